"""FedEx-LoRA against dense float64 references: the global model is the exact average of the clients'.

References are formed densely here (the strategy never forms an ``m x n`` matrix): the weighted
average of the clients' products, the residual ``sum p_k B_k A_k - B_avg A_avg``, its
differences form ``sum_{k<K} p_k (B_k - B_avg)(A_k - A_K)`` (algorithms.md §8.6), and a two-round
simulation whose models are dense weights: after every round the global model equals the weighted
average of the models the clients trained, while the adapter stays at ``r_max``.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterSpec, ClientUpdate, LoraPair
from strategies.fedavg import FedAvg
from strategies.fedex_lora import FedExLoRA, residual_merge

S = 2.0
MODULES = {"enc.q": (9, 7), "enc.v": (6, 11)}  # non-square, m != n
HEAD = {"classifier.weight": torch.zeros(3, 7), "classifier.bias": torch.zeros(3)}


def client(cid: int, rank: int, examples: int, seed: int, start: dict | None = None) -> ClientUpdate:
    """A trained client: random factors (or ``start`` moved by noise) at ``rank``, float64."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module, (m, n) in MODULES.items():
        a, b = torch.randn((rank, n), generator=gen, dtype=torch.float64), torch.randn(
            (m, rank), generator=gen, dtype=torch.float64)
        if start is not None:
            a = start[lm.lora_a_key(module)] + 0.3 * a
            b = start[lm.lora_b_key(module)] + 0.3 * b
        state[lm.lora_a_key(module)], state[lm.lora_b_key(module)] = a, b
    state["classifier.weight"] = torch.randn((3, 7), generator=gen, dtype=torch.float64)
    state["classifier.bias"] = torch.randn((3,), generator=gen, dtype=torch.float64)
    return ClientUpdate(cid, rank, S, examples, state)


def global_adapter(r_max: int) -> dict:
    spec = AdapterSpec(MODULES, r_max, S, {k: v.double() for k, v in HEAD.items()})
    return {k: v.double() for k, v in FedExLoRA().init(spec, seed=3).adapter.items()}


def product(state: dict, module: str) -> torch.Tensor:
    return state[lm.lora_b_key(module)] @ state[lm.lora_a_key(module)]


def dense_average(updates, weights, module: str) -> torch.Tensor:
    return sum(w * product(u.state, module) for u, w in zip(updates, weights, strict=True))


@pytest.mark.parametrize("ranks", [[4, 4, 4, 4], [8, 4, 2, 1], [1, 1, 1, 1, 8], [3]])
@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_the_global_model_is_exactly_the_weighted_average_of_the_clients_models(ranks, weighting) -> None:
    updates = [client(i, r, 10 * (i + 1), seed=i) for i, r in enumerate(ranks)]
    r_max = max(ranks)
    result = FedExLoRA(weighting=weighting).aggregate(global_adapter(r_max), {}, updates, server_round=1)
    weights = lm.participant_weights(weighting, [u.num_examples for u in updates])
    for module in MODULES:
        model = S * product(result.adapter, module)
        if result.merge is not None:
            model = model + lm.merge_delta(result.merge, module)
        assert torch.allclose(model, S * dense_average(updates, weights, module), atol=1e-12)
        assert lm.rank_of(result.adapter) == r_max


