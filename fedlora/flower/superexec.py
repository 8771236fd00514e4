"""``fedlora-superexec``: Flower's SuperExec with a ``flwr-clientapp`` process ready before each message.

A SuperNode started with ``--isolation process`` leaves its ClientApp processes to a SuperExec
that the operator starts (Flower's process isolation mode). Flower's own ``flower-superexec``
starts a fresh ``flwr-clientapp`` for every task, which then spends about a second importing
Flower before it asks for its message, and it looks for tasks once a second. This command is
Flower's SuperExec, unchanged, with two differences:

* the executor keeps **one standby process** that has already imported ``flwr-clientapp``'s code
  and waits for its command line on standard input; a task goes to the standby (which then is
  exactly the process ``flwr-clientapp --token ...`` would have been: it serves one task and
  exits) and a new standby starts at once for the next task. A standby that died, or a task type
  other than ClientApp, is launched as Flower launches it;
* the task poll interval defaults to 0.1 s (Flower's ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``; set
  it to override).

Nothing of the run lives in the standby before its task: it has imported library code only (no
app code: the ClientApp module still comes from the run's FAB), so what a message computes does
not depend on whether a standby or a fresh process answered it.

    flower-supernode --isolation process --port 9094 ...
    fedlora-superexec --runtime-api-address 127.0.0.1:9094 --insecure [--parent-pid <supernode pid>]

``fedlora-supernode`` (fedlora/cli/supernode.py) runs both, and restarts this one if it exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from logging import INFO, WARNING
from typing import Any, cast

from flwr.supercore import log
from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, ExecutorType, TaskType
from flwr.supercore.superexec import run_superexec as flower_run_superexec
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, Executor, LaunchResult

POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
DEFAULT_POLL_INTERVAL = "0.1"
_QUIET = "--fedlora-quiet"  # a standby's own flag: send this task's output to /dev/null
# A standby asks for its message within milliseconds of the task, often before the SuperNode has
# received all of it from the SuperLink; Flower's pull then waits 1 s before it asks again (its
# initial back-off, made for a process that needed a second to import). A standby retries after
# 20 ms, then every 40 to 50 ms: a local request to the SuperNode's Runtime API.
BACKOFF = (0.02, 0.05)


def task_command(spec: ExecutionSpec) -> list[str]:
    """The command line Flower's subprocess executor runs for ``spec``."""
    args = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


class StandbyExecutor(SubprocessExecutor):
    """Flower's subprocess executor, with a pre-started ``flwr-clientapp`` process for ClientApp tasks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._standby: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._start_standby()

    def _start_standby(self) -> None:
        try:
            self._standby = subprocess.Popen([sys.executable, "-c", STANDBY], stdin=subprocess.PIPE)  # noqa: S603
        except OSError as err:
            log(WARNING, "fedlora-superexec: no standby process (%s); ClientApps start as Flower starts them", err)
            self._standby = None

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Hand a ClientApp task to the standby (and start the next one); anything else as Flower does."""
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        with self._lock:
            standby, self._standby = self._standby, None
            if standby is not None and standby.poll() is None and standby.stdin is not None:
                line = json.dumps(task_command(spec) + ([_QUIET] if spec.suppress_output else []))
                try:
                    standby.stdin.write(line.encode() + b"\n")
                    standby.stdin.close()
                except OSError:
                    standby = None
            else:
                standby = None
            if not self._closed:
                self._start_standby()
        if standby is None:
            log(INFO, "fedlora-superexec: the standby was gone; this ClientApp starts as Flower starts it")
            return super().launch(spec)
        return LaunchResult.accepted()

    def close(self) -> None:
        """Stop the waiting standby (a task already handed over runs to its end, as in Flower)."""
        with self._lock:
            self._closed = True
            standby, self._standby = self._standby, None
        if standby is not None and standby.poll() is None:
            standby.kill()
            standby.wait()


# The standby runs as ``python -c STANDBY``, not as a module of this package: Flower loads the
# ClientApp from the run's FAB only if no module of that name is imported yet, so the standby must
# not have imported ``fedlora`` (nor have the working directory on its path, where a checkout of it
# may be). Its path starts as the ``flwr-clientapp`` script's would: with the interpreter's folder.
STANDBY = f"""
import json, os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the SuperExec, which ends the wait
sys.path[0] = os.path.dirname(sys.executable)
from flwr.supernode.cli import flwr_clientapp
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
import numpy
pull_and_inflate_object_from_tree.__kwdefaults__.update(initial_backoff={BACKOFF[0]}, backoff_cap={BACKOFF[1]})
line = sys.stdin.readline()
if line.strip():
    argv = json.loads(line)
    if {_QUIET!r} in argv:
        argv.remove({_QUIET!r})
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    sys.argv = argv
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on: flwr-clientapp's own
    sys.exit(flwr_clientapp())
"""


def _executor(executor_type: ExecutorType, *args: Any, **kwargs: Any) -> Executor:
    if executor_type == ExecutorType.SUBPROCESS:
        return StandbyExecutor()
    return cast("Executor", _FLOWER_GET_EXECUTOR(executor_type, *args, **kwargs))


# run_superexec calls the executor factory by this module-level name: replaced in main()
_FLOWER_GET_EXECUTOR = getattr(flower_run_superexec, "get_executor")  # noqa: B009 - not re-exported


def main() -> None:
    """``fedlora-superexec``: the arguments of ``flower-superexec``."""
    from flwr.supercore.cli.flower_superexec import flower_superexec  # noqa: PLC0415

    os.environ.setdefault(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL)
    setattr(flower_run_superexec, "get_executor", _executor)  # noqa: B010
    flower_superexec()


if __name__ == "__main__":
    main()
