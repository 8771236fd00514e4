"""The ``fedlora`` command: compose the Hydra config, validate it, run the simulation.

    fedlora                                   # the default experiment
    fedlora strategy=flora compression=compeft
    fedlora -m strategy=fedavg,flora seed=0,1 # a sweep (jobs run one after another)
    fedlora resume=runs/<run>                 # continue a killed run from its last checkpoint
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

from fedlora.core import env

env.apply(offline="offline=false" not in sys.argv)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fedlora.config import CONF_DIR  # noqa: E402
from fedlora.core.errors import ConfigError  # noqa: E402


def resume_arguments(argv: list[str]) -> list[str]:
    """Point Hydra's run directory at the run being resumed, so that no new directory appears.

    ``fedlora resume=runs/<run>`` becomes ``... hydra.run.dir=runs/<run> hydra.output_subdir=null``
    (the original ``.hydra/`` stays as it was). Other arguments are returned unchanged.
    """
    values = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not values or not (Path(values[-1]) / "config.yaml").is_file() \
            or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv  # nothing to resume, or a bad path that validate() will name
    return [*argv, f"hydra.run.dir={values[-1]}", "hydra.output_subdir=null"]


def _resumed(container: dict[str, Any]) -> dict[str, Any]:
    """The config of the run named by ``resume`` (its own config.yaml), set to continue in place."""
    path = Path(str(container["resume"]))
    if not (path / "config.yaml").is_file():
        return container  # validate() names the problem
    saved: dict[str, Any] = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))  # type: ignore[assignment]
    saved["resume"] = str(path)
    saved["output_dir"] = str(path)
    return saved


def prepare(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Resolve ``cfg`` to a plain dict, record the run directory, validate (raises ConfigError).

    With ``resume=<run>`` the config is that run's ``config.yaml``: other overrides are ignored
    (a resumed run must be the same run to end with the same result).
    """
    from fedlora.config.validate import validate  # noqa: PLC0415

    container: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    container["output_dir"] = str(run_dir)
    if container.get("resume"):
        container = _resumed(container)
    env.apply(offline=bool(container.get("offline", True)))
    validate(container)
    return container


def simulate(settings: Any) -> dict[str, Any]:
    """Run a federation on Flower's simulation engine (Ray) in this process; return its summary."""
    from fedlora.flower import simulation  # noqa: PLC0415

    simulation.run(settings)
    summary_path = settings.run_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without a summary in {settings.run_dir}; see the log above")
    return dict(json.loads(summary_path.read_text()))


def run_pooled(settings: Any) -> dict[str, Any]:
    """Run the centralized bound (one pooled learner, no Flower); return its summary."""
    from fedlora.serving.run import run_pooled as pooled  # noqa: PLC0415

    return pooled(settings)


#: How each ``transport`` runs a job in this process (``fedlora-deploy`` serves ``flower`` on a SuperLink).
RUNNERS = {"flower": simulate, "pooled": run_pooled}


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Validate and run one job; return its summary."""
    from fedlora.config.settings import Settings  # noqa: PLC0415

    container = prepare(cfg, run_dir)
    run_dir = Path(container["output_dir"])  # the resumed run's directory when resuming
    run_dir.mkdir(parents=True, exist_ok=True)
    if container.get("resume"):
        (run_dir / "FAILED").unlink(missing_ok=True)
        ignored = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "hydra."))]
        if ignored:
            print(f"fedlora: resuming {run_dir} with its own config.yaml; ignoring {ignored}", file=sys.stderr)
    else:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(container))
    settings = Settings.from_config(container)
    return RUNNERS[settings.transport](settings)


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """Hydra entry point: run one job and return its final task metric (for sweepers).

    That is test accuracy for classification (maximise it) and held-out perplexity for
    causal_lm (minimise it); ``summary.json`` names it under ``primary_metric``.
    """
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
    return float(summary[f"final_{summary.get('primary_metric', 'test_accuracy')}"])


def _mark_failed(run_dir: Path, text: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "FAILED").write_text(text)


def cli() -> None:
    """The console script ``fedlora`` and ``python -m fedlora``."""
    sys.argv[1:] = resume_arguments(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    cli()
