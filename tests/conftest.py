"""Shared test setup: offline and quiet environment, config composition helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # test helpers: federation_kit

from fedlora.core import env  # noqa: E402

env.apply(offline=True)

CONF_DIR = str(ROOT / "conf")
FEDLORA = str(Path(sys.executable).parent / "fedlora")


def compose(overrides: list[str] | None = None) -> dict:
    """Compose the Hydra config with ``overrides`` and return it resolved as a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []), return_hydra_config=True)
        strategy = cfg.hydra.runtime.choices.get("strategy")
        OmegaConf.set_struct(cfg, False)
        cfg.name = strategy
        del cfg["hydra"]
        return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture
def base_cfg() -> dict:
    """The default config, resolved."""
    return compose([])


# Tiny end-to-end settings: 3 clients, 2 rounds, 2 local steps, 64 test articles.
TINY = ["num_clients=3", "num_rounds=2", "train.local_steps=2", "train.batch_size=8",
        "data.max_test_examples=64", "ranks.tiers=[2,4,8]", "partition.min_partition_size=5",
        "logging.tensorboard=true"]


# Every privacy mode, and besides every conf/strategy/*.yaml the options that change what a strategy aggregates
# or sends (tests/test_privacy.py: each refused pair names its reason and fix; tests/integration/
# test_secure_aggregation.py: each pair validation lets through runs end to end).
PRIVACY_MODES = ["privacy=dp_sgd", "privacy=dp_fedavg", "privacy=secagg", "privacy=dp_sgd privacy.secure=true",
                 "privacy=dp_fedavg privacy.secure=true"]
PRIVACY_OPTIONS = [["strategy=hetlora", "strategy.prune=false"], ["strategy=fedavg", "strategy.weighting=norm"],
                   ["strategy=fedavg", "strategy.padding=owners"], ["strategy=fedavg", "compression=compeft"],
                   ["strategy=ffa_lora", "compression=compeft"], ["strategy=fedavg", "downlink=compeft"],
                   ["strategy=flora", "downlink=svd"],
                   ["strategy=fedsa_lora", "strategy.padding=zero", "data.client_test_fraction=0.3"]]


def privacy_strategies() -> list[str]:
    """Every strategy config (``conf/strategy/*.yaml``), by name."""
    return sorted(p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml"))


def privacy_extra(strategy: str) -> list[str]:
    """What a strategy needs to run at all: FedSA-LoRA has no global model, its clients evaluate on their own."""
    return ["data.client_test_fraction=0.3"] if strategy == "fedsa_lora" else []


# Tiny causal-LM settings: the random tiny decoder on 300 synthetic instructions, 3 clients with
# ranks 2/4/8, 2 rounds of 3 local steps, 40 held-out examples, 3 generations of 8 tokens.
TINY_CAUSAL = ["task=causal_lm", "num_clients=3", "num_rounds=2", "train.local_steps=3", "train.batch_size=8",
               "train.lr=1e-2", "data.max_examples=300", "data.max_test_examples=40", "ranks.tiers=[2,4,8]",
               "partition.min_partition_size=5", "task.num_generations=3", "task.max_new_tokens=8",
               "logging.tensorboard=true"]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return ROOT


def run_fedlora(args: list[str], run_dir: Path, timeout: int = 600, env: dict | None = None):
    """Run the ``fedlora`` command in a subprocess writing into ``run_dir``; return the result."""
    import subprocess

    cmd = [FEDLORA, *args, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ) if env is None else env)


def reload_accuracy(run_dir: Path) -> float:
    """Load a run's saved adapter with plain peft on the pristine base and evaluate its test set."""
    import yaml
    from peft import PeftModel

    from fedlora.config.settings import Settings
    from fedlora.runtime.models import load_base_model
    from fedlora.runtime.training.local import evaluate
    from fedlora.runtime.training.workspace import Workspace

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    ws = Workspace(Settings.from_config(cfg).workspace_key())
    base = load_base_model(cfg["model"]["name"], len(ws.label_names), seed=12345)  # different head seed
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    _, acc = evaluate(model, ws.data, ws.test)
    return acc


def reload_client_accuracies(run_dir: Path) -> list[float]:
    """Load a run's saved adapter with plain peft on the pristine base and evaluate it on each client's held-out
    examples (``data.client_test_fraction``), recomputed here from the run's config."""
    import yaml
    from peft import PeftModel

    from fedlora.config.settings import Settings
    from fedlora.runtime.models import load_base_model
    from fedlora.runtime.training.local import evaluate
    from fedlora.runtime.training.workspace import Workspace

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    ws = Workspace(Settings.from_config(cfg).workspace_key())
    base = load_base_model(cfg["model"]["name"], len(ws.label_names), seed=12345)  # different head seed
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    return [evaluate(model, ws.data, held)[1] for held in ws.client_tests]


TIMING = {"wall_time", "round_seconds", "train_seconds", "eval_seconds"}


def jsonl_rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    """The records of a run's JSON-lines file (``metrics.jsonl`` by default)."""
    import json

    return [json.loads(x) for x in (Path(run_dir) / name).read_text().splitlines()]


def untimed(value):  # noqa: ANN001, ANN201 - JSON in, JSON out
    """``value`` without the wall-clock keys (:data:`TIMING`), at any depth: what a rerun must repeat."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value