def test_the_adapter_is_fedavgs_and_the_merge_is_the_residual_in_its_differences_form() -> None:
    updates = [client(i, 4, n, seed=10 + i) for i, n in enumerate([5, 10, 20, 25])]
    start = global_adapter(4)
    fedex = FedExLoRA().aggregate(start, {}, updates, server_round=1)
    fedavg = FedAvg().aggregate(start, {}, updates, server_round=1)
    for key in fedavg.adapter:
        assert torch.equal(fedex.adapter[key], fedavg.adapter[key]), key
    weights = lm.example_weights([u.num_examples for u in updates])
    for module in MODULES:
        a_bar, b_bar = fedex.adapter[lm.lora_a_key(module)], fedex.adapter[lm.lora_b_key(module)]
        residual = dense_average(updates, weights, module) - b_bar @ a_bar
        a_last = updates[-1].state[lm.lora_a_key(module)]
        differences = sum(w * (u.state[lm.lora_b_key(module)] - b_bar) @ (u.state[lm.lora_a_key(module)] - a_last)
                          for u, w in zip(updates[:-1], weights[:-1], strict=True))
        assert torch.allclose(differences, residual, atol=1e-12)
        a_st, b_st = fedex.merge[module]
        assert a_st.shape[0] == b_st.shape[1] == 3 * 4  # (K - 1) r, below the stacked K r + r
        assert torch.allclose(b_st @ a_st, S * residual, atol=1e-12)
        assert torch.linalg.matrix_rank(b_st @ a_st) <= 12
    assert fedex.metrics["merge_rank"] == 12.0
    assert fedex.metrics["merge_params"] == sum(12 * (m + n) for m, n in MODULES.values())
    assert fedex.metrics["product_gap_rel"] == pytest.approx(fedavg.metrics["product_gap_rel"], rel=1e-12)
    assert fedex.metrics["product_gap_rel"] > 0.1


def test_hand_values_two_clients_equal_weights() -> None:
    # K = 2, p = 1/2: res = 1/4 (B1 - B2)(A1 - A2) (algorithms.md §8.1)
    a1, b1 = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([[3.0], [0.0], [1.0]], dtype=torch.float64)
    a2, b2 = torch.tensor([[0.0, -1.0]], dtype=torch.float64), torch.tensor([[1.0], [2.0], [1.0]], dtype=torch.float64)
    merge = residual_merge([LoraPair(a1, b1), LoraPair(a2, b2)], [0.5, 0.5],
                           LoraPair((a1 + a2) / 2, (b1 + b2) / 2), scaling=S)
    expected = S * 0.25 * torch.tensor([[2.0], [-2.0], [0.0]], dtype=torch.float64) @ torch.tensor(
        [[1.0, 3.0]], dtype=torch.float64)
    assert torch.equal(merge.b @ merge.a, expected)
    assert torch.equal(expected, torch.tensor([[1.0, 3.0], [-1.0, -3.0], [0.0, 0.0]], dtype=torch.float64))


def test_many_low_ranks_use_the_stacked_form_without_the_padding() -> None:
    updates = [client(i, r, 10, seed=20 + i) for i, r in enumerate([1, 1, 1, 1, 8])]
    result = FedExLoRA().aggregate(global_adapter(8), {}, updates, server_round=1)
    # differences: (5 - 1) * 8 = 32; stacked without zero slots: 1 + 1 + 1 + 1 + 8 + 8 = 20
    assert result.metrics["merge_rank"] == 20.0
    assert all(a.shape[0] == 20 for a, _ in result.merge.values())


def test_one_client_sends_no_merge_and_identical_clients_a_zero_residual() -> None:
    one = FedExLoRA().aggregate(global_adapter(4), {}, [client(0, 2, 5, seed=1)], server_round=1)
    assert one.merge is None and one.metrics["merge_rank"] == 0.0
    same = [ClientUpdate(i, 4, S, 3 + i, client(0, 4, 1, seed=2).state) for i in range(3)]
    result = FedExLoRA().aggregate(global_adapter(4), {}, same, server_round=1)
    for module in MODULES:
        assert torch.allclose(lm.merge_delta(result.merge, module), torch.zeros(MODULES[module], dtype=torch.float64),
                              atol=1e-12)


