"""The round loop, driven in-process: real strategies, wire codec, client side, faults and compression.

No Ray, no Flower, no model: the clients are :class:`~fedlora.federation.memory.InMemoryTransport`
clients training with :class:`federation_kit.TinyTrainer` (seeded noise), and the global model is
:class:`federation_kit.TinyModel` (metrics are a pure function of the global model). Each test runs
whole federations in well under a second.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from federation_kit import MODULES, SCALING, TinyModel, TinyTrainer
from safetensors.torch import load_file

from fedlora.compression.compeft import ComPEFT
from fedlora.core import lora_math as lm
from fedlora.core.faults import FaultSettings
from fedlora.core.types import AggregateResult, ClientUpdate, LoraPair
from fedlora.federation import wire
from fedlora.federation.client import ClientSide
from fedlora.federation.loop import Federation, LoopSettings
from fedlora.federation.memory import InMemoryTransport
from fedlora.federation.transport import Exchange
from fedlora.results.record import TIMING_FIELDS, read_records
from fedlora.results.recorder import RunRecorder
from strategies.fedavg import FedAvg
from strategies.flora import FLoRA

RANKS = [2, 4, 8]


def run(run_dir: Path, strategy: Any, ranks: list[int] = RANKS, *, trainer: TinyTrainer | None = None,
        compressor: Any = None, faults: FaultSettings | None = None, silent: Any = None,
        transport: Any = None, **loop: Any) -> tuple[dict, list[str], Federation]:
    """Run a federation into ``run_dir``; return its summary, its console lines and the federation."""
    settings = LoopSettings(**{"name": "test", "seed": 0, "num_clients": len(ranks), "num_rounds": 3,
                               "round_timeout": 30.0, **loop})
    side = ClientSide(trainer=trainer or TinyTrainer(), compressor=compressor, faults=faults or FaultSettings(), seed=0)
    transport = transport or InMemoryTransport(dict(enumerate(ranks)), side, silent=silent)
    lines: list[str] = []
    federation = Federation(settings, strategy=strategy, compressor=compressor, transport=transport,
                            model=TinyModel(run_dir), run_dir=run_dir, say=lines.append,
                            recorder=RunRecorder(run_dir, tensorboard=False))
    return federation.run(), lines, federation


def rows(run_dir: Path) -> list[dict]:
    """``metrics.jsonl`` without the wall-clock fields."""
    def untimed(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k not in TIMING_FIELDS}
        return [untimed(v) for v in value] if isinstance(value, list) else value
    return [untimed(r.to_dict()) for r in read_records(run_dir)]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def plain_keys(run_dir: Path) -> list[str]:
    """The tensor names of a run's saved adapter."""
    return sorted(adapter(run_dir))


def test_a_run_records_every_round_checkpoints_and_saves(tmp_path: Path) -> None:
    summary, lines, _ = run(tmp_path, FedAvg())
    assert (tmp_path / "console.log").read_text().splitlines() == lines  # what it said stays with the run
    assert lines[-1].startswith("done: final")
    records = read_records(tmp_path)
    assert [r.round for r in records] == [0, 1, 2, 3]
    for record in records[1:]:
        assert [c.client for c in record.clients] == [0, 1, 2] and record.num_ok == 3
        assert [c.rank for c in record.clients] == RANKS and [c.num_examples for c in record.clients] == [10, 20, 30]
        assert all(c.bytes_down > 0 and (c.bytes_up or 0) > 0 for c in record.clients)
        # the reported training loss is the example-weighted mean of the clients'
        expected = sum((c.train_loss or 0) * (c.num_examples or 0) for c in record.clients) / 60
        assert record.train_loss == pytest.approx(expected)
    assert records[1].clients[0].bytes_up < records[1].clients[2].bytes_up  # rank 2 sends less than rank 8
    assert summary["final_test_accuracy"] == records[-1].metrics["test_accuracy"]
    assert summary["best_test_accuracy"] == max(r.metrics["test_accuracy"] for r in records)
    assert json.loads((tmp_path / "summary.json").read_text())["adapter_rank"] == 8
    assert (tmp_path / "checkpoint" / "LATEST").read_text() == "round_00003"
    assert lines[0] == "3 in-process clients, ranks {0: 2, 1: 4, 2: 8}; strategy FedAvg; 3 rounds"
    assert lines[1].startswith("round 0/3: test accuracy") and lines[-2].startswith("round 3/3: test accuracy")


