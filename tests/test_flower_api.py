"""Guards on the Flower API we depend on (the pin in requirements.txt)."""

from __future__ import annotations

import logging

from fedlora.flower import actors, simulation


def test_private_engine_has_the_parameters_we_pass() -> None:
    engine = simulation.engine()
    assert callable(engine)


def test_backend_config_from_settings() -> None:
    from fedlora.config.settings import SimulationSettings

    backend = simulation.backend_config(SimulationSettings(client_cpus=2, client_gpus=0.25, num_cpus=8, num_gpus=1))
    assert backend["client_resources"] == {"num_cpus": 2, "num_gpus": 0.25}
    assert backend["init_args"]["num_cpus"] == 8 and backend["init_args"]["num_gpus"] == 1.0
    assert "address" not in backend["init_args"]


def test_flower_console_handler_is_removed_once() -> None:
    from flwr.supercore.logger import console_handler

    simulation.quiet_flower_console()
    assert console_handler not in logging.getLogger("flwr").handlers


def test_the_stop_event_is_set_however_the_engine_ends(monkeypatch) -> None:  # noqa: ANN001
    # The ServerApp thread waits on the stop event: if the engine fails (an empty actor pool, a lost
    # cluster), the thread must not linger until connect_timeout.
    import threading

    import pytest
    from conftest import compose

    from fedlora.config.settings import Settings

    def failing_engine():  # noqa: ANN202
        def run(**kwargs):  # noqa: ANN003, ANN202
            raise RuntimeError("An error was encountered. Ending simulation.")
        return run

    monkeypatch.setattr(simulation, "start_ray", lambda settings: None)
    monkeypatch.setattr(simulation, "engine", failing_engine)
    stop = threading.Event()
    with pytest.raises(RuntimeError, match="Ending simulation"):
        simulation.run(Settings.from_config(compose([])), stop)
    assert stop.is_set()


def test_actors_get_the_runs_quiet_and_offline_environment() -> None:
    from fedlora.core import env

    variables = env.actor_environment(offline=True)
    assert variables["HF_HUB_OFFLINE"] == "1" and variables["TRANSFORMERS_VERBOSITY"] == "error"
    assert "HF_HUB_OFFLINE" not in env.actor_environment(offline=False)


def test_a_signal_ends_the_busy_client_actors_and_only_after_a_signal() -> None:
    import subprocess
    import time

    import psutil

    from fedlora.serving.signals import Stop

    # Stand-ins for Ray's worker processes, titled as Ray titles them: one in a task, one idle.
    busy = subprocess.Popen([f"{actors.ACTOR_TITLE}.run", "60"], executable="/bin/sleep")
    idle = subprocess.Popen([actors.ACTOR_TITLE, "60"], executable="/bin/sleep")
    try:
        assert {p.pid for p in actors.local_client_actors()} == {busy.pid, idle.pid}
        assert [p.pid for p in actors.local_client_actors(busy=True)] == [busy.pid]

        ended_by_itself = Stop()
        watcher = actors.end_clients_on_signal(ended_by_itself)
        ended_by_itself.set()  # set by the program, not a signal: nothing is touched
        watcher.join(timeout=5)
        assert busy.poll() is None and idle.poll() is None

        stopped = Stop()
        watcher = actors.end_clients_on_signal(stopped)
        stopped.signal = "SIGINT"
        started = time.monotonic()
        stopped.set()
        watcher.join(timeout=10)
        # SIGTERM ended it (the watcher reaped it well before its 5 s SIGKILL fallback)
        assert not watcher.is_alive() and time.monotonic() - started < 4
        assert busy.wait(timeout=1) is not None and not psutil.pid_exists(busy.pid)
        assert idle.poll() is None
        assert logging.getLogger("flwr").level > logging.CRITICAL
    finally:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        for proc in (busy, idle):
            proc.kill()
            proc.wait()


def test_a_title_that_reads_empty_for_a_moment_is_read_again() -> None:
    # /proc/<pid>/cmdline reads empty for a moment while a process execs or retitles (CI's run of
    # 2026-12-03 missed both stand-ins of the test above at once)
    class Flickering:
        def __init__(self, empty_reads: int) -> None:
            self.reads = [[]] * empty_reads + [[actors.ACTOR_TITLE, "60"]]

        def cmdline(self) -> list[str]:
            return self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]

    assert actors._title(Flickering(3)) == actors.ACTOR_TITLE
    assert actors._title(Flickering(50), attempts=5) == ""


