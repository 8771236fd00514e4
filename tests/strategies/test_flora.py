"""FLoRA stacking (strategies/flora.py), algorithms.md §2 and §8.2."""

from __future__ import annotations

import pytest
import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterSpec, ClientUpdate
from strategies.flora import FLoRA, derive_seed

S = 2.0  # alpha = 2 r (FLoRA's heterogeneous runs)


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def update(cid: int, pairs: dict, num_examples: int = 1, head: dict | None = None, scaling: float = S):
    state = lm.join_state(pairs, head or {})
    return ClientUpdate(cid, lm.rank_of(state), scaling, num_examples, state)


def global_at(modules: dict, r_max: int, head: dict | None = None):
    return FLoRA().init(AdapterSpec(modules, r_max, S, head or {}), seed=0)


def random_clients(gen, modules, ranks, counts, head_shape=(3,)):
    ups = []
    for k, (r, n_k) in enumerate(zip(ranks, counts, strict=False)):
        pairs = {mod: (rand(gen, r, n), rand(gen, m, r)) for mod, (m, n) in modules.items()}
        ups.append(update(k, pairs, n_k, head={"head.weight": rand(gen, *head_shape)}))
    return ups


def ideal(ups, module, weights):
    out = 0
    for u, p in zip(ups, weights, strict=False):
        a, b = lm.split_state(u.state)[0][module]
        out = out + p * u.scaling * (b @ a)
    return out


def test_plan_is_a_fresh_adapter_with_per_client_per_round_seed_and_global_head():
    init = global_at({"l": (6, 5)}, 8, head={"head.weight": torch.arange(3.0)})
    strat = FLoRA()
    plan = strat.plan(init.adapter, init.state, client_id=3, rank=4, server_round=2, seed=11)
    assert plan.adapter is None and plan.rank == 4 and plan.train_lora_a and plan.send_lora_a
    assert plan.init_seed == derive_seed(11, 2, 3)
    assert list(plan.head) == ["head.weight"] and torch.equal(plan.head["head.weight"], torch.arange(3.0))
    assert plan.head["head.weight"] is not init.adapter["head.weight"]
    seeds = {
        strat.plan(init.adapter, init.state, client_id=c, rank=4, server_round=r, seed=11).init_seed
        for c in range(5)
        for r in range(1, 4)
    }
    assert len(seeds) == 15  # clients draw different A's, and a new one every round
    assert (
        strat.plan(init.adapter, init.state, client_id=3, rank=4, server_round=2, seed=11).init_seed
        == plan.init_seed
    )
    assert 0 <= plan.init_seed < 2**62
    # the client's fresh adapter: A from its seed, B = 0
    start = lm.fresh_state({"l": (6, 5)}, plan.rank, plan.init_seed, plan.head)
    assert torch.all(start["l.lora_B.weight"] == 0) and start["l.lora_A.weight"].shape == (4, 5)


@pytest.mark.parametrize("ranks", [[8, 4, 2], [4, 4, 4], [1, 8]])
def test_merge_is_exact_for_mixed_ranks(ranks):
    gen = torch.Generator().manual_seed(0)
    modules = {"q": (12, 10), "v": (7, 9)}
    ups = random_clients(gen, modules, ranks, [5, 3, 2][: len(ranks)])
    res = FLoRA().aggregate(global_at(modules, max(ranks)).adapter, {}, ups, server_round=1)
    w = lm.example_weights([u.num_examples for u in ups])
    for module, (m, n) in modules.items():
        a_st, b_st = res.merge[module]
        assert b_st.shape == (m, sum(ranks)) and a_st.shape == (sum(ranks), n)
        # B_st A_st == sum_k p_k s_k B_k A_k (scaling folded in exactly once)
        assert torch.allclose(b_st @ a_st, ideal(ups, module, w), atol=1e-12)


def test_scaling_is_folded_in_exactly_once():
    gen = torch.Generator().manual_seed(1)
    a, b = rand(gen, 2, 5), rand(gen, 4, 2)
    for s in (1.0, 2.0, 0.5):
        res = FLoRA().aggregate(
            global_at({"l": (4, 5)}, 2).adapter, {}, [update(0, {"l": (a, b)}, scaling=s)], server_round=1
        )
        a_st, b_st = res.merge["l"]
        assert torch.allclose(b_st @ a_st, s * (b @ a), atol=1e-13)
        assert torch.equal(b_st, b)  # B blocks unscaled, c_k = p_k s_k on A only


