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

import inspect
import logging
import os
from typing import Any

from fedlora.config.settings import Settings, SimulationSettings

REQUIRED_PARAMETERS = ("num_supernodes", "exit_event", "client_app", "server_app", "backend_name",
                       "backend_config")


def engine() -> Any:
    """Return Flower's in-process simulation engine function (checked against our pin)."""
    from flwr.simulation.run_simulation import _run_simulation  # noqa: PLC0415

    missing = [p for p in REQUIRED_PARAMETERS if p not in inspect.signature(_run_simulation).parameters]
    if missing:
        raise RuntimeError(f"this flwr version's simulation engine lacks {missing}; install the pinned flwr")
    return _run_simulation


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


def run(settings: Settings) -> Any:
    """Run the federated simulation of ``settings`` (the apps close over them)."""
    from flwr.supercore.telemetry import EventType  # noqa: PLC0415

    from fedlora.flower.client_app import make_client_app  # noqa: PLC0415
    from fedlora.flower.server_app import make_server_app  # noqa: PLC0415

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    quiet_flower_console()
    return engine()(
        num_supernodes=settings.loop.num_clients, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=make_client_app(settings), server_app=make_server_app(settings), backend_name="ray",
        backend_config=backend_config(settings.simulation),
    )
