"""Validation of the resolved config before anything starts: every problem reported at once.

``validate(cfg)`` runs in the ``fedlora`` process before Ray (or a deployment) starts and raises one
:class:`~fedlora.core.errors.ConfigError` listing every problem, each naming the field, the bad value
and the fix. Task-specific fields are checked by the task (:mod:`fedlora.runtime.tasks`), a
strategy's or compressor's hyperparameters by its own constructor.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.config import CONF_DIR
from fedlora.config.fields import check_fields
from fedlora.config.settings import RANK_POLICIES, TRANSPORTS, Component, Settings, import_target
from fedlora.core import control as ctl
from fedlora.core.env import hub_offline
from fedlora.core.errors import Problems
from fedlora.runtime.data.settings import DataSettings
from fedlora.runtime.tasks import TASKS, Task, TaskSettings, make_task


def _task(cfg: Mapping[str, Any]) -> type[Task] | None:
    """The config's task class (``None`` for an unknown kind; configs without one are the default task)."""
    return TASKS.get(str((cfg.get("task") or {}).get("kind", TaskSettings.kind)))


def options(group: str) -> list[str]:
    """The options of config group ``group`` (the YAML files in ``conf/<group>/``)."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def _check_partition_kind(cfg: Mapping[str, Any], p: Problems) -> None:
    part = cfg.get("partition", {})
    if part.get("kind") not in ("dirichlet", "inner_dirichlet", "iid"):
        p.add("partition.kind", part.get("kind"), "use partition=dirichlet, partition=inner_dirichlet or partition=iid")


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
    bad = [r for r in values if not isinstance(r, int) or isinstance(r, bool) or r < 1]
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
        # a compressor names its fields compression.*; the downlink's are downlink.*
        p.add(group, component.options, str(exc).replace("compression.", f"{group}."))
        return None


def _check_targets(cfg: Mapping[str, Any], p: Problems) -> Any:
    """The strategy and the compressor build (their constructors check their hyperparameters); the strategy."""
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
    _check_downlink(cfg, strategy, p)
    _check_controlled(cfg, strategy, compressor, p)
    _check_compressor_privacy(cfg, compressor, p)
    _check_personal(cfg, strategy, p)
    _check_pruning(cfg, strategy, p)
    return strategy


def _check_controlled(cfg: Mapping[str, Any], strategy: Any, compressor: Any, p: Problems) -> None:
    """Controlled averaging (``compression=scafcom``, :mod:`fedlora.core.control`) turns each reply into
    ``start + eta_g (c + d_k)`` and relies on the strategy averaging those: only a linear strategy does. Its server
    step is not FedAU's rescaled one; what it cannot run under privacy is its own declaration
    (:func:`_check_compressor_privacy`)."""
    if ctl.control_of(compressor) is None:
        return
    if strategy is not None and not getattr(strategy, "linear", False):
        why = getattr(strategy, "why_not_linear", "") or "its aggregate is not a weighted mean of what clients send"
        p.add("strategy", type(strategy).__name__, f"compression=scafcom hands the strategy start + eta_g (c + d_k) "
              f"for each client and needs it averaged, but {why}; use a linear strategy (fedavg, ffa_lora, rolora) "
              "or compression=compeft")
    if (cfg.get("participation") or {}).get("fedau") is True:
        p.add("participation.fedau", True, "FedAU rescales each update on the server, SCAFCOM's server step is "
              "its own; turn one of them off")


def _check_pruning(cfg: Mapping[str, Any], strategy: Any, p: Problems) -> None:
    """Rank self-pruning (HetLoRA, ``strategy.pruning``) adds a regulariser to each client's loss and changes its
    rank between rounds: DP-SGD's per-example clipping would leave the regulariser out, and a compressed
    downlink keeps each client's copy at a fixed rank."""
    if getattr(strategy, "pruning", None) is None:
        return
    name = type(strategy).__name__
    if (cfg.get("privacy") or {}).get("kind") == "dp_sgd":
        p.add("privacy.kind", "dp_sgd", f"{name}'s rank regulariser is a term of each client's loss that Opacus' "
              "per-example clipping does not see; use strategy.prune=false (the sparsity weighting alone) with "
              "privacy=dp_sgd, or another privacy setting")
    if (cfg.get("downlink") or {}).get("_target_"):
        p.add("downlink", "compeft", f"{name}'s clients prune their rank between rounds, and the compressed "
              "downlink keeps each client's copy at one rank; use downlink=none, or strategy.prune=false")


