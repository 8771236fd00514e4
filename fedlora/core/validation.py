"""Checks that reject a malformed client update before it reaches a strategy (torch only).

A reply is checked twice on the server:

1. :func:`check_update`, alone: it must carry exactly the keys the server expects, each with the
   shape of the client's assigned rank, floating point and finite. The expected keys and shapes
   are those of the adapter the server sent (its *start state*), so nothing here depends on the
   model or on peft.
2. :func:`norm_outliers`, across the round's well-formed updates: an update whose change from
   its start, ``||theta_k - theta_k^0||_2`` over all its tensors, exceeds ``ratio`` times the
   median change of the *other* updates is rejected. The median of the others (not of all) keeps
   one huge update from raising its own yardstick; a few legitimately larger updates (a rank-16
   client moves about sqrt(8) times more parameters than a rank-2 one) stay far below a ratio
   of 10.

Every check returns a reason string (``None`` when the update is fine), written into the
client's row of ``metrics.jsonl``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterState, Tensor

_SHOWN = 3  # how many offending keys a reason names


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _lora_rank(received: Mapping[str, Tensor]) -> int | None:
    """Return the rank the LoRA tensors agree on (rows of ``A``, columns of ``B``), else ``None``."""
    ranks = set()
    for key, value in received.items():
        if lm.is_lora_a_key(key) and value.dim() == 2:
            ranks.add(int(value.shape[0]))  # A: (r, n)
        elif lm.is_lora_b_key(key) and value.dim() == 2:
            ranks.add(int(value.shape[1]))  # B: (m, r)
    return ranks.pop() if len(ranks) == 1 else None


def check_update(expected: Mapping[str, tuple[int, ...]], received: Mapping[str, Tensor], rank: int,
                 reported_rank: int | None = None) -> str | None:
    """Return why ``received`` is malformed, or ``None`` when it is well-formed.

    Parameters
    ----------
    expected:
        Key -> shape of every tensor the client had to send, at its assigned rank.
    received:
        The decoded tensors the client sent.
    rank:
        The rank the server assigned to this client.
    reported_rank:
        The rank the client says it trained (its reply's metrics), if any.

    Returns
    -------
    str or None
        A one-line reason naming the offending keys, or ``None``.
    """
    if reported_rank is not None and reported_rank != rank:
        return f"wrong rank: the client reports rank {reported_rank} but rank {rank} was assigned"
    missing = sorted(set(expected) - set(received))
    if missing:
        return f"missing keys: {_names(missing)} ({len(missing)} of {len(expected)} expected keys absent)"
    extra = sorted(set(received) - set(expected))
    if extra:
        return f"unexpected keys: {_names(extra)} (not part of the rank-{rank} adapter)"
    wrong = sorted(k for k in expected if tuple(received[k].shape) != tuple(expected[k]))
    if wrong:
        got = _lora_rank(received)
        if got is not None and got != rank and all(lm.is_lora_key(k) for k in wrong):
            return f"wrong rank: the LoRA factors have rank {got} but rank {rank} was assigned"
        k = wrong[0]
        return (f"wrong shape: {_names(wrong)}; for example {k} has shape {tuple(received[k].shape)}, "
                f"expected {tuple(expected[k])}")
    not_float = sorted(k for k, v in received.items() if not v.is_floating_point())
    if not_float:
        return f"non-floating-point tensors: {_names(not_float)}"
    for kind, test in (("NaN", torch.isnan), ("infinite", torch.isinf)):
        bad = sorted(k for k, v in received.items() if bool(test(v).any()))
        if bad:
            count = sum(int(test(received[k]).sum()) for k in bad)
            return f"{count} {kind} value(s) in {_names(bad)}"
    return None


def change_norm(state: Mapping[str, Tensor], start: Mapping[str, Tensor]) -> float:
    """Return ``||state - start||_2`` over every tensor of ``state`` (float64 accumulation)."""
    total = 0.0
    for key, value in state.items():
        diff = value.detach().to(torch.float64) - start[key].detach().to(torch.float64)
        total += float((diff * diff).sum())
    return math.sqrt(total)


def norm_outliers(norms: Mapping[int, float], ratio: float | None) -> dict[int, str]:
    """Return ``{client: reason}`` for every change norm above ``ratio`` x the median of the others.

    Parameters
    ----------
    norms:
        Client id -> change norm of its (well-formed) update this round.
    ratio:
        The bound; ``None`` turns the check off. Needs at least two updates.
    """
    if ratio is None or len(norms) < 2:
        return {}
    out: dict[int, str] = {}
    for cid, value in sorted(norms.items()):
        median = statistics.median(v for c, v in norms.items() if c != cid)
        if median > 0 and value > ratio * median:
            out[cid] = (f"update norm {value:.4g} is {value / median:.1f} x the median {median:.4g} of the "
                        f"other updates (limit max_norm_ratio={ratio:g})")
    return out


def expected_shapes(start: Mapping[str, Tensor], keys: list[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Return key -> shape of ``start`` (restricted to ``keys`` when given)."""
    names = sorted(start) if keys is None else keys
    return {k: tuple(start[k].shape) for k in names}


def is_finite_state(state: AdapterState) -> bool:
    """Return whether every tensor of ``state`` is finite."""
    return all(bool(torch.isfinite(v).all()) for v in state.values())
