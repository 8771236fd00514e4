"""Downlink compression (fedlora.federation.downlink): the server's mirror and each client's copy agree bit
for bit, through partial participation, lost replies, lost copies and a resume.

The message math is checked on its own on tiny tensors (the reference, EF21's convergence to a fixed
target, the copies a client keeps); whole federations run in-process with real strategies, the wire
codec both ways and the client side (:mod:`fedlora.federation.memory`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import jsonl_rows, untimed
from federation_kit import MODULES, TinyModel, TinyTrainer

from fedlora.compression.compeft import ComPEFT
from fedlora.core import lora_math as lm
from fedlora.core.types import ClientPlan
from fedlora.federation import downlink as dl
from fedlora.federation import wire
from fedlora.federation.client import ClientSide
from fedlora.federation.loop import Federation, LoopSettings
from fedlora.federation.memory import InMemoryTransport
from fedlora.results import checkpoint as ckpt
from fedlora.results.record import read_records
from fedlora.results.recorder import RunRecorder
from strategies.fedavg import FedAvg
from strategies.ffa_lora import FFALoRA

RANKS = {0: 2, 1: 4, 2: 8, 3: 4}


def compeft(density: float = 0.25) -> ComPEFT:
    return ComPEFT(density=density, scale="mean_abs", error_feedback=False)


class Recording(TinyTrainer):
    """Keeps the start every client trained from: the client's side of the copy."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def train(self, client_id: int, assignment: wire.Assignment, merges: Any) -> Any:
        self.starts[(assignment.server_round, client_id)] = {k: v.clone() for k, v in assignment.start.items()}
        return super().train(client_id, assignment, merges)


class Mirrored(Federation):
    """Keeps the start the server decoded every reply against: the server's side of the copy."""

    starts: dict[tuple[int, int], dict[str, torch.Tensor]]
    planned: dict[tuple[int, int], dict[str, torch.Tensor]]  # the start each reply's update went on

    def _assign(self, state: Any, cid: int, rank: int, server_round: int, layout_rank: int = 0,
                dp_secure: Any = None) -> wire.Assignment:
        assignment = super()._assign(state, cid, rank, server_round, layout_rank, dp_secure)
        self.starts = getattr(self, "starts", {})
        self.starts[(server_round, cid)] = {k: v.clone() for k, v in assignment.start.items()}
        self.planned = getattr(self, "planned", {})
        self.planned[(server_round, cid)] = {k: v.clone() for k, v in wire.base(assignment).items()}
        return assignment


def federation(run_dir: Path, *, strategy: Any = None, down: Any = "compeft", trainer: TinyTrainer | None = None,
               transport: InMemoryTransport | None = None, silent: Any = None, **loop: Any,
               ) -> tuple[Mirrored, InMemoryTransport]:
    settings = LoopSettings(**{"name": "test", "seed": 0, "num_clients": len(RANKS), "num_rounds": 5,
                               "round_timeout": 30.0, **loop})
    down = compeft() if down == "compeft" else down
    side = ClientSide(trainer=trainer or Recording(), downlink=down)
    transport = transport or InMemoryTransport(RANKS, side, silent=silent)
    fed = Mirrored(settings, strategy=strategy or FedAvg(), transport=transport, model=TinyModel(run_dir),
                   run_dir=run_dir, recorder=RunRecorder(run_dir, tensorboard=False), say=lambda _: None,
                   downlink=down)
    return fed, transport


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the message math ----------------------------------------------------------------------------------
def test_first_contact_with_fedavg_sends_the_head_and_an_empty_difference() -> None:
    # FedAvg's round-1 start is the reference itself (A from the run seed, B = 0), so only the head travels
    init = FedAvg().init(TinyTrainer.spec(8), 0).adapter
    init["classifier.bias"] = torch.tensor([0.5, -1.0, 2.0])  # a trained head: sent as it is
    plan = FedAvg().plan(init, {}, client_id=0, rank=4, server_round=1, seed=0)
    start = lm.plan_start(plan, MODULES)
    target = {k: start[k] for k in wire.downlink_keys(plan, start)}
    message = dl.encode(compeft(), target, plan, MODULES, None)
    assert message.base_round == 0 and sorted(message.dense) == ["classifier.bias", "classifier.weight"]
    assert equal(message.view, target)  # exact: nothing was lost
    assert all(int(message.payload[f"{k}|hdr"][3]) == 0 for k in target)  # varint header: nnz 0 everywhere