def test_an_address_where_no_cluster_listens_is_refused_at_once() -> None:
    import socket
    import time

    import pytest
    import ray
    from conftest import compose

    from fedlora.config.settings import Settings
    from fedlora.core.errors import RunError

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert simulation.cluster_unreachable(f"127.0.0.1:{port}") == ""
        assert simulation.cluster_unreachable(f"ray://127.0.0.1:{port}") == ""
    # the port is closed now: nothing listens there
    settings = Settings.from_config(compose([f"simulation.address=127.0.0.1:{port}"]))
    started = time.monotonic()
    with pytest.raises(RunError, match=rf"simulation.address='127.0.0.1:{port}': no Ray cluster answers there "
                                       r"\(connecting to 127.0.0.1:\d+: Connection refused\); start one"):
        simulation.start_ray(settings)
    assert time.monotonic() - started < 10 and not ray.is_initialized()
    assert simulation.cluster_unreachable("auto") == ""  # not host:port: left to Ray


def test_flower_client_tracebacks_stay_off_the_console_but_in_the_log_file(tmp_path) -> None:  # noqa: ANN001
    import io

    console, log_file = logging.StreamHandler(io.StringIO()), logging.FileHandler(tmp_path / "main.log")
    root = logging.getLogger()
    root.addHandler(console)
    root.addHandler(log_file)
    try:
        simulation.quiet_flower_console()
        simulation.quiet_flower_console()  # twice: one filter
        assert sum(isinstance(f, simulation.TracebacksToLogFile) for f in console.filters) == 1
        assert not log_file.filters
        flwr = logging.getLogger("flwr")
        flwr.error('Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom')
        flwr.error('ray::ClientAppActor.run() (pid=1)\n  File "client.py", line 119, in train_round\nInjectedFault')
        flwr.error("An error was encountered. Ending simulation.")
        logging.getLogger("fedlora").error('Traceback (most recent call last):\n  File "ours.py"')
        log_file.flush()
        shown, kept = console.stream.getvalue(), (tmp_path / "main.log").read_text()
        assert "ValueError: boom" not in shown and "InjectedFault" not in shown
        assert "Ending simulation" in shown and "ours.py" in shown
        assert "ValueError: boom" in kept and "InjectedFault" in kept
    finally:
        root.removeHandler(console)
        root.removeHandler(log_file)
        log_file.close()


def test_the_installed_flower_is_the_pinned_one() -> None:
    # The engine guard above checks a private signature against what this pin was verified with;
    # a different flwr installed beside it would make that guard, and every test here, say nothing.
    import re
    from pathlib import Path

    import flwr

    requirements = (Path(__file__).parent.parent / "requirements.txt").read_text()
    pin = re.search(r"^flwr\[simulation\]==(\S+)$", requirements, re.M)
    assert pin is not None and flwr.__version__ == pin.group(1), (flwr.__version__, pin)


def test_the_engine_registers_nodes_where_recording_nodes_looks() -> None:
    # recording_nodes wraps this private function to learn which node holds which partition.
    import inspect

    from flwr.server.superlink.fleet.vce import vce_api

    from fedlora.flower.grid import NodeDirectory

    assert list(inspect.signature(vce_api._register_nodes).parameters) == ["num_nodes", "state_factory"]
    directory = NodeDirectory()
    original = vce_api._register_nodes
    with simulation.recording_nodes(directory):
        assert vce_api._register_nodes is not original
    assert vce_api._register_nodes is original


def test_what_fedlora_superexec_changes_in_flower_is_where_it_looks() -> None:
    # fedlora/flower/superexec.py replaces run_superexec's executor factory for the subprocess
    # executor and, in its standby processes, the back-off defaults of the message pull
    import inspect

    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.superexec import run_superexec
    from flwr.supernode.runtime import run_clientapp

    assert list(inspect.signature(run_superexec.get_executor).parameters)[0] == "executor_type"
    assert ExecutorType.SUBPROCESS in set(ExecutorType)
    assert run_clientapp.pull_and_inflate_object_from_tree is pull_and_inflate_object_from_tree
    defaults = pull_and_inflate_object_from_tree.__kwdefaults__
    assert (defaults["initial_backoff"], defaults["backoff_cap"]) == (1, 10)  # Flower's, 1.42
