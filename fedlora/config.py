"""From the resolved Hydra config (a plain dict) to typed settings, and its validation.

``validate(cfg)`` runs before Ray starts and raises one :class:`ConfigError` listing every
problem, each naming the field, the value and the fix.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedlora import task_checks
from fedlora.core.env import hub_offline
from fedlora.core.errors import ConfigError
from fedlora.core.metrics import task_kind

RANK_POLICIES = ("cycle", "explicit", "random")


def _pick(cls: type, values: Mapping[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}
    return cls(**kwargs)


def model_settings(cfg: Mapping[str, Any]):  # noqa: ANN201
    """Return :class:`fedlora.runtime.models.ModelSettings` from ``cfg["model"]``."""
    from fedlora.runtime.models import ModelSettings  # noqa: PLC0415

    return _pick(ModelSettings, {**cfg["model"], "task": task_kind(cfg)})


def task_settings(cfg: Mapping[str, Any]):  # noqa: ANN201
    """Return :class:`fedlora.runtime.training.tasks.TaskSettings` from ``cfg["task"]`` (classification if absent)."""
    from fedlora.runtime.training.tasks import TaskSettings  # noqa: PLC0415

    return _pick(TaskSettings, {**(cfg.get("task") or {}), "kind": task_kind(cfg)})


def data_settings(cfg: Mapping[str, Any]):  # noqa: ANN201
    """Return :class:`fedlora.runtime.training.workspace.DataSettings` from ``cfg["data"]`` and partition."""
    from fedlora.runtime.training.workspace import DataSettings  # noqa: PLC0415

    part = cfg.get("partition", {})
    merged = dict(cfg["data"])
    merged.update({"partition": part.get("kind", "dirichlet"), "alpha": part.get("alpha", 0.5),
                   "partition_seed": part.get("seed", 42),
                   "min_partition_size": part.get("min_partition_size", 10)})
    return _pick(DataSettings, merged)


def train_settings(cfg: Mapping[str, Any]):  # noqa: ANN201
    """Return :class:`fedlora.runtime.training.local.TrainSettings` from ``cfg["train"]``."""
    from fedlora.runtime.training.local import TrainSettings  # noqa: PLC0415

    return _pick(TrainSettings, cfg["train"])


def eval_batch_size(cfg: Mapping[str, Any]) -> int:
    """Batch size of the held-out evaluation (``eval.batch_size``, 64 if absent)."""
    return int((cfg.get("eval") or {}).get("batch_size", 64))


def workspace_key(cfg: Mapping[str, Any], num_clients: int | None = None):  # noqa: ANN201
    """Return the per-process workspace key of this run."""
    from fedlora.runtime.training.workspace import WorkspaceKey  # noqa: PLC0415

    return WorkspaceKey(model_settings(cfg), data_settings(cfg),
                        num_clients if num_clients is not None else int(cfg["num_clients"]), int(cfg["seed"]),
                        task_settings(cfg))


def assign_ranks(num_clients: int, ranks: Mapping[str, Any], seed: int) -> list[int]:
    """Return each client's LoRA rank.

    ``policy: cycle`` gives client ``k`` ``tiers[k % len(tiers)]``; ``random`` draws a tier per
    client from ``seed``; ``explicit`` takes ``ranks.explicit`` (one rank per client).
    """
    policy = ranks.get("policy", "cycle")
    tiers = list(ranks.get("tiers", [8]))
    if policy == "explicit":
        return [int(r) for r in ranks["explicit"]]
    if policy == "random":
        rng = random.Random(seed)
        return [int(rng.choice(tiers)) for _ in range(num_clients)]
    return [int(tiers[k % len(tiers)]) for k in range(num_clients)]


def instantiate(node: Mapping[str, Any] | None) -> Any:
    """Instantiate a ``_target_`` node (``None`` or ``{}`` gives ``None``)."""
    if not node or "_target_" not in node:
        return None
    from hydra.utils import instantiate as hydra_instantiate  # noqa: PLC0415

    return hydra_instantiate(dict(node), _convert_="all")


def target_class(target: Any) -> type | None:
    """Return the class a Hydra ``_target_`` names (``None`` if it cannot be imported)."""
    module, _, attr = str(target or "").rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return None


def strategy_class(cfg: Mapping[str, Any]) -> type | None:
    """Return the class named by ``cfg["strategy"]["_target_"]`` (``None`` if it cannot be imported)."""
    return target_class((cfg.get("strategy") or {}).get("_target_"))


def compression_node(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return ``cfg["compression"]`` with ``error_feedback: auto`` resolved against the strategy.

    Error feedback adds last round's compression residual to this round's update, which is only
    meaningful for a tensor the client continues from the global adapter. Strategies whose clients
    start fresh LoRA factors every round (``fresh_adapters = True``: FLoRA) keep error feedback for
    the other tensors (a classifier head) only: ``auto`` becomes ``error_feedback=True,
    fresh_factors=True`` for them and ``error_feedback=True`` for every other strategy.
    """
    node = dict(cfg.get("compression") or {})
    if node.get("error_feedback") == "auto":
        node["error_feedback"] = True
        if getattr(strategy_class(cfg), "fresh_adapters", False):
            node["fresh_factors"] = True
    return node or None