def test_the_global_adapter_is_the_strategys_aggregate_of_the_clients_training(tmp_path: Path) -> None:
    # An independent computation of round 1: plan each client, train it, aggregate; the loop must agree.
    run(tmp_path, FedAvg(), num_rounds=1)
    strategy, trainer = FedAvg(), TinyTrainer()
    init = strategy.init(TinyTrainer.spec(8), 0)
    updates = []
    for cid, rank in enumerate(RANKS):
        plan = strategy.plan(init.adapter, init.state, client_id=cid, rank=rank, server_round=1, seed=0)
        trained, _ = trainer.train(cid, wire.Assignment(1, plan, lm.plan_start(plan, MODULES)), [])
        updates.append(ClientUpdate(cid, rank, SCALING, trainer.num_examples(cid), trained))
    expected = strategy.aggregate(init.adapter, init.state, updates, server_round=1).adapter
    saved = adapter(tmp_path)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)


class Failing(TinyTrainer):
    """Client 2's training raises (a crash on the client: an error reply)."""

    def train(self, client_id: int, assignment: wire.Assignment, merges: Any) -> Any:
        if client_id == 2:
            raise RuntimeError("disk full")
        return super().train(client_id, assignment, merges)


def test_every_kind_of_failure_is_recorded_and_only_good_updates_count(tmp_path: Path) -> None:
    faults = FaultSettings(corrupt=((3, "nan"), (4, "scale"), (6, "rank")))
    summary, lines, _ = run(tmp_path, FedAvg(), [4] * 7, trainer=Failing(), faults=faults, num_rounds=1,
                            silent=lambda server_round, cid: cid == 5)
    (row,) = [r for r in read_records(tmp_path) if r.round == 1]
    status = {c.client: (c.status, c.error or "") for c in row.clients}
    assert status[0] == status[1] == ("ok", "")
    assert status[2] == ("failed", "disk full")
    assert status[3][0] == "rejected" and "NaN value(s)" in status[3][1]
    assert status[4][0] == "rejected" and "max_norm_ratio=10" in status[4][1]
    assert status[5] == ("failed", "no reply within round_timeout=30 s")
    assert status[6] == ("rejected", "wrong rank: the LoRA factors have rank 5 but rank 4 was assigned")
    assert row.num_ok == 2 and row.count("failed") == 2 and row.count("rejected") == 3
    rejected = row.clients[4]
    assert rejected.train_loss is None and rejected.num_examples is None and (rejected.bytes_up or 0) > 0
    at = next(i for i, line in enumerate(lines) if line.startswith("round 1/1:"))
    assert ", 2 clients, 2 failed, 3 rejected," in lines[at]
    # the console names the first reason; metrics.jsonl keeps every client's
    assert lines[at + 1] == "  client 2 failed: disk full (and 4 more; each client's reason is in metrics.jsonl)"
    # only clients 0 and 1 were aggregated: the same as a federation of those two alone
    alone = tmp_path / "alone"
    run(alone, FedAvg(), [4] * 7, num_rounds=1, silent=lambda server_round, cid: cid >= 2)
    assert all(torch.equal(adapter(tmp_path)[k], v) for k, v in adapter(alone).items())


def test_too_few_valid_updates_keep_the_global_adapter(tmp_path: Path) -> None:
    run(tmp_path, FedAvg(), min_fit_clients=3, silent=lambda server_round, cid: server_round == 2 and cid == 1)
    records = read_records(tmp_path)
    skipped = records[2]
    assert skipped.aggregation_skipped == ("2 valid update(s), fewer than min_fit_clients=3: the global "
                                           "adapter is kept")
    assert skipped.metrics == records[1].metrics and skipped.strategy == {}
    assert records[3].aggregation_skipped is None and records[3].metrics != records[2].metrics


