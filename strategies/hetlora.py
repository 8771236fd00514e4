r"""HetLoRA: heterogeneous ranks with local rank self-pruning and sparsity-weighted aggregation.

Cho, Y. J., Liu, L., Xu, Z., Fahrezi, A., Joshi, G. "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models." EMNLP 2024 (arXiv:2401.06432).

Update rule (algorithms.md §1.2). Client ``k`` holds rank ``r_k`` and starts each round from the first
``r_k`` slots of the global factors. It trains with the rank regulariser added to its loss,

.. math::

    F_k(W_0 + s B_k A_k) + \lambda \sum_{\text{modules}} \| B_k[:, t:r_k]\, A_k[t:r_k, :] \|_F,
    \qquad t = \max(r_{min}, \lfloor \gamma r_k \rfloor),

and when the tail norm is smaller after training than at the start, it prunes: it sends only the first
``t`` slots, reports rank ``t``, and trains at ``t`` from then on (:func:`fedlora.federation.client.
self_pruned_rank`). The server zero-pads the factors to ``r_max`` and averages them with the sparsity
weights :math:`p_k = S_k / \sum_j S_j`, :math:`S_k = \sum_{\text{modules}} \|B_k A_k\|_F` (example weights
when every ``S_k`` is zero), the head by the same weights. Wire per round and module: ``r_k (m + n)``
each way, with ``r_k`` the client's current (possibly pruned) rank.

Choices the published description leaves open, and the ones taken:

* the regulariser's norm: one Frobenius norm per adapted module, summed over modules, on the raw factors
  (without the scaling ``s``); the paper writes it for one weight matrix;
* "shrank during training": compared with the same tail of the round's start adapter, so a round that
  starts with ``B = 0`` (every client's first) never prunes;
* a pruned rank never grows back (the paper describes no growth); the server remembers each client's rank
  in its strategy state (``rank/<client>``), so it checkpoints and a resumed run plans the same ranks;
* ``floor(gamma r)`` with the defaults ``gamma = 0.99`` removes one slot per pruning round for ranks
  below 100, never going below ``min_rank``; the defaults (gamma 0.99, lambda 0.01, min rank 2) are those of
  a FederatedScope-based re-implementation, not confirmed as the paper's;
* pruned slots are zero in the padded average (``padding="zero"``), as the paper's zero-padding; a
  client's pruned slots are not sent, so ``padding="owners"`` averages them over the clients that keep them.

Not combinable with DP-SGD (Opacus clips the task loss's per-example gradients; the regulariser's would
be left out) nor with downlink compression (each client's copy is kept at its rank), both refused before
Ray starts; and, like every norm-weighted method, not linear (no client-level DP, secure aggregation or FedAU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterState, AggregateResult, ClientPlan, ClientUpdate, RankPruning, Tensor
from strategies.fedavg import FedAvg, check_client_rank

_RANK = "rank/"  # strategy state: rank/<client> -> the rank it holds after pruning


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class HetLoRA(FedAvg):
    """HetLoRA (Cho et al., EMNLP 2024): zero-padded FedAvg with sparsity weights and local rank self-pruning.

    Parameters
    ----------
    weighting:
        ``"norm"`` (the paper's sparsity weights) or ``"examples"``.
    padding:
        ``"zero"`` (the paper's) or ``"owners"``.
    gamma:
        Pruning ratio in ``(0, 1)``: a client may go from ``r`` to ``max(min_rank, floor(gamma r))``.
    reg_weight:
        ``lambda``, the rank regulariser's weight (``>= 0``; ``0`` prunes only when training alone shrank the tail).
    min_rank:
        The rank below which no client prunes (``>= 1``).
    prune:
        ``False`` turns self-pruning off (the sparsity-weighted zero-padding alone).
    """

    def __init__(self, *, weighting: str = "norm", padding: str = "zero", gamma: float = 0.99,
                 reg_weight: float = 0.01, min_rank: int = 2, prune: bool = True) -> None:
        super().__init__(weighting=weighting, padding=padding)
        if not _is_number(gamma) or not 0.0 < gamma < 1.0:
            raise ValueError(f"strategy.gamma={gamma!r} must be a number in (0, 1); use 0.99 (one slot fewer per "
                             "pruning round, the published default)")
        if not _is_number(reg_weight) or reg_weight < 0:
            raise ValueError(f"strategy.reg_weight={reg_weight!r} must be a number >= 0; use 0.01 (the published "
                             "default) or 0 (prune only when training alone shrank the tail)")
        if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
            raise ValueError(f"strategy.min_rank={min_rank!r} must be an integer >= 1; use 2 (the published default)")
        if not isinstance(prune, bool):
            raise ValueError(f"strategy.prune={prune!r} must be true or false (false: the sparsity weighting alone)")
        self.pruning = RankPruning(gamma=float(gamma), weight=float(reg_weight), min_rank=min_rank) if prune else None
        if self.pruning is not None:
            self.linear = False
            reason = ("rank self-pruning lets a client reply at a smaller rank than it was planned at, which a "
                      "masked sum laid out at fixed ranks and a per-client clip do not follow")
            self.why_not_linear = "; ".join(r for r in (self.why_not_linear, reason) if r)

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
        """The first ``r_k`` slots of the global factors, ``r_k`` the client's rank after its pruning so far."""
        check_client_rank("HetLoRA", client_id, rank, lm.rank_of(global_adapter))
        held = state.get(f"{_RANK}{client_id}")
        current = min(rank, int(held)) if held is not None else rank
        plan = super().plan(global_adapter, state, client_id=client_id, rank=current, server_round=server_round,
                            seed=seed)
        prune = self.pruning
        if prune is None or lm.pruned_rank(current, prune.gamma, prune.min_rank) >= current:
            return plan  # nothing left to prune: the plan asks for no regulariser
        return dataclasses.replace(plan, prune=prune)

    def aggregate(
        self,
        global_adapter: AdapterState,
        state: Mapping[str, Tensor],
        updates: Sequence[ClientUpdate],
        *,
        server_round: int,
    ) -> AggregateResult:
        """FedAvg's zero-padded average with HetLoRA's weights; remember each client's rank."""
        result = super().aggregate(global_adapter, state, updates, server_round=server_round)
        ranks = dict(state)
        for u in updates:
            held = state.get(f"{_RANK}{u.client_id}")
            if held is not None and u.rank > int(held):
                raise ValueError(f"client {u.client_id} replied at rank {u.rank} but holds rank {int(held)} since it "
                                 "pruned; HetLoRA's ranks never grow back")
            ranks[f"{_RANK}{u.client_id}"] = torch.tensor(u.rank, dtype=torch.int64)
        metrics = {**result.metrics, "mean_client_rank": sum(u.rank for u in updates) / len(updates)}
        return AggregateResult(adapter=result.adapter, merge=result.merge, state=ranks, metrics=metrics)
