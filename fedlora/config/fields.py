"""Every scalar field of the configuration: its type, its range, and the fix for a bad value.

One table, checked by :func:`check_fields` before anything starts (``fedlora.config.validate``) and
walked by the table-driven test (``tests/test_fields.py``), which tries a value outside every range
and a value of the wrong type for every field. Types are strict: a boolean is not a count
(``num_rounds=true`` is refused), an integer field takes no fraction. A field missing from the config
is not checked here (an older run's ``config.yaml``; the settings supply its default).

Checks that involve more than one field, the data, the model or a class named by ``_target_`` are
in :mod:`fedlora.config.validate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedlora.core.errors import Problems
from fedlora.core.participation import MODELS as PARTICIPATION_MODELS

_MISSING = object()


@dataclass(frozen=True)
class Field:
    """A scalar config field.

    Attributes
    ----------
    path:
        Dotted path in the config (``train.lr``).
    kind:
        ``int``, ``number`` (int or float, finite), ``bool`` or ``str``.
    low, high:
        Bounds (``None``: unbounded); ``low_open`` / ``high_open`` exclude the bound itself.
    optional:
        ``null`` is allowed (it means "off" or "all").
    fix:
        What to write instead, ending the error message.
    when:
        Only check the field when this holds for the config (``partition.alpha`` for Dirichlet).
    choices:
        For ``str`` fields with a fixed set of values.
    infinite_ok:
        ``inf`` is a value of the field (``privacy.target_epsilon=inf``: no privacy, a sweep's baseline).
    """

    path: str
    kind: str
    fix: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    when: Callable[[Mapping[str, Any]], bool] | None = None
    choices: tuple[str, ...] = ()
    infinite_ok: bool = False

    def problem(self, value: Any) -> str | None:
        """Why ``value`` does not fit, or ``None``."""
        if value is None:
            return None if self.optional else self.fix
        if self.kind == "bool":
            return None if isinstance(value, bool) else self.fix
        if self.kind == "str":
            ok = isinstance(value, str) and (not self.choices or value in self.choices)
            return None if ok else self.fix
        if isinstance(value, bool) or not isinstance(value, int | float):
            return self.fix
        if self.kind == "int" and not isinstance(value, int):
            return self.fix
        if not math.isfinite(value) and not (self.infinite_ok and value == math.inf):
            return self.fix
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return self.fix
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return self.fix
        return None


def _dirichlet(cfg: Mapping[str, Any]) -> bool:
    return (cfg.get("partition") or {}).get("kind") in ("dirichlet", "inner_dirichlet")


def _private(cfg: Mapping[str, Any]) -> bool:
    return (cfg.get("privacy") or {}).get("kind") in ("dp_sgd", "dp_fedavg")


FIELDS: tuple[Field, ...] = (
    Field("name", "str", "a name for the run (it names the run directory)"),
    Field("seed", "int", "use an integer >= 0 (for example seed=0)", low=0),
    Field("num_clients", "int", "must be a positive integer (for example num_clients=10)", low=1),
    Field("num_rounds", "int", "must be a positive integer (for example num_rounds=5)", low=1),
    Field("fraction_train", "number", "must be in (0, 1]; 1.0 samples every client each round",
          low=0, low_open=True, high=1),
    Field("min_clients", "int", "must be an integer >= 1", low=1),
    Field("min_fit_clients", "int", "must be an integer >= 1", low=1),
    Field("round_timeout", "number", "seconds the server waits for a round's replies: use a number > 0",
          low=0, low_open=True),
    Field("connect_timeout", "number", "seconds the server waits for the clients to connect: use a number > 0",
          low=0, low_open=True),
    Field("max_norm_ratio", "number", "use a number > 1 (10 rejects only gross outliers), or null to turn it off",
          low=1, low_open=True, optional=True),
    Field("checkpoint", "bool", "use true or false"),
    Field("offline", "bool", "use true (never touch a model or dataset hub) or false"),
    Field("resume", "str", "give a run directory, for example resume=runs/<date>_<time>_fedavg", optional=True),
    Field("eval.batch_size", "int", "the evaluation batch size: use an integer >= 1 (for example 64)", low=1),
    Field("train.local_steps", "int", "must be a positive integer", low=1),
    Field("train.batch_size", "int", "must be a positive integer", low=1),
    Field("train.lr", "number", "the learning rate must be > 0 (3e-3 works for the default task)",
          low=0, low_open=True),
    Field("train.weight_decay", "number", "use a number >= 0 (0 turns it off)", low=0),
    Field("train.max_grad_norm", "number", "the gradient clipping norm: use a number > 0, or 0 to turn clipping "
          "off", low=0),
    Field("model.name", "str", "give a model name or directory (model=minilm is the offline default)"),
    Field("model.alpha_per_rank", "number", "lora_alpha = alpha_per_rank * r; use a positive number (2.0)",
          low=0, low_open=True),
    Field("model.dropout", "number", "the LoRA dropout probability: use a number in [0, 1)", low=0, high=1,
          high_open=True),
    Field("model.max_length", "int", "tokens per example: use an integer >= 2 (the default task uses 64)", low=2),
    Field("model.base_seed", "int", "use an integer >= 0", low=0),
    Field("data.name", "str", "give a dataset: bbc_news, a local file, or a hub name"),
    Field("data.test_fraction", "number", "must be in (0, 1), for example 0.2", low=0, low_open=True, high=1,
          high_open=True),
    Field("data.validation_fraction", "number", "the share of the training split held out for validation: a "
          "number in [0, 1), for example 0.1 (0: none)", low=0, high=1, high_open=True),
    Field("data.client_test_fraction", "number", "the share of each client's partition it holds out to evaluate "
          "on: a number in [0, 1), for example 0.2 (0: no per-client evaluation)", low=0, high=1, high_open=True),
    Field("eval.client_every", "int", "evaluate on every client's held-out examples every this many rounds: an "
          "integer >= 0 (0: after the last round only)", low=0),
    Field("data.split_seed", "int", "use an integer >= 0", low=0),
    Field("data.max_examples", "int", "how many examples to read: an integer >= 1, or null for all of them",
          low=1, optional=True),
    Field("data.max_test_examples", "int", "cap the test set at an integer >= 1, or null for no cap", low=1,
          optional=True),
    Field("data.max_validation_examples", "int", "hold out at most this many training examples for validation "
          "(the rest stay with the clients): an integer >= 1, or null for no cap", low=1, optional=True),
    Field("data.drop_incomplete", "bool", "use false (rows with a missing text or label are an error) or true "
          "(they are dropped and counted)"),
    Field("partition.alpha", "number", "the Dirichlet concentration must be > 0 (0.5 is strongly non-IID)",
          low=0, low_open=True, when=_dirichlet),
    Field("partition.seed", "int", "use an integer >= 0", low=0),
    Field("partition.min_partition_size", "int", "the fewest examples a client may hold: an integer >= 0", low=0),
    Field("partition.size_sigma", "number", "the spread of the client sizes must be >= 0 (0: equal sizes)", low=0),
    Field("simulation.client_resources.num_cpus", "number", "CPUs per client must be > 0", low=0, low_open=True),
    Field("simulation.client_resources.num_gpus", "number", "use 0 (CPU) or a GPU share such as 0.25 or 1", low=0),
    Field("simulation.num_cpus", "int", "cap Ray's CPUs at an integer >= 1, or null for all", low=1, optional=True),
    Field("simulation.num_gpus", "number", "cap Ray's GPUs at a number >= 0, or null for all", low=0, optional=True),
    Field("simulation.address", "str", "a Ray cluster's address (auto, or host:port), or null for a local one",
          optional=True),
    Field("simulation.log_to_driver", "bool", "use true or false"),
    Field("simulation.reload_model_per_call", "bool", "use true or false (true is for benchmarks only)"),
    Field("logging.tensorboard", "bool", "use true or false"),
    Field("logging.wandb.enabled", "bool", "use true or false"),
    Field("logging.wandb.mode", "str", "use offline, online or disabled", choices=("offline", "online", "disabled")),
    Field("privacy.kind", "str", "use privacy=none, privacy=dp_sgd (sample-level, DP-SGD in each client), "
          "privacy=dp_fedavg (client-level, on the server) or privacy=secagg (secure aggregation)",
          choices=("none", "dp_sgd", "dp_fedavg")),
    Field("privacy.secure", "bool", "use true (secure aggregation: the server sees only the sum of the updates; "
          "privacy=secagg) or false"),
    Field("privacy.target_epsilon", "number", "the epsilon over the run: use a number > 0 (for example 8; inf: no "
          "privacy, a sweep's baseline), or null and set privacy.noise_multiplier", low=0, low_open=True,
          optional=True, when=_private, infinite_ok=True),
    Field("privacy.noise_multiplier", "number", "sigma, the noise std over the clip: use a number > 0 (for example "
          "1.0), or null and set privacy.target_epsilon", low=0, low_open=True, optional=True, when=_private),
    Field("privacy.clip", "number", "the L2 bound (of each example's gradient, or each client's update): use a "
          "number > 0 (for example 1.0)",
          low=0, low_open=True, when=_private),
    Field("privacy.delta", "number", "delta must be in (0, 1); use well below 1 / (the examples, or clients, "
          "protected), for example 1e-5", low=0, low_open=True, high=1, high_open=True, when=_private),
    Field("privacy.accountant", "str", "use one of Opacus' accountants: rdp, prv or gdp",
          choices=("rdp", "prv", "gdp"), when=_private),
    Field("faults.fail_prob", "number", "a probability: use a number in [0, 1]", low=0, high=1),
    Field("faults.straggler_prob", "number", "a probability: use a number in [0, 1]", low=0, high=1),
    Field("faults.corrupt_prob", "number", "a probability: use a number in [0, 1]", low=0, high=1),
    Field("faults.straggler_delay_s", "number", "seconds a straggler sleeps: use a number >= 0", low=0),
    Field("faults.seed", "int", "use an integer, or null for the run seed", optional=True),
    Field("participation.model", "str", "use participation=uniform (the server samples fraction_train) or "
          "participation=bernoulli (each client takes part on its own)", choices=PARTICIPATION_MODELS),
    Field("participation.mean", "number", "the drawn probabilities' mean: use a number in (0, 1), e.g. 0.2",
          low=0, high=1, low_open=True, high_open=True),
    Field("participation.concentration", "number", "Beta's concentration: use a number > 0 (2.0; smaller "
          "spreads the probabilities more)", low=0, low_open=True),
    Field("participation.minimum", "number", "the lowest probability of taking part: use a number in (0, 1], "
          "e.g. 0.02", low=0, high=1, low_open=True),
    Field("participation.fedau", "bool", "use true (FedAU's weights) or false"),
    Field("participation.fedau_cutoff", "int", "the longest interval FedAU records: use an integer >= 1 (50; "
          "100000, the authors' code's default, is in effect no cutoff)", low=1),
)


def lookup(cfg: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` (a sentinel when a key on the way is missing)."""
    node: Any = cfg
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return _MISSING
        node = node[key]
    return node


def check_fields(cfg: Mapping[str, Any], p: Problems) -> None:
    """Check every field of :data:`FIELDS` that the config has."""
    for field in FIELDS:
        if field.when is not None and not field.when(cfg):
            continue
        value = lookup(cfg, field.path)
        if value is _MISSING:
            continue
        why = field.problem(value)
        if why is not None:
            p.add(field.path, value, why)
