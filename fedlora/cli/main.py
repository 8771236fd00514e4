"""The ``fedlora`` command: compose the Hydra config, validate it, run the simulation.

    fedlora                                   # the default experiment
    fedlora strategy=flora compression=compeft
    fedlora -m strategy=fedavg,flora seed=0,1 # a sweep (jobs run one after another)
    fedlora resume=runs/<run>                 # continue a killed run from its last checkpoint
"""

from __future__ import annotations

import json
import math
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, NoReturn

from fedlora.core import env

env.apply(offline="offline=false" not in sys.argv)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fedlora.cli.rundir import FAILED, mark_failed, register_resolvers, release_unused  # noqa: E402
from fedlora.config import CONF_DIR  # noqa: E402
from fedlora.core.errors import ConfigError  # noqa: E402
from fedlora.core.metrics import validation_key  # noqa: E402

register_resolvers(sys.argv[1:])


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


def simulate(settings: Any, stop: threading.Event) -> dict[str, Any]:
    """Run a federation on Flower's simulation engine (Ray) in this process; return its summary."""
    from fedlora.flower import simulation  # noqa: PLC0415

    simulation.run(settings, stop)
    summary_path = settings.run_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without a summary in {settings.run_dir}; see the log above")
    return dict(json.loads(summary_path.read_text()))


def run_pooled(settings: Any, stop: threading.Event) -> dict[str, Any]:
    """Run the centralized bound (one pooled learner, no Flower); return its summary."""
    from fedlora.serving.run import run_pooled as pooled  # noqa: PLC0415
    from fedlora.serving.signals import stop_on_signals  # noqa: PLC0415

    with stop_on_signals(stop):
        return pooled(settings, stop)


#: How each ``transport`` runs a job in this process (``fedlora-deploy`` serves ``flower`` on a SuperLink).
RUNNERS = {"flower": simulate, "pooled": run_pooled}


def run(container: dict[str, Any], stop: threading.Event) -> dict[str, Any]:
    """Run one validated job; return its summary."""
    from fedlora.config.settings import Settings  # noqa: PLC0415

    run_dir = Path(container["output_dir"])  # the resumed run's directory when resuming
    run_dir.mkdir(parents=True, exist_ok=True)
    if container.get("resume"):
        (run_dir / FAILED).unlink(missing_ok=True)
        ignored = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "hydra."))]
        if ignored:
            print(f"fedlora: resuming {run_dir} with its own config.yaml; ignoring {ignored}", file=sys.stderr)
    else:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(container))
    settings = Settings.from_config(container)
    return RUNNERS[settings.transport](settings, stop)


def _stopped(run_dir: Path, stop: Any) -> NoReturn:
    """Say where a stopped run can be resumed, and exit with the status of an interrupted command."""
    from fedlora.results.checkpoint import checkpoint_round  # noqa: PLC0415
    from fedlora.serving.signals import exit_stopped  # noqa: PLC0415

    last = checkpoint_round(run_dir)
    where = (f"round {last} is its last complete round; resume with: fedlora resume={run_dir}" if last is not None
             else "it stopped before its first checkpoint; start it again")
    exit_stopped(f"fedlora: stopped by {stop.signal}; {where}")


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """Hydra entry point: run one job and return its final task metric (for sweepers).

    That is test accuracy for classification (maximise it) and held-out perplexity for
    causal_lm (minimise it); ``summary.json`` names it under ``primary_metric``.
    """
    from fedlora.core.errors import RunError  # noqa: PLC0415
    from fedlora.serving.signals import Stop  # noqa: PLC0415

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    release_unused(run_dir)  # names an experiment's composition claimed and does not use (fedlora/cli/rundir.py)
    resuming = bool(OmegaConf.select(cfg, "resume"))
    try:
        container = prepare(cfg, run_dir)
    except KeyboardInterrupt:
        print("\nfedlora: stopped by Ctrl-C while the configuration was being checked; nothing was started",
              file=sys.stderr)
        sys.exit(130)
    except ConfigError as exc:
        print(f"fedlora: {exc}", file=sys.stderr)
        if not resuming:  # a refused resume never writes into the run it refused
            mark_failed(run_dir, str(exc))
        sys.exit(2)
    finished = finished_run(container)
    if finished:
        print(f"fedlora: {finished}", file=sys.stderr)
        summary = json.loads((Path(container["output_dir"]) / "summary.json").read_text())
        return objective(summary)
    stop = Stop()
    try:
        summary = run(container, stop)
    except RunError as exc:  # the message says all: no traceback
        if stop.signal:
            _stopped(run_dir, stop)
        print(f"fedlora: {exc}", file=sys.stderr)
        mark_failed(run_dir, str(exc))
        sys.exit(1)
    except Exception:
        if stop.signal:  # whatever the engine raised after a Ctrl-C: the run was stopped, not broken
            _stopped(run_dir, stop)
        mark_failed(run_dir, traceback.format_exc())
        raise
    return objective(summary)


def objective(summary: dict[str, Any]) -> float:
    """The Hydra return value (what a sweeper optimises): the final validation metric when the run holds a
    validation split (``data.validation_fraction > 0``), so that a sweeper never chooses on the test set;
    else the final test metric."""
    primary = str(summary.get("primary_metric", "test_accuracy"))
    validation = f"final_{validation_key(primary)}"
    return float(summary.get(validation, summary.get(f"final_{primary}", math.nan)))


def finished_run(container: dict[str, Any]) -> str | None:
    """Why resuming ``container``'s run would do nothing (it finished), or ``None``."""
    from fedlora.results.checkpoint import checkpoint_round  # noqa: PLC0415

    if not container.get("resume"):
        return None
    run_dir = Path(container["output_dir"])
    last = checkpoint_round(run_dir)
    if (run_dir / "summary.json").is_file() and last is not None and last >= int(container["num_rounds"]):
        return f"{run_dir} finished all its {container['num_rounds']} rounds; nothing to resume (it is left as it is)"
    return None


def cli() -> None:
    """The console script ``fedlora`` and ``python -m fedlora``."""
    sys.argv[1:] = resume_arguments(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    cli()
