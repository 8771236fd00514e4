r"""FlexLoRA (HLoRA): the exact weighted product average, redistributed by SVD to every rank.

Bai, J., Chen, D., Qian, B., Yao, L., Li, Y. "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources." NeurIPS 2024 (arXiv:2402.11505).

Each client ``k`` trains an adapter of its own rank ``r_k`` and uploads it whole. The server forms
the weighted average of the clients' *products*, not of their factors,

.. math::

    \Delta = \sum_k p_k B_k A_k = U \Sigma V^\top ,

and keeps its best rank-``r_max`` approximation as the global adapter (``r_max``: the global
adapter's rank, the largest client rank): ``B = U_r \Sigma_r``, ``A = V_r^\top``, which puts the
singular values on ``B`` as the reference code does (``B = U_r diag(S_r) / s``; fedlora's clients
share one scaling ``s = alpha / r``, so ``s`` cancels). Client ``k`` receives the first ``r_k``
components, which by Eckart-Young is the best rank-``r_k`` approximation of ``Delta`` (the
reference's per-rank redistribution). The head is averaged with the same weights.

The reference code forms ``Delta`` as a dense ``m x n`` matrix; here it is never formed (as in
NVFlare's HLoRA aggregator): the stacked factors ``B_st = [B_1 ... B_K]``, ``A_st = [p_1 A_1; ...;
p_K A_K]`` (:func:`fedlora.core.lora_math.stack_pairs`, ``B_st A_st = Delta``, stacked rank
``R = sum r_k``) are reduced by thin QR, ``B_st = Q_B R_B`` and ``A_st^T = Q_A R_A``, and the
``R x R`` core ``C = R_B R_A^T`` has ``Delta``'s singular values: ``C = U_C S V_C^T`` gives
``U = Q_B U_C`` and ``V = Q_A V_C``. The cost is ``O((m + n) R^2)``, not ``O(m n min(m, n))``.
Each singular pair's sign is fixed (the largest entry of each column of ``V`` is positive), so the
global adapter does not depend on the order of the clients.

Per round each client sends and receives ``r_k (m + n)`` numbers per module and its head (as
FedAvg). Logged: ``svd_energy_kept``, the share of ``||Delta||_F^2`` that the rank-``r_max``
truncation keeps (1 when the stacked rank fits), summed over modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterState, AggregateResult, ClientUpdate, LoraPair, Tensor
from strategies.fedavg import ContinuingClients, check_equal_scaling


def product_svd(
    pairs: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float], rank: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``U, S, V`` (float64) of ``sum_k w_k B_k A_k`` for ``pairs`` ``(A_k, B_k)``, without forming it.

    ``S`` ``(q,)`` holds all ``q = min(m, n, R)`` singular values, descending; ``U`` ``(m, k)`` and
    ``V`` ``(n, k)`` the first ``k = min(q, rank)`` singular vectors (all ``q`` without ``rank``),
    each pair's sign making the largest-magnitude entry of ``V[:, i]`` positive.
    """
    a_st, b_st = lm.stack_pairs([(a.double(), b.double()) for a, b in pairs], weights)  # (R, n), (m, R)
    q_b, r_b = torch.linalg.qr(b_st)  # (m, q_b), (q_b, R)
    q_a, r_a = torch.linalg.qr(a_st.T)  # (n, q_a), (q_a, R)
    u_c, s, v_c_t = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core (q_b, q_a)
    k = s.shape[0] if rank is None else min(rank, s.shape[0])
    u, v = q_b @ u_c[:, :k], q_a @ v_c_t[:k].T
    if v.numel():
        rows = v.abs().argmax(dim=0)
        signs = torch.sign(v[rows, torch.arange(v.shape[1])])
        signs[signs == 0] = 1.0
        u, v = u * signs, v * signs
    return u, s, v


def redistribute(u: Tensor, s: Tensor, v: Tensor, rank: int, dtype: torch.dtype) -> LoraPair:
    """The rank-``rank`` adapter ``B = U_r S_r``, ``A = V_r^T`` (zero slots beyond the available components)."""
    q = min(rank, s.shape[0], v.shape[1])
    a = torch.zeros((rank, v.shape[0]), dtype=torch.float64)
    b = torch.zeros((u.shape[0], rank), dtype=torch.float64)
    a[:q] = v[:, :q].T
    b[:, :q] = u[:, :q] * s[:q]
    return LoraPair(a.to(dtype), b.to(dtype))


class FlexLoRA(ContinuingClients):
    """SVD redistribution of the exact weighted product average (FlexLoRA / HLoRA).

    Parameters
    ----------
    weighting:
        ``"examples"`` (``p_k = n_k / sum n_j``, the reference code) or ``"uniform"``.
    """

    linear = False
    why_not_linear = ("it takes an SVD of sum_k p_k s B_k A_k, which needs each client's product, and truncating it "
                      "is not linear")

    # clients continue from the first r_k slots: the top r_k components, the best rank-r_k approximation

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
        """Truncated SVD (rank ``r_max``) of ``sum_k p_k B_k A_k`` per module; the head averaged."""
        check_equal_scaling(updates)
        weights = lm.participant_weights(self.weighting, [u.num_examples for u in updates])
        r_max = lm.rank_of(global_adapter)
        prev_pairs, _ = lm.split_state(global_adapter)
        client_pairs = [lm.split_state(u.state)[0] for u in updates]
        out: dict[str, LoraPair] = {}
        kept, total = 0.0, 0.0
        for module, (a_prev, _) in prev_pairs.items():
            u, s, v = product_svd([cp[module] for cp in client_pairs], weights, rank=r_max)
            out[module] = redistribute(u, s, v, r_max, a_prev.dtype)
            energy = s**2
            kept += float(energy[:r_max].sum())
            total += float(energy.sum())
        head = lm.average_others([u.state for u in updates], weights)
        metrics = {"svd_energy_kept": kept / total if total > 0 else 1.0}
        return AggregateResult(adapter=lm.join_state(out, head), metrics=metrics)
