r"""LoRA-FAIR: FedAvg on LoRA factors plus a server-side residual correction of ``B``.

Bian, J., Wang, L., Zhang, L., Xu, J. "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement." ICCV 2025, arXiv:2411.14961.

Update rule (algorithms.md §4), per adapted module, with ``p_k = n_k / sum_j n_j``:

1. zero-padded FedAvg at ``r_max``: :math:`\bar A = \sum_k p_k [A_k; 0]` (``r x n``),
   :math:`\bar B = \sum_k p_k [B_k, 0]` (``m x r``);
2. the ideal update :math:`\Delta W = \sum_k p_k B_k A_k` (in ``B`` units: the scaling ``s`` is
   common to every client, :func:`strategies.fedavg.check_equal_scaling`);
3. the correction

   .. math::

       \Delta B^* = \arg\min_{\Delta B} \|\Delta W - (\bar B + \Delta B)\bar A\|_F^2
                    + \lambda \|\Delta B\|_F^2
                  = R \bar A^\top (\bar A \bar A^\top + \lambda I_r)^{-1},
       \qquad R = \Delta W - \bar B \bar A ;

4. broadcast :math:`(\bar A, \bar B + \Delta B^*)`; the head is averaged with ``p_k``.

``R \bar A^T`` is formed in factored form, never as an ``m x n`` matrix:
:math:`R \bar A^\top = \sum_k p_k B_k (A_k \bar A^\top) - \bar B (\bar A \bar A^\top)`, where
``A_k Ā^T`` is ``r_k x r`` (mixed ranks need no padding here). The ``r x r`` solve runs in float64.

**Scale-free λ.** The factorisation has a gauge freedom ``(A, B) -> (cA, B/c)`` that leaves every
product unchanged. With a fixed λ the correction would depend on ``c`` (ridge in the eigenbasis of
``Ā Ā^T`` shrinks direction ``i`` by ``σ_i² / (σ_i² + λ)``). fedlora therefore uses

.. math:: \lambda_{\mathrm{eff}} = \mathrm{lam} \cdot \operatorname{tr}(\bar A \bar A^\top) / r ,

i.e. ``lam`` is relative to the mean eigenvalue of ``Ā Ā^T``; ``ΔB^* Ā`` is then invariant to the
gauge and ``ΔB^*`` is linear in ``ΔW``. ``lam`` must be > 0: the paper's ablation with λ = 0 raises
the cosine to 0.9998 but moves ``B̄'`` far from ``B̄`` and loses 3.9 accuracy points.

**Relation to the paper's objective.** The paper (and both re-implementations) minimise
``1 - cos(ΔW, (B̄+ΔB)Ā) + λ ||ΔB||`` by SGD. ``(B̄+ΔB)`` ranges over all of ``R^{m x r}``, so the
reachable updates form the linear subspace ``{X Ā}``. Over a linear subspace the cosine with ``ΔW``
is maximised by the orthogonal projection ``ΔW P_Ā`` (``P_Ā`` the projector onto the row space of
``Ā``), and that projection is exactly the λ → 0 limit of the closed form above. So at vanishing λ
both objectives pick the same update; the Frobenius one also fixes its magnitude (cosine is blind to
scale), and with λ > 0 both shrink ``ΔB`` towards 0, i.e. towards plain FedAvg. Starting from the
closed form (equivalently, from ``ΔB = 0`` with an exact solver) never adds the random perturbation
of SpecTraL's xavier-initialised ``ΔB``. Since ``ΔB^*`` minimises the regularised objective and
``ΔB = 0`` is feasible, ``||ΔW - (B̄+ΔB^*)Ā||_F <= ||ΔW - B̄Ā||_F`` always: the correction never
increases the distance to the ideal (both are logged every round).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterState, AggregateResult, ClientUpdate, Tensor
from strategies.fedavg import ContinuingClients, average_padded, check_equal_scaling


def fair_correction(
    pairs: Sequence[tuple[Tensor, Tensor]],
    weights: Sequence[float],
    a_avg: Tensor,
    b_avg: Tensor,
    lam: float,
) -> Tensor:
    r"""Return ``ΔB* = R Ā^T (Ā Ā^T + λ_eff I)^{-1}`` (float64, shape ``(m, r)``).

    Parameters
    ----------
    pairs:
        The clients' ``(A_k (r_k, n), B_k (m, r_k))`` for one module (ranks may differ).
    weights:
        ``p_k`` (summing to 1).
    a_avg, b_avg:
        ``Ā`` (r, n) and ``B̄`` (m, r), the zero-padded averages.
    lam:
        Relative ridge strength: ``λ_eff = lam * tr(Ā Ā^T) / r``.
    """
    a64, b64 = a_avg.double(), b_avg.double()  # (r, n), (m, r)
    r = a64.shape[0]
    gram = a64 @ a64.T  # (r, r) = Ā Ā^T
    trace = float(torch.trace(gram))
    if r == 0 or trace <= 0.0:
        return torch.zeros_like(b64)  # Ā = 0: no B-only correction can change B̄ Ā = 0
    # R Ā^T = sum_k p_k B_k (A_k Ā^T) - B̄ (Ā Ā^T), all (m, r); never an (m, n) matrix
    rat = -(b64 @ gram)
    for (a_k, b_k), p in zip(pairs, weights, strict=True):
        rat += p * (b_k.double() @ (a_k.double() @ a64.T))  # (m, r_k) @ (r_k, r)
    lam_eff = lam * trace / r
    system = gram + lam_eff * torch.eye(r, dtype=torch.float64)  # (r, r), symmetric positive definite
    # ΔB (G + λI) = R Ā^T  <=>  (G + λI) ΔB^T = (R Ā^T)^T  (G symmetric)
    delta_b: Tensor = torch.linalg.solve(system, rat.T).T  # (m, r)
    return delta_b


def _distances_sq(
    pairs: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float], a: Tensor, bs: Sequence[Tensor]
) -> tuple[list[float], float]:
    """Return ``([||ΔW - B A||_F^2 for B in bs], ||ΔW||_F^2)`` from stacked factors (no ``m x n`` matrix).

    Every product shares the ``A`` side ``[p_1 A_1; ...; p_K A_K; A]``, so one QR of it serves the
    ideal and every gap (:func:`fedlora.core.lora_math.ideal_and_gap_norms`).
    """
    dtype = torch.float64
    ideal_pair = lm.stack_pairs([(ak.to(dtype), bk.to(dtype)) for ak, bk in pairs], weights)
    ideal, gaps = lm.ideal_and_gap_norms(ideal_pair, a, bs)
    return [g**2 for g in gaps], ideal**2


class LoRAFAIR(ContinuingClients):
    """LoRA-FAIR (Bian et al., ICCV 2025): FedAvg, then a closed-form ridge correction of ``B̄``.

    Parameters
    ----------
    lam:
        Relative regularisation ``λ_eff = lam * tr(Ā Ā^T) / r`` (see the module docstring);
        must be a finite number > 0. Default 0.01, the paper's λ (a different parametrisation of
        the same trade-off: larger keeps ``B`` closer to FedAvg's ``B̄``, smaller removes more of the
        in-row-space part of the aggregation error).
    """

    linear = False
    why_not_linear = ("its correction of B is fitted to sum_k p_k B_k A_k, which needs each client's product "
                      "B_k A_k, not only a sum of updates")

    # "Avg-Initial": clients continue from the first r_k slots of the corrected (Ā, B̄ + ΔB*)

    def __init__(self, *, lam: float = 0.01) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
            raise ValueError(
                f"strategy.lam={lam!r} is invalid: the ridge strength must be a finite number > 0 "
                "(the paper's ablation shows lam=0 hurts); use e.g. strategy.lam=0.01"
            )
        self.lam = float(lam)

    def aggregate(
        self,
        global_adapter: AdapterState,
        state: Mapping[str, Tensor],
        updates: Sequence[ClientUpdate],
        *,
        server_round: int,
    ) -> AggregateResult:
        """Zero-padded FedAvg, then ``B̄ <- B̄ + ΔB*``; log the distance to the ideal before and after."""
        if not updates:
            raise ValueError("LoRAFAIR.aggregate needs at least one client update")
        check_equal_scaling(updates)
        weights = lm.example_weights([u.num_examples for u in updates])
        r_max = lm.rank_of(global_adapter)
        averaged = average_padded(updates, weights, global_adapter, rank=r_max, padding="zero")
        client_pairs = [lm.split_state(u.state)[0] for u in updates]
        out = {}
        before_sq = after_sq = ideal_sq = delta_sq = b_sq = 0.0
        for module, (a_avg, b_avg) in averaged.items():  # (r, n), (m, r)
            pairs = [cp[module] for cp in client_pairs]
            delta_b = fair_correction(pairs, weights, a_avg, b_avg, self.lam)  # (m, r) float64
            b_new = (b_avg.double() + delta_b).to(b_avg.dtype)
            (gap0, gap1), ideal = _distances_sq(pairs, weights, a_avg, [b_avg, b_new])
            if gap1 > gap0:
                # Only possible by rounding (casting B̄ + ΔB* back to the state dtype when the
                # correction is negligible): keep FedAvg's B̄ so the correction never hurts.
                b_new, gap1, delta_b = b_avg.clone(), gap0, torch.zeros_like(delta_b)
            out[module] = (a_avg, b_new)
            before_sq, after_sq, ideal_sq = before_sq + gap0, after_sq + gap1, ideal_sq + ideal
            delta_sq += float(delta_b.pow(2).sum())
            b_sq += float(b_avg.double().pow(2).sum())
        head = lm.average_others([u.state for u in updates], weights)
        ideal_norm = math.sqrt(ideal_sq)
        metrics = {
            "fedavg_error_rel": math.sqrt(before_sq) / ideal_norm if ideal_norm > 0 else 0.0,
            "fair_error_rel": math.sqrt(after_sq) / ideal_norm if ideal_norm > 0 else 0.0,
            "delta_b_rel": math.sqrt(delta_sq) / math.sqrt(b_sq) if b_sq > 0 else 0.0,
        }
        return AggregateResult(adapter=lm.join_state(out, head), metrics=metrics)