def test_the_copy_converges_to_a_fixed_target_and_the_identity_reaches_it() -> None:
    gen = torch.Generator().manual_seed(3)
    plan = ClientPlan(rank=4, adapter=None, init_seed=7)
    base = {k: v for k, v in lm.fresh_state(MODULES, 4, 7, {"head.bias": torch.zeros(3)}).items()}
    target = {k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()}
    held = None
    errors = []
    for server_round in range(1, 30):
        message = dl.encode(compeft(0.2), target, plan, MODULES, held)
        held = (server_round, message.view)
        errors.append(math.sqrt(sum(float((target[k] - message.view[k]).pow(2).sum()) for k in target)))
    # EF21 with a contractive compressor: the error shrinks every message, geometrically
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-3 * errors[0]
    exact = dl.encode(ComPEFT(density=1.0, scale="none", error_feedback=False), target, plan, MODULES, None)
    # the identity: one message, equal up to float32 rounding of base + (target - base)
    assert all(torch.allclose(exact.view[k], target[k], rtol=0, atol=1e-6) for k in target)


def test_the_client_decodes_the_servers_copy_and_refuses_one_it_lacks() -> None:
    plan = ClientPlan(rank=2, adapter=None, init_seed=1)
    base = lm.fresh_state(MODULES, 2, 1, {})
    target = {k: v + 0.1 for k, v in base.items()}
    first = dl.encode(compeft(), target, plan, MODULES, None)
    second = dl.encode(compeft(), target, plan, MODULES, (3, first.view))
    assert second.base_round == 3 and not second.dense
    names = sorted(target)
    got = dl.decode(compeft(), second.payload, base_round=3, base_crc=second.base_crc, dense={}, plan=plan,
                    modules=MODULES, names=names, views={3: first.view})
    assert equal(got, second.view)
    with pytest.raises(ValueError, match=r"^downlink copy lost: .* copy of round 3, and it holds copies of rounds "
                                         r"\[2\]"):
        dl.decode(compeft(), second.payload, base_round=3, base_crc=second.base_crc, dense={}, plan=plan,
                  modules=MODULES, names=names, views={2: first.view})
    damaged = {k: v.clone() for k, v in first.view.items()}
    damaged[names[0]].view(-1)[0] += 1.0
    with pytest.raises(ValueError, match="differs from the server's"):
        dl.decode(compeft(), second.payload, base_round=3, base_crc=second.base_crc, dense={}, plan=plan,
                  modules=MODULES, names=names, views={3: damaged})


def test_a_client_keeps_every_copy_the_server_may_still_name() -> None:
    v = {"x": torch.zeros(1)}
    assert sorted(dl.keep_views({1: v, 2: v, 3: v}, 2, 4, v)) == [2, 3, 4]
    assert sorted(dl.keep_views({1: v, 2: v}, 0, 3, v)) == [3]  # a first-contact message: only the new copy


# -- whole federations -----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [FedAvg, FFALoRA])
def test_every_client_starts_from_the_copy_the_server_holds_under_partial_participation(
        tmp_path: Path, strategy: Any) -> None:
    # a lost reply (client 1 in round 2) leaves the server at the older copy; the client kept it
    fed, transport = federation(tmp_path, strategy=strategy(), fraction_train=0.5,
                                silent=lambda server_round, cid: (server_round, cid) == (2, 1))
    fed.run()
    client_starts = transport.side.trainer.starts  # type: ignore[attr-defined]
    assert len(client_starts) >= 8 and client_starts.keys() == fed.starts.keys()
    for key, start in client_starts.items():
        assert equal(start, fed.starts[key]), key
    records = read_records(tmp_path)
    assert all(c.status == "ok" for r in records[1:] for c in r.clients)
    # the same run uncompressed sends more bytes down
    plain, _ = federation(tmp_path / "plain", strategy=strategy(), down=None, fraction_train=0.5)
    plain.run()
    assert (sum(r.bytes_total("down") for r in records)
            < sum(r.bytes_total("down") for r in read_records(tmp_path / "plain")))


