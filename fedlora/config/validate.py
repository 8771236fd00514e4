"""Validation of the resolved config before anything starts: every problem reported at once.

``validate(cfg)`` runs in the ``fedlora`` process before Ray (or a deployment) starts and raises one
:class:`~fedlora.core.errors.ConfigError` listing every problem, each naming the field, the bad value
and the fix. Task-specific fields are checked by the task (:mod:`fedlora.runtime.tasks`), a
strategy's or compressor's hyperparameters by its own constructor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.config import CONF_DIR
from fedlora.config.settings import RANK_POLICIES, TRANSPORTS, Component, import_target
from fedlora.core.env import hub_offline
from fedlora.core.errors import Problems
from fedlora.runtime.tasks import TASKS, Task, TaskSettings


def _task(cfg: Mapping[str, Any]) -> type[Task] | None:
    """The config's task class (``None`` for an unknown kind; configs without one are the default task)."""
    return TASKS.get(str((cfg.get("task") or {}).get("kind", TaskSettings.kind)))


def options(group: str) -> list[str]:
    """The options of config group ``group`` (the YAML files in ``conf/<group>/``)."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def _check_numbers(cfg: Mapping[str, Any], p: Problems) -> None:
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
    for key in ("local_steps", "batch_size"):
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


def _check_ranks(cfg: Mapping[str, Any], p: Problems) -> list[int]:
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


def _check_model(cfg: Mapping[str, Any], ranks: list[int], task: type[Task], p: Problems) -> None:
    model = cfg.get("model", {})
    name = model.get("name")
    if not task.check_model(name, p):
        return
    try:
        layers = probe_layers(name, tuple(model.get("target_modules") or ()), task.decoder)
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's model name
        hint = (f"hub access is off (HF_HUB_OFFLINE=1): set offline=false to download it, or use "
                f"{task.builtin_model}, a local model directory, or a name already in the Hugging Face cache"
                if hub_offline() else
                f"use {task.builtin_model}, a local model directory, or a valid Hugging Face model name")
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


def probe_layers(name: str, target_modules: tuple[str, ...], decoder: bool = False) -> dict[str, tuple[int, int]]:
    """Return the adapted layer shapes of model ``name`` without loading its weights."""
    from fedlora.runtime.models import adapted_layers, model_skeleton  # noqa: PLC0415

    return adapted_layers(model_skeleton(name, decoder), target_modules)


def _check_component(group: str, node: Mapping[str, Any], p: Problems) -> Any:
    """Build a ``_target_`` node; return the object, or ``None`` after naming the problem."""
    component = Component.from_node(node)
    if component is None:
        return None
    try:
        import_target(component.target)
    except (ImportError, AttributeError, ValueError):
        p.add(f"{group}._target_", component.target, f"no such class; see conf/{group}/ for the available ones")
        return None
    try:
        return component.build()
    except Exception as exc:  # noqa: BLE001 - constructor validation messages are for the user
        p.add(group, component.options, str(exc))
        return None


def _check_targets(cfg: Mapping[str, Any], p: Problems) -> None:
    """The strategy and the compressor build (their constructors check their hyperparameters)."""
    node = cfg.get("strategy") or {}
    if not node.get("_target_"):
        p.add("strategy", node, "choose one: " + "|".join(f"strategy={o}" for o in options("strategy")))
        strategy = None
    else:
        strategy = _check_component("strategy", node, p)
    compressor = _check_component("compression", cfg.get("compression") or {}, p)
    feedback = (cfg.get("compression") or {}).get("error_feedback")
    if compressor is not None and feedback is True and getattr(strategy, "fresh_adapters", False):
        p.add("compression.error_feedback", True,
              f"{type(strategy).__name__} starts fresh LoRA factors every round, so a residual kept in last "
              "round's factors has nothing to be added to; use auto (error feedback for the classifier head "
              "only) or false")


def _check_transport(cfg: Mapping[str, Any], p: Problems) -> None:
    """The centralized bound (``transport: pooled``) has one learner: nothing to compress or to fail."""
    transport = cfg.get("transport") or "flower"
    if transport not in TRANSPORTS:
        p.add("transport", transport, f"use one of {', '.join(TRANSPORTS)} (strategy=centralized sets pooled)")
        return
    if transport != "pooled":
        return
    if (cfg.get("compression") or {}).get("_target_"):
        p.add("compression", cfg["compression"]["_target_"], "the centralized bound communicates nothing; "
              "use compression=none with strategy=centralized")
    faults = cfg.get("faults") or {}
    if any(faults.get(k) for k in ("fail_prob", "straggler_prob", "corrupt_prob", "corrupt")):
        p.add("faults", {k: v for k, v in faults.items() if v}, "the centralized bound has no clients to fail; "
              "use faults=none with strategy=centralized")


def _check_logging(cfg: Mapping[str, Any], p: Problems) -> None:
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


def _check_reliability(cfg: Mapping[str, Any], p: Problems) -> None:
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


def _check_resume(cfg: Mapping[str, Any], p: Problems) -> None:
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


def validate(cfg: Mapping[str, Any], *, check_model: bool = True, check_data: bool = True) -> None:
    """Raise :class:`~fedlora.core.errors.ConfigError` listing every problem in ``cfg`` (nothing is started)."""
    p = Problems()
    _check_numbers(cfg, p)
    task = _task(cfg)
    if task is None:
        kind = (cfg.get("task") or {}).get("kind")
        p.add("task.kind", kind, "use " + " or ".join(f"task={k}" for k in TASKS))
    else:
        task.check_config(cfg, p)
    from fedlora.runtime.models import check_options  # noqa: PLC0415

    check_options(cfg.get("model") or {}, bool(task and task.decoder), p)
    _check_reliability(cfg, p)
    _check_resume(cfg, p)
    _check_logging(cfg, p)
    ranks = _check_ranks(cfg, p)
    _check_targets(cfg, p)
    _check_transport(cfg, p)
    if check_data and task is not None:
        task.check_data(cfg, p)
    if check_model and task is not None:
        _check_model(cfg, ranks, task, p)
    p.raise_if_any()
