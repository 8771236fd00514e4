r"""What a client puts into secure aggregation, and what the server makes of the sum (torch only).

Under secure aggregation the server learns :math:`\sum_k n_k x_k` and :math:`\sum_k n_k`, never an
``x_k``. For that to be enough, ``x_k`` must live in one space for every client, whatever its rank:
client ``k``'s **uplink tensors** (what its plan lets it send: :func:`fedlora.federation.wire.uplink_keys`)
zero-padded to the round's layout rank ``R`` (``A`` gets zero rows, ``B`` zero columns; the head
as is), in sorted key order, flattened (:func:`embed`). The weighted mean of those vectors is
unflattened (:func:`unembed`) into one **mean update** of rank ``R`` (:func:`mean_update`), and the
strategy aggregates that single update.

That equals the strategy's aggregate of the individual updates exactly when the strategy is
``linear`` (its aggregate is the example-weighted mean of the zero-padded uplink tensors, the rest
taken from the global adapter); the contract test checks it for every strategy that declares it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterState, ClientUpdate, Tensor

Layout = list[tuple[str, tuple[int, ...]]]  # (key, shape at the layout rank), in vector order


@dataclass(frozen=True)
class SecureSettings:
    """A run's secure aggregation (config ``secure_aggregation.*``; on with ``privacy.secure=true``).

    ``num_shares`` neighbours of each client hold shares of its secrets, ``threshold`` of them
    rebuild them; each weighted entry ``n_k / W * x_k`` is clipped to ``[-clipping_range,
    clipping_range]`` and quantized to ``quantization_range`` levels; masked sums live modulo
    ``modulus_range``. ``W`` (the weight of one example) is the run's: the smallest power of two at
    least the largest client's example count.
    """

    num_shares: int = 5
    threshold: int = 3
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32


def max_weight(num_examples: Sequence[int]) -> int:
    """``W``: the smallest power of two >= every count (so ``n_k / W`` is exact in SecAgg+'s quantization)."""
    largest = max([1, *num_examples])
    return 1 << (largest - 1).bit_length()


def error_bound(settings: SecureSettings, weight: int, total_weight: float, contributors: int) -> float:
    """The largest error of an entry of the weighted mean that quantization allows: each contributor's
    weighted entry ``n_k / W * x_k`` is rounded by less than one step ``2 c / T``, and the sum is
    scaled by ``W / sum n_k`` (entries clipped at ``c`` aside)."""
    return contributors * 2.0 * settings.clipping_range / settings.quantization_range * weight / max(total_weight, 1.0)


def padded_shape(key: str, shape: Sequence[int], rank: int) -> tuple[int, ...]:
    """The shape of tensor ``key`` zero-padded to ``rank`` (``A``: rows, ``B``: columns, others unchanged)."""
    if lm.is_lora_a_key(key):
        return (rank, *shape[1:])
    if lm.is_lora_b_key(key):
        return (*shape[:-1], rank)
    return tuple(shape)


def layout(shapes: Mapping[str, Sequence[int]], rank: int) -> Layout:
    """The vector's layout for uplink tensors of ``shapes`` (any rank up to ``rank``), padded to ``rank``."""
    return [(key, padded_shape(key, shapes[key], rank)) for key in sorted(shapes)]


def vector_size(plan: Layout) -> int:
    """How many entries the vector of ``plan`` has."""
    total = 0
    for _, shape in plan:
        count = 1
        for d in shape:
            count *= d
        total += count
    return total


def embed(tensors: Mapping[str, Tensor], plan: Layout) -> Tensor:
    """``tensors`` (a client's uplink tensors at its rank) zero-padded to ``plan`` and flattened (float64).

    Raises ``ValueError`` when the keys differ from the layout's or a tensor does not fit in it.
    """
    if sorted(tensors) != [key for key, _ in plan]:
        raise ValueError(f"secure aggregation: the update has tensors {sorted(tensors)}, the layout "
                         f"{[key for key, _ in plan]}")
    parts = []
    for key, shape in plan:
        t = tensors[key].detach().to(torch.float64)
        if t.dim() != len(shape) or any(d > s for d, s in zip(t.shape, shape, strict=True)):
            raise ValueError(f"secure aggregation: {key!r} has shape {tuple(t.shape)}, larger than the layout's "
                             f"{shape}")
        parts.append(lm.pad_key(key, t, shape, "the secure-aggregation layout").reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def unembed(vector: Tensor, plan: Layout, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The tensors of ``plan`` read back from ``vector`` (the inverse of :func:`embed`)."""
    if vector.numel() != vector_size(plan):
        raise ValueError(f"secure aggregation: the sum has {vector.numel()} entries, the layout "
                         f"{vector_size(plan)}")
    out, at = {}, 0
    for key, shape in plan:
        count = vector_size([(key, shape)])
        out[key] = vector[at: at + count].reshape(shape).to(dtype).clone()
        at += count
    return out


def mean_update(weighted_sum: Tensor, total_weight: float, plan: Layout, start: AdapterState, *,
                scaling: float, client_id: int = -1) -> ClientUpdate:
    """The one update the strategy aggregates: the weighted mean of the vectors, as a client of the
    layout rank whose plan started from ``start`` would have sent it (the rest of its adapter from
    ``start``), weighing ``total_weight`` examples."""
    if total_weight <= 0:
        raise ValueError(f"secure aggregation: the sum's total weight is {total_weight}; nothing to average")
    mean = unembed(weighted_sum.to(torch.float64) / float(total_weight), plan,
                   dtype=next(iter(start.values())).dtype if start else torch.float32)
    state = dict(mean)
    for key, value in start.items():
        state.setdefault(key, value.clone())
    rank = lm.rank_of(state)
    return ClientUpdate(client_id, rank, scaling, round(total_weight), state)