def _check_personal(cfg: Mapping[str, Any], strategy: Any, p: Problems) -> None:
    """A personalized strategy (FedSA-LoRA: each client keeps its ``B`` and head) has no global model: its
    clients must hold out examples to evaluate their own models on, and its start is not one adapter a
    compressed downlink could mirror."""
    if not getattr(strategy, "personalized", False):
        return
    name = type(strategy).__name__
    held = (cfg.get("data") or {}).get("client_test_fraction") or 0
    if not (isinstance(held, int | float) and held > 0):
        p.add("data.client_test_fraction", held, f"{name} has no global model: each client's own model is evaluated "
              "on examples the client holds out; set data.client_test_fraction=0.2 (or another share in (0, 1))")
    if (cfg.get("downlink") or {}).get("_target_"):
        p.add("downlink", "compeft", f"{name} sends each client only the shared A (its B and head stay with it), and "
              "downlink compression of that is not built; use downlink=none")


def _check_downlink(cfg: Mapping[str, Any], strategy: Any, p: Problems) -> None:
    """Downlink compression (:mod:`fedlora.federation.downlink`): EF21's rule needs a contractive compressor
    (no ``alpha``-scaled ``std``), a start that continues from the global adapter (not FLoRA's fresh
    factors, whose downlink is its merges), a client per message (not the centralized bound) and
    per-client starts (not secure aggregation, whose sum needs one start)."""
    node = cfg.get("downlink") or {}
    if not node.get("_target_"):
        return
    built = _check_component("downlink", node, p)
    if built is None:
        return
    if getattr(built, "compresses_merges", False):
        _check_merge_downlink(cfg, strategy, p)
        return
    if node.get("scale", "std") == "std":
        p.add("downlink.scale", node.get("scale", "std"), "the downlink keeps each client's copy with EF21's rule, "
              "which converges only for a contractive compressor; alpha * std can overshoot a kept entry. Use "
              "downlink.scale=mean_abs (the L2-optimal scale on the kept entries) or none")
    if node.get("error_feedback", "auto") not in (False, "auto"):
        p.add("downlink.error_feedback", node.get("error_feedback"), "the downlink's error feedback is the copy "
              "each client holds (what compression dropped stays in the next difference); a residual would count "
              "it twice. Leave downlink.error_feedback=false")
    if strategy is not None and getattr(strategy, "fresh_adapters", False):
        p.add("downlink", "compeft", f"{type(strategy).__name__}'s clients start fresh LoRA factors every round, so "
              "its downlink is its base merges, not a start to copy; use downlink=svd (the merges truncated by "
              "their SVD) or downlink=none with this strategy")
    if strategy is not None and getattr(strategy, "needs_global_start", ""):
        p.add("downlink", "compeft", f"{type(strategy).__name__} cannot take a compressed start: "
              f"{strategy.needs_global_start}; use downlink=none with this strategy")
    if (cfg.get("transport") or "flower") == "pooled":
        p.add("downlink", "compeft", "the centralized bound communicates nothing; use downlink=none with "
              "strategy=centralized")
    if (cfg.get("privacy") or {}).get("secure") is True:
        p.add("downlink", "compeft", "secure aggregation sums updates from one start, and a compressed downlink gives "
              "each client its own; use downlink=none with privacy.secure=true")