def compressor(cfg: Mapping[str, Any]) -> Any:
    """Instantiate the run's uplink compressor (``None`` without compression)."""
    return instantiate(compression_node(cfg))


@dataclass
class _Problems:
    items: list[str]

    def add(self, field: str, value: Any, fix: str) -> None:
        self.items.append(f"{field}={value!r}: {fix}")


def _check_numbers(cfg: Mapping[str, Any], p: _Problems) -> None:
    n = cfg.get("num_clients")
    if not isinstance(n, int) or n < 1:
        p.add("num_clients", n, "must be a positive integer (for example num_clients=10)")
    rounds = cfg.get("num_rounds")
    if not isinstance(rounds, int) or rounds < 1:
        p.add("num_rounds", rounds, "must be a positive integer (for example num_rounds=5)")
    frac = cfg.get("fraction_train")
    if not isinstance(frac, int | float) or not 0 < frac <= 1:
        p.add("fraction_train", frac, "must be in (0, 1]; 1.0 samples every client each round")
    part = cfg.get("partition", {})
    if part.get("kind") not in ("dirichlet", "iid"):
        p.add("partition.kind", part.get("kind"), "use partition=dirichlet or partition=iid")
    if part.get("kind") == "dirichlet":
        alpha = part.get("alpha")
        if not isinstance(alpha, int | float) or alpha <= 0:
            p.add("partition.alpha", alpha, "the Dirichlet concentration must be > 0 (0.5 is strongly non-IID)")
    train = cfg.get("train", {})
    for key, kind in (("local_steps", int), ("batch_size", int)):
        v = train.get(key)
        if not isinstance(v, int) or v < 1:
            p.add(f"train.{key}", v, "must be a positive integer")
    lr = train.get("lr")
    if not isinstance(lr, int | float) or lr <= 0:
        p.add("train.lr", lr, "the learning rate must be > 0 (3e-3 works for the default task)")
    data = cfg.get("data", {})
    tf = data.get("test_fraction")
    if not isinstance(tf, int | float) or not 0 < tf < 1:
        p.add("data.test_fraction", tf, "must be in (0, 1), for example 0.2")
    model = cfg.get("model", {})
    apr = model.get("alpha_per_rank")
    if not isinstance(apr, int | float) or apr <= 0:
        p.add("model.alpha_per_rank", apr, "lora_alpha = alpha_per_rank * r; use a positive number (2.0)")


def _check_ranks(cfg: Mapping[str, Any], p: _Problems) -> list[int]:
    ranks = cfg.get("ranks", {})
    policy = ranks.get("policy")
    if policy not in RANK_POLICIES:
        p.add("ranks.policy", policy, f"use one of {RANK_POLICIES}")
        return []
    n = cfg.get("num_clients")
    if policy == "explicit":
        explicit = list(ranks.get("explicit") or [])
        if isinstance(n, int) and len(explicit) != n:
            p.add("ranks.explicit", explicit, f"give exactly one rank per client ({n} values, num_clients={n})")
        values = explicit
    else:
        values = list(ranks.get("tiers") or [])
        if not values:
            p.add("ranks.tiers", values, "give at least one rank tier, for example [2,4,8,16]")
    bad = [r for r in values if not isinstance(r, int) or r < 1]
    if bad:
        p.add("ranks", bad, "every rank must be an integer >= 1")
        return []
    return [int(r) for r in values]


def _check_model(cfg: Mapping[str, Any], ranks: list[int], p: _Problems) -> None:
    model = cfg.get("model", {})
    name = model.get("name")
    if not task_checks.model_fits_task(name, task_kind(cfg), p):
        return
    try:
        layers = probe_layers(name, tuple(model.get("target_modules") or ()), task_kind(cfg))
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's model name
        offline = hub_offline()
        builtin = "model=tiny_decoder" if task_kind(cfg) == "causal_lm" else "all-MiniLM-L6-v2"
        hint = (f"hub access is off (HF_HUB_OFFLINE=1): set offline=false to download it, or use {builtin}, "
                "a local model directory, or a name already in the Hugging Face cache" if offline else
                f"use {builtin}, a local model directory, or a valid Hugging Face model name")
        p.add("model.name", name, f"cannot be loaded ({type(exc).__name__}: {str(exc)[:160]}); {hint}")
        return
    if not layers:
        p.add("model.target_modules", model.get("target_modules"),
              "no nn.Linear layer of the model has one of these names; for BERT use [query, value], "
              "for LLaMA-like models [q_proj, v_proj]")
        return
    width = min(min(shape) for shape in layers.values())
    too_big = sorted({r for r in ranks if r > width})
    if too_big:
        p.add("ranks", too_big, f"a LoRA rank cannot exceed the adapted layers' width {width}; lower it")


