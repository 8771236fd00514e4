"""Flower's client actors in a local Ray: how the driver finds them and how they take a stop.

Used by the simulation driver (:mod:`fedlora.flower.simulation`) and inside each actor
(:mod:`fedlora.flower.client_app`); it imports neither.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from fedlora.serving.signals import ignore_interrupts

ACTOR_TITLE = "ray::ClientAppActor"  # the process title Ray gives Flower's client actors
# Set by the driver in the actors' environment (the run's model.device) when each actor should say
# once where it runs: on a Ray cluster (simulation.address) and when clients take GPUs.
PLACEMENT_VARIABLE = "FEDLORA_REPORT_PLACEMENT"
PLACEMENT_PREFIX = "fedlora client actor"
_prepared: list[int] = []  # this process's pid once it has been prepared as an actor


def local_client_actors(busy: bool = False) -> list[Any]:
    """This process's descendant Ray workers that host Flower's client actors (``busy``: in a task).

    Ray titles a worker process ``ray::<actor class>`` and, while it runs a method,
    ``ray::<actor class>.<method>()``.
    """
    import psutil  # noqa: PLC0415

    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            title = _title(proc)
            if title.startswith(ACTOR_TITLE) and (not busy or title.startswith(ACTOR_TITLE + ".")):
                found.append(proc)
    return found


def _title(proc: Any, attempts: int = 20) -> str:
    """A process's title, read again while it reads empty.

    /proc/<pid>/cmdline reads empty for a moment while a process execs or retitles itself (Ray
    retitles an actor at each method it starts and ends): rarely, but CI's run of 2026-12-03 missed
    both of a test's stand-in actors at once because of it.
    """
    for _ in range(attempts):
        title = " ".join(proc.cmdline()[:1])
        if title:
            return title
        time.sleep(0.005)
    return ""


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
    if os.getpid() not in _prepared:
        _prepared.append(os.getpid())
        logging.getLogger("flwr").addFilter(DropTerminationNotice())
        device = os.environ.get(PLACEMENT_VARIABLE)
        if device:
            print(placement_line(device), file=sys.stderr, flush=True)


class DropTerminationNotice(logging.Filter):
    """Drop Flower's "Manually terminating ClientAppActor" warning: every actor logs it at the end of a run.

    On a cluster Ray forwards it to the driver's console (a local Ray is shut down before it arrives);
    it reports nothing wrong.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Manually terminating")


def placement_line(device_setting: str = "auto") -> str:
    """Where this Ray actor runs: pid, node, the GPUs Ray gave it, torch threads, the device it trains on.

    Called inside an actor; the device is what ``model.device=device_setting`` picks here (a GPU that
    torch cannot use makes :func:`fedlora.runtime.models.pick_device` say so on a line of its own).
    """
    import ray  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from fedlora.runtime.models import pick_device  # noqa: PLC0415

    context = ray.get_runtime_context()
    device = pick_device(device_setting)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gpus = [str(g) for g in ray.get_gpu_ids()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"{PLACEMENT_PREFIX} pid {os.getpid()} on node {context.get_node_id()} "
            f"({ray.util.get_node_ip_address()}): GPU ids [{', '.join(gpus)}] "
            f"(CUDA_VISIBLE_DEVICES={visible if visible is not None else 'unset'}), "
            f"{torch.get_num_threads()} torch threads -> device {device}")


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