def _check_merge_downlink(cfg: Mapping[str, Any], strategy: Any, p: Problems) -> None:
    """``downlink=svd`` (:mod:`fedlora.compression.merges`) truncates base merges: the downlink of a strategy
    whose clients start fresh factors every round (FLoRA); a continuing strategy's start is compressed by
    ``downlink=compeft``."""
    if (cfg.get("transport") or "flower") == "pooled":
        p.add("downlink", "svd", "the centralized bound communicates nothing; use downlink=none with "
              "strategy=centralized")
    elif strategy is not None and not getattr(strategy, "fresh_adapters", False):
        p.add("downlink", "svd", f"downlink=svd compresses base merges, and {type(strategy).__name__}'s downlink is "
              "each client's start; use downlink=compeft (each client's copy of its start) with this strategy")
    if (cfg.get("privacy") or {}).get("secure") is True:
        p.add("downlink", "svd", "secure aggregation merges nothing into the base; use downlink=none with "
              "privacy.secure=true")


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
    held = (cfg.get("data") or {}).get("client_test_fraction") or 0
    if isinstance(held, int | float) and held > 0:
        p.add("data.client_test_fraction", held, "the centralized bound has one learner and no clients to evaluate "
              "on their own data; use data.client_test_fraction=0 with strategy=centralized")


def _check_privacy(cfg: Mapping[str, Any], strategy: Any, p: Problems) -> None:
    """Exactly one of a budget and a noise multiplier; what each DP level needs of the model and the strategy.

    DP-SGD captures per-example gradients (no gradient checkpointing). DP-FedAvg noises a sum, so the
    strategy's aggregate must be linear in what clients send (``Strategy.linear``; the reason it is
    not is the strategy's own), and it needs clients: not the centralized bound.
    """
    privacy = cfg.get("privacy") or {}
    kind = privacy.get("kind")
    if kind not in ("dp_sgd", "dp_fedavg"):
        return
    eps, sigma = privacy.get("target_epsilon"), privacy.get("noise_multiplier")
    if (eps is None) == (sigma is None):
        p.add("privacy.target_epsilon", eps, f"with privacy.noise_multiplier={sigma}: set exactly one of the two "
              "(a budget the noise is calibrated to, or the noise itself); the other must be null")
    if kind == "dp_fedavg":
        if (cfg.get("transport") or "flower") == "pooled":
            p.add("privacy.kind", kind, "the centralized bound has one learner and no clients to protect; use "
                  "privacy=dp_sgd (sample-level) with strategy=centralized")
        elif strategy is not None and not getattr(strategy, "linear", False):
            name = type(strategy).__name__
            p.add("privacy.kind", kind, f"client-level DP noises the sum of the clients' clipped updates, and "
                  f"{name}'s aggregate is not linear in what clients send: "
                  f"{getattr(strategy, 'why_not_linear', '') or 'it declares no linearity'}; the noise would not "
                  f"protect its released model. Use strategy=fedavg (zero padding, example weights), "
                  f"strategy=ffa_lora or strategy=rolora, or privacy=dp_sgd, which composes with {name}")
        return
    if (cfg.get("model") or {}).get("gradient_checkpointing") is True:
        p.add("model.gradient_checkpointing", True, "privacy=dp_sgd captures per-example gradients with hooks that "
              "recomputed activations would confuse; set model.gradient_checkpointing=false")


def _check_compressor_privacy(cfg: Mapping[str, Any], compressor: Any, p: Problems) -> None:
    """What the uplink compressor declares it cannot run under (``privacy_refusals``: privacy mode -> the reason
    and the fix; :class:`~fedlora.compression.compeft.ComPEFT`, :class:`~fedlora.compression.scafcom.SCAFCOM`)."""
    refusals: Mapping[str, str] = getattr(compressor, "privacy_refusals", {}) if compressor is not None else {}
    if not refusals:
        return
    from fedlora.results.report import compression_name  # noqa: PLC0415

    privacy = cfg.get("privacy") or {}
    kind, name = privacy.get("kind"), compression_name(cfg.get("compression") or {})
    if kind in refusals:
        p.add("privacy.kind", kind, f"compression={name}: {refusals[kind]}")
    if privacy.get("secure") is True and "secure" in refusals:
        p.add("compression", name, refusals["secure"])


