"""How a run's settings reach the Flower apps.

In simulation the apps are built by factories that close over the run's
:class:`~fedlora.config.settings.Settings` (Ray pickles them with the app). Under ``flwr run``
(deployment) Flower's run config carries only flat scalars, so the whole resolved config travels as
one JSON string under the run-config key ``fedlora-config`` (see docs/deployment.md) and every app
process builds the settings from it once; node-specific values (partition, rank, data file) come
from each SuperNode's ``--node-config``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from fedlora.config.settings import Settings
from fedlora.core import env
from fedlora.federation import keys


@functools.lru_cache(maxsize=4)
def _from_json(raw: str) -> Settings:
    cfg = json.loads(raw)
    # the apps run in flwr-serverapp / flwr-clientapp processes that the SuperLink and SuperNodes start
    # with their own environment: apply the offline and quiet settings of the run here
    env.apply(offline=bool(cfg.get("offline", True)))
    return Settings.from_config(cfg)


def resolve_settings(closure: Settings | None, run_config: Mapping[str, Any]) -> Settings:
    """The run's settings: the factory's closure, else the JSON carried by ``run_config``."""
    if closure is not None:
        return closure
    raw = run_config.get(keys.CLIENT_CONFIG)
    if not raw:
        raise RuntimeError(
            f"run config has no {keys.CLIENT_CONFIG!r}: start deployments with `fedlora-deploy`, which passes "
            "the resolved config in --run-config (docs/deployment.md)"
        )
    return _from_json(str(raw))
