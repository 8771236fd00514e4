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
    norms = [math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values())) for delta in deltas]
    factors = [min(1.0, dp.clip / norm) if norm > 0 else 1.0 for norm in norms]
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in global_adapter.items()}
    for delta, factor in zip(deltas, factors, strict=True):
        for k in total:
            total[k] += factor * delta[k]
    std = dp.noise_multiplier * dp.clip
    for k in sorted(noised):
        total[k] += torch.normal(0.0, std, size=total[k].shape, generator=generator)
    out = {k: (v.to(torch.float32) + total[k] / dp.denominator).to(v.dtype) for k, v in global_adapter.items()}
    metrics = {
        "dp_clipped_fraction": sum(f < 1.0 for f in factors) / len(factors) if factors else 0.0,
        "dp_update_norm_median": float(torch.tensor(norms).median()) if norms else 0.0,
        "dp_noise_std": std / dp.denominator,
    }
    return out, metrics