class Poisoned:
    """A strategy that returns a non-finite aggregate in one round (a bug, or an overflow)."""

    def __init__(self, inner: Any, bad_round: int, where: str) -> None:
        self.inner, self.bad_round, self.where = inner, bad_round, where
        self.fresh_adapters = inner.fresh_adapters

    def init(self, spec: Any, seed: int) -> AggregateResult:
        return self.inner.init(spec, seed)

    def plan(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.plan(*args, **kwargs)

    def aggregate(self, global_adapter: Any, state: Any, updates: Any, *, server_round: int) -> AggregateResult:
        result = self.inner.aggregate(global_adapter, state, updates, server_round=server_round)
        if server_round != self.bad_round:
            return result
        if self.where == "adapter":
            key = sorted(result.adapter)[0]
            return AggregateResult({**result.adapter, key: result.adapter[key] * float("nan")}, result.merge,
                                   result.state, result.metrics)
        merge = {m: LoraPair(p.a, p.b * float("inf")) for m, p in (result.merge or {}).items()}
        return AggregateResult(result.adapter, merge, result.state, result.metrics)


@pytest.mark.parametrize("inner,where", [(FedAvg(), "adapter"), (FLoRA(), "merge")])
def test_a_non_finite_aggregate_is_never_adopted(tmp_path: Path, inner: Any, where: str) -> None:
    summary, _, _ = run(tmp_path, Poisoned(inner, bad_round=2, where=where))
    records = read_records(tmp_path)
    assert records[2].aggregation_skipped == "aggregation produced non-finite values: the global adapter is kept"
    assert records[2].metrics == records[1].metrics  # round 1's model, evaluated again
    assert records[3].aggregation_skipped is None
    assert all(bool(v.isfinite().all()) for v in adapter(tmp_path).values())
    assert summary["base_merges"] == (2 if where == "merge" else 0)  # FLoRA: rounds 1 and 3 merged


@pytest.mark.parametrize("strategy", [FedAvg, FLoRA])
def test_resumed_from_a_checkpoint_equals_uninterrupted(tmp_path: Path, strategy: Any) -> None:
    run(tmp_path / "straight", strategy(), num_rounds=4)
    killed = tmp_path / "killed"
    run(killed, strategy(), num_rounds=2)  # as if killed after round 2's checkpoint
    (killed / "summary.json").unlink()
    summary, lines, _ = run(killed, strategy(), num_rounds=4, resume=True)  # new clients, new stores
    assert "resuming after round 2" in lines[0]
    resumed, straight = rows(killed), rows(tmp_path / "straight")
    # the first round after a resume resends every base merge (the clients are new): more bytes down
    for row in (resumed[3], straight[3]):
        for client in row["clients"]:
            client.pop("bytes_down")
        row.pop("bytes_down_total")
    assert resumed == straight
    assert all(torch.equal(adapter(killed)[k], v) for k, v in adapter(tmp_path / "straight").items())
    assert summary["base_merges"] == (4 if strategy is FLoRA else 0)


def test_resuming_from_round_0_writes_round_0_once(tmp_path: Path) -> None:
    run(tmp_path / "straight", FedAvg(), num_rounds=2)
    killed = tmp_path / "killed"
    run(killed, FedAvg(), num_rounds=0)  # killed right after round 0's checkpoint
    _, lines, _ = run(killed, FedAvg(), num_rounds=2, resume=True)
    assert [r["round"] for r in rows(killed)] == [0, 1, 2]
    assert rows(killed) == rows(tmp_path / "straight")
    assert not any(line.startswith("round 0/") for line in lines)


def test_resume_with_other_ranks_is_refused(tmp_path: Path) -> None:
    run(tmp_path, FedAvg(), num_rounds=1)
    with pytest.raises(RuntimeError, match=r"\(client 2: 8 -> 16\); resume with the same clients"):
        run(tmp_path, FedAvg(), [2, 4, 16], num_rounds=2, resume=True)


def test_flora_clients_receive_each_merge_once_even_after_missing_rounds(tmp_path: Path) -> None:
    trainer = TinyTrainer()
    summary, _, _ = run(tmp_path, FLoRA(), [2, 4, 8, 4], trainer=trainer, num_rounds=4, fraction_train=0.5)
    records = read_records(tmp_path)
    for record in records[1:]:
        assert len(record.clients) == 2
        for client in record.clients:  # every client trained on every merge made before its round
            assert client.base_version == record.round - 1
    assert all(merges == rnd - 1 for rnd, _, merges in trainer.calls)
    assert summary["base_merges"] == 4 and summary["adapter_rank"] == 8 + sum(
        sum(c.rank for c in r.clients) for r in records[1:])


class Reversed(InMemoryTransport):
    """Replies arrive in the opposite order."""

    def exchange(self, server_round: int, packets: Mapping[int, wire.Packet], timeout: float) -> Exchange:
        out = super().exchange(server_round, packets, timeout)
        return Exchange(out.bytes_down, dict(reversed(list(out.replies.items()))))


def test_arrival_order_changes_nothing(tmp_path: Path) -> None:
    run(tmp_path / "sorted", FLoRA())
    side = ClientSide(trainer=TinyTrainer())
    run(tmp_path / "reversed", FLoRA(), transport=Reversed(dict(enumerate(RANKS)), side))
    assert rows(tmp_path / "sorted") == rows(tmp_path / "reversed")
    a, b = adapter(tmp_path / "sorted"), adapter(tmp_path / "reversed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compression_through_the_loop(tmp_path: Path) -> None:
    # the identity codec (every entry, exact values) reproduces the uncompressed run up to rounding
    run(tmp_path / "plain", FedAvg())
    identity = ComPEFT(density=1.0, scale="none")
    summary, lines, _ = run(tmp_path / "identity", FedAvg(), compressor=identity)
    plain, same = read_records(tmp_path / "plain"), read_records(tmp_path / "identity")
    for a, b in zip(plain, same, strict=True):
        assert a.metrics == pytest.approx(b.metrics, rel=1e-6)
    assert summary["compression"] == "ComPEFT" and summary["error_feedback_tensors"] == "all"
    assert "+ ComPEFT (error feedback on)" in lines[0]
    # at 10% the server aggregates a lossy update, and every client keeps its residual for the next
    # round (the sizes of such tiny tensors are all headers: tests/integration measure the savings)
    side = ClientSide(trainer=TinyTrainer(), compressor=ComPEFT(density=0.1))
    transport = InMemoryTransport(dict(enumerate(RANKS)), side)
    run(tmp_path / "compressed", FedAvg(), transport=transport, compressor=side.compressor)
    lossy = read_records(tmp_path / "compressed")
    assert all(r.num_ok == 3 and r.metrics != p.metrics for r, p in zip(lossy[1:], plain[1:], strict=True))
    assert all(store.kept is not None and set(store.kept) == set(plain_keys(tmp_path / "plain"))
               for store in transport.stores.values())


def test_flora_with_compression_keeps_no_residual_of_its_fresh_factors(tmp_path: Path) -> None:
    side = ClientSide(trainer=TinyTrainer(), compressor=ComPEFT(density=0.2))
    transport = InMemoryTransport(dict(enumerate(RANKS)), side)
    summary, lines, _ = run(tmp_path, FLoRA(), transport=transport, compressor=side.compressor)
    assert summary["error_feedback_tensors"] == "all but the fresh LoRA factors"
    for store in transport.stores.values():
        assert store.kept is not None and not any(lm.is_lora_key(k) for k in store.kept)


# -- stopping: a round cut short is never aggregated nor checkpointed ------------------------------------
class StopsTheRun(TinyTrainer):
    """Sets the run's stop event while client 1 trains in round ``when`` (as a Ctrl-C would, mid-round)."""

    def __init__(self, stop: Any, when: int) -> None:
        super().__init__()
        self.stop, self.when = stop, when

    def train(self, client_id: int, assignment: wire.Assignment, merges: Any) -> Any:
        if assignment.server_round == self.when and client_id == 1:
            self.stop.set()
        return super().train(client_id, assignment, merges)


@pytest.mark.parametrize("strategy", [FedAvg, FLoRA])
def test_a_stop_mid_round_keeps_the_last_checkpoint_and_resumes_exactly(tmp_path: Path, strategy: Any) -> None:
    import threading

    from fedlora.federation.loop import RunInterrupted

    run(tmp_path / "straight", strategy(), num_rounds=3)
    stop = threading.Event()
    side = ClientSide(trainer=StopsTheRun(stop, when=2))
    transport = InMemoryTransport(dict(enumerate(RANKS)), side, stop=stop)
    killed = tmp_path / "stopped"
    settings = LoopSettings(name="test", seed=0, num_clients=3, num_rounds=3, round_timeout=30.0)
    federation = Federation(settings, strategy=strategy(), transport=transport, model=TinyModel(killed),
                            run_dir=killed, recorder=RunRecorder(killed, tensorboard=False), say=lambda _: None,
                            stop=stop)
    with pytest.raises(RunInterrupted) as info:
        federation.run()
    assert info.value.last_round == 1 and "after round 1" in str(info.value)
    assert (killed / "checkpoint" / "LATEST").read_text() == "round_00001"  # round 2 was not kept
    assert [r["round"] for r in rows(killed)] == [0, 1] and not (killed / "summary.json").exists()
    assert [(r, c) for r, c, _ in side.trainer.calls if r == 2] == [(2, 0), (2, 1)]  # client 2 never started
    said_before = (killed / "console.log").read_text().splitlines()
    assert said_before[-1].startswith("round 1/3")
    _, said_after, _ = run(killed, strategy(), num_rounds=3, resume=True)
    assert (killed / "console.log").read_text().splitlines() == said_before + said_after  # appended, not replaced
    assert "resuming after round 1" in said_after[0]
    resumed, straight = rows(killed), rows(tmp_path / "straight")
    for row in (resumed[2], straight[2]):  # the resent merges after a resume (FLoRA)
        row.pop("bytes_down_total")
        for client in row["clients"]:
            client.pop("bytes_down")
    assert resumed == straight
    assert all(torch.equal(adapter(killed)[k], v) for k, v in adapter(tmp_path / "straight").items())


def test_a_run_that_never_aggregates_fails_and_saves_no_adapter(tmp_path: Path) -> None:
    from fedlora.federation.loop import NoProgress

    with pytest.raises(NoProgress, match="no round aggregated an update: every one of the 2 rounds kept"):
        run(tmp_path, FedAvg(), num_rounds=2, silent=lambda server_round, cid: True)
    assert [r.aggregation_skipped is not None for r in read_records(tmp_path)[1:]] == [True, True]
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "summary.json").exists()


def test_each_round_records_where_the_update_went_by_rank_slot(tmp_path: Path) -> None:
    # The rank-collapse diagnostic: the share of the adapter's change in each rank slot, recomputed
    # here as dense products from the adapters after rounds 0, 1, 2 (the checkpoints of a 1-round and
    # a 2-round run); shared = the first r_min = 2 slots.
    from fedlora.results import checkpoint as ckpt

    for n in (1, 2):
        run(tmp_path / f"fedavg{n}", FedAvg(), num_rounds=n)
    records = read_records(tmp_path / "fedavg2")
    assert records[0].slot_energy is None
    adapters = [FedAvg().init(TinyTrainer.spec(8), 0).adapter,
                *(ckpt.load_checkpoint(tmp_path / f"fedavg{n}").adapter for n in (1, 2))]
    for record, old, new in zip(records[1:], adapters[:-1], adapters[1:], strict=True):
        assert record.slot_energy is not None and len(record.slot_energy) == 8
        dense = []
        for slot in range(8):
            def term(state: dict, m: str, i: int = slot) -> torch.Tensor:
                return state[lm.lora_b_key(m)][:, i:i + 1].double() @ state[lm.lora_a_key(m)][i:i + 1].double()
            dense.append(sum(float(torch.linalg.matrix_norm(term(new, m) - term(old, m))) ** 2 for m in MODULES))
        assert record.slot_energy == pytest.approx([d / sum(dense) for d in dense], rel=1e-9)
        assert record.shared_slot_energy == pytest.approx(sum(record.slot_energy[:2]), rel=1e-12)
    # FLoRA's adapter is fresh every round (B = 0): its update is the merge, no slot shares
    run(tmp_path / "flora", FLoRA(), num_rounds=1)
    assert read_records(tmp_path / "flora")[1].slot_energy is None
    assert "slot_energy" not in rows(tmp_path / "flora")[1]
