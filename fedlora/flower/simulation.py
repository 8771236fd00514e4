"""Launch a simulation on Flower's Ray backend, in this process.

Decision: we call Flower's simulation engine directly (``flwr.simulation.run_simulation``'s
engine, ``_run_simulation``) instead of the deprecated public ``run_simulation`` wrapper (which
logs a deprecation warning on every call) or ``flwr run`` (which starts a detached SuperLink and
SuperExec that outlive the command and passes config only as flat strings). In-process we keep:
the run's settings handed to the apps as a Python object, Ray resources from the config,
Hydra sweeps running one job after another in one process, and exceptions that reach the
caller. The price is a private function: Flower is pinned (pyproject.toml) and
``tests/test_flower_api.py`` fails loudly if its signature changes. The same ServerApp and
ClientApp run unchanged under ``flwr run`` in a deployment (docs/deployment.md).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from fedlora.config.settings import Settings, SimulationSettings
from fedlora.core import env
from fedlora.core.errors import RunError
from fedlora.flower.actors import PLACEMENT_VARIABLE, end_clients_on_signal
from fedlora.flower.grid import NodeDirectory
from fedlora.serving.signals import stop_on_signals

REQUIRED_PARAMETERS = ("num_supernodes", "exit_event", "client_app", "server_app", "backend_name",
                       "backend_config")


def engine() -> Any:
    """Return Flower's in-process simulation engine function (checked against our pin)."""
    from flwr.simulation.run_simulation import _run_simulation  # noqa: PLC0415

    missing = [p for p in REQUIRED_PARAMETERS if p not in inspect.signature(_run_simulation).parameters]
    if missing:
        raise RuntimeError(f"this flwr version's simulation engine lacks {missing}; install the pinned flwr")
    return _run_simulation


@contextlib.contextmanager
def recording_nodes(directory: NodeDirectory) -> Iterator[None]:
    """Have the engine tell ``directory`` which node holds which partition when it registers them.

    Flower's engine maps node ids to partition ids in ``vce_api._register_nodes`` and keeps the map
    to itself; the ServerApp would otherwise have to ask every node (bench/README.md, item 6: minutes
    at 10,000 nodes). A private function, as :func:`engine` is: ``tests/test_flower_api.py`` checks it.
    """
    from flwr.server.superlink.fleet.vce import vce_api  # noqa: PLC0415

    original = vce_api._register_nodes  # noqa: SLF001

    def register(*args: Any, **kwargs: Any) -> Any:
        mapping = original(*args, **kwargs)
        directory.publish(mapping)
        return mapping

    vce_api._register_nodes = register  # noqa: SLF001
    try:
        yield
    finally:
        vce_api._register_nodes = original  # noqa: SLF001


def backend_config(sim: SimulationSettings) -> dict[str, Any]:
    """Ray backend settings: per-client CPUs/GPUs and ray.init arguments."""
    resources = {"num_cpus": sim.client_cpus, "num_gpus": sim.client_gpus}
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": sim.log_to_driver,
                                 "include_dashboard": False}
    if sim.num_cpus:
        init_args["num_cpus"] = int(sim.num_cpus)
    if sim.num_gpus is not None:
        init_args["num_gpus"] = float(sim.num_gpus)
    if sim.address:
        init_args["address"] = str(sim.address)
    return {"client_resources": resources, "init_args": init_args}


def quiet_flower_console() -> None:
    """Drop Flower's own console handler (Hydra's handler already prints flwr's records once)."""
    from flwr.supercore.logger import console_handler  # noqa: PLC0415

    logger = logging.getLogger("flwr")
    logger.removeHandler(console_handler)
    logger.setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and not any(isinstance(f, TracebacksToLogFile)
                                                                for f in handler.filters):
            handler.addFilter(TracebacksToLogFile())


class TracebacksToLogFile(logging.Filter):
    """Keep Flower's tracebacks of a client's failure off the console (the job's log file keeps them).

    The round's line and ``metrics.jsonl`` already say which client failed and why; the remote
    traceback Flower logs with it is for whoever debugs the client.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("flwr") or record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        return record.exc_info is None and "Traceback (most recent call last)" not in text and '  File "' not in text


def start_ray(settings: Settings) -> None:
    """Start a local Ray instance (or join ``simulation.address``) before Flower's engine would.

    Three reasons to do it ourselves (Flower's backend keeps a Ray that is already running):

    * without an address a fresh local instance starts (``address="local"``): never a cluster that
      ``RAY_ADDRESS`` or a stale state file of a killed ``ray start`` happens to name;
    * the actors get the run's quiet and offline environment on every node of a cluster
      (``runtime_env``), not only those this process forked;
    * ``ray.init`` replaces the driver's SIGTERM handler: ours are installed after it.
    """
    import ray  # noqa: PLC0415

    init = backend_config(settings.simulation)["init_args"]
    address = init.pop("address", None) or "local"
    # Ray subprocesses inherit the environment, not this driver's sys.path (as Flower's backend does)
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, **env.actor_environment(settings.offline),
                                **placement_report(settings)}}
    unreachable = "" if address in ("local", "auto") else cluster_unreachable(address)
    try:
        if unreachable:
            raise ConnectionError(unreachable)
        ray.init(address=address, runtime_env=runtime_env, **init)
    except ConnectionError as exc:
        raise RunError(f"simulation.address={address!r}: no Ray cluster answers there ({exc}); start one "
                           "(`ray start --head`) or leave simulation.address unset to start a local one") from exc


def placement_report(settings: Settings) -> dict[str, str]:
    """Actor environment that makes each client actor say once where it runs (:func:`actors.placement_line`).

    Asked for on a Ray cluster and when clients take GPUs, where placement is a question; a local CPU
    run stays as quiet as before.
    """
    sim = settings.simulation
    if not sim.address and not sim.client_gpus:
        return {}
    return {PLACEMENT_VARIABLE: settings.model.device}


def cluster_unreachable(address: str, timeout: float = 5.0) -> str:
    """Why nothing listens at a Ray ``host:port`` address (``ray://`` included), or ``""``.

    ``ray.init`` retries an address where nothing listens for minutes; a TCP connection says at once.
    """
    import socket  # noqa: PLC0415

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return ""  # not host:port: Ray's own parsing says what is wrong
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return ""
    except OSError as exc:
        return f"connecting to {host}:{port}: {exc.strerror or exc}"


def run(settings: Settings, stop: threading.Event | None = None) -> Any:
    """Run the federated simulation of ``settings`` (the apps close over them).

    ``stop`` (set on Ctrl-C or SIGTERM here, and whatever way the engine ends) stops the round loop
    at its next safe point; the ServerApp thread never outlives the engine.
    """
    import ray  # noqa: PLC0415
    from flwr.supercore.telemetry import EventType  # noqa: PLC0415

    from fedlora.flower.client_app import make_client_app  # noqa: PLC0415
    from fedlora.flower.server_app import make_server_app  # noqa: PLC0415

    stop = stop or threading.Event()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    quiet_flower_console()
    start_ray(settings)
    try:
        directory = NodeDirectory()
        with stop_on_signals(stop), recording_nodes(directory):
            end_clients_on_signal(stop)
            return engine()(
                num_supernodes=settings.loop.num_clients, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=make_client_app(settings), server_app=make_server_app(settings, stop, directory),
                backend_name="ray", backend_config=backend_config(settings.simulation),
            )
    finally:
        stop.set()
        if ray.is_initialized():
            ray.shutdown()
