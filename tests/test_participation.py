"""Clients that take part on their own (``participation=bernoulli``) and FedAU's weights (``participation.fedau``).

* FedAU's bookkeeping against algorithms.md's invariants (§8.9): the first weight is 1, the interval is
  recorded after the weight is read, intervals are capped at ``K``, the mean weight tends to
  ``(1 - (1 - p)^K) / p``;
* FedAU through each strategy it composes with, against the rule computed independently
  (``x + 1/N sum omega_k Delta_k``; FLoRA's merge ``1/N sum omega_k s B_k A_k``);
* the round loop: who takes part is seeded, a round nobody joins keeps the adapter, FedAU's weights
  reach the aggregate, a resumed run equals the uninterrupted one;
* the configuration: every combination that cannot work is refused before anything starts.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose
from federation.test_loop import adapter, rows, run
from federation_kit import MODULES, SCALING, TinyTrainer

from fedlora.config.settings import Settings
from fedlora.config.validate import validate
from fedlora.core import lora_math as lm
from fedlora.core import participation as part
from fedlora.core.errors import ConfigError
from fedlora.core.types import ClientUpdate
from fedlora.federation import wire
from fedlora.results.record import read_records
from strategies.fedavg import FedAvg
from strategies.fedsa_lora import FedSALoRA
from strategies.ffa_lora import FFALoRA
from strategies.flora import FLoRA
from strategies.rolora import RoLoRA


# -- FedAU's bookkeeping ------------------------------------------------------------------------------
def test_fedau_weights_by_hand() -> None:
    w = part.FedAUWeights([0, 1], cutoff=3)
    assert (w.weight(0), w.weight(1)) == (1.0, 1.0)  # no interval yet
    w.record({0})  # round 1: client 0 took part (interval 1), client 1 absent 1 round
    assert w.weight(0) == 1.0 and w.weight(1) == 1.0
    w.record({1})  # round 2: client 1 after 2 rounds -> interval 2; client 0 absent 1
    assert w.weight(1) == 2.0
    w.record(set())  # round 3: client 0 absent 2, client 1 absent 1
    w.record(set())  # round 4: client 0 absent 3 = K -> interval 3 recorded, counter restarts
    assert w.weight(0) == pytest.approx((1 + 3) / 2) and w.absent[0] == 0
    w.record({0, 1})  # round 5: client 0 after 1 round -> interval 1; client 1 after 3 -> interval 3
    assert w.weight(0) == pytest.approx((1 + 3 + 1) / 3) and w.weight(1) == pytest.approx((2 + 3) / 2)


@pytest.mark.parametrize("p,cutoff", [(0.1, 50), (0.02, 50), (0.1, 100_000)])
def test_the_mean_weight_tends_to_its_limit(p: float, cutoff: int) -> None:
    rng = random.Random(7)
    w = part.FedAUWeights([0], cutoff)
    for _ in range(400_000):
        w.record({0} if rng.random() < p else set())
    assert w.weight(0) == pytest.approx(part.expected_weight(p, cutoff), rel=0.02)
    # algorithms.md's values: 9.948 at p=0.1, K=50; 31.792 at p=0.02, K=50; 10 without a cutoff
    assert part.expected_weight(p, cutoff) == pytest.approx({(0.1, 50): 9.948, (0.02, 50): 31.792,
                                                            (0.1, 100_000): 10.0}[(p, cutoff)], abs=1e-3)


def test_replaying_the_history_gives_the_same_state() -> None:
    rng = random.Random(3)
    history = [{c for c in range(5) if rng.random() < 0.3} for _ in range(40)]
    step = part.FedAUWeights(range(5), 6)
    for took_part in history:
        step.record(took_part)
    again = part.FedAUWeights.replay(range(5), 6, history)
    assert [again.weight(c) for c in range(5)] == [step.weight(c) for c in range(5)]
    assert again.absent == step.absent


# -- who takes part -----------------------------------------------------------------------------------
def test_each_client_takes_part_at_its_own_rate_and_reruns_draw_the_same() -> None:
    probs = part.ParticipationSettings(model="bernoulli", probabilities=(0.9, 0.1, 0.5)).client_probabilities(
        range(6), seed=0)
    assert probs == {0: 0.9, 1: 0.1, 2: 0.5, 3: 0.9, 4: 0.1, 5: 0.5}
    counts = dict.fromkeys(probs, 0)
    for rnd in range(1, 4001):
        for cid in part.participants(probs, rnd, seed=1):
            counts[cid] += 1
    assert all(abs(counts[c] / 4000 - probs[c]) < 0.03 for c in probs)
    assert part.participants(probs, 17, seed=1) == part.participants(probs, 17, seed=1)
    assert any(part.participants(probs, r, seed=1) != part.participants(probs, r, seed=2) for r in range(1, 20))


def test_drawn_probabilities_are_seeded_and_bounded() -> None:
    settings = part.ParticipationSettings(model="bernoulli", mean=0.2, concentration=2.0, minimum=0.05)
    drawn = settings.client_probabilities(range(2000), seed=4)
    assert drawn == settings.client_probabilities(range(2000), seed=4)
    assert drawn != settings.client_probabilities(range(2000), seed=5)
    assert all(0.05 <= v <= 1.0 for v in drawn.values()) and min(drawn.values()) == 0.05
    assert sum(drawn.values()) / 2000 == pytest.approx(0.2, abs=0.02)  # Beta's mean, a little above (clipping)


# -- FedAU through the strategies ---------------------------------------------------------------------
def _round(strategy: Any, ranks: list[int], seed: int = 0) -> tuple[dict, dict, list[ClientUpdate]]:
    """Round 1 of ``strategy``: the global adapter, each client's start and its trained update."""
    trainer, r_max = TinyTrainer(), max(ranks)
    init = strategy.init(TinyTrainer.spec(r_max), seed)
    starts, updates = {}, []
    for cid, rank in enumerate(ranks):
        plan = strategy.plan(init.adapter, init.state, client_id=cid, rank=rank, server_round=1, seed=seed)
        starts[cid] = lm.plan_start(plan, MODULES)
        trained, _ = trainer.train(cid, wire.Assignment(1, plan, starts[cid]), [])
        updates.append(ClientUpdate(cid, rank, SCALING, trainer.num_examples(cid), trained))
    return init.adapter, starts, updates


