r"""FedAvg over LoRA factors (FedIT), with zero-padding for mixed ranks (HeteroLoRA / HetLoRA).

FedIT (Zhang et al., 2024) averages the factors separately:
:math:`\bar A = \sum_k p_k A_k`, :math:`\bar B = \sum_k p_k B_k`, so the global update is
:math:`s \bar B \bar A`, which in general differs from the average of the clients' products
:math:`s \sum_k p_k B_k A_k` (the gap is :math:`\sum_k p_k (B_k-\bar B)(A_k-\bar A)`); the gap is
logged every round as ``product_gap_rel``.

Mixed ranks (Cho et al., EMNLP 2024): each client's factors are zero-padded to ``r_max``
(``A`` with zero rows, ``B`` with zero columns), averaged, and client ``k`` receives the first
``r_k`` slots. ``padding="owners"`` instead averages each rank slot only over the clients that
own it (slots nobody trained keep their value), which avoids diluting high-rank slots.

``weighting="norm"`` is HetLoRA's sparsity weighting: :math:`p_k \propto \|B_k A_k\|_F`
(summed over modules), falling back to example counts when every norm is zero; HetLoRA as published,
with its local rank self-pruning, is :mod:`strategies.hetlora`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterSpec, AdapterState, AggregateResult, ClientPlan, ClientUpdate, LoraPair, Tensor

_WEIGHTINGS = ("examples", "norm")
_PADDINGS = ("zero", "owners")


def check_client_rank(method: str, client_id: int, rank: int, r_max: int) -> None:
    """Raise ``ValueError`` unless ``1 <= rank <= r_max`` (a client holds the first ``rank`` slots)."""
    if not 1 <= rank <= r_max:
        raise ValueError(f"client {client_id} has rank {rank}; {method} needs 1 <= rank <= r_max={r_max}")


def check_equal_scaling(updates: Sequence[ClientUpdate]) -> float:
    """Return the common scaling ``s = alpha / r`` or raise if clients disagree.

    Averaging factors of adapters with different ``s`` mixes incompatible units (the asymmetric
    alpha handling of FlexLoRA's HeteroLoRA, algorithms.md 1.2); fedlora keeps ``alpha = c * r``.
    """
    scalings = {round(u.scaling, 9) for u in updates}
    if len(scalings) != 1:
        raise ValueError(
            f"clients use different LoRA scalings {sorted(scalings)}; set adapter.alpha_per_rank "
            "so that lora_alpha / r is the same at every rank"
        )
    return updates[0].scaling


def norm_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """HetLoRA weights ``S_k / sum_j S_j`` with ``S_k = sum_modules ||B_k A_k||_F``.

    Falls back to example weights when every ``S_k`` is zero (no client moved its adapter).
    """
    norms = []
    for u in updates:
        pairs, _ = lm.split_state(u.state)
        norms.append(sum(lm.factored_fro_norm(b, a) for a, b in pairs.values()))
    total = sum(norms)
    if total <= 0.0:
        return lm.example_weights([u.num_examples for u in updates])
    return [s / total for s in norms]


def product_gap(
    updates: Sequence[ClientUpdate], weights: Sequence[float], averaged: Mapping[str, LoraPair]
) -> float:
    """Relative gap ``||sum p_k B_k A_k - B_avg A_avg||_F / ||sum p_k B_k A_k||_F`` over modules.

    Both norms share one ``A`` side, ``[p_1 A_1; ...; p_K A_K; A_avg]``: one QR of it per module
    (:func:`fedlora.core.lora_math.ideal_and_gap_norms`).
    """
    client_pairs = [lm.split_state(u.state)[0] for u in updates]
    gap_sq, ideal_sq = 0.0, 0.0
    for module, (a_avg, b_avg) in averaged.items():
        ideal_pair = lm.stack_pairs([cp[module] for cp in client_pairs], weights)
        ideal, (gap,) = lm.ideal_and_gap_norms(ideal_pair, a_avg, [b_avg])
        ideal_sq += ideal**2
        gap_sq += gap**2
    return (gap_sq**0.5) / (ideal_sq**0.5) if ideal_sq > 0 else 0.0


def average_padded(
    updates: Sequence[ClientUpdate],
    weights: Sequence[float],
    previous: Mapping[str, Tensor],
    *,
    rank: int,
    padding: str = "zero",
) -> dict[str, LoraPair]:
    """Average every module's factors after zero-padding each client to ``rank``.

    With ``padding="owners"`` slot ``i`` is averaged over the clients with ``r_k > i`` only
    (weights renormalised per slot); a slot no client owns keeps its value from ``previous``.
    """
    prev_pairs, _ = lm.split_state(previous)
    client_pairs = [lm.split_state(u.state)[0] for u in updates]
    out = {}
    for module in prev_pairs:
        padded = [lm.pad_pair(*cp[module], rank) for cp in client_pairs]
        if padding == "zero":
            a = lm.weighted_sum([p[0] for p in padded], weights)
            b = lm.weighted_sum([p[1] for p in padded], weights)
        else:
            a, b = _owner_average(padded, [u.rank for u in updates], weights, prev_pairs[module])
        out[module] = LoraPair(a, b)
    return out


def _owner_average(
    padded: Sequence[tuple[Tensor, Tensor]],
    ranks: Sequence[int],
    weights: Sequence[float],
    previous: LoraPair,
) -> LoraPair:
    a_prev, b_prev = previous  # (R, n), (m, R)
    a_out, b_out = a_prev.clone(), b_prev.clone()
    for slot in range(a_prev.shape[0]):
        owners = [k for k, r in enumerate(ranks) if r > slot]
        if not owners:
            continue
        total = sum(weights[k] for k in owners)
        if total <= 0:
            continue
        w = [weights[k] / total for k in owners]
        a_out[slot] = lm.weighted_sum([padded[k][0][slot] for k in owners], w)
        b_out[:, slot] = lm.weighted_sum([padded[k][1][:, slot] for k in owners], w)
    return LoraPair(a_out, b_out)


class ContinuingClients:
    """``init`` and ``plan`` of the strategies whose clients continue from the global factors.

    The global adapter starts at ``r_max`` (``A`` from the run seed, ``B = 0``) and client ``k``
    starts every round from its first ``r_k`` slots (FedAvg, LoRA-FAIR, FlexLoRA).
    """

    fresh_adapters = False  # clients continue from the first r_k slots of the global factors

    def init(self, spec: AdapterSpec, seed: int) -> AggregateResult:
        """Global adapter at ``r_max``: ``A`` from the run seed, ``B = 0``, the initial head."""
        return AggregateResult(adapter=lm.fresh_state(spec.modules, spec.r_max, seed, spec.head))

    def plan(
        self,
        global_adapter: AdapterState,
        state: Mapping[str, Tensor],
        *,
        client_id: int,
        rank: int,
        server_round: int,
        seed: int,
    ) -> ClientPlan:
        """Client ``k`` starts from the first ``r_k`` slots of the global factors."""
        return ClientPlan(rank=rank, adapter=lm.resize_state(global_adapter, rank), init_seed=seed)


class FedAvg(ContinuingClients):
    """FedIT: average ``A`` and ``B`` separately, zero-padding mixed ranks to ``r_max``.

    Parameters
    ----------
    weighting:
        ``"examples"`` (``p_k = n_k / sum n_j``, FedIT) or ``"norm"`` (HetLoRA).
    padding:
        ``"zero"`` (naive zero-padding, the HeteroLoRA baseline) or ``"owners"``.
    """

    def __init__(self, *, weighting: str = "examples", padding: str = "zero") -> None:
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"strategy.weighting={weighting!r} is not one of {_WEIGHTINGS}")
        if padding not in _PADDINGS:
            raise ValueError(f"strategy.padding={padding!r} is not one of {_PADDINGS}")
        self.weighting = weighting
        self.padding = padding
        reasons = ([] if weighting == "examples" else
                   ["HetLoRA's norm weights need every client's ||B_k A_k||_F (each client's weight would have to "
                    "travel with its update), and client-level DP weighs every client the same"])
        if padding == "owners":
            reasons.append("padding=owners divides each rank slot by the weight of the clients that own it, which "
                           "depends on who took part; use padding=zero")
        self.linear = not reasons
        self.why_not_linear = "; ".join(reasons)

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        """Return the aggregation weight of each update (they sum to 1)."""
        if self.weighting == "norm":
            return norm_weights(updates)
        return lm.example_weights([u.num_examples for u in updates])

    def aggregate(
        self,
        global_adapter: AdapterState,
        state: Mapping[str, Tensor],
        updates: Sequence[ClientUpdate],
        *,
        server_round: int,
    ) -> AggregateResult:
        """Weighted average of the zero-padded factors and of the head."""
        check_equal_scaling(updates)
        weights = self.weights(updates)
        r_max = lm.rank_of(global_adapter)
        averaged = average_padded(updates, weights, global_adapter, rank=r_max, padding=self.padding)
        head = lm.average_others([u.state for u in updates], weights)
        # one update: the average is that update, there is no gap (and no rounding noise to log)
        gap = product_gap(updates, weights, averaged) if len(updates) > 1 else 0.0
        metrics = {"product_gap_rel": gap}
        return AggregateResult(adapter=lm.join_state(averaged, head), metrics=metrics)
