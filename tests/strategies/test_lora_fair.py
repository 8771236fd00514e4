"""LoRA-FAIR closed-form correction (strategies/lora_fair.py), algorithms.md §4 and §8.7."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterSpec, ClientUpdate
from strategies.fedavg import FedAvg
from strategies.lora_fair import LoRAFAIR, fair_correction

S = 2.0


def rand(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def update(cid, a, b, n_k=1, head=None, scaling=S):
    state = lm.join_state({"l": (a, b)}, head or {})
    return ClientUpdate(cid, a.shape[0], scaling, n_k, state)


def global_at(m, n, r_max, dtype=torch.float64):
    res = LoRAFAIR().init(AdapterSpec({"l": (m, n)}, r_max, S, {}), seed=0)
    return {k: v.to(dtype) for k, v in res.adapter.items()}


def drifted_clients(gen, m, n, ranks, counts, drift=0.3, dtype=torch.float64):
    """Round-1-like clients: a common A_0 plus drift, B from zero plus drift."""
    a0 = rand(gen, max(ranks), n, dtype=dtype)
    return [
        update(k, a0[:r] + drift * rand(gen, r, n, dtype=dtype), rand(gen, m, r, dtype=dtype), c)
        for k, (r, c) in enumerate(zip(ranks, counts, strict=False))
    ]


def dense_oracle(ups, lam):
    """ΔW, Ā, B̄, ΔB* computed with explicit (m, n) matrices."""
    w = lm.example_weights([u.num_examples for u in ups])
    r_max = max(u.rank for u in ups)
    pairs = [lm.split_state(u.state)[0]["l"] for u in ups]
    padded = [lm.pad_pair(a.double(), b.double(), r_max) for a, b in pairs]
    a_bar = sum(p * a for p, (a, _) in zip(w, padded, strict=False))
    b_bar = sum(p * b for p, (_, b) in zip(w, padded, strict=False))
    dw = sum(p * b.double() @ a.double() for p, (a, b) in zip(w, pairs, strict=False))
    r = dw - b_bar @ a_bar
    gram = a_bar @ a_bar.T
    lam_eff = lam * torch.trace(gram) / r_max
    delta_b = r @ a_bar.T @ torch.linalg.inv(gram + lam_eff * torch.eye(r_max, dtype=torch.float64))
    return dw, a_bar, b_bar, delta_b


def fro(x):
    return float(torch.linalg.matrix_norm(x))


@pytest.mark.parametrize("ranks", [[4, 4, 4], [8, 4, 2], [3, 1]])
def test_closed_form_matches_dense_oracle(ranks):
    gen = torch.Generator().manual_seed(0)
    m, n = 16, 12
    ups = drifted_clients(gen, m, n, ranks, [5, 2, 3][: len(ranks)])
    res = LoRAFAIR(lam=0.05).aggregate(global_at(m, n, max(ranks)), {}, ups, server_round=1)
    dw, a_bar, b_bar, delta_b = dense_oracle(ups, 0.05)
    a, b = lm.split_state(res.adapter)[0]["l"]
    assert torch.allclose(a, a_bar, atol=1e-14)  # broadcast A is the FedAvg Ā
    assert torch.allclose(b, b_bar + delta_b, atol=1e-10)
    before, after = fro(dw - b_bar @ a_bar) / fro(dw), fro(dw - b @ a) / fro(dw)
    assert res.metrics["fedavg_error_rel"] == pytest.approx(before, rel=1e-9)
    assert res.metrics["fair_error_rel"] == pytest.approx(after, rel=1e-9)
    assert after < before
    assert res.metrics["delta_b_rel"] == pytest.approx(fro(delta_b) / fro(b_bar), rel=1e-9)
    # the FedAvg error is FedAvg's own product-gap metric
    fedavg = FedAvg().aggregate(global_at(m, n, max(ranks)), {}, ups, server_round=1)
    assert res.metrics["fedavg_error_rel"] == pytest.approx(fedavg.metrics["product_gap_rel"], rel=1e-9)


def test_vanishing_lambda_leaves_only_the_part_outside_the_row_space():
    # λ → 0: remaining error is ||R (I - P_Ā)||_F (algorithms.md 8.7)
    gen = torch.Generator().manual_seed(1)
    m, n = 20, 15
    ups = drifted_clients(gen, m, n, [4, 4, 4, 4], [1, 2, 3, 4])
    res = LoRAFAIR(lam=1e-12).aggregate(global_at(m, n, 4), {}, ups, server_round=1)
    dw, a_bar, b_bar, _ = dense_oracle(ups, 1e-12)
    proj = torch.linalg.pinv(a_bar) @ a_bar  # (n, n) projector onto rowspace(Ā)
    outside = fro((dw - b_bar @ a_bar) @ (torch.eye(n, dtype=torch.float64) - proj)) / fro(dw)
    assert res.metrics["fair_error_rel"] == pytest.approx(outside, rel=1e-6)
    # ... which is the maximiser of the paper's cosine objective over {X Ā}: cos = ||ΔW P|| / ||ΔW||
    a, b = lm.split_state(res.adapter)[0]["l"]
    cos = float((dw * (b @ a)).sum()) / (fro(dw) * fro(b @ a))
    cos_fedavg = float((dw * (b_bar @ a_bar)).sum()) / (fro(dw) * fro(b_bar @ a_bar))
    assert cos == pytest.approx(fro(dw @ proj) / fro(dw), rel=1e-8)
    assert cos >= cos_fedavg


def test_delta_b_norm_is_non_increasing_in_lambda_and_tends_to_fedavg():
    gen = torch.Generator().manual_seed(2)
    ups = drifted_clients(gen, 12, 10, [4, 4, 4], [3, 1, 2])
    g = global_at(12, 10, 4)
    norms, errors = [], []
    for lam in (1e-4, 1e-2, 1.0, 100.0, 1e8):
        res = LoRAFAIR(lam=lam).aggregate(g, {}, ups, server_round=1)
        norms.append(res.metrics["delta_b_rel"])
        errors.append(res.metrics["fair_error_rel"])
    assert all(x >= y for x, y in zip(norms, norms[1:], strict=False))
    assert all(x <= y + 1e-12 for x, y in zip(errors, errors[1:], strict=False))  # more shrinkage, less correction
    assert norms[-1] < 1e-6  # huge λ: plain FedAvg
    assert errors[-1] == pytest.approx(res.metrics["fedavg_error_rel"], rel=1e-6)


def test_lambda_is_scale_free():
    # The gauge (A, B) -> (cA, B/c) changes no product; with λ_eff = lam tr(ĀĀ^T)/r neither does
    # the corrected product (B̄ + ΔB*) Ā.
    gen = torch.Generator().manual_seed(3)
    ups = drifted_clients(gen, 9, 11, [3, 3], [1, 2])
    c = 37.0
    scaled = [
        update(u.client_id, c * u.state["l.lora_A.weight"], u.state["l.lora_B.weight"] / c, u.num_examples)
        for u in ups
    ]
    g = global_at(9, 11, 3)
    outs = []
    for batch in (ups, scaled):
        a, b = lm.split_state(LoRAFAIR(lam=0.5).aggregate(g, {}, batch, server_round=1).adapter)[0]["l"]
        outs.append(b @ a)
    assert torch.allclose(outs[0], outs[1], atol=1e-10)


def test_no_correction_when_fedavg_is_already_exact():
    # Regression: SpecTraL's _optimize_delta_lora_B initialises ΔB with xavier_uniform, leaving a
    # random perturbation at small λ. The closed form is ΔB* = 0 whenever R = 0 (here all A_k are
    # equal, as in FFA-LoRA), deterministic, and the adapter is exactly FedAvg's.
    gen = torch.Generator().manual_seed(4)
    a = rand(gen, 3, 8)
    ups = [update(k, a.clone(), rand(gen, 6, 3), k + 1) for k in range(3)]
    g = global_at(6, 8, 3)
    r1 = LoRAFAIR(lam=1e-6).aggregate(g, {}, ups, server_round=1)
    r2 = LoRAFAIR(lam=1e-6).aggregate(g, {}, ups, server_round=1)
    fedavg = FedAvg().aggregate(g, {}, ups, server_round=1)
    assert torch.allclose(r1.adapter["l.lora_B.weight"], fedavg.adapter["l.lora_B.weight"], atol=1e-13)
    assert torch.equal(r1.adapter["l.lora_B.weight"], r2.adapter["l.lora_B.weight"])
    assert r1.metrics["delta_b_rel"] < 1e-12 and r1.metrics["fair_error_rel"] < 1e-12


def test_identical_clients_return_that_client():
    gen = torch.Generator().manual_seed(5)
    a, b = rand(gen, 4, 7), rand(gen, 5, 4)
    ups = [update(k, a.clone(), b.clone(), k + 1) for k in range(3)]
    res = LoRAFAIR().aggregate(global_at(5, 7, 4), {}, ups, server_round=1)
    assert torch.allclose(res.adapter["l.lora_A.weight"], a, atol=1e-14)
    assert torch.allclose(res.adapter["l.lora_B.weight"], b, atol=1e-12)


def test_zero_a_bar_gives_no_correction():
    ups = [update(0, torch.zeros(2, 5, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64))]
    res = LoRAFAIR().aggregate(global_at(4, 5, 2), {}, ups, server_round=1)
    assert torch.equal(res.adapter["l.lora_B.weight"], torch.ones(4, 2, dtype=torch.float64))
    assert all(math.isfinite(v) for v in res.metrics.values())


def test_never_forms_an_m_by_n_matrix():
    # m = n = 100,000: a dense ΔW would need 40 GB in float32 (80 GB in float64).
    gen = torch.Generator().manual_seed(6)
    m = n = 100_000
    ups = [
        update(k, rand(gen, 2, n, dtype=torch.float32), rand(gen, m, 2, dtype=torch.float32), k + 1)
        for k in range(2)
    ]
    res = LoRAFAIR().aggregate(global_at(m, n, 2, torch.float32), {}, ups, server_round=1)
    assert res.adapter["l.lora_B.weight"].shape == (m, 2)
    # strictly closer: the code keeps FedAvg's B when a correction would not help, so "<=" alone
    # would also pass with a wrong correction (a flipped sign, say)
    assert res.metrics["fair_error_rel"] < res.metrics["fedavg_error_rel"] and res.metrics["delta_b_rel"] > 0


@given(
    m=st.integers(4, 20),
    n=st.integers(4, 20),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    counts=st.lists(st.integers(1, 100), min_size=4, max_size=4),
    lam=st.floats(1e-6, 100.0),
    drift=st.floats(0.01, 3.0),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_correction_never_increases_the_distance_to_the_ideal(m, n, ranks, counts, lam, drift, seed):
    gen = torch.Generator().manual_seed(seed)
    ups = drifted_clients(gen, m, n, ranks, counts[: len(ranks)], drift=drift)
    res = LoRAFAIR(lam=lam).aggregate(global_at(m, n, max(ranks)), {}, ups, server_round=1)
    assert res.metrics["fair_error_rel"] <= res.metrics["fedavg_error_rel"]
    # and the closed form itself (not only the logged metric) is no worse, checked densely
    dw, a_bar, b_bar, delta_b = dense_oracle(ups, lam)
    assert fro(dw - (b_bar + delta_b) @ a_bar) <= fro(dw - b_bar @ a_bar) * (1 + 1e-9) + 1e-12
    a, b = lm.split_state(res.adapter)[0]["l"]
    assert torch.isfinite(b).all() and b.shape == (m, max(ranks))
    # the broadcast B is that closed form (the guard that keeps FedAvg's B never hides a wrong one)
    assert torch.allclose(b, b_bar + delta_b, rtol=1e-7, atol=1e-9 * (1 + fro(b_bar + delta_b)))


@pytest.mark.parametrize("ranks,lam", [([4, 4, 4], 0.01), ([8, 4, 2], 0.3), ([3, 1], 1e-4)])
def test_corrected_b_solves_the_ridge_problem_by_least_squares(ranks, lam):
    # An independent solution of min ||ΔW - (B̄ + ΔB) Ā||² + λ_eff ||ΔB||²: the stacked least-squares
    # system [Ā^T; sqrt(λ_eff) I] ΔB^T = [R^T; 0], solved densely by QR (not the normal equations).
    gen = torch.Generator().manual_seed(11)
    m, n = 14, 9
    ups = drifted_clients(gen, m, n, ranks, [3, 5, 2][: len(ranks)])
    res = LoRAFAIR(lam=lam).aggregate(global_at(m, n, max(ranks)), {}, ups, server_round=1)
    dw, a_bar, b_bar, _ = dense_oracle(ups, lam)
    r = max(ranks)
    lam_eff = lam * float(torch.trace(a_bar @ a_bar.T)) / r
    lhs = torch.cat([a_bar.T, math.sqrt(lam_eff) * torch.eye(r, dtype=torch.float64)])  # (n + r, r)
    rhs = torch.cat([(dw - b_bar @ a_bar).T, torch.zeros(r, m, dtype=torch.float64)])  # (n + r, m)
    delta_b = torch.linalg.lstsq(lhs, rhs).solution.T  # (m, r)
    _, b = lm.split_state(res.adapter)[0]["l"]
    assert torch.allclose(b, b_bar + delta_b, atol=1e-9)
    assert res.metrics["fair_error_rel"] < res.metrics["fedavg_error_rel"]


def test_float32_states_keep_dtype_and_the_guarantee():
    gen = torch.Generator().manual_seed(7)
    ups = drifted_clients(gen, 10, 8, [4, 2], [1, 1], dtype=torch.float32)
    res = LoRAFAIR().aggregate(global_at(10, 8, 4, torch.float32), {}, ups, server_round=1)
    assert all(v.dtype == torch.float32 for v in res.adapter.values())
    assert res.metrics["fair_error_rel"] < res.metrics["fedavg_error_rel"]


def test_fair_correction_helper_handles_mixed_ranks_without_padding():
    gen = torch.Generator().manual_seed(8)
    pairs = [(rand(gen, 3, 6), rand(gen, 5, 3)), (rand(gen, 1, 6), rand(gen, 5, 1))]
    w = [0.4, 0.6]
    padded = [lm.pad_pair(a, b, 3) for a, b in pairs]
    a_bar = sum(p * a for p, (a, _) in zip(w, padded, strict=False))
    b_bar = sum(p * b for p, (_, b) in zip(w, padded, strict=False))
    got = fair_correction(pairs, w, a_bar, b_bar, 0.1)
    same = fair_correction(padded, w, a_bar, b_bar, 0.1)
    assert got.shape == (5, 3) and got.dtype == torch.float64
    assert torch.allclose(got, same, atol=1e-13)


@pytest.mark.parametrize("lam", [0, 0.0, -1, float("nan"), float("inf"), True, "0.01", None])
def test_lambda_must_be_positive(lam):
    # The paper's ablation: λ = 0 drops accuracy 77.07 -> 73.22; refuse it rather than allow it.
    with pytest.raises(ValueError, match="strategy.lam"):
        LoRAFAIR(lam=lam)


def test_unequal_scalings_raise():
    gen = torch.Generator().manual_seed(9)
    ups = [
        update(0, rand(gen, 2, 4), rand(gen, 3, 2)),
        update(1, rand(gen, 2, 4), rand(gen, 3, 2), scaling=1.0),
    ]
    with pytest.raises(ValueError, match="scalings"):
        LoRAFAIR().aggregate(global_at(3, 4, 2), {}, ups, server_round=1)