@pytest.mark.parametrize("strategy", [FedAvg(), FFALoRA(), FFALoRA(weighting="uniform"), RoLoRA(),
                                      FedSALoRA(padding="zero")])
def test_fedau_through_an_averaging_strategy_is_the_published_rule(strategy: Any) -> None:
    ranks, n, omegas = [4, 4, 4], 7, [1.0, 3.5, 6.0]  # 3 of 7 clients took part, with these weights
    global_adapter, starts, updates = _round(strategy, ranks)
    weighting = getattr(strategy, "weighting", "examples")
    p = lm.participant_weights(weighting, [u.num_examples for u in updates])
    # w_k: 1/N (uniform, the paper's), or n_k over all N clients' examples (10, 20, ..., 60, 10 here)
    sizes = {cid: TinyTrainer().num_examples(cid) for cid in range(n)}
    full = part.full_weights(weighting, sizes)
    assert full == ({c: 1 / 7 for c in range(7)} if weighting == "uniform" else {c: sizes[c] / 220 for c in range(7)})
    w = [full[u.client_id] for u in updates]
    factors = part.fedau_factors(omegas, w, p)
    scaled = [part.rescale(u, starts[u.client_id], c, keep_lora_a=False) for u, c in zip(updates, factors, strict=True)]
    got = strategy.aggregate(global_adapter, {}, scaled, server_round=1).adapter
    for key, x in global_adapter.items():  # every client started from the global adapter (same rank)
        if getattr(strategy, "personalized", False) and lm.is_personal_key(key):  # FedSA: B, head stay on clients
            assert torch.equal(got[key], x)
            continue
        want = x.double() + sum(o * wk * (u.state[key].double() - x.double())
                                for o, wk, u in zip(omegas, w, updates, strict=True))
        torch.testing.assert_close(got[key].double(), want, rtol=1e-5, atol=1e-6)


