r"""FedEx-LoRA: FedAvg of the factors, with the exact residual folded into the base weights.

Singhal, R., Ponkshe, K., Vepakomma, P. "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models." ACL 2025 (arXiv:2410.09432).

Update rule (algorithms.md §6.2). Clients continue from the global factors and upload their trained
``(A_k, B_k)``, as in FedIT. The server averages the factors, :math:`\bar A = \sum_k p_k A_k`,
:math:`\bar B = \sum_k p_k B_k` (mixed ranks zero-padded to ``r_max`` as in
:mod:`strategies.fedavg`), and adds the part of the average of the products that the averaged
factors miss,

.. math::

    \mathrm{res} = \sum_k p_k B_k A_k - \bar B \bar A ,
    \qquad W^{t+1} = W^t + s\,\mathrm{res},

to the frozen base of every model, so the global model :math:`W^{t+1} + s \bar B \bar A` equals
:math:`W^t + s \sum_k p_k B_k A_k`, the weighted average of the clients' models, *exactly*, while the
adapter stays at rank ``r_max``.

The reference code sends the residual as a dense ``m x n`` matrix and adds it with an unconditional
transpose (right for GPT-2's ``Conv1D``, silently wrong for ``nn.Linear``). Here it travels factored,
like FLoRA's merges (a :data:`fedlora.core.types.BaseMerge`, ``B_st @ A_st``, ``(m, n)`` like the
layer's weight, no transpose), in the smaller of two exact forms:

* *differences*: with the last client ``K`` (by client id) as anchor,
  :math:`\mathrm{res} = \sum_{k<K} p_k (B_k - \bar B)(A_k - A_K)`, rank ``<= (K-1) r_max``
  (expand it: the ``A_K`` terms cancel because :math:`\sum_k p_k = 1`);
* *stacked*: :math:`[B_1, \dots, B_K, \bar B]\,[p_1 A_1; \dots; p_K A_K; -\bar A]`, rank
  ``<= sum_k r_k + r_max`` (smaller when most clients have a low rank).

The scaling ``s`` is folded into the ``A`` blocks (a merge is applied at scaling 1). One client: the
residual is zero and no merge is sent.

Per round a client sends ``r_k (m + n)`` numbers per module and its head, and receives its factors
plus every merge it has not applied yet (``R (m + n)`` per module per round, ``R`` the merge rank,
logged as ``merge_rank``). The paper's code averages uniformly; ``weighting="examples"``, fedlora's
default for every strategy, keeps the comparison with FedAvg to the one difference, the residual.
Logged: ``product_gap_rel`` (``||res||_F / ||sum p_k B_k A_k||_F``, what FedAvg would have lost),
``merge_rank`` and ``merge_params``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterState, AggregateResult, BaseMerge, ClientUpdate, LoraPair, Tensor
from strategies.fedavg import ContinuingClients, average_padded, check_equal_scaling, product_gap


def residual_merge(
    padded: Sequence[LoraPair], weights: Sequence[float], average: LoraPair, scaling: float
) -> LoraPair:
    """Factored ``scaling * (sum_k w_k B_k A_k - B_avg A_avg)`` for padded pairs ``(A_k, B_k)``.

    ``average`` must be ``(sum_k w_k A_k, sum_k w_k B_k)`` and the weights must sum to 1. Returns the
    lower-rank of the differences form (rank ``(K-1) r``) and the stacked form (rank
    ``sum_k r_k + r``, with ``r_k`` the rows of ``A_k`` that are not all zero).
    """
    a_avg, b_avg = average
    r = a_avg.shape[0]
    trimmed = [_trim(p) for p in padded]
    stacked_rank = sum(p.a.shape[0] for p in trimmed) + r
    if (len(padded) - 1) * r <= stacked_rank:
        anchor = padded[-1].a
        pairs = [(p.a - anchor, p.b - b_avg) for p in padded[:-1]]
        return lm.stack_pairs(pairs, [scaling * w for w in weights[:-1]])
    pairs = [(p.a, p.b) for p in trimmed] + [(a_avg, b_avg)]
    return lm.stack_pairs(pairs, [scaling * w for w in weights] + [-scaling])


def _trim(pair: LoraPair) -> LoraPair:
    """Drop trailing all-zero rank slots (the zero-padding) so the stacked form is not inflated."""
    live = (pair.a.abs().sum(dim=1) > 0) | (pair.b.abs().sum(dim=0) > 0)
    nonzero = torch.nonzero(live).flatten()
    r = int(nonzero[-1]) + 1 if nonzero.numel() else 0
    return LoraPair(pair.a[:r], pair.b[:, :r])


class FedExLoRA(ContinuingClients):
    """FedEx-LoRA (Singhal et al., ACL 2025): FedAvg of the factors plus the exact residual in the base.

    Parameters
    ----------
    weighting:
        ``"examples"`` (``p_k = n_k / sum n_j``) or ``"uniform"`` (``p_k = 1/K``, the paper's code).
    """

    linear = False
    why_not_linear = ("it merges the residual sum_k p_k B_k A_k - B_bar A_bar into the base, which needs each "
                      "client's product B_k A_k")

    def __init__(self, *, weighting: str = "examples") -> None:
        self.weighting = lm.check_weighting(weighting)

    def aggregate(
        self,
        global_adapter: AdapterState,
        state: Mapping[str, Tensor],
        updates: Sequence[ClientUpdate],
        *,
        server_round: int,
    ) -> AggregateResult:
        """Zero-padded average of the factors; the residual to the average of the products as a merge."""
        if not updates:
            raise ValueError("FedExLoRA.aggregate needs at least one client update")
        scaling = check_equal_scaling(updates)
        # the anchor of the differences form is the last client by id: the merge factors, not only
        # their product, do not depend on the order in which replies arrived
        updates = sorted(updates, key=lambda u: u.client_id)
        weights = lm.participant_weights(self.weighting, [u.num_examples for u in updates])
        r_max = lm.rank_of(global_adapter)
        averaged = average_padded(updates, weights, global_adapter, rank=r_max)
        head = lm.average_others([u.state for u in updates], weights)
        if len(updates) == 1:  # the average of one model is that model: nothing to fold in
            return AggregateResult(adapter=lm.join_state(averaged, head), metrics={
                "product_gap_rel": 0.0, "merge_rank": 0.0, "merge_params": 0.0})
        client_pairs = [lm.split_state(u.state)[0] for u in updates]
        merge: BaseMerge = {}
        params = 0
        for module in sorted(averaged):
            dtype = torch.float64 if averaged[module].a.dtype == torch.float64 else torch.float32
            padded = [lm.pad_pair(cp[module].a.to(dtype), cp[module].b.to(dtype), r_max) for cp in client_pairs]
            average = LoraPair(averaged[module].a.to(dtype), averaged[module].b.to(dtype))
            merge[module] = residual_merge(padded, weights, average, scaling)
            a_st, b_st = merge[module]
            params += a_st.numel() + b_st.numel()
        metrics = {
            "product_gap_rel": product_gap(updates, weights, averaged),
            "merge_rank": float(max(a.shape[0] for a, _ in merge.values())),
            "merge_params": float(params),
        }
        return AggregateResult(adapter=lm.join_state(averaged, head), merge=merge, metrics=metrics)
