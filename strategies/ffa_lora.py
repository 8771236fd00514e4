r"""FFA-LoRA: federated LoRA with a frozen, shared ``A``.

Sun, Y., Li, Z., Li, Y., Ding, B. "Improving LoRA in Privacy-preserving Federated Learning."
ICLR 2024, arXiv:2403.12313.

Update rule (algorithms.md §3). ``A`` is drawn **once** from the run seed,
``A = init_lora_a(seed, module, r_max, n)`` of shape ``(r_max, n)``, and never trained. A client of
rank ``r_k`` uses its first ``r_k`` rows, which :func:`fedlora.core.lora_math.init_lora_a`
guarantees are bit-identical to ``init_lora_a(seed, module, r_k, n)``, so ``A`` never travels: the
client regenerates it from the seed (``send_lora_a=False``). Only ``B_k`` (``m x r_k``) and the head
are trained and uploaded. The server averages the zero-padded ``B``:

.. math::

    \bar B = \sum_k p_k \,[B_k, 0] \in \mathbb{R}^{m \times r_{max}},
    \qquad \bar B A = \sum_k p_k B_k A_{[:r_k]} ,

which is *exact* (the average of the products), because ``A`` is common: FedIT's product gap
:math:`\sum_k p_k (B_k-\bar B)(A_k-\bar A)` vanishes. ``A`` is returned unchanged.

Regression (SpecTraL's ``ffa`` branch re-draws ``lora_A`` per client per round, silently breaking
the shared ``A``): :meth:`FFALoRA.aggregate` raises if any client's ``A`` differs bit for bit from the
global one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterSpec, AdapterState, AggregateResult, ClientPlan, ClientUpdate, LoraPair, Tensor
from strategies.fedavg import check_client_rank, check_equal_scaling, product_gap

SEED_KEY = "seed"  # strategy state: the seed the shared A was drawn from


class FFALoRA:
    """FFA-LoRA (Sun et al., ICLR 2024): ``A`` frozen from a shared seed, only ``B`` is averaged.

    Parameters
    ----------
    weighting:
        ``"examples"`` (``p_k = n_k / sum_j n_j``) or ``"uniform"`` (FedEx-LoRA's
        ``aggregate_models_ffa`` uses a plain mean).
    """

    fresh_adapters = False  # clients continue from the global B (and the one shared A)
    linear = True  # the zero-padded mean of the clients' B (A is the seed's)
    why_not_linear = ""

    def __init__(self, *, weighting: str = "examples") -> None:
        self.weighting = lm.check_weighting(weighting)

    def init(self, spec: AdapterSpec, seed: int) -> AggregateResult:
        """Shared ``A = init_lora_a(seed, module, r_max, n)``, ``B = 0``; the seed is kept as state."""
        adapter = lm.fresh_state(spec.modules, spec.r_max, seed, spec.head)
        return AggregateResult(adapter=adapter, state={SEED_KEY: torch.tensor(int(seed), dtype=torch.int64)})

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
        """Client ``k`` gets the first ``r_k`` slots; ``A`` is frozen and regenerated from the seed.

        Raises
        ------
        ValueError
            If ``rank`` exceeds the global rank, or if the global ``A`` is not the seed-derived one
            (then a client regenerating ``A`` from ``init_seed`` would train against another ``A``).
        """
        r_max = lm.rank_of(global_adapter)
        check_client_rank("FFA-LoRA", client_id, rank, r_max)
        shared_seed = int(state[SEED_KEY].item()) if SEED_KEY in state else int(seed)
        adapter = lm.resize_state(global_adapter, rank)
        pairs, _ = lm.split_state(adapter)
        for module, (a, _b) in pairs.items():
            expected = lm.init_lora_a(shared_seed, module, rank, a.shape[1])  # (rank, n)
            if not torch.equal(a, expected.to(a.dtype)):
                raise ValueError(
                    f"FFA-LoRA: the global A of module {module!r} is not init_lora_a(seed={shared_seed}); "
                    "start the run with FFALoRA.init so that clients can regenerate A from the seed"
                )
        return ClientPlan(
            rank=rank, adapter=adapter, init_seed=shared_seed, train_lora_a=False, send_lora_a=False
        )

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        """Return ``p_k`` over the participants (sums to 1)."""
        return lm.participant_weights(self.weighting, [u.num_examples for u in updates])

    def aggregate(
        self,
        global_adapter: AdapterState,
        state: Mapping[str, Tensor],
        updates: Sequence[ClientUpdate],
        *,
        server_round: int,
    ) -> AggregateResult:
        """Average the zero-padded ``B`` (exact), keep ``A``, average the head.

        Raises
        ------
        ValueError
            If a client's ``A`` is not bit-identical to the first ``r_k`` rows of the global ``A``.
        """
        if not updates:
            raise ValueError("FFALoRA.aggregate needs at least one client update")
        check_equal_scaling(updates)
        weights = self.weights(updates)
        r_max = lm.rank_of(global_adapter)
        global_pairs, _ = lm.split_state(global_adapter)
        client_pairs = [lm.split_state(u.state)[0] for u in updates]
        averaged: dict[str, LoraPair] = {}
        for module, (a_glob, b_glob) in global_pairs.items():  # (r_max, n), (m, r_max)
            padded_b = []
            for u, cp in zip(updates, client_pairs, strict=True):
                a_k, b_k = cp[module]  # (r_k, n), (m, r_k)
                r_k = a_k.shape[0]
                if r_k > r_max or a_k.dtype != a_glob.dtype or not torch.equal(a_k, a_glob[:r_k]):
                    raise ValueError(
                        f"FFA-LoRA: client {u.client_id} returned an A for module {module!r} that differs "
                        f"from the shared frozen A (its first {r_k} rows); A must stay frozen and be "
                        "regenerated from the shared seed, never re-drawn per client or round"
                    )
                padded_b.append(lm.pad_pair(a_k, b_k, r_max).b)  # (m, r_max)
            b_avg = lm.weighted_sum(padded_b, weights).to(b_glob.dtype)
            averaged[module] = LoraPair(a_glob.clone(), b_avg)
        head = lm.average_others([u.state for u in updates], weights)
        metrics = {
            # sum p_k B_k A_k vs B_avg A: zero up to rounding (the point of freezing A)
            "product_gap_rel": product_gap(updates, weights, averaged),
            "b_fro": float(sum(b.double().pow(2).sum() for _, b in averaged.values()) ** 0.5),
        }
        return AggregateResult(adapter=lm.join_state(averaged, head), state=dict(state), metrics=metrics)
