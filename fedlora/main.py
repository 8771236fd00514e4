"""The ``fedlora`` command: compose the Hydra config, validate it, run the simulation.

    fedlora                                   # the default experiment
    fedlora strategy=flora compression=compeft
    fedlora -m strategy=fedavg,flora seed=0,1 # a sweep (jobs run one after another)
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

from fedlora import env

env.apply(offline="offline=false" not in sys.argv)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fedlora.errors import ConfigError  # noqa: E402

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def prepare(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Resolve ``cfg`` to a plain dict, record the run directory, validate (raises ConfigError)."""
    from fedlora.config import validate  # noqa: PLC0415

    container: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    container["output_dir"] = str(run_dir)
    env.apply(offline=bool(container.get("offline", True)))
    validate(container)
    return container


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Validate and run one job; return its summary."""
    from fedlora.centralized import run_centralized  # noqa: PLC0415
    from fedlora.config import instantiate  # noqa: PLC0415
    from fedlora.flower import simulation  # noqa: PLC0415

    container = prepare(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(container))
    strategy = instantiate(container["strategy"])
    if getattr(strategy, "pooled", False):
        return run_centralized(container, strategy, run_dir)
    simulation.run(container)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without a summary in {run_dir}; see the log above")
    return json.loads(summary_path.read_text())


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def cli(cfg: DictConfig) -> float:
    """Hydra entry point (console script ``fedlora`` and ``python -m fedlora``)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, run_dir)
    except ConfigError as exc:
        print(f"fedlora: {exc}", file=sys.stderr)
        _mark_failed(run_dir, str(exc))
        sys.exit(2)
    except Exception:
        _mark_failed(run_dir, traceback.format_exc())
        raise
    return float(summary["final_test_accuracy"])


def _mark_failed(run_dir: Path, text: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "FAILED").write_text(text)


if __name__ == "__main__":
    cli()
