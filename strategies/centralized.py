"""Centralized training: the upper bound a federated method is compared against.

Not a federated aggregation: ``pooled = True`` tells the platform to train one LoRA model (at
the largest client rank) on the union of all clients' training data, with as many optimiser
steps per "round" as the federation spends in a round (``local_steps`` x sampled clients), and
to evaluate it on the same held-out test set after each round. Nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterSpec, AdapterState, AggregateResult, ClientPlan, ClientUpdate, Tensor


class Centralized:
    """Marker strategy for pooled (non-federated) training with the same step budget."""

    pooled = True

    def init(self, spec: AdapterSpec, seed: int) -> AggregateResult:
        """A fresh adapter at ``r_max`` (``A`` from the seed, ``B = 0``)."""
        return AggregateResult(adapter=lm.fresh_state(spec.modules, spec.r_max, seed, spec.head))

    def plan(self, global_adapter: AdapterState, state: Mapping[str, Tensor], *, client_id: int, rank: int,
             server_round: int, seed: int) -> ClientPlan:
        """The single pooled learner continues from the current adapter."""
        return ClientPlan(rank=rank, adapter=lm.resize_state(global_adapter, rank), init_seed=seed)

    def aggregate(self, global_adapter: AdapterState, state: Mapping[str, Tensor],
                  updates: Sequence[ClientUpdate], *, server_round: int) -> AggregateResult:
        """One pooled learner: its adapter is the new global adapter."""
        if len(updates) != 1:
            raise ValueError(f"centralized training has one learner, got {len(updates)} updates")
        return AggregateResult(adapter=dict(updates[0].state))
