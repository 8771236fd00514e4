"""Flower's client actors in a local Ray: how the driver finds them and how they take a stop.

Used by the simulation driver (:mod:`fedlora.flower.simulation`) and inside each actor
(:mod:`fedlora.flower.client_app`); it imports neither.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any

from fedlora.serving.signals import ignore_interrupts

ACTOR_TITLE = "ray::ClientAppActor"  # the process title Ray gives Flower's client actors


def local_client_actors(busy: bool = False) -> list[Any]:
    """This process's descendant Ray workers that host Flower's client actors (``busy``: in a task).

    Ray titles a worker process ``ray::<actor class>`` and, while it runs a method,
    ``ray::<actor class>.<method>()``.
    """
    import psutil  # noqa: PLC0415

    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            title = " ".join(proc.cmdline()[:1])
            if title.startswith(ACTOR_TITLE) and (not busy or title.startswith(ACTOR_TITLE + ".")):
                found.append(proc)
    return found


def prepare_actor() -> None:
    """In a client actor: Ctrl-C is the driver's to handle, SIGTERM ends the actor as intended.

    The driver (:func:`end_clients_on_signal`) sends SIGTERM to the actors busy in a stopped round;
    ``ray.actor.exit_actor`` makes that an intended exit, which Ray does not report as a crash.
    """
    import ray  # noqa: PLC0415

    if threading.current_thread() is not threading.main_thread():
        return
    ignore_interrupts()

    def leave(signum: int, frame: Any) -> None:  # noqa: ARG001
        ray.actor.exit_actor()

    signal.signal(signal.SIGTERM, leave)


def end_clients_on_signal(stop: threading.Event) -> threading.Thread:
    """Once a signal sets ``stop``, end the busy client actors of a local Ray at once.

    Flower's engine waits for every client task in flight before it returns, which can be a whole
    round of training; a stopped round is never kept (the resume point is the last checkpoint, and
    clients write their state atomically), so its work is ended instead: SIGTERM, which the actors
    turn into an intended exit (:func:`prepare_actor`), then SIGKILL for any still there after 5 s.
    Flower reports the ended tasks as errors; nobody waits for them, so its log is silenced first.
    On a Ray cluster (``simulation.address``) the actors are not this process's children: the
    command waits for their current task.
    """
    import psutil  # noqa: PLC0415

    def watch() -> None:
        stop.wait()
        if not getattr(stop, "signal", None):
            return  # the run ended by itself
        logging.getLogger("flwr").setLevel(logging.CRITICAL + 1)
        busy = local_client_actors(busy=True)
        for proc in busy:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        for proc in psutil.wait_procs(busy, timeout=5)[1]:
            with contextlib.suppress(psutil.Error):
                proc.kill()

    watcher = threading.Thread(target=watch, name="fedlora-end-clients", daemon=True)
    watcher.start()
    return watcher
