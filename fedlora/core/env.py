"""Environment variables that keep runs offline and quiet (set before flwr/ray/transformers load)."""

from __future__ import annotations

import logging
import os
import warnings

QUIET = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
}


def hub_offline() -> bool:
    """Whether hub downloads are off (``HF_HUB_OFFLINE`` set to a true value, as :func:`apply` does)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def actor_environment(offline: bool = True) -> dict[str, str]:
    """The environment a run's worker processes need on any machine: quiet, and offline when asked.

    A user's own setting of a quiet variable wins (as in :func:`apply`).
    """
    variables = {key: os.environ.get(key, value) for key, value in QUIET.items()}
    if offline:
        variables.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return variables


def apply(offline: bool = True) -> None:
    """Set the quiet defaults (user-set values win) and the hub switch."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    else:
        os.environ.pop("HF_HUB_OFFLINE", None)
        os.environ.pop("HF_DATASETS_OFFLINE", None)
    # peft 0.21 warns about an internal transformers attribute on every model wrap; not actionable.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    for name in ("alembic", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
