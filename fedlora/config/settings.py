"""Typed settings of a run, built once from the resolved config after validation.

``Settings.from_config(cfg)`` is the one place that reads the config dict by key and the one place
that supplies defaults for keys an older run's ``config.yaml`` may lack; every other module takes a
frozen dataclass. The dataclasses are hashable, so per-process objects built from them (the
workspace, the compressor) are cached by them.

Strategies and compressors are :class:`Component` nodes: the ``_target_`` class and its keyword
arguments. A new one is its module, its YAML in ``conf/strategy/`` or ``conf/compression/`` and its
test; nothing here lists them.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedlora.core import seeds
from fedlora.core.faults import FaultSettings
from fedlora.core.participation import ParticipationSettings
from fedlora.core.secure import SecureSettings
from fedlora.federation.loop import LoopSettings
from fedlora.federation.sampling import sample_size
from fedlora.runtime.data.settings import DataSettings
from fedlora.runtime.models import ModelSettings
from fedlora.runtime.tasks import TaskSettings, task_class
from fedlora.runtime.training.dp import ClientDPSettings, DPSettings
from fedlora.runtime.training.local import TrainSettings
from fedlora.runtime.training.workspace import WorkspaceKey

RANK_POLICIES = ("cycle", "explicit", "random")
TRANSPORTS = ("flower", "pooled")  # Flower (simulation or deployment) | the centralized bound's pooled learner


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _thaw(value: Any) -> Any:
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def import_target(target: str) -> Any:
    """The object a ``_target_`` names (``ImportError``/``AttributeError`` when there is none)."""
    module, _, attr = str(target).rpartition(".")
    if not module:
        raise ImportError(f"{target!r} is not a dotted path module.Class")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Component:
    """A ``_target_`` node: a class by its dotted path and its keyword arguments (hashable)."""

    target: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_node(cls, node: Mapping[str, Any] | None) -> Component | None:
        """The component of a config node (``None`` for ``{}`` or a node without ``_target_``)."""
        if not node or "_target_" not in node:
            return None
        return cls(str(node["_target_"]), tuple(sorted((k, _freeze(v)) for k, v in node.items() if k != "_target_")))

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments, as the config wrote them."""
        return {k: _thaw(v) for k, v in self.kwargs}

    def build(self) -> Any:
        """Construct it (the constructor validates its arguments and raises ``ValueError``)."""
        return import_target(self.target)(**self.options)


@dataclass(frozen=True)
class RankSettings:
    """How clients get their LoRA rank (``ranks`` group)."""

    policy: str = "cycle"  # cycle | random | explicit
    tiers: tuple[int, ...] = (8,)
    explicit: tuple[int, ...] | None = None

    def assign(self, num_clients: int, seed: int) -> list[int]:
        """Each client's rank: ``cycle`` gives client ``k`` ``tiers[k % len(tiers)]``, ``random`` a
        tier drawn per client from ``seed``, ``explicit`` the listed rank of each client."""
        if self.policy == "explicit":
            return [int(r) for r in self.explicit or ()]
        if self.policy == "random":
            rng = seeds.rank_tiers(seed)
            return [int(rng.choice(self.tiers)) for _ in range(num_clients)]
        return [int(self.tiers[k % len(self.tiers)]) for k in range(num_clients)]


@dataclass(frozen=True)
class SimulationSettings:
    """Ray's resources for a simulation (``simulation`` group)."""

    client_cpus: float = 1  # CPUs per client actor
    client_gpus: float = 0.0  # GPU share per client actor
    num_cpus: int | None = None  # cap on the CPUs Ray may use
    num_gpus: float | None = None
    address: str | None = None  # an existing Ray cluster to join
    log_to_driver: bool = True
    reload_model_per_call: bool = False  # benchmark only: load the base model on every train call


@dataclass(frozen=True)
class LoggingSettings:
    """Where the round records stream besides ``metrics.jsonl`` (``logging`` group)."""

    tensorboard: bool = True
    wandb_enabled: bool = False
    wandb_project: str = "fedlora"
    wandb_mode: str = "offline"

    def wandb(self) -> dict[str, Any]:
        """The W&B options as :class:`fedlora.results.recorder.RunRecorder` takes them."""
        return {"enabled": self.wandb_enabled, "project": self.wandb_project, "mode": self.wandb_mode}