def test_two_rounds_each_global_model_is_the_average_of_the_models_its_clients_trained() -> None:
    # Dense models: base W (+ every merge so far) + s B A. Clients continue from the global
    # factors (their first r_k slots) on the merged base; after each round the global model must
    # equal sum_k p_k (their model), which FedAvg alone misses.
    gen = torch.Generator().manual_seed(7)
    base = {module: torch.randn(shape, generator=gen, dtype=torch.float64) for module, shape in MODULES.items()}
    strategy = FedExLoRA()
    adapter = global_adapter(4)
    for server_round, ranks in ((1, [4, 2, 1]), (2, [2, 4, 4])):
        updates = []
        for cid, r in enumerate(ranks):
            plan = strategy.plan(adapter, {}, client_id=cid, rank=r, server_round=server_round, seed=3)
            updates.append(client(cid, r, 7 + 5 * cid, seed=100 * server_round + cid, start=plan.adapter))
        weights = lm.example_weights([u.num_examples for u in updates])
        result = strategy.aggregate(adapter, {}, updates, server_round=server_round)
        for module in MODULES:
            client_models = [base[module] + S * product(u.state, module) for u in updates]
            average = sum(w * model for w, model in zip(weights, client_models, strict=True))
            base[module] = base[module] + lm.merge_delta(result.merge, module)  # every model adds it
            assert torch.allclose(base[module] + S * product(result.adapter, module), average, atol=1e-12)
        adapter = result.adapter


def test_the_residual_is_oriented_like_a_linear_weight() -> None:
    # Regression: the reference code adds its residual transposed (right for Conv1D, wrong for
    # nn.Linear). A Linear layer with the merge added computes the average of the clients' forwards.
    gen = torch.Generator().manual_seed(4)
    updates = [client(i, 3, 10, seed=30 + i) for i in range(3)]
    result = FedExLoRA().aggregate(global_adapter(3), {}, updates, server_round=1)
    m, n = MODULES["enc.q"]
    layer = torch.nn.Linear(n, m, bias=False).double()
    x = torch.randn((4, n), generator=gen, dtype=torch.float64)

    def lora_forward(state: dict) -> torch.Tensor:
        a, b = state[lm.lora_a_key("enc.q")], state[lm.lora_b_key("enc.q")]
        return layer(x) + S * (x @ a.T) @ b.T

    average = sum(lora_forward(u.state) for u in updates) / 3
    with torch.no_grad():
        layer.weight += lm.merge_delta(result.merge, "enc.q")
    assert torch.allclose(lora_forward(result.adapter), average, atol=1e-12)


def test_float32_clients_get_a_float32_merge_and_errors() -> None:
    updates = [ClientUpdate(u.client_id, u.rank, S, 1, {k: v.float() for k, v in u.state.items()})
               for u in (client(0, 2, 1, seed=1), client(1, 2, 1, seed=2))]
    start = {k: v.float() for k, v in global_adapter(2).items()}
    result = FedExLoRA().aggregate(start, {}, updates, server_round=1)
    assert all(a.dtype == b.dtype == torch.float32 for a, b in result.merge.values())
    assert all(result.adapter[k].dtype == torch.float32 for k in result.adapter)
    with pytest.raises(ValueError, match="at least one"):
        FedExLoRA().aggregate(start, {}, [], server_round=1)
    with pytest.raises(ValueError, match="weighting"):
        FedExLoRA(weighting="norm")


@pytest.mark.slow
def test_end_to_end_with_the_real_model_and_partial_participation(tmp_path) -> None:
    # Real MiniLM, real Flower apps on Ray: 2 of 3 clients a round (seed 3 samples {0, 1}, {1, 2},
    # {0, 1}), so clients 2 and 0 each sat out a round and must apply the merge they missed before
    # continuing from the global factors; the saved adapter (merges folded in) reloads with plain
    # peft to the final accuracy.
    import json

    from conftest import TINY, reload_accuracy, run_fedlora

    run_dir = tmp_path / "run"
    out = run_fedlora([*TINY, "strategy=fedex_lora", "num_rounds=3", "fraction_train=0.67", "seed=3"], run_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    seen = [{c["client"] for c in row["clients"]} for row in rows[1:]]
    assert seen == [{0, 1}, {1, 2}, {0, 1}]
    for row in rows[1:]:
        assert row["num_ok"] == 2
        assert row["strategy"]["merge_rank"] > 0 and row["strategy"]["product_gap_rel"] > 0
    # it learns (slowly at 2 clients x 2 steps a round; FedAvg's accuracies are the same here)
    assert rows[-1]["test_loss"] < rows[0]["test_loss"] and rows[-1]["test_accuracy"] > rows[0]["test_accuracy"]
    assert reload_accuracy(run_dir) == pytest.approx(summary["final_test_accuracy"], abs=1e-9)
