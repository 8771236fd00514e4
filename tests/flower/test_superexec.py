"""fedlora-superexec: Flower's SuperExec with a standby ``flwr-clientapp`` process (fedlora/flower/superexec.py).

The deployment tests (tests/integration/test_deploy.py) run every SuperNode with it; these check
the pieces with real processes: the command a standby gets is the one Flower's own executor runs,
a task reaches the standby and a new standby takes its place, a dead standby or another task type
is launched as Flower launches it, and a standby imports no fedlora code (the ClientApp must come
from the run's FAB) and shortens only Flower's pull back-off.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import subprocess_executor
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec

from fedlora.flower import superexec

ROOT = Path(__file__).resolve().parents[2]


def spec(task_type: TaskType = TaskType.CLIENT_APP, **changes: object) -> ExecutionSpec:
    fields: dict = {"task_type": task_type, "runtime_api_address": "127.0.0.1:9094", "token": "tok-1",
                    "insecure": True, "root_certificates_path": None, "runtime_dependency_install": False,
                    "parent_pid": 4321, "suppress_output": False, "task_id": 7}
    return ExecutionSpec(**{**fields, **changes})


@pytest.mark.parametrize("changes", [
    {},
    {"insecure": False, "root_certificates_path": "/certs/ca.crt"},
    {"parent_pid": None, "runtime_dependency_install": True},
    {"insecure": False, "root_certificates_path": None, "suppress_output": True},
])
def test_a_standby_gets_the_command_flowers_executor_runs(changes: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[list[str]] = []

    class Recorder:
        def __init__(self, args: list[str], **kwargs: object) -> None:
            started.append(args)

    monkeypatch.setattr(subprocess_executor.subprocess, "Popen", Recorder)
    SubprocessExecutor().launch(spec(**changes))
    assert started == [superexec.task_command(spec(**changes))]


def _executor_with(code: str, monkeypatch: pytest.MonkeyPatch) -> superexec.StandbyExecutor:
    monkeypatch.setattr(superexec, "STANDBY", code)
    return superexec.StandbyExecutor()


def test_a_task_goes_to_the_standby_and_a_new_one_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a standby that writes what it was given (one file per process) instead of running it
    code = f"import os, sys; open(os.path.join({str(tmp_path)!r}, str(os.getpid())), 'w').write(sys.stdin.readline())"
    executor = _executor_with(code, monkeypatch)
    try:
        first = executor._standby
        assert first is not None and first.poll() is None  # started before any task
        result = executor.launch(spec(suppress_output=True))
        assert result.status == "accepted"
        assert first.wait(timeout=30) == 0
        line = (tmp_path / str(first.pid)).read_text()
        assert json.loads(line) == [*superexec.task_command(spec()), "--fedlora-quiet"]
        second = executor._standby
        assert second is not None and second.pid != first.pid and second.poll() is None
    finally:
        executor.close()
    assert second.poll() is not None and executor._standby is None  # close() stops the waiting one


def test_a_dead_standby_or_another_task_type_is_launched_as_flower_does(monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[ExecutionSpec] = []
    monkeypatch.setattr(SubprocessExecutor, "launch", lambda self, s: launched.append(s) or "flower")
    executor = _executor_with("import sys; sys.stdin.readline()", monkeypatch)
    try:
        standby = executor._standby
        assert standby is not None
        assert executor.launch(spec(TaskType.SERVER_APP)) == "flower" and executor._standby is standby
        standby.kill()
        standby.wait(timeout=30)
        assert executor.launch(spec()) == "flower"  # the standby was gone
        assert launched == [spec(TaskType.SERVER_APP), spec()]
        assert executor._standby is not None and executor._standby.poll() is None  # a new one waits
    finally:
        executor.close()


def test_the_standby_runs_flowers_clientapp_and_imports_no_fedlora() -> None:
    # from the repository root, where a checkout of fedlora could shadow the run's FAB
    with_help = subprocess.run([sys.executable, "-c", superexec.STANDBY], input='["flwr-clientapp", "--help"]\n',
                               capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert with_help.returncode == 0 and "usage: flwr-clientapp" in with_help.stdout, with_help.stderr
    probe = (superexec.STANDBY + "\nimport json\nprint(json.dumps({'fedlora': sorted(m for m in sys.modules if "
             "m.split('.')[0] in ('fedlora', 'strategies')), 'path0': sys.path[0], 'backoff': {k: v for k, v in "
             "pull_and_inflate_object_from_tree.__kwdefaults__.items() if 'backoff' in k}}))")
    waited = time.monotonic()
    nothing = subprocess.run([sys.executable, "-c", probe], input="", capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
    assert nothing.returncode == 0, nothing.stderr  # no command (the SuperExec stopped): nothing runs
    seen = json.loads(nothing.stdout.splitlines()[-1])
    assert seen["fedlora"] == [] and seen["path0"] == str(Path(sys.executable).parent)
    assert seen["backoff"]["initial_backoff"] == superexec.BACKOFF[0]
    assert seen["backoff"]["backoff_cap"] == superexec.BACKOFF[1]
    assert time.monotonic() - waited < 120


def test_fedlora_supernode_connects_its_superexec_to_the_nodes_runtime_api() -> None:
    from fedlora.cli import supernode

    base = ["--insecure", "--superlink", "10.0.0.1:9092", "--node-config", "partition-id=0"]
    assert supernode.supernode_command(base)[1:] == [*base, "--isolation", "process"]
    assert supernode.superexec_command(base, 7)[1:] == ["--runtime-api-address", "127.0.0.1:9094",
                                                        "--parent-pid", "7", "--insecure"]
    listening = [*base, "--host", "0.0.0.0", "--port", "9200", "--ssl-certfile", "rt.crt", "--ssl-keyfile", "rt.key",
                 "--ssl-ca-certfile", "ca.crt", "--superexec-auth-secret-file", "s.bin"]
    assert supernode.superexec_command(listening, 7)[1:] == [
        "--runtime-api-address", "127.0.0.1:9200", "--parent-pid", "7", "--root-certificates", "ca.crt",
        "--superexec-auth-secret-file", "s.bin"]


@pytest.mark.parametrize(("args", "named"), [
    (["--isolation", "subprocess"], "--isolation subprocess"),
    (["--ssl-certfile", "rt.crt", "--ssl-keyfile", "rt.key"], "--ssl-certfile rt.crt"),
    (["--port", "94a"], "--port 94a"),
])
def test_fedlora_supernode_refuses_what_it_cannot_run_before_starting_anything(
        args: list[str], named: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from fedlora.cli import supernode

    monkeypatch.setattr(supernode.subprocess, "Popen", lambda *a, **k: pytest.fail("started a process"))
    assert supernode.main(["--insecure", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedlora-supernode: {named}:")
    assert "leave --isolation out" in err or "add --ssl-ca" in err or "e.g. --port 9094" in err


@pytest.mark.slow
@pytest.mark.parametrize("when", ["up", "starting"])
def test_ctrl_c_stops_fedlora_supernode_its_superexec_and_standby_quietly(when: str, tmp_path: Path) -> None:
    # A terminal's Ctrl-C reaches the whole process group: the SuperNode (here without a SuperLink:
    # it keeps trying to connect), fedlora-superexec and its waiting standby must all end, with no
    # traceback and no SuperExec restarted; also while Flower's SuperNode is still starting (there
    # a SIGINT used to raise KeyboardInterrupt in its start-up and leave it hanging).
    import os
    import signal
    import socket

    import psutil

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path / "node.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "fedlora-supernode"), "--insecure", "--superlink",
                             "127.0.0.1:9", "--node-config", "partition-id=0", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "FLWR_HOME": str(tmp_path / "home")})
    try:
        deadline = time.monotonic() + 120
        while True:  # until the SuperNode's Runtime API listens and the standby waits
            family = psutil.Process(proc.pid).children(recursive=True)
            with socket.socket() as probe:
                listening = probe.connect_ex(("127.0.0.1", port)) == 0
            if when == "up" and listening and any("-c" in p.cmdline() for p in family if p.is_running()):
                break
            if when == "starting" and any("flower-supernode" in " ".join(p.cmdline()) for p in family):
                time.sleep(1.0)  # Flower is importing or starting its HTTP API
                break
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "node.log").read_text()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) in (0, 130, -signal.SIGINT), (tmp_path / "node.log").read_text()
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert alive == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    out = (tmp_path / "node.log").read_text()
    assert "Traceback" not in out and "starting a new one" not in out, out
