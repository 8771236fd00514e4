"""RoLoRA: one factor trained and averaged per round, exact against dense float64 references.

Odd rounds train ``B`` (``A`` frozen), even rounds ``A`` (``B`` frozen); since the frozen factor is
the same for every client, the new global product equals the weighted average of the clients'
products, for any mix of ranks. Checked over several simulated rounds with dense products, with
hand values, and the refusals of a reply whose frozen factor moved; end to end with the real model
(with ComPEFT, whose error feedback must carry each factor's residual across the round it is not sent).
"""

from __future__ import annotations

import pytest
import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterSpec, ClientPlan, ClientUpdate
from strategies.rolora import RoLoRA, trains_b

S = 2.0
MODULES = {"enc.q": (9, 7), "enc.v": (6, 11)}  # non-square, m != n
HEAD = {"classifier.weight": torch.zeros(3, 7), "classifier.bias": torch.zeros(3)}


def init(r_max: int) -> dict:
    spec = AdapterSpec(MODULES, r_max, S, {k: v.double() for k, v in HEAD.items()})
    return {k: v.double() for k, v in RoLoRA().init(spec, seed=3).adapter.items()}


def train(plan: ClientPlan, seed: int) -> dict:
    """Move every tensor the plan trains by seeded noise; leave the frozen factor bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in sorted(plan.adapter.items()):
        frozen = (lm.is_lora_a_key(key) and not plan.train_lora_a) or (lm.is_lora_b_key(key) and not plan.train_lora_b)
        noise = torch.randn(value.shape, generator=gen, dtype=value.dtype)
        state[key] = value.clone() if frozen else value + 0.3 * noise
    return state


def product(state: dict, module: str) -> torch.Tensor:
    return state[lm.lora_b_key(module)] @ state[lm.lora_a_key(module)]


def test_odd_rounds_train_b_and_even_rounds_train_a() -> None:
    adapter = init(8)
    for server_round in (1, 2, 3, 4):
        plan = RoLoRA().plan(adapter, {}, client_id=0, rank=4, server_round=server_round, seed=3)
        assert (plan.train_lora_b, plan.train_lora_a) == ((True, False) if server_round % 2 else (False, True))
        assert trains_b(server_round) == plan.train_lora_b
        assert plan.send_lora_a and plan.adapter is not None  # both factors go down (neither is the seed's)
        assert all(torch.equal(plan.adapter[k], lm.resize_state(adapter, 4)[k]) for k in plan.adapter)
    with pytest.raises(ValueError, match="rank 9"):
        RoLoRA().plan(adapter, {}, client_id=0, rank=9, server_round=1, seed=3)


@pytest.mark.parametrize("ranks", [[4, 4, 4], [8, 4, 2, 1], [1]])
@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_every_round_the_global_product_is_the_average_of_the_clients_products(ranks, weighting) -> None:
    strategy = RoLoRA(weighting=weighting)
    adapter = init(8)
    for server_round in (1, 2, 3, 4):
        updates = []
        for cid, r in enumerate(ranks):
            plan = strategy.plan(adapter, {}, client_id=cid, rank=r, server_round=server_round, seed=3)
            updates.append(ClientUpdate(cid, r, S, 5 + 7 * cid, train(plan, 100 * server_round + cid)))
        result = strategy.aggregate(adapter, {}, updates, server_round=server_round)
        weights = lm.participant_weights(weighting, [u.num_examples for u in updates])
        for module in MODULES:
            average = sum(w * product(u.state, module) for w, u in zip(weights, updates, strict=True))
            assert torch.allclose(product(result.adapter, module), average, atol=1e-12)
            # the factor not trained this round is the global one, unchanged
            frozen = lm.lora_a_key(module) if server_round % 2 else lm.lora_b_key(module)
            assert torch.equal(result.adapter[frozen], adapter[frozen])
        assert result.metrics["trained_b"] == float(server_round % 2)
        assert result.metrics["product_gap_rel"] < 1e-12
        for key in HEAD:
            expected = sum(w * u.state[key] for w, u in zip(weights, updates, strict=True))
            assert torch.allclose(result.adapter[key], expected, atol=1e-12)
        assert lm.rank_of(result.adapter) == 8
        adapter = result.adapter


def test_hand_values_of_an_a_round() -> None:
    # r_max = 2, B = [[1, 2]] frozen; client 0 (rank 2, weight 1/4) and client 1 (rank 1, weight 3/4)
    b = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    adapter = {lm.lora_a_key("l"): torch.zeros(2, 2, dtype=torch.float64), lm.lora_b_key("l"): b}
    a0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    a1 = torch.tensor([[4.0, 4.0]], dtype=torch.float64)
    updates = [ClientUpdate(0, 2, S, 1, {lm.lora_a_key("l"): a0, lm.lora_b_key("l"): b.clone()}),
               ClientUpdate(1, 1, S, 3, {lm.lora_a_key("l"): a1, lm.lora_b_key("l"): b[:, :1].clone()})]
    result = RoLoRA().aggregate(adapter, {}, updates, server_round=2)
    # A_bar = 1/4 [[1, 0], [0, 1]] + 3/4 [[4, 4], [0, 0]] = [[3.25, 3], [0, 0.25]]
    a_bar = result.adapter[lm.lora_a_key("l")]
    assert torch.equal(a_bar, torch.tensor([[3.25, 3.0], [0.0, 0.25]], dtype=torch.float64))
    # B A_bar = [[3.25, 3.5]] = 1/4 B A_0 + 3/4 B[:, :1] A_1 = 1/4 [[1, 2]] + 3/4 [[4, 4]]
    assert torch.equal(b @ result.adapter[lm.lora_a_key("l")], torch.tensor([[3.25, 3.5]], dtype=torch.float64))


@pytest.mark.parametrize("server_round", [1, 2])
def test_a_reply_whose_frozen_factor_moved_is_refused(server_round: int) -> None:
    adapter = init(4)
    plan = RoLoRA().plan(adapter, {}, client_id=0, rank=4, server_round=server_round, seed=3)
    state = train(plan, 1)
    frozen = lm.lora_a_key("enc.v") if server_round == 1 else lm.lora_b_key("enc.v")
    state[frozen] = state[frozen] + 1e-9
    factor = "A" if server_round == 1 else "B"
    with pytest.raises(ValueError, match=f"client 0 changed the frozen {factor} of module 'enc.v'"):
        RoLoRA().aggregate(adapter, {}, [ClientUpdate(0, 4, S, 1, state)], server_round=server_round)
    with pytest.raises(ValueError, match="at least one"):
        RoLoRA().aggregate(adapter, {}, [], server_round=server_round)


def test_a_compressed_downlink_is_refused_before_anything_starts() -> None:
    # each client's compressed copy would approximate the frozen factor, which the aggregate refuses
    from conftest import compose

    from fedlora.config.validate import validate
    from fedlora.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        validate(compose(["strategy=rolora", "downlink=compeft"]), check_model=False, check_data=False)
    assert "downlink='compeft'" in str(info.value), str(info.value)
    assert "frozen factor must be the global one" in str(info.value) and "use downlink=none" in str(info.value)


@pytest.mark.slow
def test_end_to_end_with_the_real_model_and_compeft(tmp_path) -> None:
    # Real MiniLM, real Flower apps on Ray, ComPEFT with error feedback: rounds 1 and 3 send B, round 2
    # sends A; for these square 384 x 384 projections A and B are the same size, so each round's
    # uplink is the same and about half of FedAvg's in the same setting (the head goes up every round).
    import json

    from conftest import TINY, reload_accuracy, run_fedlora

    rows_by = {}
    for strategy in ("rolora", "fedavg"):
        run_dir = tmp_path / strategy
        out = run_fedlora([*TINY, f"strategy={strategy}", "num_rounds=3", "compression=compeft"], run_dir)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        rows_by[strategy] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = rows_by["rolora"]
    assert [r["strategy"]["trained_b"] for r in rows[1:]] == [1.0, 0.0, 1.0]
    assert all(r["num_ok"] == 3 and r["strategy"]["product_gap_rel"] < 1e-5 for r in rows[1:])
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    for row, fedavg_row in zip(rows[1:], rows_by["fedavg"][1:], strict=True):
        up = sum(c["bytes_up"] for c in row["clients"])
        fedavg_up = sum(c["bytes_up"] for c in fedavg_row["clients"])
        assert 0.4 < up / fedavg_up < 0.65, (up, fedavg_up)
    summary = json.loads((tmp_path / "rolora" / "summary.json").read_text())
    assert reload_accuracy(tmp_path / "rolora") == pytest.approx(summary["final_test_accuracy"], abs=1e-9)
