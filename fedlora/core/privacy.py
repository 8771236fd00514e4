r"""Client-level differential privacy (DP-FedAvg with a trusted server): clip, sum, noise, fixed denominator.

The mechanism of McMahan et al. ("Learning Differentially Private Recurrent Language Models",
ICLR 2018) in the space the strategy aggregates. For a strategy whose aggregate is a weighted mean
of per-client images (``Strategy.linear``), the image of client ``k`` is what the strategy returns
for ``k``'s update alone, :math:`y_k = S(\{u_k\})`: FedAvg's zero-padded factors and head, FFA-LoRA's
``B`` and head next to the seed's ``A``, RoLoRA's trained factor. With :math:`g` the global adapter:

.. math::

    \Delta_k = y_k - g, \qquad
    g' = g + \frac{1}{m}\Big(\sum_k \Delta_k \min\big(1, C / \|\Delta_k\|_2\big) + \mathcal N(0, z^2 C^2 I)\Big)

``C`` is the clip (the L2 norm over every tensor of the adapter together), ``z`` the noise multiplier
and ``m`` the fixed denominator: the number of clients a round samples, whether or not all of them
answer (a data-dependent denominator would leak how many did). Every client weighs the same; example
counts are not used (they would be unbounded in the sensitivity). The noise goes on every tensor a
client can move (the plans' uplink tensors); a tensor no plan lets a client move (FFA-LoRA's ``A``)
must come out of every image unchanged, which :func:`private_mean` checks. The noise is drawn from a
generator the caller seeds (per run and round), so a resumed run draws what the uninterrupted one did.
Accounting (the sampled Gaussian mechanism over the rounds) is the runtime's, with Opacus.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlora.core.types import AdapterState


@dataclass(frozen=True)
class ClientLevel:
    """DP-FedAvg's parameters: the clip ``C``, the noise multiplier ``z`` and the fixed denominator ``m``."""

    clip: float
    noise_multiplier: float
    denominator: int


def clip_update(delta: Mapping[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """``delta`` scaled by ``min(1, clip / ||delta||_2)`` (the norm over every tensor together, float32 out),
    and the norm before clipping. The one step of DP-FedAvg a client can take itself: under secure
    aggregation each client clips its own change before masking it (:func:`release` adds the noise)."""
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values()))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: factor * d.to(torch.float32) for k, d in delta.items()}, norm


def release(global_adapter: AdapterState, clipped_sum: Mapping[str, torch.Tensor], noised: Collection[str],
            dp: ClientLevel, generator: torch.Generator) -> AdapterState:
    """``g + (clipped_sum + N(0, z^2 C^2)) / m``: the noise on every tensor of ``noised`` (sorted key order,
    drawn from ``generator``), the sum of the clients' clipped changes ``clipped_sum`` (a missing key: zero)."""
    total = {k: (clipped_sum[k].to(torch.float32).clone() if k in clipped_sum
                 else torch.zeros_like(v, dtype=torch.float32)) for k, v in global_adapter.items()}
    std = dp.noise_multiplier * dp.clip
    for k in sorted(noised):
        total[k] += torch.normal(0.0, std, size=total[k].shape, generator=generator)
    return {k: (v.to(torch.float32) + total[k] / dp.denominator).to(v.dtype) for k, v in global_adapter.items()}


def private_mean(global_adapter: AdapterState, images: Sequence[Mapping[str, torch.Tensor]],
                 noised: Collection[str], dp: ClientLevel, generator: torch.Generator,
                 ) -> tuple[AdapterState, dict[str, float]]:
    """``g + (sum of clipped deltas + noise) / m``; with the round's clipping metrics.

    Raises
    ------
    ValueError
        When an image moves a tensor outside ``noised`` (it would be released without noise).
    """
    deltas = [{k: image[k].to(torch.float32) - v for k, v in global_adapter.items()} for image in images]
    for delta in deltas:
        moved = sorted(k for k, d in delta.items() if k not in noised and bool(d.any()))
        if moved:
            raise ValueError(f"client-level DP: an update moves {moved[:3]}, which no plan lets a client train; it "
                             "would be released without noise")
    clipped = [clip_update(delta, dp.clip) for delta in deltas]
    norms = [norm for _, norm in clipped]
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in global_adapter.items()}
    for part, _ in clipped:
        for k in total:
            total[k] += part[k]
    out = release(global_adapter, total, noised, dp, generator)
    metrics = {
        "dp_clipped_fraction": sum(norm > dp.clip for norm in norms) / len(norms) if norms else 0.0,
        "dp_update_norm_median": float(torch.tensor(norms).median()) if norms else 0.0,
        "dp_noise_std": dp.noise_multiplier * dp.clip / dp.denominator,
    }
    return out, metrics
