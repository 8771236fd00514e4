"""FFA-LoRA (strategies/ffa_lora.py): frozen shared A, B-only averaging, algorithms.md §3 and §8.3."""

from __future__ import annotations

import pytest
import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterSpec, ClientUpdate
from strategies.ffa_lora import FFALoRA

S = 2.0
SEED = 123
MODULES = {"enc.q": (10, 6), "enc.v": (5, 9)}


def init(r_max=8, head=None):
    return FFALoRA().init(AdapterSpec(MODULES, r_max, S, head or {"head.weight": torch.zeros(4)}), SEED)


def train(plan, gen, shift=1.0):
    """What a client does under the plan: A frozen (train_lora_a=False), B and the head move."""
    state = {k: v.clone() for k, v in plan.adapter.items()}
    for key, value in state.items():
        if key.endswith(".lora_A.weight"):
            assert not plan.train_lora_a
            continue
        value += shift * torch.randn(value.shape, generator=gen)
    return state


def round_updates(strat, res, ranks, counts, gen, server_round=1):
    ups = []
    for cid, (r, n_k) in enumerate(zip(ranks, counts, strict=False)):
        plan = strat.plan(res.adapter, res.state, client_id=cid, rank=r, server_round=server_round, seed=SEED)
        ups.append(ClientUpdate(cid, r, S, n_k, train(plan, gen)))
    return ups


def test_init_draws_a_from_the_shared_seed_and_b_is_zero():
    res = init()
    for module, (m, n) in MODULES.items():
        assert torch.equal(res.adapter[f"{module}.lora_A.weight"], lm.init_lora_a(SEED, module, 8, n))
        assert torch.all(res.adapter[f"{module}.lora_B.weight"] == 0)
        assert res.adapter[f"{module}.lora_B.weight"].shape == (m, 8)
    assert int(res.state["seed"]) == SEED


@pytest.mark.parametrize("rank", range(1, 9))
def test_plan_freezes_a_and_keeps_it_off_the_wire(rank):
    res = init()
    plan = FFALoRA().plan(res.adapter, res.state, client_id=0, rank=rank, server_round=1, seed=SEED)
    assert plan.rank == rank and plan.init_seed == SEED
    assert plan.train_lora_a is False and plan.send_lora_a is False
    for module, (m, n) in MODULES.items():
        a = plan.adapter[f"{module}.lora_A.weight"]
        # the client regenerates A from the seed at its own rank: bit-identical to the server's rows
        assert torch.equal(a, lm.init_lora_a(SEED, module, rank, n))
        assert plan.adapter[f"{module}.lora_B.weight"].shape == (m, rank)


def test_plan_rejects_rank_above_r_max_and_a_global_a_not_from_the_seed():
    res = init(r_max=4)
    with pytest.raises(ValueError, match="rank"):
        FFALoRA().plan(res.adapter, res.state, client_id=0, rank=5, server_round=1, seed=SEED)
    tampered = dict(res.adapter)
    tampered["enc.q.lora_A.weight"] = tampered["enc.q.lora_A.weight"] + 1e-3
    with pytest.raises(ValueError, match="init_lora_a"):
        FFALoRA().plan(tampered, res.state, client_id=0, rank=2, server_round=1, seed=SEED)


def test_average_of_b_is_exact_with_mixed_ranks():
    # (sum_k p_k [B_k, 0]) A == sum_k p_k B_k A[:r_k]  (algorithms.md 8.3)
    gen = torch.Generator().manual_seed(0)
    strat, res = FFALoRA(), init()
    ups = round_updates(strat, res, [8, 4, 2, 1], [5, 1, 3, 7], gen)
    new = strat.aggregate(res.adapter, res.state, ups, server_round=1)
    w = lm.example_weights([u.num_examples for u in ups])
    for module in MODULES:
        a = new.adapter[f"{module}.lora_A.weight"].double()
        b = new.adapter[f"{module}.lora_B.weight"].double()
        target = sum(
            p * (u.state[f"{module}.lora_B.weight"].double() @ u.state[f"{module}.lora_A.weight"].double())
            for p, u in zip(w, ups, strict=False)
        )
        assert torch.allclose(b @ a, target, atol=1e-5)
    assert new.metrics["product_gap_rel"] < 1e-6
    assert new.adapter.keys() == res.adapter.keys()


def test_a_is_bit_identical_on_every_client_every_round():
    gen = torch.Generator().manual_seed(1)
    strat, res = FFALoRA(), init()
    a0 = {m: res.adapter[f"{m}.lora_A.weight"].clone() for m in MODULES}
    for server_round in range(1, 4):
        ups = round_updates(strat, res, [8, 3, 5], [1, 2, 3], gen, server_round)
        for u in ups:
            for m in MODULES:
                assert torch.equal(u.state[f"{m}.lora_A.weight"], a0[m][: u.rank])
        res = strat.aggregate(res.adapter, res.state, ups, server_round=server_round)
        for m in MODULES:
            assert torch.equal(res.adapter[f"{m}.lora_A.weight"], a0[m])
        assert int(res.state["seed"]) == SEED


def test_redrawn_a_is_rejected():
    # Regression: SpecTraL's `ffa` branch (client.py::train_baseline) re-draws lora_A ~ N(0, 0.02)
    # per client per round, silently breaking the shared A. Any difference, even one ulp, raises.
    gen = torch.Generator().manual_seed(2)
    strat, res = FFALoRA(), init()
    ups = round_updates(strat, res, [4, 4], [1, 1], gen)
    redrawn = dict(ups[1].state)
    redrawn["enc.v.lora_A.weight"] = 0.02 * torch.randn(4, 9, generator=gen)
    with pytest.raises(ValueError, match="frozen A"):
        strat.aggregate(res.adapter, res.state, [ups[0], ClientUpdate(1, 4, S, 1, redrawn)], server_round=1)
    one_ulp = dict(ups[1].state)
    a = one_ulp["enc.q.lora_A.weight"].clone()
    a[0, 0] = torch.nextafter(a[0, 0], torch.tensor(float("inf")))
    one_ulp["enc.q.lora_A.weight"] = a
    with pytest.raises(ValueError, match="client 1"):
        strat.aggregate(res.adapter, res.state, [ups[0], ClientUpdate(1, 4, S, 1, one_ulp)], server_round=1)


def test_head_is_averaged_and_uniform_weighting():
    gen = torch.Generator().manual_seed(3)
    strat, res = FFALoRA(weighting="uniform"), init()
    ups = round_updates(strat, res, [2, 2], [1, 9], gen)
    new = strat.aggregate(res.adapter, res.state, ups, server_round=1)
    assert torch.allclose(
        new.adapter["head.weight"], 0.5 * (ups[0].state["head.weight"] + ups[1].state["head.weight"])
    )
    b = 0.5 * (ups[0].state["enc.q.lora_B.weight"] + ups[1].state["enc.q.lora_B.weight"])
    assert torch.allclose(new.adapter["enc.q.lora_B.weight"][:, :2], b)
    assert torch.all(new.adapter["enc.q.lora_B.weight"][:, 2:] == 0)


def test_errors():
    with pytest.raises(ValueError, match="strategy.weighting"):
        FFALoRA(weighting="norm")
    gen = torch.Generator().manual_seed(4)
    strat, res = FFALoRA(), init()
    ups = round_updates(strat, res, [2, 2], [1, 1], gen)
    ups[0] = ClientUpdate(0, 2, 4.0, 1, ups[0].state)
    with pytest.raises(ValueError, match="scalings"):
        strat.aggregate(res.adapter, res.state, ups, server_round=1)
