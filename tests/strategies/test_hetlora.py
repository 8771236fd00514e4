"""HetLoRA: sparsity-weighted zero-padding, the rank regulariser and local rank self-pruning.

The aggregate against an independent float64 computation on tiny shapes, with a client that pruned; the
regulariser against the dense norm it stands for, and on the real model (it shrinks the tail it
penalises); the client's pruning decision; the plan and a pruned reply through the wire codec; then whole
in-process federations through the real loop and client side (:mod:`federation_kit`), with compression
and a kill mid-round; and the configuration refusals before anything starts.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose, jsonl_rows, untimed
from federation_kit import MODULES, TinyModel, TinyTrainer

from fedlora.compression.compeft import ComPEFT
from fedlora.config.validate import validate
from fedlora.core import lora_math as lm
from fedlora.core.errors import ConfigError
from fedlora.core.types import AdapterSpec, ClientPlan, ClientUpdate, RankPruning
from fedlora.federation import wire
from fedlora.federation.client import ClientSide, self_pruned_rank
from fedlora.federation.loop import Federation, LoopSettings, RunInterrupted
from fedlora.federation.memory import InMemoryTransport
from fedlora.results.checkpoint import load_checkpoint
from fedlora.results.record import read_records
from fedlora.results.recorder import RunRecorder
from strategies.hetlora import HetLoRA

S = 2.0
HEAD = {"classifier.weight": torch.zeros(3, 6), "classifier.bias": torch.zeros(3)}
RANKS = [2, 4, 8]


def spec(r_max: int) -> AdapterSpec:
    return AdapterSpec(MODULES, r_max, S, {k: v.clone() for k, v in HEAD.items()})


def random_state(rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for module, (m, n) in MODULES.items():
        state[lm.lora_a_key(module)] = torch.randn(rank, n, generator=gen)
        state[lm.lora_b_key(module)] = torch.randn(m, rank, generator=gen)
    state.update({k: torch.randn(v.shape, generator=gen) for k, v in HEAD.items()})
    return state


# -- the math ------------------------------------------------------------------------------------------
def test_the_pruned_rank_is_max_of_min_rank_and_floor_gamma_r() -> None:
    assert [lm.pruned_rank(r, 0.99, 2) for r in (1, 2, 3, 8, 64, 100, 101)] == [1, 2, 2, 7, 63, 99, 99]
    assert lm.pruned_rank(10, 0.7, 1) == 7  # 0.7 * 10 = 7.000000000000001 in floats: no slot lost or gained
    assert lm.pruned_rank(10, 0.3, 1) == 3  # 0.3 * 10 = 3.0000000000000004
    assert lm.pruned_rank(64, 0.5, 40) == 40 and lm.pruned_rank(4, 0.5, 8) == 4  # never above the rank


def test_the_tail_norm_is_the_dense_norm_of_the_tail_product_and_differentiable_at_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    pairs = lm.split_state(random_state(5, gen))[0]
    for keep in (0, 2, 4):
        dense = sum(torch.linalg.matrix_norm(b.double()[:, keep:] @ a.double()[keep:]) for a, b in pairs.values())
        assert float(lm.tail_norm(pairs, keep)) == pytest.approx(float(dense), rel=1e-5)
    assert float(lm.tail_norm(pairs, 5)) == 0.0  # nothing beyond the rank
    # B = 0 (every client's first round): the norm is 0 and its gradient 0, not nan
    a = torch.randn(4, 6, generator=gen, requires_grad=True)
    b = torch.zeros(8, 4, requires_grad=True)
    lm.tail_norm({"m": lm.LoraPair(a, b)}, 2).backward()
    assert a.grad is not None and b.grad is not None
    assert bool(torch.isfinite(a.grad).all()) and bool(torch.isfinite(b.grad).all())
    # a step against the gradient shrinks the tail and leaves the kept slots alone
    a2 = torch.randn(4, 6, generator=gen, requires_grad=True)
    b2 = torch.randn(8, 4, generator=gen, requires_grad=True)
    before = lm.tail_norm({"m": lm.LoraPair(a2, b2)}, 2)
    before.backward()
    assert a2.grad is not None and b2.grad is not None
    assert not bool(a2.grad[:2].any()) and not bool(b2.grad[:, :2].any())
    with torch.no_grad():
        after = lm.tail_norm({"m": lm.LoraPair(a2 - 0.01 * a2.grad, b2 - 0.01 * b2.grad)}, 2)
    assert float(after) < float(before.detach())


def test_the_aggregate_is_the_sparsity_weighted_zero_padded_average_with_a_pruned_client() -> None:
    strategy = HetLoRA()
    init = strategy.init(spec(8), 3)
    gen = torch.Generator().manual_seed(1)
    ranks, counts = [2, 3, 8], [10, 40, 25]  # client 1 pruned from 4 to 3: it replied with 3 slots
    updates = [ClientUpdate(c, r, S, n, random_state(r, gen))
               for c, (r, n) in enumerate(zip(ranks, counts, strict=True))]
    result = strategy.aggregate(init.adapter, init.state, updates, server_round=1)
    # independent float64 reference: S_k = sum_modules ||B_k A_k||_F from the dense products
    def product(u: ClientUpdate, m: str) -> torch.Tensor:
        return u.state[lm.lora_b_key(m)].double() @ u.state[lm.lora_a_key(m)].double()

    norms = [sum(float(torch.linalg.matrix_norm(product(u, m))) for m in MODULES) for u in updates]
    weights = [s / sum(norms) for s in norms]
    for module, (m, n) in MODULES.items():
        a_ref, b_ref = torch.zeros(8, n, dtype=torch.float64), torch.zeros(m, 8, dtype=torch.float64)
        for w, u in zip(weights, updates, strict=True):
            a_ref[: u.rank] += w * u.state[lm.lora_a_key(module)].double()
            b_ref[:, : u.rank] += w * u.state[lm.lora_b_key(module)].double()
        torch.testing.assert_close(result.adapter[lm.lora_a_key(module)].double(), a_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.adapter[lm.lora_b_key(module)].double(), b_ref, rtol=1e-5, atol=1e-6)
    for key in HEAD:
        ref = sum(w * u.state[key].double() for w, u in zip(weights, updates, strict=True))
        torch.testing.assert_close(result.adapter[key].double(), ref, rtol=1e-5, atol=1e-6)
    # the server remembers each client's rank and plans it there from now on, with the regulariser while it can prune
    assert {k: int(v) for k, v in result.state.items()} == {"rank/0": 2, "rank/1": 3, "rank/2": 8}
    assert result.metrics["mean_client_rank"] == pytest.approx(13 / 3)
    plans = {c: strategy.plan(result.adapter, result.state, client_id=c, rank=r, server_round=2, seed=0)
             for c, r in enumerate([2, 4, 8])}
    assert [p.rank for p in plans.values()] == [2, 3, 8]
    assert plans[0].prune is None  # rank 2 = min_rank: nothing left to prune, no regulariser asked
    assert plans[1].prune == plans[2].prune == RankPruning(0.99, 0.01, 2)
    assert plans[1].adapter is not None and torch.equal(plans[1].adapter[lm.lora_a_key("enc.q")],
                                                        result.adapter[lm.lora_a_key("enc.q")][:3])
    unseen = strategy.plan(result.adapter, result.state, client_id=7, rank=4, server_round=2, seed=0)
    assert unseen.rank == 4  # a client never seen starts at its configured rank
    grown = ClientUpdate(1, 4, S, 10, random_state(4, gen))
    with pytest.raises(ValueError, match="client 1 replied at rank 4 but holds rank 3"):
        strategy.aggregate(result.adapter, result.state, [grown], server_round=2)


def test_without_pruning_it_is_fedavg_with_norm_weights() -> None:
    from strategies.fedavg import FedAvg

    strategy = HetLoRA(prune=False)
    init = strategy.init(spec(8), 3)
    plan = strategy.plan(init.adapter, init.state, client_id=0, rank=8, server_round=1, seed=0)
    assert plan.prune is None
    gen = torch.Generator().manual_seed(2)
    updates = [ClientUpdate(c, r, S, 10 * (c + 1), random_state(r, gen)) for c, r in enumerate(RANKS)]
    ours = strategy.aggregate(init.adapter, init.state, updates, server_round=1).adapter
    theirs = FedAvg(weighting="norm").aggregate(init.adapter, init.state, updates, server_round=1).adapter
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"gamma": 1.0}, "strategy.gamma=1.0"), ({"gamma": 0}, "strategy.gamma=0"),
    ({"reg_weight": -0.1}, "strategy.reg_weight=-0.1"), ({"min_rank": 0}, "strategy.min_rank=0"),
    ({"min_rank": 2.5}, "strategy.min_rank=2.5"), ({"weighting": "size"}, "strategy.weighting='size'"),
    ({"gamma": "abc"}, "strategy.gamma='abc'"), ({"reg_weight": [1]}, "strategy.reg_weight=[1]"),
    ({"prune": "yes"}, "strategy.prune='yes'"),
])
def test_bad_hyperparameters_are_named(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        HetLoRA(**kwargs)


# -- the client's decision and the wire ----------------------------------------------------------------
def test_a_client_prunes_only_when_training_shrank_the_tail() -> None:
    prune = RankPruning(gamma=0.5, weight=0.01, min_rank=2)
    gen = torch.Generator().manual_seed(3)
    start = random_state(8, gen)

    def scaled(state: dict, tail: float) -> dict:
        out = dict(state)
        for module in MODULES:
            b = out[lm.lora_b_key(module)].clone()
            b[:, 4:] *= tail
            out[lm.lora_b_key(module)] = b
        return out

    assert self_pruned_rank(8, prune, start, scaled(start, 0.9)) == 4
    assert self_pruned_rank(8, prune, start, scaled(start, 1.1)) == 8
    assert self_pruned_rank(8, prune, start, start) == 8  # unchanged is not shrunk
    zero_b = {k: torch.zeros_like(v) if lm.is_lora_b_key(k) else v for k, v in start.items()}
    assert self_pruned_rank(8, prune, zero_b, scaled(start, 0.01)) == 8  # a zero tail cannot shrink
    assert self_pruned_rank(2, prune, lm.resize_state(start, 2), lm.resize_state(scaled(start, 0.0), 2)) == 2


def test_the_plan_travels_and_a_reply_at_the_pruned_rank_is_read_at_that_rank() -> None:
    gen = torch.Generator().manual_seed(4)
    start = random_state(8, gen)
    plan = ClientPlan(rank=8, adapter=start, init_seed=5, prune=RankPruning(0.7, 0.25, 3))
    packet = wire.encode_assignment(wire.Assignment(2, plan, start, ()))
    decoded = wire.decode_assignment(packet, MODULES)
    assert decoded.plan.prune == RankPruning(0.7, 0.25, 3)
    plain = wire.decode_assignment(wire.encode_assignment(wire.Assignment(2, ClientPlan(8, start, 5), start, ())),
                                   MODULES)
    assert plain.plan.prune is None
    # a reply at floor(0.7 * 8) = 5 slots is read at rank 5; at any other smaller rank it stays at 8 and fails the check
    assignment = wire.Assignment(2, plan, start, ())
    for rank, ok in ((5, True), (4, False), (8, True)):
        sent = lm.truncate_keys(start, rank)
        report = wire.Report(num_examples=3, train_loss=0.5, train_seconds=0.0, rank=rank)
        received, back = wire.decode_reply(wire.encode_update(sent, report), assignment, None)
        trained = wire.as_trained(assignment, back)
        from fedlora.core import validation

        reason = validation.check_update(wire.uplink_shapes(trained), received, trained.plan.rank, back.rank)
        assert (reason is None) == ok, (rank, reason)
        if ok:
            assert trained.plan.rank == rank and lm.rank_of(trained.start) == rank


# -- whole federations ---------------------------------------------------------------------------------
class TailTrainer(TinyTrainer):
    """TinyTrainer whose clients scale the tail slots of ``B`` after their noise, by ``factor[client]``: below 1
    the tail shrinks (as the regulariser makes it), above it grows. Every (start, trained, plan) is recorded."""

    def __init__(self, factor: dict[int, float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = factor
        self.seen: list[tuple[int, int, ClientPlan, dict, dict]] = []

    def train(self, client_id: int, assignment: wire.Assignment, merges: Any) -> Any:
        state, loss = super().train(client_id, assignment, merges)
        prune = assignment.plan.prune
        if prune is not None:
            keep = lm.pruned_rank(assignment.plan.rank, prune.gamma, prune.min_rank)
            for module in MODULES:
                key = lm.lora_b_key(module)
                state[key] = torch.cat([state[key][:, :keep], self.factor[client_id] * state[key][:, keep:]], dim=1)
        self.seen.append((assignment.server_round, client_id, assignment.plan, dict(assignment.start), dict(state)))
        return state, loss


def federate(run_dir: Path, *, trainer: TinyTrainer, stop: threading.Event | None = None,
             transport: InMemoryTransport | None = None, compressor: Any = None, **loop: Any) -> InMemoryTransport:
    settings = LoopSettings(**{"name": "t", "seed": 0, "num_clients": 3, "num_rounds": 5, "round_timeout": 30.0,
                               **loop})
    transport = transport or InMemoryTransport(dict(enumerate([4, 8, 8])),
                                               ClientSide(trainer=trainer, compressor=compressor), stop=stop)
    Federation(settings, strategy=HetLoRA(gamma=0.75), transport=transport, model=TinyModel(run_dir),
               run_dir=run_dir, recorder=RunRecorder(run_dir, tensorboard=False), say=lambda _: None,
               stop=stop, compressor=compressor).run()
    return transport


def test_clients_prune_when_their_tail_shrinks_and_the_server_follows(tmp_path: Path) -> None:
    trainer = TailTrainer({0: 0.2, 1: 0.2, 2: 1.2})  # clients 0 and 1 shrink their tail, client 2 grows it
    federate(tmp_path, trainer=trainer)
    records = read_records(tmp_path)
    replied: dict[tuple[int, int], int] = {}
    for server_round, cid, plan, start, trained in trainer.seen:
        prune = plan.prune
        keep = lm.pruned_rank(plan.rank, 0.75, 2)
        if prune is None:
            assert keep >= plan.rank  # no regulariser asked only when there is nothing left to prune
            expected = plan.rank
        else:  # the decision recomputed by hand from the dense tail products
            def tail(state: dict, keep: int = keep) -> float:
                return sum(float(torch.linalg.matrix_norm(state[lm.lora_b_key(m)].double()[:, keep:]
                                                          @ state[lm.lora_a_key(m)].double()[keep:])) for m in MODULES)
            expected = keep if tail(trained) < tail(start) else plan.rank
        replied[(server_round, cid)] = expected
    for r in records[1:]:
        for c in r.clients:
            assert c.status == "ok" and c.rank == replied[(r.round, c.client)]
            # it sent what it kept: r (m + n) float32 per module, and the head
            head = sum(v.numel() for v in HEAD.values())
            assert c.bytes_up >= 4 * (c.rank * sum(m + n for m, n in MODULES.values()) + head)
    ranks = {c: [r.clients[c].rank for r in records[1:]] for c in range(3)}
    # round 1 starts from B = 0: nobody prunes; then one step a round (floor(0.75 r)) down to min_rank 2
    assert ranks[0] == [4, 3, 2, 2, 2] and ranks[1] == [8, 6, 4, 3, 2] and ranks[2] == [8] * 5
    assert all(r.strategy["mean_client_rank"] == pytest.approx(sum(c.rank for c in r.clients) / 3) for r in records[1:])
    state = load_checkpoint(tmp_path).strategy_state
    assert {k: int(v) for k, v in state.items()} == {"rank/0": 2, "rank/1": 2, "rank/2": 8}
    # the next round's plan is at the rank each client replied at in the round before
    plans = {(rnd, cid): plan.rank for rnd, cid, plan, _, _ in trainer.seen}
    for rnd in range(2, 6):
        for cid in range(3):
            assert plans[(rnd, cid)] == replied[(rnd - 1, cid)]


def test_with_compression_and_error_feedback_a_pruned_client_drops_the_residual_of_its_pruned_slots(
        tmp_path: Path) -> None:
    trainer = TailTrainer({0: 0.2, 1: 0.2, 2: 1.2})
    transport = federate(tmp_path, trainer=trainer, compressor=ComPEFT(density=0.3, error_feedback=True))
    records = read_records(tmp_path)
    assert all(c.status == "ok" for r in records[1:] for c in r.clients)
    for cid in range(3):
        kept = transport.stores[cid].kept
        assert kept is not None
        assert {lm.rank_of({k: v for k, v in kept.items() if lm.is_lora_key(k)})} == {records[-1].clients[cid].rank}


@pytest.mark.parametrize("when", [2, 3])
def test_a_run_stopped_mid_round_resumes_to_what_the_uninterrupted_one_computes(tmp_path: Path, when: int) -> None:
    factor = {0: 0.2, 1: 0.2, 2: 1.2}
    federate(tmp_path / "straight", trainer=TailTrainer(factor))
    stop = threading.Event()

    class StopsMidRound(TailTrainer):
        fired = False

        def train(self, client_id: int, assignment: wire.Assignment, merges: Any) -> Any:
            out = super().train(client_id, assignment, merges)
            if assignment.server_round == when and client_id == 1 and not self.fired:
                self.fired = True
                stop.set()
            return out

    transport = InMemoryTransport(dict(enumerate([4, 8, 8])), ClientSide(trainer=StopsMidRound(factor)), stop=stop)
    with pytest.raises(RunInterrupted):
        federate(tmp_path / "killed", trainer=transport.side.trainer, transport=transport, stop=stop)
    stop.clear()
    federate(tmp_path / "killed", trainer=transport.side.trainer, transport=transport, stop=stop, resume=True)
    assert untimed(jsonl_rows(tmp_path / "killed")) == untimed(jsonl_rows(tmp_path / "straight"))


# -- the real model: the regulariser shrinks the tail it penalises -------------------------------------
def test_on_the_real_model_the_regulariser_shrinks_the_tail() -> None:
    from fedlora.runtime.models import AdapterHost, ModelSettings
    from fedlora.runtime.training.local import Encoded, TrainSettings, train_steps
    from fedlora.serving.runtime import rank_penalty

    host = AdapterHost(ModelSettings(dropout=0.0), num_labels=3, seed=0)
    gen = torch.Generator().manual_seed(0)
    data = Encoded(input_ids=torch.randint(1000, 2000, (16, 12), generator=gen),
                   attention_mask=torch.ones(16, 12, dtype=torch.long),
                   labels=torch.randint(0, 3, (16,), generator=gen))
    spec_ = host.spec(4)
    start = lm.fresh_state(spec_.modules, 4, seed=1, head=spec_.head)
    start = {k: 0.05 * torch.randn(v.shape, generator=gen) if lm.is_lora_b_key(k) else v for k, v in start.items()}
    settings = TrainSettings(local_steps=4, batch_size=8, lr=1e-2)
    tails = {}
    for weight in (0.0, 5.0):
        plan = ClientPlan(rank=4, adapter=start, init_seed=1, prune=RankPruning(gamma=0.5, weight=weight, min_rank=1))
        host.load_state(4, start)
        penalty = rank_penalty(host, plan)
        assert (penalty is None) == (weight == 0.0)
        if penalty is not None:  # the penalty reads the live adapter the model trains
            expected = weight * float(lm.tail_norm(lm.split_state(start)[0], 2))
            assert float(penalty().detach()) == pytest.approx(expected, rel=1e-5)
        train_steps(host.model, host.set_trainable(4, True), data, list(range(16)), settings, seed=3, penalty=penalty)
        tails[weight] = float(lm.tail_norm(lm.split_state(host.get_state(4))[0], 2))
    before = float(lm.tail_norm(lm.split_state(start)[0], 2))
    assert tails[5.0] < before and tails[5.0] < tails[0.0], (before, tails)


# -- what it refuses before anything starts ------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "field", "fix"), [
    (["privacy=dp_sgd"], "privacy.kind='dp_sgd'", "use strategy.prune=false"),
    (["downlink=compeft", "downlink.scale=mean_abs"], "downlink='compeft'",
     "use downlink=none, or strategy.prune=false"),
    (["privacy=dp_fedavg"], "privacy.kind='dp_fedavg'", "rank self-pruning lets a client reply at a smaller rank"),
    (["privacy=secagg"], "privacy.secure=True", "HetLoRA's norm weights"),
    (["strategy.gamma=1.5"], "strategy", "strategy.gamma=1.5 must be a number in (0, 1); use 0.99"),
    (["strategy.prune=yes"], "strategy", "strategy.prune='yes' must be true or false"),
])
def test_what_hetlora_cannot_run_with_is_refused_before_anything_starts(overrides: list[str], field: str,
                                                                        fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose(["strategy=hetlora", *overrides]), check_model=False, check_data=False)
    assert field in str(info.value) and fix in str(info.value), str(info.value)


def test_without_pruning_dp_sgd_is_accepted() -> None:
    validate(compose(["strategy=hetlora", "strategy.prune=false", "privacy=dp_sgd"]), check_model=False,
             check_data=False)
    validate(compose(["strategy=hetlora", "compression=compeft"]), check_model=False, check_data=False)