def _pick(cls: type, values: Mapping[str, Any], **extra: Any) -> Any:
    """Build dataclass ``cls`` from the entries of ``values`` named like its fields (lists as tuples)."""
    names = {f.name for f in fields(cls)}
    kwargs = {k: _freeze(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
    return cls(**{**kwargs, **extra})


def _privacy(cfg: Mapping[str, Any]) -> DPSettings | None:
    """DP-SGD's settings (``privacy=dp_sgd``), its budget over the run's rounds; ``None`` otherwise.

    ``target_epsilon=inf`` is no privacy at all (plain training: no clipping, no noise, no Poisson
    batches), so that one sweep over ``privacy.target_epsilon`` holds its non-private baseline.
    """
    privacy = cfg.get("privacy") or {}
    if privacy.get("kind", "none") != "dp_sgd" or privacy.get("target_epsilon") == math.inf:
        return None
    return _pick(DPSettings, privacy, rounds=int(cfg["num_rounds"]))


def _secure(cfg: Mapping[str, Any]) -> SecureSettings | None:
    """Secure aggregation's settings (``secure_aggregation.*``) when ``privacy.secure`` is on; ``None`` otherwise."""
    if not (cfg.get("privacy") or {}).get("secure"):
        return None
    return _pick(SecureSettings, cfg.get("secure_aggregation") or {})


def _client_privacy(cfg: Mapping[str, Any]) -> ClientDPSettings | None:
    """DP-FedAvg's settings (``privacy=dp_fedavg``): its sampling rate is the share of clients a round samples.

    ``target_epsilon=inf`` is no privacy (the strategy's own aggregate), as for DP-SGD.
    """
    privacy = cfg.get("privacy") or {}
    if privacy.get("kind", "none") != "dp_fedavg" or privacy.get("target_epsilon") == math.inf:
        return None
    n = int(cfg["num_clients"])
    per_round = sample_size(n, float(cfg.get("fraction_train", 1.0)), int(cfg.get("min_clients", 1)))
    return _pick(ClientDPSettings, privacy, sample_rate=per_round / n, rounds=int(cfg["num_rounds"]))


@dataclass(frozen=True)
class Settings:
    """Everything a run reads, typed. Build it with :meth:`from_config`."""

    loop: LoopSettings
    output_dir: str
    strategy: Component
    compression: Component | None
    ranks: RankSettings
    model: ModelSettings
    data: DataSettings
    train: TrainSettings
    task: TaskSettings
    faults: FaultSettings = field(default_factory=FaultSettings)
    downlink: Component | None = None  # compresses each client's start (downlink=compeft)
    client_dp: ClientDPSettings | None = None  # privacy=dp_fedavg (privacy=dp_sgd is train.dp)
    secure: SecureSettings | None = None  # secure aggregation (privacy=secagg, or privacy.secure=true)
    simulation: SimulationSettings = field(default_factory=SimulationSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    eval_batch_size: int = 64
    offline: bool = True
    transport: str = "flower"
    deployment: bool = False
    # the resolved config itself (what config.yaml and W&B record); not part of equality or hashing
    source: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def seed(self) -> int:
        """The run seed."""
        return self.loop.seed

    @property
    def run_dir(self) -> Path:
        """The run directory."""
        return Path(self.output_dir)

    def client_ranks(self) -> list[int]:
        """Every client's LoRA rank, by the rank policy."""
        return self.ranks.assign(self.loop.num_clients, self.seed)

    def workspace_key(self) -> WorkspaceKey:
        """The per-process workspace of this run (base model, data, split, partitions)."""
        return WorkspaceKey(self.model, self.data, self.loop.num_clients, self.seed, self.task)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Settings:
        """The settings of a resolved (and validated) config."""
        task = _pick(TaskSettings, cfg.get("task") or {})
        part = cfg.get("partition") or {}
        data = _pick(DataSettings, cfg["data"], partition=part.get("kind", "dirichlet"),
                     alpha=part.get("alpha", 0.5), partition_seed=part.get("seed", 42),
                     min_partition_size=part.get("min_partition_size", 10),
                     size_sigma=float(part.get("size_sigma", 0.0)))
        sim = dict(cfg.get("simulation") or {})
        resources = sim.pop("client_resources", None) or {}
        wandb = (cfg.get("logging") or {}).get("wandb") or {}
        every = int((cfg.get("eval") or {}).get("client_every", 0))
        loop = _pick(LoopSettings, cfg, name=str(cfg.get("name") or ""), resume=bool(cfg.get("resume")),
                     participation=_pick(ParticipationSettings, cfg.get("participation") or {}),
                     client_eval_every=every if data.client_test_fraction > 0 else None)
        return cls(
            loop=loop, output_dir=str(cfg.get("output_dir", ".")),
            strategy=Component.from_node(cfg["strategy"]),  # type: ignore[arg-type]
            compression=Component.from_node(cfg.get("compression")),
            ranks=_pick(RankSettings, cfg.get("ranks") or {}),
            model=_pick(ModelSettings, cfg["model"], decoder=task_class(task.kind).decoder),
            data=data, train=_pick(TrainSettings, cfg["train"], dp=_privacy(cfg)), task=task,
            faults=FaultSettings.from_config(cfg.get("faults")), client_dp=_client_privacy(cfg),
            downlink=Component.from_node(cfg.get("downlink")),
            secure=_secure(cfg),
            simulation=_pick(SimulationSettings, sim, client_cpus=resources.get("num_cpus", 1),
                             client_gpus=resources.get("num_gpus", 0.0)),
            logging=LoggingSettings(tensorboard=bool((cfg.get("logging") or {}).get("tensorboard", True)),
                                    wandb_enabled=bool(wandb.get("enabled", False)),
                                    wandb_project=str(wandb.get("project", "fedlora")),
                                    wandb_mode=str(wandb.get("mode", "offline"))),
            eval_batch_size=int((cfg.get("eval") or {}).get("batch_size", 64)),
            offline=bool(cfg.get("offline", True)), transport=str(cfg.get("transport") or "flower"),
            deployment=bool(cfg.get("deployment")), source=dict(cfg),
        )
