"""FedAvg / FedIT with zero padding (strategies/fedavg.py): hand-computed values, algorithms.md §8.1, §8.4."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import ClientUpdate
from strategies.fedavg import FedAvg, average_padded, check_equal_scaling, norm_weights, product_gap

S = 2.0  # alpha = 2 r at every rank


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def update(cid: int, pairs: dict, num_examples: int = 1, head: dict | None = None, scaling: float = S):
    state = lm.join_state(pairs, head or {})
    return ClientUpdate(cid, lm.rank_of(state), scaling, num_examples, state)


def global_at(modules: dict, r_max: int, head: dict | None = None, seed: int = 0):
    return {k: v.double() for k, v in lm.fresh_state(modules, r_max, seed, head or {}).items()}


def pairs_of(result):
    return lm.split_state(result.adapter)[0]


# -- two clients, rank 1, hand-computed --------------------------------------------------------------

A1, B1 = t([[1.0, 0.0]]), t([[1.0], [0.0]])  # B1 A1 = [[1, 0], [0, 0]]
A2, B2 = t([[0.0, 1.0]]), t([[0.0], [1.0]])  # B2 A2 = [[0, 0], [0, 1]]


def test_two_clients_equal_weights_hand_values():
    g = global_at({"l": (2, 2)}, 1)
    res = FedAvg().aggregate(g, {}, [update(0, {"l": (A1, B1)}), update(1, {"l": (A2, B2)})], server_round=1)
    a, b = pairs_of(res)["l"]
    assert torch.equal(a, t([[0.5, 0.5]]))
    assert torch.equal(b, t([[0.5], [0.5]]))
    # product of averages = 1/4 ones; average of products = I/2: they differ by
    # 1/4 (B1 - B2)(A1 - A2) = 1/4 [[1, -1], [-1, 1]] (algorithms.md 8.1, K = 2, equal weights)
    ideal = 0.5 * (B1 @ A1) + 0.5 * (B2 @ A2)
    assert torch.equal(b @ a, torch.full((2, 2), 0.25, dtype=torch.float64))
    assert torch.equal(ideal - b @ a, 0.25 * (B1 - B2) @ (A1 - A2))
    assert torch.equal(ideal - b @ a, t([[0.25, -0.25], [-0.25, 0.25]]))
    # relative gap ||gap|| / ||ideal|| = 0.5 / (0.5 sqrt 2)
    assert res.metrics["product_gap_rel"] == pytest.approx(1 / math.sqrt(2), rel=1e-12)


def test_two_clients_example_weights_hand_values():
    g = global_at({"l": (2, 2)}, 1)
    ups = [update(0, {"l": (A1, B1)}, num_examples=3), update(1, {"l": (A2, B2)}, num_examples=1)]
    a, b = pairs_of(FedAvg().aggregate(g, {}, ups, server_round=1))["l"]
    assert torch.equal(a, t([[0.75, 0.25]]))
    assert torch.equal(b, t([[0.75], [0.25]]))
    assert torch.equal(b @ a, t([[0.5625, 0.1875], [0.1875, 0.0625]]))


def test_fedit_uses_every_client_not_only_the_first():
    # Regression: FLoRA's FedIT path (ATP-1010/FederatedLLM fed_utils/model_aggregation.py) wrote
    # clients after the first into a misspelled accumulator `weighted_sindgle_weights`, so the
    # global adapter was p_0 * (A_0, B_0). The average must be sum_k p_k (A_k, B_k).
    gen = torch.Generator().manual_seed(0)
    ups, raw = [], []
    for k, n_k in enumerate([5, 3, 2]):
        a, b = (
            torch.randn(2, 4, generator=gen, dtype=torch.float64),
            torch.randn(3, 2, generator=gen, dtype=torch.float64),
        )
        raw.append((a, b, n_k / 10))
        ups.append(update(k, {"l": (a, b)}, num_examples=n_k))
    a_avg, b_avg = pairs_of(FedAvg().aggregate(global_at({"l": (3, 4)}, 2), {}, ups, server_round=1))["l"]
    assert torch.allclose(a_avg, sum(p * a for a, _, p in raw), atol=1e-14)
    assert torch.allclose(b_avg, sum(p * b for _, b, p in raw), atol=1e-14)
    assert not torch.allclose(a_avg, raw[0][2] * raw[0][0])


# -- mixed ranks, zero padding and owners padding --------------------------------------------------------

A_R2, B_R2 = t([[1.0, 2.0], [3.0, 4.0]]), t([[1.0, 0.0], [0.0, 1.0]])  # rank 2
A_R1, B_R1 = t([[2.0, 2.0]]), t([[4.0], [2.0]])  # rank 1


def test_mixed_ranks_zero_padding_hand_values():
    g = global_at({"l": (2, 2)}, 2)
    ups = [update(0, {"l": (A_R2, B_R2)}), update(1, {"l": (A_R1, B_R1)})]
    res = FedAvg(padding="zero").aggregate(g, {}, ups, server_round=1)
    a, b = pairs_of(res)["l"]
    # rank-1 client padded to A = [[2, 2], [0, 0]], B = [[4, 0], [2, 0]]
    assert torch.equal(a, t([[1.5, 2.0], [1.5, 2.0]]))
    assert torch.equal(b, t([[2.5, 0.0], [1.0, 0.5]]))
    # the rank-1 client receives the first slot only
    plan = FedAvg().plan(res.adapter, {}, client_id=1, rank=1, server_round=2, seed=0)
    a1, b1 = lm.split_state(plan.adapter)[0]["l"]
    assert torch.equal(a1, t([[1.5, 2.0]])) and torch.equal(b1, t([[2.5], [1.0]]))
    assert plan.rank == 1 and plan.train_lora_a and plan.send_lora_a


def test_mixed_ranks_owners_padding_hand_values():
    g = global_at({"l": (2, 2)}, 3)
    ups = [update(0, {"l": (A_R2, B_R2)}), update(1, {"l": (A_R1, B_R1)})]
    a, b = pairs_of(FedAvg(padding="owners").aggregate(g, {}, ups, server_round=1))["l"]
    # slot 0: both clients (equal weights); slot 1: only the rank-2 client; slot 2: nobody, keeps global
    a_g, b_g = lm.split_state(g)[0]["l"]
    assert torch.equal(a[0], t([1.5, 2.0])) and torch.equal(b[:, 0], t([2.5, 1.0]))
    assert torch.equal(a[1], t([3.0, 4.0])) and torch.equal(b[:, 1], t([0.0, 1.0]))
    assert torch.equal(a[2], a_g[2]) and torch.equal(b[:, 2], b_g[:, 2])


def test_owner_slot_weights_are_renormalised():
    g = global_at({"l": (2, 2)}, 2)
    ups = [update(0, {"l": (A_R2, B_R2)}, num_examples=1), update(1, {"l": (A_R1, B_R1)}, num_examples=3)]
    a, b = pairs_of(FedAvg(padding="owners").aggregate(g, {}, ups, server_round=1))["l"]
    assert torch.allclose(a[0], 0.25 * A_R2[0] + 0.75 * A_R1[0], atol=1e-15)
    assert torch.equal(a[1], A_R2[1])  # owner weight renormalised to 1


def test_padding_keeps_each_clients_own_product_exactly():
    for a, b in [(A_R2, B_R2), (A_R1, B_R1)]:
        ap, bp = lm.pad_pair(a, b, 5)
        assert torch.equal(bp @ ap, b @ a)


# -- the covariance identity (algorithms.md 8.1) ---------------------------------------------------------


def _random_updates(gen, ranks, m=12, n=9, dtype=torch.float64):
    ups = []
    for k, r in enumerate(ranks):
        a = torch.randn(r, n, generator=gen, dtype=dtype)
        b = torch.randn(m, r, generator=gen, dtype=dtype)
        ups.append(update(k, {"l": (a, b)}, num_examples=int(torch.randint(1, 50, (1,), generator=gen))))
    return ups


@pytest.mark.parametrize("ranks", [[4, 4, 4, 4, 4], [8, 4, 4, 2, 2]])
def test_gap_equals_weighted_covariance(ranks):
    gen = torch.Generator().manual_seed(1)
    ups = _random_updates(gen, ranks)
    r_max = max(ranks)
    strat = FedAvg()
    w = strat.weights(ups)
    assert sum(w) == pytest.approx(1.0, abs=1e-15)
    a_bar, b_bar = pairs_of(strat.aggregate(global_at({"l": (12, 9)}, r_max), {}, ups, server_round=1))["l"]
    padded = [lm.pad_pair(*lm.split_state(u.state)[0]["l"], r_max) for u in ups]
    ideal = sum(p * (b @ a) for p, (a, b) in zip(w, padded, strict=False))
    cov = sum(p * (b - b_bar) @ (a - a_bar) for p, (a, b) in zip(w, padded, strict=False))
    assert torch.allclose(ideal - b_bar @ a_bar, cov, atol=1e-12)
    # invariant to a common shift of the A_k
    shift = torch.randn(r_max, 9, generator=gen, dtype=torch.float64)
    cov_shift = sum(p * (b - b_bar) @ (a + shift - (a_bar + shift)) for p, (a, b) in zip(w, padded, strict=False))
    assert torch.allclose(cov_shift, cov, atol=1e-12)
    # the logged metric is this gap, relative to ||ideal||
    res = strat.aggregate(global_at({"l": (12, 9)}, r_max), {}, ups, server_round=1)
    expected = float(torch.linalg.matrix_norm(cov) / torch.linalg.matrix_norm(ideal))
    assert res.metrics["product_gap_rel"] == pytest.approx(expected, rel=1e-9)
    assert expected > 0.1  # independent random factors: far from the ideal (0.76 in the reference check)


def test_gap_is_zero_when_all_a_or_all_b_equal():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    b = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    same_a = [
        update(k, {"l": (a, torch.randn(5, 3, generator=gen, dtype=torch.float64))}, k + 1) for k in range(3)
    ]
    same_b = [
        update(k, {"l": (torch.randn(3, 7, generator=gen, dtype=torch.float64), b)}, k + 1) for k in range(3)
    ]
    for ups in (same_a, same_b):
        res = FedAvg().aggregate(global_at({"l": (5, 7)}, 3), {}, ups, server_round=1)
        assert res.metrics["product_gap_rel"] < 1e-14


def test_gap_is_second_order_in_the_a_drift():
    # From a common A_0 with B_0 = 0 the gap grows with the drift of the A_k (algorithms.md 8.1).
    gen = torch.Generator().manual_seed(3)
    a0 = torch.randn(4, 48, generator=gen, dtype=torch.float64)
    gaps = []
    for drift in (1e-3, 1e-2, 1e-1):
        g2 = torch.Generator().manual_seed(4)
        ups = [
            update(
                k,
                {
                    "l": (
                        a0 + drift * torch.randn(4, 48, generator=g2, dtype=torch.float64),
                        drift * torch.randn(64, 4, generator=g2, dtype=torch.float64),
                    )
                },
                k + 1,
            )
            for k in range(5)
        ]
        gaps.append(
            FedAvg()
            .aggregate(global_at({"l": (64, 48)}, 4), {}, ups, server_round=1)
            .metrics["product_gap_rel"]
        )
    assert gaps[0] < gaps[1] < gaps[2]
    assert gaps[1] / gaps[0] == pytest.approx(10.0, rel=0.1)  # relative error ∝ drift


# -- HetLoRA norm weights ----------------------------------------------------------------------------------


def test_norm_weights_hand_values_and_sum_to_one():
    # ||B A||_F = 3 and 1 -> weights 3/4, 1/4 (example counts ignored)
    ups = [
        update(0, {"l": (t([[1.0, 0.0]]), t([[3.0], [0.0]]))}, num_examples=1),
        update(1, {"l": (t([[0.0, 1.0]]), t([[0.0], [1.0]]))}, num_examples=100),
    ]
    w = norm_weights(ups)
    assert w == pytest.approx([0.75, 0.25], abs=1e-15)
    assert sum(w) == pytest.approx(1.0)
    a, _ = pairs_of(FedAvg(weighting="norm").aggregate(global_at({"l": (2, 2)}, 1), {}, ups, server_round=1))[
        "l"
    ]
    assert torch.allclose(a, t([[0.75, 0.25]]), atol=1e-15)


def test_norm_weights_fall_back_to_examples_when_all_zero():
    # a client that took no step has B = 0: sum of norms is 0 -> example weights
    zero_b = t([[0.0], [0.0]])
    ups = [update(0, {"l": (A1, zero_b)}, num_examples=1), update(1, {"l": (A2, zero_b)}, num_examples=3)]
    assert norm_weights(ups) == pytest.approx([0.25, 0.75])


# -- scaling and validation ----------------------------------------------------------------------------------


def test_unequal_scalings_raise():
    # Regression: FlexLoRA's HeteroLoRA rescales by sqrt(16/r_k) on load but not on aggregation
    # (asymmetric alpha handling). fedlora keeps alpha = c r and refuses mixed scalings.
    ups = [update(0, {"l": (A_R2, B_R2)}, scaling=2.0), update(1, {"l": (A_R1, B_R1)}, scaling=16.0)]
    with pytest.raises(ValueError, match="scalings"):
        check_equal_scaling(ups)
    with pytest.raises(ValueError, match="scalings"):
        FedAvg().aggregate(global_at({"l": (2, 2)}, 2), {}, ups, server_round=1)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"weighting": "size"}, "strategy.weighting"), ({"padding": "mean"}, "strategy.padding")],
)
def test_bad_hyperparameters_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FedAvg(**kwargs)


def test_average_padded_and_product_gap_helpers_agree():
    gen = torch.Generator().manual_seed(5)
    ups = _random_updates(gen, [3, 1], m=6, n=5)
    g = global_at({"l": (6, 5)}, 3)
    w = lm.example_weights([u.num_examples for u in ups])
    avg = average_padded(ups, w, g, rank=3)
    assert avg["l"][0].shape == (3, 5) and avg["l"][1].shape == (6, 3)
    dense_ideal = sum(
        p * lm.split_state(u.state)[0]["l"][1] @ lm.split_state(u.state)[0]["l"][0] for p, u in zip(w, ups, strict=True)
    )
    dense_gap = dense_ideal - avg["l"][1] @ avg["l"][0]
    assert product_gap(ups, w, avg) == pytest.approx(float(dense_gap.norm() / dense_ideal.norm()), rel=1e-10)
