"""Fault injection for testing and realistic simulation (torch and the standard library only).

The ``faults`` config group (``conf/faults/``) describes what goes wrong; the ClientApp asks
:func:`decide` at the start of every training message and then fails (raises, which Flower turns
into an error reply), sleeps (a straggler) or corrupts its reply (:func:`corrupt_state`).

Every decision is a pure function of ``(faults.seed or the run seed, round, client)``, drawn from
its own seeded generator, so a run with faults is as reproducible as one without, and a test can
compute in advance which client fails in which round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.core import lora_math as lm
from fedlora.core import seeds
from fedlora.core.types import AdapterState

# What a corrupted reply looks like; each is rejected by fedlora.core.validation.
CORRUPT_KINDS = ("nan", "inf", "shape", "rank", "missing_key", "extra_key", "scale")
SCALE = 1e4  # the "scale" corruption multiplies the client's change by this


def kind_name(value: object) -> str:
    """Return a corruption kind as a string (Hydra reads ``nan``/``inf`` on the command line as floats)."""
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf"
    return str(value)


class InjectedFault(RuntimeError):
    """A failure the ``faults`` config asked for (not a bug)."""


@dataclass(frozen=True)
class FaultSettings:
    """The ``faults`` config group.

    Attributes
    ----------
    fail_prob:
        Probability that a sampled client fails in a round (raises before training).
    straggler_prob:
        Probability that a sampled client sleeps ``straggler_delay_s`` before training.
    straggler_delay_s:
        A straggler's delay in seconds; above ``round_timeout`` its reply misses the round.
    corrupt_prob:
        Probability that a client sends a malformed update of kind ``corrupt_kind``.
    corrupt_kind:
        One of :data:`CORRUPT_KINDS`.
    corrupt:
        ``(client id, kind)`` pairs: these clients corrupt their update in every round.
    seed:
        Seed of the decisions; ``None`` uses the run seed.
    """

    fail_prob: float = 0.0
    straggler_prob: float = 0.0
    straggler_delay_s: float = 0.0
    corrupt_prob: float = 0.0
    corrupt_kind: str = "nan"
    corrupt: tuple[tuple[int, str], ...] = ()
    seed: int | None = None

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> FaultSettings:
        """Build from the ``faults`` config node (``None`` or ``{}``: no faults)."""
        node = dict(node or {})
        corrupt = tuple(sorted((int(k), kind_name(v)) for k, v in dict(node.pop("corrupt", None) or {}).items()))
        node["corrupt_kind"] = kind_name(node.get("corrupt_kind", "nan"))
        names = {f for f in cls.__dataclass_fields__ if f != "corrupt"}
        return cls(corrupt=corrupt, **{k: v for k, v in node.items() if k in names})


@dataclass(frozen=True)
class FaultDecision:
    """What goes wrong for one client in one round."""

    fail: bool = False
    delay_s: float = 0.0
    corrupt: str | None = None


def decide(settings: FaultSettings, run_seed: int, server_round: int, client_id: int) -> FaultDecision:
    """Return the (deterministic) faults of client ``client_id`` in round ``server_round``."""
    seed = run_seed if settings.seed is None else int(settings.seed)
    rng = seeds.faults(seed, server_round, client_id)
    fail, straggle, corrupt = rng.random(), rng.random(), rng.random()  # always three draws, in order
    kind = dict(settings.corrupt).get(client_id)
    if kind is None and corrupt < settings.corrupt_prob:
        kind = settings.corrupt_kind
    return FaultDecision(
        fail=fail < settings.fail_prob,
        delay_s=float(settings.straggler_delay_s) if straggle < settings.straggler_prob else 0.0,
        corrupt=kind,
    )


def corrupt_state(state: AdapterState, start: AdapterState, kind: str) -> AdapterState:
    """Return a copy of the trained ``state`` made malformed in the way ``kind`` names.

    ``start`` is the adapter the client started from (for ``scale``, which blows up the change).
    """
    out = {k: v.clone() for k, v in state.items()}
    lora = sorted(k for k in out if lm.is_lora_b_key(k))
    first = lora[0] if lora else sorted(out)[0]
    if kind == "nan":
        out[first].view(-1)[0] = float("nan")
    elif kind == "inf":
        out[first].view(-1)[-1] = float("inf")
    elif kind == "shape":
        out[first] = out[first][:-1]  # one row short
    elif kind == "rank":
        for key in list(out):  # every factor one rank larger: A (r+1, n), B (m, r+1)
            if lm.is_lora_a_key(key):
                out[key] = torch.cat([out[key], torch.zeros(1, out[key].shape[1])], dim=0)
            elif lm.is_lora_b_key(key):
                out[key] = torch.cat([out[key], torch.zeros(out[key].shape[0], 1)], dim=1)
    elif kind == "missing_key":
        del out[first]
    elif kind == "extra_key":
        out["injected.extra.weight"] = torch.zeros(2, 2)
    elif kind == "scale":
        out = {k: start[k] + SCALE * (v - start[k]) if k in start else v for k, v in out.items()}
    else:
        raise ValueError(f"faults.corrupt_kind={kind!r}: use one of {CORRUPT_KINDS}")
    return out
