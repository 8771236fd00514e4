"""Ctrl-C and SIGTERM set the run's stop event; a second signal ends the process at once."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

SCRIPT = """
import os, signal, sys, time
from fedlora.serving.signals import Stop, stop_on_signals
stop = Stop()
with stop_on_signals(stop):
    os.kill(os.getpid(), signal.{first})
    time.sleep(0.2)
    print("stop set:", stop.is_set(), stop.signal, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("not reached", flush=True)
"""


def run(first: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(first=first)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_the_first_signal_asks_to_stop_and_the_second_exits_at_once() -> None:
    for first in ("SIGINT", "SIGTERM"):
        out = run(first)
        assert out.returncode == 130, out.stderr
        assert f"stop set: True {first}" in out.stdout and "not reached" not in out.stdout
        assert f"{first} received: stopping after the step in progress" in out.stderr
        assert "press Ctrl-C again to quit at once" in out.stderr


def test_handlers_are_restored_afterwards() -> None:
    import signal
    import threading

    from fedlora.serving.signals import stop_on_signals

    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals(threading.Event()):
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before


BROKEN_STDERR = """
import io, os, signal, sys, time
from fedlora.serving.signals import Stop, stop_on_signals

class Gone(io.TextIOBase):  # the parent that read our stderr was ended by the same signal
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

sys.stderr = Gone()
stop = Stop()
with stop_on_signals(stop):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
print("stop set:", stop.is_set(), stop.signal, flush=True)
"""


def test_a_signal_with_nobody_reading_stderr_still_stops_cleanly() -> None:
    out = subprocess.run([sys.executable, "-c", BROKEN_STDERR], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "stop set: True SIGTERM" in out.stdout


STUCK_THREAD = """
import threading
from fedlora.serving.signals import exit_stopped
threading.Thread(target=threading.Event().wait).start()  # non-daemon, never returns: Python would wait for it
exit_stopped("fedlora: stopped by SIGTERM; resume with: fedlora resume=x")
"""


def test_a_stopped_run_exits_although_a_thread_still_waits() -> None:
    out = subprocess.run([sys.executable, "-c", STUCK_THREAD], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 130
    assert out.stderr.strip() == "fedlora: stopped by SIGTERM; resume with: fedlora resume=x"