def probe_layers(name: str, target_modules: tuple[str, ...], task: str = "classification",
                 ) -> dict[str, tuple[int, int]]:
    """Return the adapted layer shapes of model ``name`` (built for ``task``) without loading its weights."""
    from fedlora.runtime.models import adapted_layers, model_skeleton  # noqa: PLC0415

    return adapted_layers(model_skeleton(name, task), target_modules)


def _check_data(cfg: Mapping[str, Any], p: _Problems) -> None:
    from fedlora.runtime.data import datasets as ds  # noqa: PLC0415

    if task_kind(cfg) == "causal_lm":
        task_checks.check_instruction_data(cfg, p)
        return
    data = cfg.get("data", {})
    name = data.get("name")
    if name == ds.BUILTIN_BBC:
        return
    if name == "synthetic_instructions":
        p.add("data.name", name, "instruction data is for task=causal_lm (fedlora task=causal_lm); "
              "classification needs text and labels, for example data=bbc_news")
        return
    if not isinstance(name, str) or not name:
        p.add("data.name", name, "use bbc_news, a local csv/json/jsonl/parquet file, or a hub dataset name")
        return
    if ds.is_local_file(name):
        if not Path(name).is_file():
            p.add("data.name", name, "the file does not exist; give an existing path (absolute, or relative "
                  "to where you run fedlora)")
            return
        columns = ds.read_columns(name)
        for field in ("text_column", "label_column"):
            if data.get(field) not in columns:
                p.add(f"data.{field}", data.get(field), f"not a column of {name}; its columns are {columns}")
        return
    if hub_offline():
        p.add("data.name", name, "unknown dataset: not bbc_news nor a local file, and hub access is off "
              "(HF_HUB_OFFLINE=1); give a local file or set offline=false")


def _check_targets(cfg: Mapping[str, Any], p: _Problems) -> None:
    for group in ("strategy", "compression"):
        node = (cfg.get(group) or {}) if group == "strategy" else (compression_node(cfg) or {})
        target = node.get("_target_")
        if group == "strategy" and not target:
            p.add("strategy", node, "choose one: strategy=fedavg|flora|ffa_lora|lora_fair|centralized")
            continue
        if not target:
            continue
        if target_class(target) is None:
            p.add(f"{group}._target_", target, f"no such class; see conf/{group}/ for the available ones")
            continue
        try:
            instantiate(node)
        except Exception as exc:  # noqa: BLE001 - constructor validation messages are for the user
            p.add(group, {k: v for k, v in node.items() if k != "_target_"}, str(getattr(exc, "__cause__", None) or exc))
    feedback = (cfg.get("compression") or {}).get("error_feedback")
    if feedback is True and getattr(strategy_class(cfg), "fresh_adapters", False):
        name = str(cfg["strategy"]["_target_"]).rpartition(".")[2]
        p.add("compression.error_feedback", True,
              f"{name} starts fresh LoRA factors every round, so a residual kept in last round's factors "
              "has nothing to be added to; use auto (error feedback for the classifier head only) or false")