def _check_secure(cfg: Mapping[str, Any], strategy: Any, p: Problems) -> None:
    """Secure aggregation (``privacy.secure``): what the masked sum can carry and what it takes away.

    The server sees only ``sum_k n_k x_k``, so the strategy's aggregate must be linear in what clients
    send (its own reason otherwise), a compressed payload would be masked into a dense vector (ComPEFT
    saves nothing and its decoder needs each client's payload), and the protocol needs clients and
    enough of them per round; its ring arithmetic needs ``clients per round * levels < modulus``.
    """
    privacy = cfg.get("privacy") or {}
    if privacy.get("secure") is not True:
        return
    from fedlora.federation.sampling import sample_size  # noqa: PLC0415

    sec = cfg.get("secure_aggregation") or {}
    if (cfg.get("transport") or "flower") == "pooled":
        p.add("privacy.secure", True, "the centralized bound has one learner and nothing to sum; use privacy.secure="
              "false with strategy=centralized")
        return
    if strategy is not None and not getattr(strategy, "linear", False):
        name = type(strategy).__name__
        p.add("privacy.secure", True, f"secure aggregation gives the server only the weighted sum of the clients' "
              f"updates, and {name}'s aggregate is not linear in what clients send: "
              f"{getattr(strategy, 'why_not_linear', '') or 'it declares no linearity'}. Use strategy=fedavg (zero "
              "padding, example weights), strategy=ffa_lora or strategy=rolora")
    ints = {"num_shares": 3, "threshold": 2, "quantization_range": 2, "modulus_range": 4}
    for key, low in ints.items():
        value = sec.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            p.add(f"secure_aggregation.{key}", value, f"use an integer >= {low} (the default is "
                  f"{ {'num_shares': 5, 'threshold': 3, 'quantization_range': 2**22, 'modulus_range': 2**32}[key]})")
            return
    c = sec.get("clipping_range")
    if isinstance(c, bool) or not isinstance(c, int | float) or not c > 0 or c == float("inf"):
        p.add("secure_aggregation.clipping_range", c, "use a number > 0 (8.0: LoRA factors and heads stay well "
              "inside it)")
        return
    shares, threshold = sec["num_shares"], sec["threshold"]
    if shares % 2 == 0:
        p.add("secure_aggregation.num_shares", shares, f"each client's neighbours on SecAgg+'s ring are itself "
              f"and as many on each side: use an odd number, e.g. {shares + 1}")
    if threshold > shares:
        p.add("secure_aggregation.threshold", threshold, f"must be <= secure_aggregation.num_shares={shares} "
              "(the shares a secret is split into)")
    if sec["quantization_range"] >= 2**31:
        p.add("secure_aggregation.quantization_range", sec["quantization_range"], "Flower's quantization is "
              "32-bit: use a number of levels below 2**31 (the default 2**22)")
    try:
        per_round = sample_size(int(cfg["num_clients"]), float(cfg["fraction_train"]), int(cfg["min_clients"]))
    except (KeyError, TypeError, ValueError):
        return  # reported by the fields' own checks
    if per_round < threshold:
        p.add("secure_aggregation.threshold", threshold, f"a round samples {per_round} client(s), fewer than the "
              "threshold, so no round could complete; lower the threshold or sample more clients")
    if per_round * sec["quantization_range"] >= sec["modulus_range"]:
        p.add("secure_aggregation.modulus_range", sec["modulus_range"], f"{per_round} clients per round x "
              f"{sec['quantization_range']} levels would wrap around the modulus; use a modulus_range above "
              f"{per_round * sec['quantization_range']} (a power of two, e.g. "
              f"{1 << (per_round * sec['quantization_range']).bit_length()})")


