"""Guards on the Flower API we depend on (the pin in requirements.txt)."""

from __future__ import annotations

import logging

from fedlora.flower import simulation


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