def test_the_servers_model_moves_by_the_clients_updates_exactly_whatever_the_copies_they_trained_from(
        tmp_path: Path) -> None:
    # EF21-P: each reply's update (trained minus the copy the client started from) goes on the start the
    # strategy planned, so what compression dropped is not lost from the model: it stays in the next message.
    # The tiny trainer's update does not depend on its start and the clients share one rank, so FedAvg's model
    # after 5 rounds is the same with a compressed downlink as without one (the lossy rule, updates added to
    # the copies, would drop each round's compression error from the model).
    equal_ranks = dict.fromkeys(RANKS, 4)
    runs = {}
    for name, down in (("plain", None), ("compressed", compeft(0.1))):
        side = ClientSide(trainer=Recording(), downlink=down)
        fed, _ = federation(tmp_path / name, down=down, transport=InMemoryTransport(equal_ranks, side),
                            fraction_train=0.5)
        fed.run()
        runs[name] = ckpt.load_checkpoint(tmp_path / name).adapter
        if down is not None:  # the copies were approximations: clients trained from starts other than the plan's
            starts = side.trainer.starts  # type: ignore[attr-defined]
            assert all(equal(starts[key], fed.starts[key]) for key in starts)  # as the server's mirror says
            planned = {key: a for key, a in fed.planned.items() if key[0] > 1}
            assert any(not torch.equal(starts[key][k], planned[key][k]) for key in planned for k in planned[key])
    assert runs["plain"].keys() == runs["compressed"].keys()
    for key in runs["plain"]:
        torch.testing.assert_close(runs["compressed"][key], runs["plain"][key], rtol=1e-5, atol=1e-5)


def test_a_client_that_lost_its_copy_fails_one_round_and_starts_again_from_the_reference(tmp_path: Path) -> None:
    class Forgets(InMemoryTransport):
        def exchange(self, server_round: int, packets: Any, timeout: float) -> Any:
            if server_round == 3:
                self.stores[2].copies = {}  # client 2's disk is gone
            return super().exchange(server_round, packets, timeout)

    side = ClientSide(trainer=Recording(), downlink=compeft())
    fed, _ = federation(tmp_path, transport=Forgets(RANKS, side))
    fed.run()
    rows = {r.round: {c.client: c for c in r.clients} for r in read_records(tmp_path)}
    assert rows[3][2].status == "failed" and "downlink copy lost" in (rows[3][2].error or "")
    assert "copy of round 2, and it holds copies of rounds none" in (rows[3][2].error or "")
    assert rows[4][2].status == "ok" and rows[5][2].status == "ok"  # started again from the reference
    assert equal(side.trainer.starts[(4, 2)], fed.starts[(4, 2)])  # type: ignore[attr-defined]


def test_resumed_from_a_checkpoint_equals_uninterrupted(tmp_path: Path) -> None:
    straight, _ = federation(tmp_path / "straight", fraction_train=0.5)
    straight.run()
    killed = tmp_path / "killed"
    first, transport = federation(killed, fraction_train=0.5, num_rounds=3)  # as if killed after round 3
    first.run()
    saved = ckpt.load_checkpoint(killed)
    assert saved.views and all(r <= 3 for r, _ in saved.views.values())  # the server's mirrors, checkpointed
    (killed / "summary.json").unlink()
    # the clients kept their copies (on disk in Flower: fedlora.flower.node_worker.StateStore)
    resumed, _ = federation(killed, fraction_train=0.5, transport=transport, resume=True)
    resumed.run()
    # bytes, statuses and metrics, every round
    assert untimed(jsonl_rows(killed)) == untimed(jsonl_rows(tmp_path / "straight"))
    assert all(equal(resumed.starts[key], straight.starts[key]) for key in resumed.starts)
