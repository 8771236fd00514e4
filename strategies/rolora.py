r"""RoLoRA: alternating optimisation of the LoRA factors, one factor per round.

Chen, S., Ju, Y., Dalal, H., Zhu, Z., Khisti, A. "Robust Federated Finetuning of LLMs via Alternating
Optimization of LoRA." NeurIPS 2025 (arXiv:2502.01755).

Update rule. Rounds alternate between the two factors; in each, every client trains only one of
them, the other frozen at its global value, and sends only the one it trained:

* odd rounds (1, 3, ...): ``A`` frozen, client ``k`` trains ``B_k``; the server sets
  :math:`\bar B = \sum_k p_k [B_k, 0]` (zero-padded to ``r_max``) and keeps ``A``;
* even rounds (2, 4, ...): ``B`` frozen, client ``k`` trains ``A_k``; the server sets
  :math:`\bar A = \sum_k p_k [A_k; 0]` and keeps ``B``.

Because the frozen factor is common to all clients, the average of the factor is the average of the
products, exactly and for any mix of ranks (client ``k`` holds the first ``r_k`` slots of the
frozen factor): :math:`\bar B A = \sum_k p_k B_k A_{[:r_k]}` and
:math:`B \bar A = \sum_k p_k B_{[:, :r_k]} A_k`. FedIT's product gap vanishes (logged as
``product_gap_rel``, zero up to rounding), and each client sends one factor: ``r_k m`` numbers per
module in ``B`` rounds and ``r_k n`` in ``A`` rounds, half of FedIT's for square layers; it
receives both factors (``r_k (m + n)``), the head is trained and averaged every round.

Choices the paper leaves open, and the ones taken: ``B`` is trained first, since with ``B = 0`` at
the start the gradient of ``A`` is zero and an ``A`` round first would be wasted; ``A`` starts from
the run seed (as every fedlora adapter) and is common to all clients from the start. Each round is
one alternation (the issue's "alternate rounds"), with the same number of local steps in both.

:meth:`RoLoRA.aggregate` refuses a reply whose frozen factor is not the global one bit for bit (a
client that trained it, or re-drew it, would silently break the exactness).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterState, AggregateResult, ClientPlan, ClientUpdate, LoraPair, Tensor
from strategies.fedavg import ContinuingClients, check_client_rank, check_equal_scaling, product_gap


def trains_b(server_round: int) -> bool:
    """Whether ``server_round`` is a ``B`` round (odd rounds; an ``A`` round otherwise)."""
    return server_round % 2 == 1


class RoLoRA(ContinuingClients):
    """RoLoRA (Chen et al., NeurIPS 2025): train and average ``B`` in odd rounds, ``A`` in even rounds.

    Parameters
    ----------
    weighting:
        ``"examples"`` (``p_k = n_k / sum n_j``) or ``"uniform"`` (``p_k = 1/K``).
    """

    linear = True  # the zero-padded mean of the factor the round trains; the other is kept
    why_not_linear = ""
    # a compressed downlink (EF21's per-client copy) would give each client an approximation of the frozen factor
    needs_global_start = ("its clients' frozen factor must be the global one bit for bit (the average of the trained "
                          "factor is then the average of the products), and a compressed downlink gives each client "
                          "an approximation of it")

    def __init__(self, *, weighting: str = "examples") -> None:
        self.weighting = lm.check_weighting(weighting)

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
        """The first ``r_k`` slots of the global factors, with the factor of the other phase frozen."""
        r_max = lm.rank_of(global_adapter)
        check_client_rank("RoLoRA", client_id, rank, r_max)
        b_round = trains_b(server_round)
        return ClientPlan(rank=rank, adapter=lm.resize_state(global_adapter, rank), init_seed=seed,
                          train_lora_a=not b_round, train_lora_b=b_round)

    def aggregate(
        self,
        global_adapter: AdapterState,
        state: Mapping[str, Tensor],
        updates: Sequence[ClientUpdate],
        *,
        server_round: int,
    ) -> AggregateResult:
        """Average the factor this round trained (zero-padded, exact); keep the frozen one; average the head.

        Raises
        ------
        ValueError
            If a client's frozen factor differs from the global one's first ``r_k`` slots.
        """
        if not updates:
            raise ValueError("RoLoRA.aggregate needs at least one client update")
        check_equal_scaling(updates)
        weights = lm.participant_weights(self.weighting, [u.num_examples for u in updates])
        b_round = trains_b(server_round)
        r_max = lm.rank_of(global_adapter)
        global_pairs, _ = lm.split_state(global_adapter)
        client_pairs = [lm.split_state(u.state)[0] for u in updates]
        averaged: dict[str, LoraPair] = {}
        for module, (a_glob, b_glob) in global_pairs.items():  # (r_max, n), (m, r_max)
            trained = []
            for u, cp in zip(updates, client_pairs, strict=True):
                a_k, b_k = cp[module]  # (r_k, n), (m, r_k)
                r_k = a_k.shape[0]
                frozen, expected = (a_k, a_glob[:r_k]) if b_round else (b_k, b_glob[:, :r_k])
                if r_k > r_max or frozen.dtype != expected.dtype or not torch.equal(frozen, expected):
                    raise ValueError(
                        f"RoLoRA round {server_round}: client {u.client_id} changed the frozen "
                        f"{'A' if b_round else 'B'} of module {module!r}; in this round only "
                        f"{'B' if b_round else 'A'} is trained and the other factor must stay the global one"
                    )
                padded = lm.pad_pair(a_k, b_k, r_max)
                trained.append(padded.b if b_round else padded.a)
            average = lm.weighted_sum(trained, weights)
            averaged[module] = (LoraPair(a_glob.clone(), average.to(b_glob.dtype)) if b_round
                                else LoraPair(average.to(a_glob.dtype), b_glob.clone()))
        head = lm.average_others([u.state for u in updates], weights)
        metrics = {
            "trained_b": 1.0 if b_round else 0.0,
            # sum p_k B_k A_k vs the new B A: zero up to rounding (the frozen factor is common)
            "product_gap_rel": product_gap(updates, weights, averaged) if len(updates) > 1 else 0.0,
        }
        return AggregateResult(adapter=lm.join_state(averaged, head), metrics=metrics)