def test_fedau_through_flora_scales_each_clients_product() -> None:
    ranks, n, omegas = [2, 4, 8], 10, [2.0, 1.0, 4.0]
    strategy = FLoRA()
    global_adapter, starts, updates = _round(strategy, ranks)
    p = lm.participant_weights(strategy.weighting, [u.num_examples for u in updates])
    total = sum(TinyTrainer().num_examples(c) for c in range(n))  # 310 examples among the 10 clients
    w = [u.num_examples / total for u in updates]  # FLoRA's default weighting: examples
    scaled = [part.rescale(u, starts[u.client_id], c, keep_lora_a=True)
              for u, c in zip(updates, part.fedau_factors(omegas, w, p), strict=True)]
    result = strategy.aggregate(global_adapter, {}, scaled, server_round=1)
    assert result.merge is not None
    for module in MODULES:
        want = sum(o * wk * SCALING * (u.state[f"{module}.lora_B.weight"].double() @
                                       u.state[f"{module}.lora_A.weight"].double())
                   for o, wk, u in zip(omegas, w, updates, strict=True))
        torch.testing.assert_close(lm.merge_delta(result.merge, module).double(), want, rtol=1e-5, atol=1e-6)
    head = "classifier.weight"
    want_head = global_adapter[head].double() + sum(
        o * wk * (u.state[head].double() - starts[u.client_id][head].double())
        for o, wk, u in zip(omegas, w, updates, strict=True))
    torch.testing.assert_close(result.adapter[head].double(), want_head, rtol=1e-5, atol=1e-6)


# -- the round loop -----------------------------------------------------------------------------------
BERNOULLI = part.ParticipationSettings(model="bernoulli", probabilities=(0.9, 0.3, 0.6, 0.2))


def test_who_takes_part_is_seeded_and_a_round_nobody_joins_keeps_the_adapter(tmp_path: Path) -> None:
    ranks = [4, 4, 4, 4]
    probs = BERNOULLI.client_probabilities(range(4), 0)
    summary, lines, _ = run(tmp_path, FedAvg(), ranks, num_rounds=12, participation=BERNOULLI)
    records = read_records(tmp_path)
    for record in records[1:]:
        assert [c.client for c in record.clients] == part.participants(probs, record.round, 0)
    empty = [r for r in records[1:] if not r.clients]
    assert empty, "no round without clients in 12: pick another seed for this test"
    for r in empty:
        assert r.aggregation_skipped == "no client took part: the global adapter is kept"
        assert r.metrics == records[r.round - 1].metrics
    assert "participation: each client on its own" in lines[0] and "min_clients do not apply" in lines[0]
    assert summary["num_rounds"] == 12


def test_fedau_in_the_loop_weighs_the_first_round_by_one_over_n(tmp_path: Path) -> None:
    ranks = [4, 4, 4, 4]
    fedau = part.ParticipationSettings(model="bernoulli", probabilities=(0.9, 0.3, 0.6, 0.2), fedau=True)
    _, lines, _ = run(tmp_path, FedAvg(), ranks, num_rounds=1, participation=fedau)
    joined = part.participants(fedau.client_probabilities(range(4), 0), 1, 0)
    assert joined and "FedAU weights" in lines[0]
    global_adapter, _, updates = _round(FedAvg(), ranks)
    saved = adapter(tmp_path)
    # every omega is 1 in round 1: x + sum of n_k / 100 times the changes (10 + 20 + 30 + 40 examples in all)
    for key, x in global_adapter.items():
        want = x + sum((u.state[key] - x) * u.num_examples / 100 for u in updates if u.client_id in joined)
        torch.testing.assert_close(saved[key], want, rtol=1e-5, atol=1e-6)
    record = read_records(tmp_path)[1]
    assert record.strategy["fedau_step"] == pytest.approx(sum(10 * (c + 1) for c in joined) / 100)


