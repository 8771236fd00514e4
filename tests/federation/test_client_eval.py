"""Per-client evaluation: every client evaluates the global model on the examples it holds out.

In-process federations (:class:`~fedlora.federation.memory.InMemoryTransport`, :class:`federation_kit.TinyTrainer`)
through the real loop, wire codec and client side: who evaluates when, that the numbers are each client's own
evaluation of the global model (recomputed here independently), the mean and the worst, the summary and the
console, base merges (FLoRA), a client that fails, and a resumed run. The data side (which examples a client
holds out) is in ``tests/test_data.py``; the Flower path end to end in ``tests/integration/test_e2e.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from federation_kit import TinyModel, TinyTrainer, client_metrics
from test_loop import adapter, rows, run

from fedlora.core import lora_math as lm
from fedlora.core.metrics import ACCURACY, PERPLEXITY
from fedlora.core.types import ClientPlan
from fedlora.federation import wire
from fedlora.federation.client import ClientSide
from fedlora.federation.loop import Federation, LoopSettings, summarize_clients
from fedlora.federation.memory import InMemoryTransport
from fedlora.results.checkpoint import load_checkpoint
from fedlora.results.plots import plot_run
from fedlora.results.record import read_records
from fedlora.results.recorder import RunRecorder
from strategies.fedavg import FedAvg
from strategies.flora import FLoRA

RANKS = [2, 4, 8]


def test_when_clients_evaluate() -> None:
    settings = LoopSettings(name="t", seed=0, num_clients=3, num_rounds=5, client_eval_every=2)
    assert [r for r in range(6) if settings.client_eval_due(r)] == [2, 4, 5]  # every 2nd round and the last
    last_only = LoopSettings(name="t", seed=0, num_clients=3, num_rounds=5, client_eval_every=0)
    assert [r for r in range(6) if last_only.client_eval_due(r)] == [5]
    off = LoopSettings(name="t", seed=0, num_clients=3, num_rounds=5)
    assert not any(off.client_eval_due(r) for r in range(6))


def test_every_client_evaluates_the_global_model_after_the_last_round(tmp_path: Path) -> None:
    trainer = TinyTrainer()
    summary, lines, _ = run(tmp_path, FedAvg(), trainer=trainer, num_rounds=3, client_eval_every=0)
    records = read_records(tmp_path)
    assert [r.client_eval is not None for r in records] == [False, False, False, True]
    assert [(rnd, cid, rank) for rnd, cid, rank, _ in trainer.evaluations] == [(3, 0, 8), (3, 1, 8), (3, 2, 8)]
    # each client's numbers are its own evaluation of the saved global adapter (at r_max = 8)
    final = adapter(tmp_path)
    expected = [client_metrics(cid, final, []) for cid in range(3)]
    evaluation = records[-1].client_eval
    assert evaluation is not None
    for got, want in zip(evaluation.clients, expected, strict=True):
        assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-12)
    assert [c["num_examples"] for c in evaluation.clients] == [2, 4, 6]
    mean = sum(e["test_accuracy"] for e in expected) / 3  # each client counts once
    assert evaluation.mean["test_accuracy"] == pytest.approx(mean, rel=1e-12)
    assert evaluation.worst == pytest.approx(expected[2]["test_accuracy"]) and evaluation.worst_client == 2
    # the evaluation messages carry the whole r_max adapter, and are not the method's traffic
    assert all(c["bytes_down"] == records[-1].clients[2].bytes_down for c in evaluation.clients)
    assert summary["client_mean_test_accuracy"] == evaluation.mean["test_accuracy"]
    assert summary["client_worst_test_accuracy"] == evaluation.worst and summary["client_worst_id"] == 2
    assert summary["client_eval_failed"] == 0
    assert summary["bytes_down_total"] == sum(r.bytes_total("down") for r in records)
    assert lines[0].endswith("; 3 rounds; every client evaluates the global model on its own held-out examples after "
                             "the last round")
    assert lines[-2].startswith("  clients' own held-out data: mean test accuracy ")
    assert "(client 2); 3 clients" in lines[-2]


def test_without_held_out_examples_nothing_is_evaluated(tmp_path: Path) -> None:
    trainer = TinyTrainer()
    summary, _, _ = run(tmp_path, FedAvg(), trainer=trainer, num_rounds=2)
    assert trainer.evaluations == [] and all(r.client_eval is None for r in read_records(tmp_path))
    assert not any(k.startswith("client_") for k in summary)
    assert all("client_eval" not in row for row in rows(tmp_path))  # metrics.jsonl as before


def test_flora_clients_evaluate_on_every_merge_and_are_not_sent_them_again(tmp_path: Path) -> None:
    trainer = TinyTrainer()
    run(tmp_path, FLoRA(), trainer=trainer, num_rounds=3, client_eval_every=1)
    # after round t the base holds t merges; each evaluation applied all of them
    assert [(rnd, merges) for rnd, _, _, merges in trainer.evaluations] == [(r, r) for r in (1, 2, 3) for _ in RANKS]
    assert {rank for _, _, rank, _ in trainer.evaluations} == {8}  # FLoRA's global adapter is kept at r_max
    assert all(merges == rnd - 1 for rnd, _, merges in trainer.calls)  # training as before
    records = read_records(tmp_path)
    saved = load_checkpoint(tmp_path)  # after round 3: the global adapter and the three merges
    evaluation = records[-1].client_eval
    assert evaluation is not None and len(saved.merges) == 3
    for cid in range(3):
        expected = client_metrics(cid, saved.adapter, saved.merges)["test_accuracy"]
        assert evaluation.clients[cid]["test_accuracy"] == pytest.approx(expected, rel=1e-12)
    # the evaluation after round t delivered merge t: no training message carries a merge (without the
    # evaluations, round t's training message carries merge t - 1)
    training = [r.clients[0].bytes_down for r in records[1:]]
    run(tmp_path / "plain", FLoRA(), num_rounds=3)
    plain = [r.clients[0].bytes_down for r in read_records(tmp_path / "plain")[1:]]
    assert training == [plain[0]] * 3 and plain[1] > plain[0]


class FailsToEvaluate(TinyTrainer):
    """Client 1 cannot evaluate."""

    def evaluate(self, client_id: int, assignment: wire.Assignment, merges: Any) -> Any:
        if client_id == 1:
            raise RuntimeError("no disk for the held-out file")
        return super().evaluate(client_id, assignment, merges)


def test_a_client_that_fails_to_evaluate_is_named_and_left_out_of_the_mean(tmp_path: Path) -> None:
    summary, lines, _ = run(tmp_path, FedAvg(), trainer=FailsToEvaluate(), num_rounds=1, client_eval_every=0)
    evaluation = read_records(tmp_path)[-1].client_eval
    assert evaluation is not None and evaluation.num_failed == 1
    assert evaluation.clients[1] == {"client": 1, "bytes_down": evaluation.clients[0]["bytes_down"],
                                     "error": "no disk for the held-out file"}
    answered = [evaluation.clients[c]["test_accuracy"] for c in (0, 2)]
    assert evaluation.mean["test_accuracy"] == pytest.approx(sum(answered) / 2)
    assert summary["client_eval_failed"] == 1 and "2 clients, 1 failed" in lines[-2]


def test_a_client_holding_nothing_out_fails_its_evaluation_with_the_fix(tmp_path: Path) -> None:
    run(tmp_path, FedAvg(), trainer=TinyTrainer(held_out=(3, 0)), num_rounds=1, client_eval_every=0)
    evaluation = read_records(tmp_path)[-1].client_eval
    assert evaluation is not None
    error = evaluation.clients[1]["error"]
    assert "client 1 holds no example to evaluate on; set data.client_test_fraction > 0" in error


@pytest.mark.parametrize("strategy", [FedAvg, FLoRA])
def test_a_resumed_run_evaluates_as_the_uninterrupted_one(tmp_path: Path, strategy: Any) -> None:
    run(tmp_path / "straight", strategy(), num_rounds=4, client_eval_every=1)
    killed = tmp_path / "killed"
    run(killed, strategy(), num_rounds=2, client_eval_every=1)  # as if killed after round 2's checkpoint
    (killed / "summary.json").unlink()
    run(killed, strategy(), num_rounds=4, client_eval_every=1, resume=True)
    resumed, straight = rows(killed), rows(tmp_path / "straight")
    for row in (resumed[3], straight[3]):  # the first message after a resume resends every base merge
        row.pop("bytes_down_total")
        for client in row["clients"]:
            client.pop("bytes_down")
    # (the evaluation after the round before the resume ran in the first run; the next ones are equal)
    assert resumed == straight


def test_the_summary_of_a_round_picks_the_worst_by_the_tasks_direction() -> None:
    rows_ = [{"client": 0, "bytes_down": 1, "num_examples": 3, "test_perplexity": 9.0, "test_loss": 2.2},
             {"client": 1, "bytes_down": 1, "num_examples": 5, "test_perplexity": 12.0, "test_loss": 2.5},
             {"client": 2, "bytes_down": 1, "error": "gone"}]
    evaluation = summarize_clients(rows_, PERPLEXITY)
    assert evaluation.worst == 12.0 and evaluation.worst_client == 1  # perplexity: higher is worse
    assert evaluation.mean == {"test_perplexity": 10.5, "test_loss": pytest.approx(2.35)}
    accuracy = summarize_clients([{"client": 3, "test_accuracy": 0.5}, {"client": 1, "test_accuracy": 0.5}], ACCURACY)
    assert accuracy.worst_client == 3  # a tie keeps the first in client order
    nobody = summarize_clients([{"client": 0, "error": "x"}], ACCURACY)
    assert nobody.worst is None and nobody.mean == {}


def test_the_evaluation_message_carries_the_global_adapter_as_it_is() -> None:
    spec = TinyTrainer.spec(8)
    init = FedAvg().init(spec, 0)
    plan = ClientPlan(rank=8, adapter=init.adapter, init_seed=0)
    packet = wire.encode_assignment(wire.Assignment(3, plan, init.adapter))
    decoded = wire.decode_assignment(packet, spec.modules)
    assert decoded.server_round == 3 and decoded.plan.rank == 8
    assert all(torch.equal(decoded.start[k], v) for k, v in init.adapter.items())
    assert lm.rank_of(decoded.start) == 8


def test_the_last_evaluation_asks_the_client_to_save_its_model_and_the_reply_says_where() -> None:
    spec = TinyTrainer.spec(4)
    plan = ClientPlan(rank=4, adapter=FedAvg().init(spec, 0).adapter, init_seed=0)
    asked = wire.decode_assignment(wire.encode_assignment(wire.Assignment(3, plan, plan.adapter or {}, save_own=True)),
                                   spec.modules)
    plain = wire.decode_assignment(wire.encode_assignment(wire.Assignment(3, plan, plan.adapter or {})), spec.modules)
    assert asked.save_own and not plain.save_own
    reply = wire.encode_evaluation({"test_accuracy": 0.5}, 7, saved_to="/node/state/run/3/adapter")
    assert wire.saved_to(reply) == "/node/state/run/3/adapter"
    assert wire.decode_evaluation(reply) == ({"test_accuracy": 0.5}, 7)
    assert wire.saved_to(wire.encode_evaluation({"test_accuracy": 0.5}, 7)) is None


def test_tensorboard_and_the_plot_show_the_clients_mean_and_worst(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = LoopSettings(name="t", seed=0, num_clients=3, num_rounds=2, client_eval_every=1)
    transport = InMemoryTransport(dict(enumerate(RANKS)), ClientSide(trainer=TinyTrainer()))
    Federation(settings, strategy=FedAvg(), transport=transport, model=TinyModel(tmp_path), run_dir=tmp_path,
               recorder=RunRecorder(tmp_path, tensorboard=True), say=lambda _: None).run()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = read_records(tmp_path)
    worst = [(e.step, e.value) for e in events.Scalars("clients/worst")]
    assert worst == [(r.round, pytest.approx(r.client_eval.worst)) for r in records[1:] if r.client_eval]
    assert [e.step for e in events.Scalars("clients/mean_test_accuracy")] == [1, 2]
    assert plot_run(tmp_path).stat().st_size > 10_000
