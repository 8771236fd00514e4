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
NVFlare's HLoRA aggregator): with the stacked factors ``B_st = [B_1 ... B_K]``, ``A_st = [p_1 A_1;
...; p_K A_K]`` (:func:`fedlora.core.lora_math.stack_pairs`, ``B_st A_st = Delta``, stacked rank
``R = sum r_k``), everything happens in ``R x R`` Gram matrices (float64). ``G_B = B_st^T B_st = E L
E^T`` gives ``H = L^{1/2} E^T`` with ``H^T H = G_B``, so ``Delta^T Delta = A_st^T H^T H A_st`` and the
singular values of ``Delta`` are the square roots of the eigenvalues of the ``R x R`` matrix ``H G_A
H^T`` (``G_A = A_st A_st^T``); its eigenvectors ``w_i`` give the right singular vectors ``v_i = A_st^T
H^T w_i / sigma_i`` (re-orthonormalised by a thin QR of the ``n x r_max`` block) and the adapter's
``B = Delta V_r = B_st (A_st V_r)``, so ``B A`` is the projection of ``Delta`` on its top singular
directions. The cost is two Gram products, ``O((m + n) R^2)`` at full BLAS speed (about half of two
thin QRs, which an earlier version used: 2.79 s against the 2 s target on LLaMA-7B shapes,
``bench/aggregation.py``). The Gram form resolves singular values down to about ``sqrt(R eps)`` of
the largest (``eps`` float64's, ``2e-7`` at ``R = 160``): components below ``1e-6`` of the largest,
whose energy is under ``1e-12`` of the update's, are dropped as zero. Each singular pair's sign is
fixed (the largest entry of each column of ``V`` is positive), so the global adapter does not
depend on the order of the clients.

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

# singular values below this share of the largest are zero: the Gram form cannot resolve them
RESOLVABLE = 1e-6


def product_svd(
    pairs: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float], rank: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``U, S, V`` (float64) of ``sum_k w_k B_k A_k`` for ``pairs`` ``(A_k, B_k)``, without forming it.

    ``S`` ``(q,)`` holds all ``q = min(m, n, R)`` singular values, descending (those below
    :data:`RESOLVABLE` of the largest as 0); ``U`` ``(m, k)`` and ``V`` ``(n, k)`` the first
    ``k = min(rank, number of nonzero S)`` singular vectors (all of them without ``rank``), each pair's
    sign making the largest-magnitude entry of ``V[:, i]`` positive. ``U S = Delta V`` exactly as computed.
    """
    a_st, b_st = lm.stack_pairs([(a.double(), b.double()) for a, b in pairs], weights)  # (R, n), (m, R)
    q = min(b_st.shape[0], a_st.shape[1], a_st.shape[0])
    lam, e = torch.linalg.eigh(b_st.T @ b_st)  # G_B = E L E^T, (R, R)
    h = lam.clamp_min(0.0).sqrt()[:, None] * e.T  # H^T H = G_B
    ha = h @ a_st  # (R, n): Delta^T Delta = (H A_st)^T (H A_st)
    sigma2, w = torch.linalg.eigh(ha @ ha.T)  # ascending
    sigma2, w = sigma2.flip(0)[:q].clamp_min(0.0), w.flip(1)[:, :q]
    s = sigma2.sqrt()
    if s.numel():
        s[s <= RESOLVABLE * s[0]] = 0.0
    nonzero = int((s > 0).sum())
    k = nonzero if rank is None else min(rank, nonzero)
    v = (ha.T @ w[:, :k]) / s[:k]  # (n, k): the right singular vectors
    if k:
        v = torch.linalg.qr(v).Q  # orthonormal to rounding (the Gram form leaves about sqrt(eps))
        rows = v.abs().argmax(dim=0)
        signs = torch.sign(v[rows, torch.arange(k)])
        signs[signs == 0] = 1.0
        v = v * signs
    us = b_st @ (a_st @ v)  # (m, k): Delta V = U S
    return us / s[:k] if k else us, s, v


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