def test_stacked_rank_is_the_sum_of_participants_ranks():
    # Regression: the reference code saved the stacked adapter with r = lora_r * num_clients, which
    # is wrong under partial participation and for mixed ranks (right for [64,32,16,16,8,8,4,4,4,4]
    # only by coincidence). Here 2 of 10 clients (ranks 4 and 2) participate: R = 6, not 16 * 10.
    gen = torch.Generator().manual_seed(2)
    ups = random_clients(gen, {"l": (6, 8)}, [4, 2], [1, 1])
    ups = [ClientUpdate(7, 4, S, 1, ups[0].state), ClientUpdate(2, 2, S, 1, ups[1].state)]
    res = FLoRA().aggregate(global_at({"l": (6, 8)}, 16).adapter, {}, ups, server_round=1)
    assert res.metrics["stacked_rank"] == 6.0
    assert res.merge["l"].b.shape == (6, 6) and res.merge["l"].a.shape == (6, 8)
    assert res.metrics["merge_params"] == 6 * (6 + 8)


def test_lora_a_and_b_are_matched_by_key_name_when_rank_equals_m_or_n():
    # Regression: the reference code told A from B by `shape[0] == r_k` (A gets p_k, cat on dim 0).
    # With r_k == m, B (m, r_k) also has shape[0] == r_k and would be scaled and stacked as an A.
    # Layer m = 4, n = 6; client ranks 4 (== m) and 6 (== n).
    gen = torch.Generator().manual_seed(3)
    a4, b4 = rand(gen, 4, 6), rand(gen, 4, 4)
    a6, b6 = rand(gen, 6, 6), rand(gen, 4, 6)
    ups = [update(0, {"l": (a4, b4)}, 1), update(1, {"l": (a6, b6)}, 3)]
    res = FLoRA().aggregate(global_at({"l": (4, 6)}, 6).adapter, {}, ups, server_round=1)
    a_st, b_st = res.merge["l"]
    assert b_st.shape == (4, 10) and a_st.shape == (10, 6)
    assert torch.equal(b_st, torch.cat([b4, b6], dim=1))
    assert torch.allclose(a_st, torch.cat([0.25 * S * a4, 0.75 * S * a6], dim=0), atol=1e-15)
    assert torch.allclose(b_st @ a_st, S * (0.25 * b4 @ a4 + 0.75 * b6 @ a6), atol=1e-12)


def test_merge_is_oriented_like_linear_weight_on_a_non_square_layer():
    # FedEx-LoRA added its residual with an unconditional transpose (right for GPT-2 Conv1D, wrong
    # for nn.Linear). FLoRA's merge must be (m, n) = (out, in), like nn.Linear.weight, untransposed:
    # a layer with the merge applied computes W0 x + s B (A x), the client's LoRA forward.
    gen = torch.Generator().manual_seed(4)
    m, n = 5, 7
    layer = torch.nn.Linear(n, m, bias=False).double()
    a, b = rand(gen, 3, n), rand(gen, m, 3)
    res = FLoRA().aggregate(
        global_at({"l": (m, n)}, 3).adapter, {}, [update(0, {"l": (a, b)})], server_round=1
    )
    delta = lm.merge_delta(res.merge, "l")
    assert delta.shape == layer.weight.shape == (m, n)
    x = rand(gen, 4, n)
    lora_out = layer(x) + S * (x @ a.T) @ b.T
    with torch.no_grad():
        layer.weight += delta
    assert torch.allclose(layer(x), lora_out, atol=1e-12)


