r"""FLoRA: stacking heterogeneous LoRA adapters into the base weights.

Wang, Z., Shen, Z., He, Y., Sun, G., Wang, H., Lyu, L., Li, A. "FLoRA: Federated Fine-Tuning Large
Language Models with Heterogeneous Low-Rank Adaptations." NeurIPS 2024, arXiv:2409.05976.

Update rule (algorithms.md §2). Every round each participant ``k`` attaches a *fresh* LoRA pair of
its own rank ``r_k`` (``A_k`` random, ``B_k = 0``) to the current base ``W^t`` and trains it. The
server stacks the trained factors

.. math::

    A_{st} = \begin{bmatrix} c_1 A_1 \\ \vdots \\ c_K A_K \end{bmatrix} \in \mathbb{R}^{R \times n},
    \qquad
    B_{st} = [B_1, \dots, B_K] \in \mathbb{R}^{m \times R},
    \qquad c_k = p_k s_k,\; R = \sum_{k \in S_t} r_k,

so that :math:`B_{st} A_{st} = \sum_k p_k s_k B_k A_k` *exactly* for any mix of ranks, and every
model adds it to its frozen base: :math:`W^{t+1} = W^t + B_{st} A_{st}`. The scaling ``s_k`` is
folded into the ``A`` blocks exactly once (the merge is at scaling 1), and the next round starts
from a fresh adapter again, so the global adapter returned here has ``B = 0``.

Pitfalls of the reference code that this module avoids (each has a regression test):

* the stacked rank is ``sum_{k in S_t} r_k``, never ``lora_r * num_clients`` (wrong under partial
  participation);
* ``A`` and ``B`` are told apart by their key names (``lora_A`` / ``lora_B``), never by comparing a
  dimension with ``r_k`` (which breaks when ``r_k`` equals ``m`` or ``n``);
* unequal scalings ``s_k`` are rejected (:func:`strategies.fedavg.check_equal_scaling`), as everywhere
  in fedlora, even though the stacking itself would stay exact with ``c_k = p_k s_k``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlora.core import lora_math as lm
from fedlora.core import seeds
from fedlora.core.types import AdapterSpec, AdapterState, AggregateResult, ClientPlan, ClientUpdate, LoraPair, Tensor
from strategies.fedavg import check_equal_scaling

SEED_KEY = "seed"  # strategy state: the run seed, so ``aggregate`` can derive per-round seeds


def derive_seed(seed: int, server_round: int, client_id: int) -> int:
    """The seed of client ``client_id``'s fresh ``A`` in ``server_round`` (``-1``: the server's own).

    :func:`fedlora.core.seeds.fresh_adapter`.
    """
    return seeds.fresh_adapter(seed, server_round, client_id)


def module_shapes(adapter: Mapping[str, Tensor]) -> dict[str, tuple[int, int]]:
    """Return ``{module: (m, n)}`` read from the ``B`` (m, r) and ``A`` (r, n) keys of ``adapter``."""
    pairs, _ = lm.split_state(adapter)
    return {module: (int(b.shape[0]), int(a.shape[1])) for module, (a, b) in pairs.items()}


def _seed_from_state(state: Mapping[str, Tensor], default: int = 0) -> int:
    value = state.get(SEED_KEY)
    return int(value.item()) if value is not None else default


class FLoRA:
    """FLoRA (Wang et al., NeurIPS 2024): stack the clients' LoRA pairs and merge them into the base.

    Parameters
    ----------
    weighting:
        ``"examples"`` (``p_k = n_k / sum_j n_j``, the reference code's default) or ``"uniform"``
        (``p_k = 1/|S_t|``). The paper notes the best ``p_k`` is data-dependent.
    """

    # Every round's client adapter is a fresh pair (new random A, B = 0), not a continuation of the
    # last one: a compression residual kept in last round's factors has no coordinates to return to,
    # so error feedback keeps only the residual of the tensors that continue from the global adapter
    # (the classifier head; fedlora.core.lora_math.continues), and error_feedback=true is refused.
    fresh_adapters = True
    linear = False
    why_not_linear = ("it stacks every client's factors side by side and merges their product into the base: the "
                      "aggregate holds each client's update, not a sum of them")

    def __init__(self, *, weighting: str = "examples") -> None:
        self.weighting = lm.check_weighting(weighting)

    def init(self, spec: AdapterSpec, seed: int) -> AggregateResult:
        """Fresh global adapter at ``r_max`` (``A`` from the run seed, ``B = 0``) and the seed as state."""
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
        """Every client starts a fresh rank-``r_k`` adapter with its own ``A`` draw and the global head."""
        if rank < 1:
            raise ValueError(f"client {client_id} has rank {rank}; LoRA ranks must be >= 1")
        _, head = lm.split_state(global_adapter)
        return ClientPlan(
            rank=rank,
            adapter=None,
            init_seed=derive_seed(seed, server_round, client_id),
            head={k: v.clone() for k, v in head.items()},
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
        """Stack ``(p_k s_k A_k, B_k)`` per module into a base merge; reset the adapter (``B = 0``)."""
        if not updates:
            raise ValueError("FLoRA.aggregate needs at least one client update")
        check_equal_scaling(updates)
        # A fixed stacking order (by client id) makes the merge factors, not only their product,
        # independent of the order in which replies arrived.
        order = sorted(range(len(updates)), key=lambda i: updates[i].client_id)
        updates = [updates[i] for i in order]
        weights = self.weights(updates)
        coefficients = [p * u.scaling for p, u in zip(weights, updates, strict=True)]  # c_k = p_k s_k

        shapes = module_shapes(global_adapter)
        client_pairs = [lm.split_state(u.state)[0] for u in updates]
        merge: dict[str, LoraPair] = {}
        merge_sq = 0.0
        for module in sorted(shapes):
            pairs = []
            for u, cp in zip(updates, client_pairs, strict=True):
                if module not in cp:
                    raise ValueError(f"client {u.client_id} sent no LoRA pair for module {module!r}")
                a, b = cp[module]  # (r_k, n), (m, r_k), matched on key names
                if a.shape[0] != u.rank or b.shape[1] != u.rank:
                    raise ValueError(
                        f"client {u.client_id} reports rank {u.rank} but module {module!r} has "
                        f"A {tuple(a.shape)} and B {tuple(b.shape)}"
                    )
                dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
                pairs.append((a.to(dtype), b.to(dtype)))
            stacked = lm.stack_pairs(pairs, coefficients)  # A_st (R, n), B_st (m, R)
            merge[module] = stacked
            merge_sq += lm.factored_fro_norm(stacked.b, stacked.a) ** 2

        stacked_rank = sum(u.rank for u in updates)
        seed = _seed_from_state(state)
        head = lm.average_others([u.state for u in updates], weights)
        r_max = lm.rank_of(global_adapter)
        fresh = lm.fresh_state(shapes, r_max, derive_seed(seed, server_round, -1), head)
        adapter = {k: v.to(global_adapter[k].dtype) if k in global_adapter else v for k, v in fresh.items()}
        metrics = {
            "stacked_rank": float(stacked_rank),
            "num_clients": float(len(updates)),
            "merge_fro": merge_sq**0.5,
            # parameters of the factored merge sent down: R (m + n) per module
            "merge_params": float(sum(stacked_rank * (m + n) for m, n in shapes.values())),
        }
        return AggregateResult(
            adapter=adapter,
            merge=merge,
            state={SEED_KEY: torch.tensor(seed, dtype=torch.int64)},
            metrics=metrics,
        )