def _check_logging(cfg: Mapping[str, Any], p: _Problems) -> None:
    wandb = (cfg.get("logging") or {}).get("wandb") or {}
    if wandb.get("enabled"):
        import importlib.util  # noqa: PLC0415

        if importlib.util.find_spec("wandb") is None:
            p.add("logging.wandb.enabled", True, "wandb is not installed: `pip install wandb`, or set it to false")
    sim = cfg.get("simulation") or {}
    res = sim.get("client_resources") or {}
    if not isinstance(res.get("num_cpus"), int | float) or res.get("num_cpus", 0) <= 0:
        p.add("simulation.client_resources.num_cpus", res.get("num_cpus"), "CPUs per client must be > 0")
    gpus = res.get("num_gpus", 0)
    if not isinstance(gpus, int | float) or gpus < 0:
        p.add("simulation.client_resources.num_gpus", gpus, "use 0 (CPU) or a GPU share such as 0.25 or 1")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_reliability(cfg: Mapping[str, Any], p: _Problems) -> None:
    """Client minimums, timeout, the norm bound, checkpointing and the ``faults`` group."""
    n = cfg.get("num_clients")
    n = n if isinstance(n, int) and n >= 1 else None
    for key, default in (("min_clients", 1), ("min_fit_clients", 1)):
        v = cfg.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            p.add(key, v, "must be an integer >= 1")
        elif n is not None and v > n:
            p.add(key, v, f"cannot exceed num_clients={n}; lower it or add clients")
    timeout = cfg.get("round_timeout", 3600)
    if not _is_number(timeout) or timeout <= 0:
        p.add("round_timeout", timeout, "seconds the server waits for a round's replies: use a number > 0")
    ratio = cfg.get("max_norm_ratio")
    if ratio is not None and (not _is_number(ratio) or ratio <= 1):
        p.add("max_norm_ratio", ratio, "use a number > 1 (10 rejects only gross outliers), or null to turn it off")
    if not isinstance(cfg.get("checkpoint", True), bool):
        p.add("checkpoint", cfg.get("checkpoint"), "use true or false")
    faults = cfg.get("faults") or {}
    from fedlora.core.faults import CORRUPT_KINDS, FaultSettings, kind_name  # noqa: PLC0415

    unknown = sorted(set(faults) - set(FaultSettings.__dataclass_fields__))
    if unknown:
        p.add("faults", unknown, f"unknown fault option(s); known: {sorted(FaultSettings.__dataclass_fields__)}")
    for key in ("fail_prob", "straggler_prob", "corrupt_prob"):
        v = faults.get(key, 0.0)
        if not _is_number(v) or not 0 <= v <= 1:
            p.add(f"faults.{key}", v, "a probability: use a number in [0, 1]")
    delay = faults.get("straggler_delay_s", 0.0)
    if not _is_number(delay) or delay < 0:
        p.add("faults.straggler_delay_s", delay, "seconds a straggler sleeps: use a number >= 0")
    if kind_name(faults.get("corrupt_kind", "nan")) not in CORRUPT_KINDS:
        p.add("faults.corrupt_kind", faults.get("corrupt_kind"), f"use one of {', '.join(CORRUPT_KINDS)}")
    corrupt = faults.get("corrupt") or {}
    if not isinstance(corrupt, Mapping):
        p.add("faults.corrupt", corrupt, "a mapping client id -> kind, for example {1: nan}")
        corrupt = {}
    for cid, kind in corrupt.items():
        if not str(cid).isdigit() or (n is not None and int(cid) >= n):
            p.add(f"faults.corrupt.{cid}", kind, f"the key must be a client id in 0..{(n or 1) - 1}")
        if kind_name(kind) not in CORRUPT_KINDS:
            p.add(f"faults.corrupt.{cid}", kind, f"use one of {', '.join(CORRUPT_KINDS)}")
    seed = faults.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        p.add("faults.seed", seed, "use an integer, or null for the run seed")


def _check_resume(cfg: Mapping[str, Any], p: _Problems) -> None:
    """``resume`` must name a run directory with its config and a complete checkpoint."""
    resume = cfg.get("resume")
    if resume is None:
        return
    from fedlora.results.checkpoint import has_checkpoint  # noqa: PLC0415

    path = Path(str(resume))
    if not path.is_dir():
        p.add("resume", resume, "no such directory; give a run directory, for example resume=runs/<date>_<time>_fedavg")
    elif not (path / "config.yaml").is_file():
        p.add("resume", resume, "has no config.yaml: it is not a fedlora run directory")
    elif not has_checkpoint(path):
        p.add("resume", resume, "has no complete checkpoint/ (the run stopped before round 0 ended, or ran "
              "with checkpoint=false); start it again instead")
    strategy = str((cfg.get("strategy") or {}).get("_target_", ""))
    if strategy.endswith("Centralized"):
        p.add("resume", resume, "strategy=centralized runs cannot be resumed; run it again")


def validate(cfg: Mapping[str, Any], *, check_model: bool = True, check_data: bool = True) -> None:
    """Raise :class:`ConfigError` listing every problem in ``cfg`` (nothing is started)."""
    p = _Problems([])
    _check_numbers(cfg, p)
    task_checks.check_task(cfg, p)
    task_checks.check_decoder_options(cfg, p)
    _check_reliability(cfg, p)
    _check_resume(cfg, p)
    _check_logging(cfg, p)
    ranks = _check_ranks(cfg, p)
    _check_targets(cfg, p)
    if check_data:
        _check_data(cfg, p)
    if check_model:
        _check_model(cfg, ranks, p)
    if p.items:
        raise ConfigError(p.items)
