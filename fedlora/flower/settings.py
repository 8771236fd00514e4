"""How the resolved config reaches the apps.

In simulation the apps are built by factories that close over the resolved config (a plain
dict; Ray pickles it with the app). Under ``flwr run`` (deployment) Flower's run config carries
only flat scalars, so the whole resolved config travels as one JSON string under the run-config
key ``fedlora-config`` (see docs/deployment.md); node-specific values (partition, rank, data
file) come from each SuperNode's ``--node-config``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fedlora.core import env
from fedlora.federation import keys


def resolve_config(closure: Mapping[str, Any] | None, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Return the run's config: the factory's closure, else the JSON carried by ``run_config``.

    In a deployment the apps run in ``flwr-serverapp`` / ``flwr-clientapp`` processes that the
    SuperLink and SuperNodes start with their own environment, so the offline and quiet
    settings (:mod:`fedlora.core.env`) are applied here, from the run's ``offline`` setting.
    """
    if closure is not None:
        return dict(closure)
    raw = run_config.get(keys.CLIENT_CONFIG)
    if not raw:
        raise RuntimeError(
            f"run config has no {keys.CLIENT_CONFIG!r}: start deployments with `fedlora-deploy`, which passes "
            "the resolved config in --run-config (docs/deployment.md)"
        )
    cfg = json.loads(str(raw))
    env.apply(offline=bool(cfg.get("offline", True)))
    return cfg