def _check_participation(cfg: Mapping[str, Any], strategy: Any, p: Problems) -> None:
    """The ``participation`` group: fixed probabilities, and what Bernoulli participation and FedAU compose with.

    Client-level DP's accountant and secure aggregation's threshold assume a fixed number of clients
    sampled uniformly per round; FedAU rescales each update about its start, which is the FedAU rule
    only for a strategy that averages its updates (``linear``) or FLoRA's fresh factors
    (:mod:`fedlora.core.participation`).
    """
    part = cfg.get("participation") or {}
    bernoulli = part.get("model") == "bernoulli"
    probabilities = part.get("probabilities") or []
    listed = isinstance(probabilities, list | tuple)  # a bare number or string is not a list of them
    bad = [v for v in probabilities if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1
           ] if listed else [probabilities]
    if bad:
        p.add("participation.probabilities", probabilities, "a list of probabilities in (0, 1], client k gets "
              "entry k % length, e.g. [0.9, 0.1]; or [] to draw them")
    elif probabilities and not bernoulli:
        p.add("participation.probabilities", probabilities, "only participation=bernoulli uses them; add "
              "participation=bernoulli, or drop them")
    privacy = cfg.get("privacy") or {}
    pooled = (cfg.get("transport") or "flower") == "pooled"
    if bernoulli:
        if pooled:
            p.add("participation.model", "bernoulli", "the centralized bound has no clients to come and go; use "
                  "participation=uniform with strategy=centralized")
        if privacy.get("kind") == "dp_fedavg":
            p.add("participation.model", "bernoulli", "client-level DP's accountant assumes the server samples "
                  "fraction_train of the clients uniformly; use participation=uniform with privacy=dp_fedavg")
        if privacy.get("secure") is True:
            p.add("participation.model", "bernoulli", "secure aggregation's threshold is checked against a fixed "
                  "number of clients per round, which Bernoulli participation does not have; use "
                  "participation=uniform with privacy.secure=true")
    if part.get("fedau") is not True:
        return
    if pooled:
        p.add("participation.fedau", True, "the centralized bound has one learner and nothing to weigh; use "
              "participation.fedau=false with strategy=centralized")
    elif strategy is not None and not (getattr(strategy, "linear", False)
                                       or getattr(strategy, "fresh_adapters", False)):
        name = type(strategy).__name__
        p.add("participation.fedau", True, f"FedAU weighs each client's update, and {name} aggregates what no "
              f"per-client rescaling reaches ({getattr(strategy, 'why_not_linear', '') or 'it is not linear'}); use "
              "strategy=fedavg (zero padding, example weights), ffa_lora, rolora or flora")
    if privacy.get("kind") == "dp_fedavg" or privacy.get("secure") is True:
        p.add("participation.fedau", True, "FedAU rescales each client's update on the server, which client-level "
              "DP (each client clipped to the same bound) and secure aggregation (the server sees only the sum) "
              "do not allow; use participation.fedau=false, or privacy=none or dp_sgd")


def _check_logging(cfg: Mapping[str, Any], p: Problems) -> None:
    wandb = (cfg.get("logging") or {}).get("wandb") or {}
    if wandb.get("enabled") is True:
        import importlib.util  # noqa: PLC0415

        if importlib.util.find_spec("wandb") is None:
            p.add("logging.wandb.enabled", True, "wandb is not installed: `pip install wandb`, or set it to false")


def _check_resources(cfg: Mapping[str, Any], p: Problems) -> None:
    """A local simulation whose clients need more CPUs or GPUs than Ray may use would start no client."""
    import os  # noqa: PLC0415

    sim = cfg.get("simulation") or {}
    if sim.get("address"):
        return  # a cluster's resources are known only once connected
    res = sim.get("client_resources") or {}
    cpus, gpus = res.get("num_cpus"), res.get("num_gpus", 0)
    cap = sim.get("num_cpus")
    have_cpus = cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else os.cpu_count() or 1
    if isinstance(cpus, int | float) and not isinstance(cpus, bool) and cpus > have_cpus:
        p.add("simulation.client_resources.num_cpus", cpus, f"each client needs {cpus:g} CPUs but Ray may use "
              f"{have_cpus} here (simulation.num_cpus, else this machine's CPUs): no client could start; lower it")
    if not isinstance(gpus, int | float) or isinstance(gpus, bool) or gpus <= 0:
        return
    have_gpus = sim.get("num_gpus")
    if not isinstance(have_gpus, int | float) or isinstance(have_gpus, bool):
        import torch  # noqa: PLC0415

        have_gpus = torch.cuda.device_count()
    if gpus > have_gpus:
        p.add("simulation.client_resources.num_gpus", gpus, f"each client needs {gpus:g} GPU but Ray sees "
              f"{have_gpus:g} here: no client could start; use simulation=cpu, or declare GPUs with "
              "simulation.num_gpus")


