"""Ctrl-C and SIGTERM stop a run cleanly; a second one exits at once.

The first SIGINT (Ctrl-C, to the process or its whole group) or SIGTERM sets the run's stop event:
the round loop stops at its next safe point, never aggregates or checkpoints the round it was in
(a round interrupted by the user is not a round with failed clients), and the last complete
checkpoint stays the resume point. The second signal ends the process immediately.

Install the handlers after anything that replaces them: ``ray.init`` sets its own SIGTERM handler
in the driver, so the simulation starts Ray first (:func:`fedlora.flower.simulation.run`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import NoReturn

INTERRUPTED_EXIT = 130  # what a shell reports for a command stopped by Ctrl-C
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop(threading.Event):
    """A run's stop event; ``signal`` names the signal that set it (``None``: set by the program)."""

    def __init__(self) -> None:
        super().__init__()
        self.signal: str | None = None


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[threading.Event]:
    """Set ``stop`` on the first SIGINT or SIGTERM, exit at once on the second (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001
        if stop.is_set() and getattr(stop, "signal", None):
            os._exit(INTERRUPTED_EXIT)  # the second signal: no cleanup, at once
        if isinstance(stop, Stop):
            stop.signal = signal.Signals(signum).name
        stop.set()
        say(f"\nfedlora: {signal.Signals(signum).name} received: stopping after the step in progress (the round "
            "being trained is not kept); press Ctrl-C again to quit at once")

    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def say(text: str) -> None:
    """Print ``text`` to stderr; a stream nobody reads any more (the terminal or the parent that captured
    the output was ended by the same signal) must not turn a clean stop into an exception."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)


def exit_stopped(text: str) -> NoReturn:
    """Say ``text`` and end a stopped run's process with :data:`INTERRUPTED_EXIT`, whatever still runs.

    Called once the round loop has stopped and Ray is shut down: every file the run keeps is already
    written atomically. A thread left waiting on a client that the signal also ended (Flower's engine
    keeps non-daemon threads) must not keep the process alive at interpreter exit, so the process
    ends here, after flushing the log handlers and the standard streams.
    """
    import logging  # noqa: PLC0415

    say(text)
    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(INTERRUPTED_EXIT)


def ignore_interrupts() -> None:
    """Ignore SIGINT in this process (a simulation's client actors: the driver stops the run)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