def test_new_global_adapter_is_fresh_with_zero_b_and_averaged_head():
    gen = torch.Generator().manual_seed(5)
    modules = {"l": (6, 5)}
    init = global_at(modules, 4, head={"head.weight": torch.zeros(3)})
    ups = random_clients(gen, modules, [4, 2], [1, 3])
    res = FLoRA().aggregate(init.adapter, init.state, ups, server_round=1)
    assert res.adapter.keys() == init.adapter.keys()
    assert torch.all(res.adapter["l.lora_B.weight"] == 0)
    assert res.adapter["l.lora_A.weight"].shape == (4, 5)
    assert res.adapter["l.lora_A.weight"].dtype == init.adapter["l.lora_A.weight"].dtype
    assert not torch.equal(res.adapter["l.lora_A.weight"], init.adapter["l.lora_A.weight"])
    head = 0.25 * ups[0].state["head.weight"] + 0.75 * ups[1].state["head.weight"]
    assert torch.allclose(res.adapter["head.weight"].double(), head, atol=1e-6)
    # the seed travels in the state (tensors only, so it checkpoints)
    assert all(isinstance(v, torch.Tensor) for v in res.state.values())
    again = FLoRA().aggregate(init.adapter, res.state, ups, server_round=2)
    assert torch.equal(again.state["seed"], init.state["seed"])
    assert not torch.equal(again.adapter["l.lora_A.weight"], res.adapter["l.lora_A.weight"])


def test_weights_renormalise_over_participants_and_uniform_option():
    gen = torch.Generator().manual_seed(6)
    ups = random_clients(gen, {"l": (5, 4)}, [2, 2, 2], [10, 30, 60])
    g = global_at({"l": (5, 4)}, 2).adapter
    part = FLoRA().aggregate(g, {}, ups[:2], server_round=1)
    assert torch.allclose(lm.merge_delta(part.merge, "l"), ideal(ups[:2], "l", [0.25, 0.75]), atol=1e-12)
    uni = FLoRA(weighting="uniform").aggregate(g, {}, ups, server_round=1)
    assert torch.allclose(lm.merge_delta(uni.merge, "l"), ideal(ups, "l", [1 / 3] * 3), atol=1e-12)


def test_stacking_order_does_not_depend_on_reply_order():
    gen = torch.Generator().manual_seed(7)
    ups = random_clients(gen, {"l": (5, 4)}, [3, 1, 2], [1, 2, 3])
    g = global_at({"l": (5, 4)}, 3).adapter
    r1 = FLoRA().aggregate(g, {}, ups, server_round=1)
    r2 = FLoRA().aggregate(g, {}, ups[::-1], server_round=1)
    assert torch.equal(r1.merge["l"][0], r2.merge["l"][0]) and torch.equal(r1.merge["l"][1], r2.merge["l"][1])


def test_metrics():
    gen = torch.Generator().manual_seed(8)
    ups = random_clients(gen, {"l": (5, 4)}, [3, 1], [1, 1])
    res = FLoRA().aggregate(global_at({"l": (5, 4)}, 3).adapter, {}, ups, server_round=1)
    assert res.metrics["stacked_rank"] == 4.0 and res.metrics["num_clients"] == 2.0
    assert res.metrics["merge_fro"] == pytest.approx(float(lm.merge_delta(res.merge, "l").norm()), rel=1e-10)
    assert all(isinstance(v, float) for v in res.metrics.values())


def test_errors():
    with pytest.raises(ValueError, match="strategy.weighting"):
        FLoRA(weighting="norm")
    gen = torch.Generator().manual_seed(9)
    g = global_at({"l": (5, 4), "k": (3, 3)}, 2).adapter
    missing = update(0, {"l": (rand(gen, 2, 4), rand(gen, 5, 2))})
    with pytest.raises(ValueError, match="module 'k'"):
        FLoRA().aggregate(g, {}, [missing], server_round=1)
    # HeteroLoRA's asymmetric alpha handling: unequal scalings are refused
    ups = random_clients(gen, {"l": (5, 4)}, [2, 2], [1, 1])
    ups[1] = ClientUpdate(1, 2, 8.0, 1, ups[1].state)
    with pytest.raises(ValueError, match="scalings"):
        FLoRA().aggregate(global_at({"l": (5, 4)}, 2).adapter, {}, ups, server_round=1)
    with pytest.raises(ValueError, match="at least one"):
        FLoRA().aggregate(g, {}, [], server_round=1)