def _check_reliability(cfg: Mapping[str, Any], p: Problems) -> None:
    """Client minimums against the client count, and the ``faults`` group's options and kinds."""
    n = cfg.get("num_clients")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None
    for key in ("min_clients", "min_fit_clients"):
        v = cfg.get(key, 1)
        if isinstance(v, int) and not isinstance(v, bool) and n is not None and v > n:
            p.add(key, v, f"cannot exceed num_clients={n}; lower it or add clients")
    faults = cfg.get("faults") or {}
    from fedlora.core.faults import CORRUPT_KINDS, FaultSettings, kind_name  # noqa: PLC0415

    unknown = sorted(set(faults) - set(FaultSettings.__dataclass_fields__))
    if unknown:
        p.add("faults", unknown, f"unknown fault option(s); known: {sorted(FaultSettings.__dataclass_fields__)}")
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


def _check_data_split(cfg: Mapping[str, Any], p: Problems) -> None:
    """Read the data (built-in or local, never a hub) and split and partition it as the run will."""
    from fedlora.runtime.data import datasets as ds  # noqa: PLC0415
    from fedlora.runtime.data import instructions as ins  # noqa: PLC0415

    name = str((cfg.get("data") or {}).get("name"))
    if name not in (ds.BUILTIN_BBC, ins.BUILTIN_SYNTHETIC) and not ds.is_local_file(name):
        return  # a hub dataset is checked when it is loaded
    settings = Settings.from_config(cfg)
    problem = data_split_problem(settings.task, settings.data, settings.loop.num_clients)
    if problem:
        p.note(problem)


@functools.lru_cache(maxsize=32)
def data_split_problem(task: TaskSettings, data: DataSettings, num_clients: int) -> str | None:
    """Why the data cannot be read, split and partitioned as configured (``None``: they can)."""
    from fedlora.runtime.data.datasets import DataError  # noqa: PLC0415
    from fedlora.runtime.training.workspace import split_and_partition  # noqa: PLC0415

    try:
        groups, has_groups = make_task(task).groups(data)
        split_and_partition(groups, has_groups, data, num_clients)
    except DataError as exc:
        text = str(exc)
        if text.startswith(f"num_clients={num_clients}:"):  # more clients than training examples
            text += (f"; a federation of {num_clients} clients needs at least that many: e.g. the generated "
                     f"instructions, experiment=causal_demo data.max_examples={4 * num_clients} "
                     "partition=iid (bench/README.md, item 6)")
        return text
    return None


def _check_resume(cfg: Mapping[str, Any], p: Problems) -> None:
    """``resume`` must name a run directory with its config and a complete checkpoint."""
    resume = cfg.get("resume")
    if resume is None:
        return
    from fedlora.results.checkpoint import latest_marker, verify_checkpoint  # noqa: PLC0415

    path = Path(str(resume))
    if not path.is_dir():
        p.add("resume", resume, "no such directory; give a run directory, for example resume=runs/<date>_<time>_fedavg")
    elif not (path / "config.yaml").is_file():
        p.add("resume", resume, "has no config.yaml: it is not a fedlora run directory")
    elif not latest_marker(path).is_file():
        p.add("resume", resume, "has no complete checkpoint/ (the run stopped before round 0 ended, or ran "
              "with checkpoint=false); start it again instead")
    else:
        for damage in verify_checkpoint(path):
            p.add("resume", resume, f"the checkpoint cannot be resumed from: {damage}; restore that file, or start "
                  "the run again")


def validate(cfg: Mapping[str, Any], *, check_model: bool = True, check_data: bool = True) -> None:
    """Raise :class:`~fedlora.core.errors.ConfigError` listing every problem in ``cfg`` (nothing is started)."""
    p = Problems()
    check_fields(cfg, p)
    _check_partition_kind(cfg, p)
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
    _check_resources(cfg, p)
    ranks = _check_ranks(cfg, p)
    strategy = _check_targets(cfg, p)
    _check_privacy(cfg, strategy, p)
    _check_secure(cfg, strategy, p)
    _check_participation(cfg, strategy, p)
    _check_transport(cfg, p)
    if check_data and task is not None:
        task.check_data(cfg, p)
        if not p.items:  # the data can be read: check that they make the split and the partitions asked for
            _check_data_split(cfg, p)
    if check_model and task is not None:
        _check_model(cfg, ranks, task, p)
    p.raise_if_any()
