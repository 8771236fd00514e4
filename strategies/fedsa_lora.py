r"""FedSA-LoRA: share ``A``, keep ``B`` (and the head) on each client.

Guo, P., Zeng, S., Wang, Y., Fan, H., Wang, F., Qu, L. "Selective Aggregation for Low-Rank Adaptation in
Federated Learning." ICLR 2025 (arXiv:2410.01463).

Update rule (algorithms.md §6.3). Every client trains both factors and its head from the shared ``A`` and
the ``B`` and head it kept after its last round; it sends back only ``A_k``. The server averages the
``A`` factors,

.. math::

    \bar A = \sum_k p_k \,[A_k; 0] \in \mathbb{R}^{r_{max} \times n},

and sends each client the first ``r_k`` rows of :math:`\bar A`; ``B_k`` and the head never leave client
``k`` (the paper's ``personalization.local_param: ['lora_B', 'classifier']`` for its classification tasks).
Client ``k``'s model is :math:`W_0 + s\, B_k \bar A_{[:r_k]}` with its own head: there is no global
model, so the platform evaluates each client's own model on the examples that client holds out
(``data.client_test_fraction``, required) and reports the mean over clients and the worst one.
Wire per round and module: ``r_k n`` each way (``A`` only), the paper's.

Choices the paper leaves open, and the ones taken. The paper uses one rank; with mixed ranks client
``k`` holds the first ``r_k`` rows of ``A``. ``padding="owners"`` (the default) averages row ``i`` over
the clients that own it (``r_k > i``); ``padding="zero"`` pads with zeros, which shrinks the rows only
high-rank clients train towards zero every round, and the ``B_k`` columns kept against them would then
act on a fading ``A``. The head is personal, as in the paper's classification configs. The global
adapter the server holds (and saves) is ``\bar A`` with ``B = 0`` and the initial head: the shared part
only. The reference code shares one model object between clients (``federate.share_local_model: True``),
so that a client's "local" ``B`` is the previous client's (algorithms.md §6.3); here each client keeps its
own, on its side (:func:`fedlora.federation.client.with_own`), across kills and resumes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import PERSONAL_KEPT, AdapterState, AggregateResult, ClientPlan, ClientUpdate, LoraPair, Tensor
from strategies.fedavg import ContinuingClients, average_padded, check_client_rank, check_equal_scaling

_PADDINGS = ("owners", "zero")


class FedSALoRA(ContinuingClients):
    """FedSA-LoRA (Guo et al., ICLR 2025): average ``A``; each client keeps its ``B`` and head.

    Parameters
    ----------
    weighting:
        ``"examples"`` (``p_k = n_k / sum n_j``, the reference code's default) or ``"uniform"``
        (``federate.ignore_weight``).
    padding:
        ``"owners"`` (each row of ``A`` over the clients that own it) or ``"zero"``.
    """

    personalized = True  # no global model: B and the head stay with each client

    def __init__(self, *, weighting: str = "examples", padding: str = "owners") -> None:
        self.weighting = lm.check_weighting(weighting)
        if padding not in _PADDINGS:
            raise ValueError(f"strategy.padding={padding!r} is not one of {_PADDINGS}")
        self.padding = padding
        # with zero-padding the shared A is a weighted mean of what each client sends alone ([A_k; 0]), so
        # client-level DP, secure aggregation and FedAU can act on it (B and the head never leave a client)
        self.linear = padding == "zero"
        self.why_not_linear = ("" if self.linear else "padding=owners divides each row of A by the weight of the "
                               "clients that own it, which depends on who took part; use strategy.padding=zero")

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
        """The first ``r_k`` rows of the shared ``A``; ``B`` and the head are the client's own."""
        r_max = lm.rank_of(global_adapter)
        check_client_rank("FedSA-LoRA", client_id, rank, r_max)
        return ClientPlan(rank=rank, adapter=lm.resize_state(global_adapter, rank), init_seed=seed,
                          personal=PERSONAL_KEPT)

    def aggregate(
        self,
        global_adapter: AdapterState,
        state: Mapping[str, Tensor],
        updates: Sequence[ClientUpdate],
        *,
        server_round: int,
    ) -> AggregateResult:
        """Average the clients' ``A`` (padded to ``r_max``); keep the global ``B`` and head as they are.

        The updates' ``B`` and head are the server's own start (they never travelled) and are not read.
        """
        if not updates:
            raise ValueError("FedSALoRA.aggregate needs at least one client update")
        check_equal_scaling(updates)
        weights = lm.participant_weights(self.weighting, [u.num_examples for u in updates])
        r_max = lm.rank_of(global_adapter)
        averaged = average_padded(updates, weights, global_adapter, rank=r_max, padding=self.padding)
        pairs, head = lm.split_state(global_adapter)
        shared = {module: LoraPair(averaged[module].a.to(a.dtype), b.clone()) for module, (a, b) in pairs.items()}
        before = sum(float(a.double().square().sum()) for a, _ in pairs.values())
        moved = sum(float((shared[m].a.double() - a.double()).square().sum()) for m, (a, _) in pairs.items())
        metrics = {"a_change_rel": (moved / before) ** 0.5 if before > 0 else 0.0}
        return AggregateResult(adapter=lm.join_state(shared, {k: v.clone() for k, v in head.items()}),
                               metrics=metrics)


def personal_model(shared: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], rank: int) -> AdapterState:
    """Client ``k``'s model: the first ``rank`` rows of the shared ``A`` with its own ``B`` and head."""
    start = lm.resize_state(shared, rank)
    return {**{k: v for k, v in start.items() if not lm.is_personal_key(k)}, **own}