@pytest.mark.parametrize("strategy", [FedAvg, FLoRA])
def test_a_resumed_fedau_run_equals_the_uninterrupted_one(tmp_path: Path, strategy: Any) -> None:
    fedau = part.ParticipationSettings(model="bernoulli", probabilities=(0.9, 0.3, 0.6, 0.2), fedau=True,
                                       fedau_cutoff=3)
    run(tmp_path / "straight", strategy(), [2, 4, 8, 4], num_rounds=8, participation=fedau)
    killed = tmp_path / "killed"
    run(killed, strategy(), [2, 4, 8, 4], num_rounds=5, participation=fedau)
    (killed / "summary.json").unlink()
    run(killed, strategy(), [2, 4, 8, 4], num_rounds=8, participation=fedau, resume=True)
    resumed, straight = rows(killed), rows(tmp_path / "straight")
    # a client's first message after the resume resends every base merge (FLoRA): more bytes down, nothing else
    for row in resumed[6:] + straight[6:]:
        for client in row["clients"]:
            client.pop("bytes_down")
        row.pop("bytes_down_total")
    assert resumed == straight
    assert max((r.get("strategy") or {}).get("fedau_weight_max", 1.0) for r in straight) > 1.0  # weights moved
    assert all(torch.equal(adapter(killed)[k], v) for k, v in adapter(tmp_path / "straight").items())


# -- configuration ------------------------------------------------------------------------------------
def _problems(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides), check_model=False, check_data=False)
    return str(info.value)


def test_the_settings_reach_the_loop() -> None:
    cfg = compose(["participation=bernoulli", "participation.probabilities=[0.5,0.25]", "participation.fedau=true"])
    validate(cfg, check_model=False, check_data=False)
    loop = Settings.from_config(cfg).loop
    assert loop.participation == part.ParticipationSettings(model="bernoulli", probabilities=(0.5, 0.25),
                                                            fedau=True)
    assert Settings.from_config(compose([])).loop.participation == part.ParticipationSettings()


@pytest.mark.parametrize("overrides,field,words", [
    (["participation=bernoulli", "participation.probabilities=[0.5,0]"], "participation.probabilities",
     "in (0, 1]"),
    (["participation.probabilities=[0.5]"], "participation.probabilities", "only participation=bernoulli"),
    (["participation=bernoulli", "participation.probabilities=0.5"], "participation.probabilities=0.5",
     "a list of probabilities"),
    (["participation=bernoulli", "participation.mean=1.5"], "participation.mean", "(0, 1)"),
    (["participation=bernoulli", "participation.fedau_cutoff=0"], "participation.fedau_cutoff", ">= 1"),
    (["participation=bernoulli", "privacy=dp_fedavg"], "participation.model", "use participation=uniform"),
    (["participation=bernoulli", "privacy=secagg"], "participation.model", "secure aggregation's threshold"),
    (["participation=bernoulli", "strategy=centralized"], "participation.model", "centralized bound"),
    (["participation.fedau=true", "strategy=lora_fair"], "participation.fedau", "LoRAFAIR"),
    (["participation.fedau=true", "strategy=flexlora"], "participation.fedau", "FlexLoRA"),
    (["participation.fedau=true", "strategy=fedex_lora"], "participation.fedau", "FedExLoRA"),
    (["participation.fedau=true", "strategy.weighting=norm"], "participation.fedau", "HetLoRA"),
    (["participation.fedau=true", "privacy=secagg"], "participation.fedau", "secure aggregation"),
    (["participation.fedau=true", "privacy=dp_fedavg"], "participation.fedau", "client-level"),
])
def test_what_cannot_work_is_refused_before_anything_starts(overrides: list[str], field: str, words: str) -> None:
    problems = _problems(overrides)
    assert field in problems and words in problems, problems


@pytest.mark.parametrize("strategy", ["fedavg", "ffa_lora", "rolora", "flora"])
def test_fedau_composes_with_these_strategies_and_dp_sgd(strategy: str) -> None:
    validate(compose([f"strategy={strategy}", "participation=bernoulli", "participation.fedau=true",
                      "privacy=dp_sgd"]), check_model=False, check_data=False)


def test_a_client_without_weight_gets_no_rescaling_instead_of_a_division_by_zero() -> None:
    assert part.fedau_factors([2.0, 1.0], [0.0, 0.5], [0.0, 1.0]) == [0.0, 0.5]
