"""Pure LoRA factor algebra (fedlora/adapters/lora_math.py), algorithms.md §8.2, §8.4."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.core import lora_math as lm
from fedlora.core.types import LoraPair


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# -- keys ------------------------------------------------------------------------------------------


def test_split_join_round_trip_and_name_based_detection():
    # A head tensor whose shape looks like a LoRA factor is still a head tensor: keys decide.
    state = {
        "enc.q.lora_A.weight": torch.zeros(4, 6),
        "enc.q.lora_B.weight": torch.zeros(4, 4),  # B with r == m: shape alone cannot tell it from A
        "classifier.weight": torch.zeros(4, 6),
    }
    pairs, others = lm.split_state(state)
    assert list(pairs) == ["enc.q"] and list(others) == ["classifier.weight"]
    assert pairs["enc.q"][0] is state["enc.q.lora_A.weight"]
    assert lm.join_state(pairs, others).keys() == state.keys()
    assert lm.is_lora_key("x.lora_B.weight") and not lm.is_lora_key("x.lora_B.bias")


def test_rank_of_rejects_mixed_ranks():
    state = {
        "a.lora_A.weight": torch.zeros(2, 3),
        "a.lora_B.weight": torch.zeros(3, 2),
        "b.lora_A.weight": torch.zeros(4, 3),
        "b.lora_B.weight": torch.zeros(3, 4),
    }
    with pytest.raises(ValueError):
        lm.rank_of(state)
    assert lm.rank_of({k: v for k, v in state.items() if k.startswith("a.")}) == 2


def test_split_raises_on_unpaired_factor():
    with pytest.raises(KeyError):
        lm.split_state({"a.lora_A.weight": torch.zeros(2, 3)})


# -- padding and truncation ------------------------------------------------------------------------


@given(
    m=st.integers(4, 16),
    n=st.integers(4, 16),
    r=st.integers(1, 8),
    extra=st.integers(0, 8),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_pad_truncate_round_trip(m, n, r, extra, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = rand(gen, r, n), rand(gen, m, r)
    ap, bp = lm.pad_pair(a, b, r + extra)
    assert ap.shape == (r + extra, n) and bp.shape == (m, r + extra)
    # zero slots add exact zeros (BLAS may sum in another order: equal to rounding)
    assert torch.allclose(bp @ ap, b @ a, rtol=0, atol=1e-12)
    assert torch.all(ap[r:] == 0) and torch.all(bp[:, r:] == 0)
    at, bt = lm.truncate_pair(ap, bp, r)
    assert torch.equal(at, a) and torch.equal(bt, b)
    assert at.shape == (r, n) and bt.shape == (m, r)


def test_truncate_returns_first_slots_and_copies():
    a, b = torch.arange(12.0).reshape(4, 3), torch.arange(8.0).reshape(2, 4)
    at, bt = lm.truncate_pair(a, b, 2)
    assert torch.equal(at, a[:2]) and torch.equal(bt, b[:, :2])
    at += 1
    assert a[0, 0] == 0  # no aliasing
    with pytest.raises(ValueError):
        lm.truncate_pair(a, b, 5)
    with pytest.raises(ValueError):
        lm.pad_pair(a, b, 3)


def test_resize_state_pads_or_truncates_every_module_and_copies_head():
    state = lm.fresh_state({"a": (5, 3), "b": (2, 7)}, 4, seed=1, head={"h": torch.ones(3)})
    small = lm.resize_state(state, 2)
    big = lm.resize_state(state, 6)
    assert lm.rank_of(small) == 2 and lm.rank_of(big) == 6
    assert torch.equal(small["a.lora_A.weight"], state["a.lora_A.weight"][:2])
    assert torch.equal(big["b.lora_A.weight"][:4], state["b.lora_A.weight"])
    assert torch.equal(small["h"], state["h"]) and small["h"] is not state["h"]


# -- initialisation --------------------------------------------------------------------------------


def test_init_lora_a_prefix_property_and_determinism():
    full = lm.init_lora_a(7, "layer.0.q", 8, 20)
    assert full.shape == (8, 20) and full.dtype == torch.float32
    for r in range(1, 9):
        assert torch.equal(lm.init_lora_a(7, "layer.0.q", r, 20), full[:r])  # bit-identical prefix
    assert torch.equal(lm.init_lora_a(7, "layer.0.q", 8, 20), full)  # deterministic
    assert not torch.equal(lm.init_lora_a(8, "layer.0.q", 8, 20), full)  # seed matters
    assert not torch.equal(lm.init_lora_a(7, "layer.0.v", 8, 20), full)  # module matters
    assert float(full.abs().max()) <= 1 / math.sqrt(20)  # Kaiming-uniform bound
    assert len({tuple(row.tolist()) for row in full}) == 8  # rows are distinct


def test_fresh_state_has_zero_b_and_given_head():
    state = lm.fresh_state({"m": (6, 4)}, 3, seed=0, head={"h": torch.arange(3.0)})
    assert state["m.lora_A.weight"].shape == (3, 4) and state["m.lora_B.weight"].shape == (6, 3)
    assert torch.all(state["m.lora_B.weight"] == 0)
    assert torch.equal(state["h"], torch.arange(3.0))


# -- weights ---------------------------------------------------------------------------------------


def test_example_weights():
    assert lm.example_weights([1, 3]) == [0.25, 0.75]
    with pytest.raises(ValueError):
        lm.example_weights([0, 0])
    with pytest.raises(ValueError):
        lm.example_weights([1, -1])


def test_weighted_sum_accumulates_low_precision_in_fp32():
    halves = [torch.full((4,), 1e-4, dtype=torch.float16)] * 1000
    out = lm.weighted_sum(halves, [1.0] * 1000)
    assert out.dtype == torch.float16
    assert float(out[0]) == pytest.approx(0.1, rel=1e-3)


# -- stacking (FLoRA) --------------------------------------------------------------------------------------


@given(
    ranks=st.lists(st.integers(1, 8), min_size=1, max_size=5),
    m=st.integers(4, 24),
    n=st.integers(4, 24),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_stack_pairs_is_exact_with_mixed_ranks(ranks, m, n, seed):
    gen = torch.Generator().manual_seed(seed)
    pairs = [(rand(gen, r, n), rand(gen, m, r)) for r in ranks]
    coef = torch.rand(len(ranks), generator=gen, dtype=torch.float64).tolist()
    a_st, b_st = lm.stack_pairs(pairs, coef)
    assert b_st.shape == (m, sum(ranks)) and a_st.shape == (sum(ranks), n)
    dense = sum(c * (b @ a) for c, (a, b) in zip(coef, pairs, strict=False))
    assert torch.allclose(b_st @ a_st, dense, atol=1e-12)
    # the coefficient is applied once, on A only: B blocks are the clients' B unchanged
    assert torch.equal(b_st, torch.cat([b for _, b in pairs], dim=1))
    # any common permutation of the stacked slots gives the same product
    perm = torch.randperm(sum(ranks), generator=gen)
    assert torch.allclose(b_st[:, perm] @ a_st[perm], dense, atol=1e-12)


def test_concat_merges_product_is_the_sum():
    gen = torch.Generator().manual_seed(0)
    m1 = {"x": LoraPair(rand(gen, 2, 3), rand(gen, 5, 2)), "y": LoraPair(rand(gen, 1, 4), rand(gen, 4, 1))}
    m2 = {"x": LoraPair(rand(gen, 3, 3), rand(gen, 5, 3))}
    cum = lm.concat_merges([m1, m2])
    assert sorted(cum) == ["x", "y"]
    assert torch.allclose(
        lm.merge_delta(cum, "x"), lm.merge_delta(m1, "x") + lm.merge_delta(m2, "x"), atol=1e-13
    )
    assert torch.allclose(lm.merge_delta(cum, "y"), lm.merge_delta(m1, "y"), atol=1e-13)
    assert cum["x"].b.shape == (5, 5) and cum["x"].a.shape == (5, 3)


# -- factored norms --------------------------------------------------------------------------------


@given(m=st.integers(1, 24), n=st.integers(1, 24), r=st.integers(1, 40), seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_factored_fro_norm_matches_dense(m, n, r, seed):
    gen = torch.Generator().manual_seed(seed)
    b, a = rand(gen, m, r), rand(gen, r, n)  # r may exceed m and n
    assert lm.factored_fro_norm(b, a) == pytest.approx(float(torch.linalg.matrix_norm(b @ a)), rel=1e-10)


@given(m=st.integers(1, 24), n=st.integers(1, 24), r=st.integers(1, 40), seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_product_singular_values_match_the_dense_product(m, n, r, seed):
    gen = torch.Generator().manual_seed(seed)
    b, a = rand(gen, m, r), rand(gen, r, n)
    dense = torch.linalg.svdvals(b @ a)
    got = lm.product_singular_values(b, a)
    k = min(len(dense), len(got))
    assert torch.allclose(got[:k], dense[:k], rtol=1e-9, atol=1e-9 * float(dense[0]))
    assert float(got[k:].abs().sum() + dense[k:].abs().sum()) <= 1e-9 * float(dense[0]) * (m + n + r)


def test_top_energy_share_by_hand():
    # B A = diag(3, 2, 1) in orthonormal bases: energies 9, 4, 1 of 14, however the factors split it
    q_m = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).Q
    q_n = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))).Q
    s = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    split = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 4.0]], dtype=torch.float64)
    b, a = q_m @ s @ torch.linalg.inv(split), split @ q_n.T
    assert lm.top_energy_share(b, a, 1) == pytest.approx(9 / 14, rel=1e-12)
    assert lm.top_energy_share(b, a, 2) == pytest.approx(13 / 14, rel=1e-12)
    assert lm.top_energy_share(b, a, 3) == pytest.approx(1.0, rel=1e-12)
    assert lm.top_energy_share(torch.zeros(7, 2), torch.zeros(2, 5), 1) == 1.0


def test_factored_fro_norm_is_accurate_for_small_differences():
    # Found while writing these tests: the former Gram-matrix form sqrt(tr(B^T B A A^T)) cancelled
    # catastrophically for differences of stacked factors (1.8e-6 returned for a true 1.1e-7).
    gen = torch.Generator().manual_seed(0)
    b, a = rand(gen, 64, 4), rand(gen, 4, 48)
    d = 1e-9 * rand(gen, 64, 4)
    got = lm.factored_fro_norm(torch.cat([b + d, -b], dim=1), torch.cat([a, a], dim=0))
    assert got == pytest.approx(float(torch.linalg.matrix_norm(d @ a)), rel=1e-5)
    assert lm.factored_fro_norm(torch.cat([b, -2 * b], 1), torch.cat([a, a / 2], 0)) < 1e-12
    assert lm.factored_fro_norm(torch.zeros(3, 0), torch.zeros(0, 4)) == 0.0
    assert lm.factored_fro_norm(torch.zeros(3, 2), torch.ones(2, 4)) == 0.0


@given(m=st.integers(1, 24), n=st.integers(1, 24), r=st.integers(1, 12), k=st.integers(1, 3),
       seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_ideal_and_gap_norms_match_dense(m, n, r, k, seed):
    gen = torch.Generator().manual_seed(seed)
    b_id, a_id = rand(gen, m, 2 * r), rand(gen, 2 * r, n)
    a = rand(gen, r, n)
    bs = [rand(gen, m, r) for _ in range(k)]
    ideal, gaps = lm.ideal_and_gap_norms(LoraPair(a_id, b_id), a, bs)
    dense = b_id @ a_id
    assert ideal == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-10)
    for b, gap in zip(bs, gaps, strict=True):
        assert gap == pytest.approx(float(torch.linalg.matrix_norm(dense - b @ a)), rel=1e-9)


def test_ideal_and_gap_norms_are_accurate_for_small_gaps():
    # The gap of an aggregate that nearly equals the ideal must not drown in rounding (FFA-LoRA).
    gen = torch.Generator().manual_seed(1)
    b, a = rand(gen, 64, 4), rand(gen, 4, 48)
    d = 1e-9 * rand(gen, 64, 4)
    ideal, (gap, exact) = lm.ideal_and_gap_norms(LoraPair(a, b), a, [b + d, b])
    assert ideal == pytest.approx(float(torch.linalg.matrix_norm(b @ a)), rel=1e-12)
    assert gap == pytest.approx(float(torch.linalg.matrix_norm(d @ a)), rel=1e-5)
    assert exact < 1e-12


# -- plans, merges, folding --------------------------------------------------------------------------------
def test_plan_start_builds_each_kind_of_plan() -> None:
    from fedlora.core.types import ClientPlan

    modules = {"l": (5, 4)}
    head = {"h": torch.ones(2)}
    fresh = lm.plan_start(ClientPlan(rank=3, adapter=None, init_seed=9, head=head), modules)
    assert torch.equal(fresh["l.lora_A.weight"], lm.init_lora_a(9, "l", 3, 4))
    assert torch.equal(fresh["l.lora_B.weight"], torch.zeros(5, 3)) and torch.equal(fresh["h"], head["h"])
    given = {"l.lora_A.weight": torch.randn(3, 4), "l.lora_B.weight": torch.randn(5, 3)}
    start = lm.plan_start(ClientPlan(rank=3, adapter=given, init_seed=9), modules)
    assert all(torch.equal(start[k], v) and start[k] is not v for k, v in given.items())  # copies
    b_only = {"l.lora_B.weight": given["l.lora_B.weight"]}  # A stayed off the wire: drawn from the seed
    start = lm.plan_start(ClientPlan(rank=3, adapter=b_only, init_seed=9, send_lora_a=False), modules)
    assert torch.equal(start["l.lora_A.weight"], lm.init_lora_a(9, "l", 3, 4))
    assert lm.continues(ClientPlan(3, None, 9), "l.lora_A.weight") is False
    assert lm.continues(ClientPlan(3, None, 9), "h") and lm.continues(ClientPlan(3, given, 9), "l.lora_B.weight")


def test_merges_flatten_and_come_back() -> None:
    gen = torch.Generator().manual_seed(1)
    merges = [(2, {"x": LoraPair(rand(gen, 3, 4), rand(gen, 5, 3))}),
              (0, {"y": LoraPair(rand(gen, 1, 2), rand(gen, 2, 1))})]
    flat = lm.merges_to_tensors(merges)
    assert sorted(flat) == ["0|y|A", "0|y|B", "2|x|A", "2|x|B"]
    back = lm.tensors_to_merges(flat)
    assert [i for i, _ in back] == [0, 2] and torch.equal(back[1][1]["x"].b, merges[0][1]["x"].b)


def test_fold_merges_product_equals_global_plus_merges() -> None:
    # The saved adapter must load on the pristine base: fold s*B_g@A_g and the merges into one LoRA.
    gen = torch.Generator().manual_seed(0)
    m, n, r, s = 6, 5, 3, 2.0
    adapter = {"l.lora_A.weight": rand(gen, r, n), "l.lora_B.weight": rand(gen, m, r), "head": torch.ones(2)}
    merges = [{"l": LoraPair(rand(gen, 4, n), rand(gen, m, 4))}, {"l": LoraPair(rand(gen, 2, n), rand(gen, m, 2))}]
    folded, rank = lm.fold_merges(adapter, s, merges)
    assert rank == r + 6 and lm.rank_of(folded) == rank
    expected = s * adapter["l.lora_B.weight"] @ adapter["l.lora_A.weight"] + sum(p.b @ p.a for p in
                                                                                 (mm["l"] for mm in merges))
    assert torch.allclose(folded["l.lora_B.weight"] @ folded["l.lora_A.weight"], expected, atol=1e-12)  # scaling 1
    assert torch.equal(folded["head"], adapter["head"])
    same, rank = lm.fold_merges(adapter, s, [])
    assert rank == r and all(torch.equal(same[k], v) for k, v in adapter.items())


def test_slot_update_energy_is_each_slots_dense_change() -> None:
    gen = torch.Generator().manual_seed(3)
    old = {lm.lora_a_key("q"): torch.randn(2, 5, generator=gen), lm.lora_b_key("q"): torch.randn(4, 2, generator=gen),
           "head": torch.ones(3)}
    new = {lm.lora_a_key("q"): torch.randn(3, 5, generator=gen), lm.lora_b_key("q"): torch.randn(4, 3, generator=gen)}
    energy = lm.slot_update_energy(old, new)
    padded = lm.pad_pair(old[lm.lora_a_key("q")], old[lm.lora_b_key("q")], 3)  # slot 2 did not exist before
    for i in range(3):
        b1, a1 = new[lm.lora_b_key("q")].double(), new[lm.lora_a_key("q")].double()
        change = b1[:, i:i + 1] @ a1[i:i + 1] - padded.b[:, i:i + 1].double() @ padded.a[i:i + 1].double()
        assert energy[i] == pytest.approx(float(change.pow(2).sum()), rel=1e-9)
    assert lm.slot_update_energy(new, new) == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    assert lm.slot_update_energy({}, {"head": torch.ones(2)}) == []
