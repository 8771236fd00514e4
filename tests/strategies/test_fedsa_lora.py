"""FedSA-LoRA: the shared ``A`` is the clients' average; each client's ``B`` and head stay with it.

The aggregate against an independent float64 computation on tiny shapes (both paddings, mixed ranks);
what travels (only ``A``, both ways); then whole in-process federations through the real loop, wire
codec and client side (:mod:`federation_kit`): each client's model is the shared ``A`` with its own ``B``
and head, its evaluation is of that model, a client that lost its own state is started again, and a
run stopped mid-round and resumed computes what the uninterrupted one does. The configuration
refusals are checked before anything starts.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose, jsonl_rows, untimed
from federation_kit import HEAD as HEAD_SHAPES
from federation_kit import MODULES, TinyModel, TinyTrainer, client_metrics

from fedlora.config.validate import validate
from fedlora.core import lora_math as lm
from fedlora.core.errors import ConfigError
from fedlora.core.types import PERSONAL_KEPT, PERSONAL_START, AdapterSpec, ClientUpdate
from fedlora.federation import wire
from fedlora.federation.client import ClientSide
from fedlora.federation.loop import Federation, LoopSettings, RunInterrupted
from fedlora.federation.memory import InMemoryTransport
from fedlora.results.checkpoint import load_checkpoint
from fedlora.results.record import read_records
from fedlora.results.recorder import RunRecorder
from strategies.fedsa_lora import FedSALoRA, personal_model

S = 2.0
HEAD = {"classifier.weight": torch.zeros(3, 6), "classifier.bias": torch.zeros(3)}
RANKS = [2, 4, 8]
HEAD_OF_KIT = {k: torch.zeros(shape) for k, shape in HEAD_SHAPES.items()}  # TinyTrainer's initial head


def spec(r_max: int) -> AdapterSpec:
    return AdapterSpec(MODULES, r_max, S, {k: v.clone() for k, v in HEAD.items()})


def updates_from(global_adapter: dict, ranks: list[int], counts: list[int], seed: int = 0) -> list[ClientUpdate]:
    """Clients that moved their A (what the server receives; B and head are its own start)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for cid, (rank, n) in enumerate(zip(ranks, counts, strict=True)):
        state = lm.resize_state(global_adapter, rank)
        for key in sorted(state):
            if lm.is_lora_a_key(key):
                state[key] = state[key] + torch.randn(state[key].shape, generator=gen)
        out.append(ClientUpdate(cid, rank, S, n, state))
    return out


@pytest.mark.parametrize("padding", ["owners", "zero"])
def test_the_shared_a_is_the_weighted_average_of_the_clients_a(padding: str) -> None:
    strategy = FedSALoRA(padding=padding)
    init = strategy.init(spec(8), 3)
    updates = updates_from(init.adapter, [2, 4, 8], [10, 30, 60])
    result = strategy.aggregate(init.adapter, init.state, updates, server_round=1)
    p = torch.tensor([10.0, 30.0, 60.0], dtype=torch.float64) / 100
    for module, (_, n) in MODULES.items():
        key = lm.lora_a_key(module)
        expected = torch.zeros(8, n, dtype=torch.float64)
        for row in range(8):
            owners = [k for k, u in enumerate(updates) if u.rank > row]
            if padding == "owners":
                w = p[owners] / p[owners].sum()
                expected[row] = sum(w[i] * updates[k].state[key][row].double() for i, k in enumerate(owners))
            else:
                expected[row] = sum(p[k] * updates[k].state[key][row].double() for k in owners)
        assert torch.allclose(result.adapter[key].double(), expected, atol=1e-6), (module, padding)
        # the global B stays what it was (zero): no client's B reaches the server
        assert torch.equal(result.adapter[lm.lora_b_key(module)], init.adapter[lm.lora_b_key(module)])
    for key in HEAD:
        assert torch.equal(result.adapter[key], init.adapter[key])
    assert result.metrics["a_change_rel"] > 0


def test_a_b_or_head_in_an_update_is_never_read() -> None:
    strategy = FedSALoRA()
    init = strategy.init(spec(4), 0)
    updates = updates_from(init.adapter, [4, 4], [1, 1])
    poisoned = [ClientUpdate(u.client_id, u.rank, S, u.num_examples,
                             {k: (v + 100.0 if lm.is_personal_key(k) else v) for k, v in u.state.items()})
                for u in updates]
    clean = strategy.aggregate(init.adapter, init.state, updates, server_round=1).adapter
    other = strategy.aggregate(init.adapter, init.state, poisoned, server_round=1).adapter
    assert all(torch.equal(clean[k], other[k]) for k in clean)


def test_only_a_travels_both_ways_and_the_client_is_told_its_b_and_head_are_its_own() -> None:
    strategy = FedSALoRA()
    init = strategy.init(spec(8), 0)
    plan = strategy.plan(init.adapter, init.state, client_id=1, rank=4, server_round=2, seed=0)
    assert plan.personal == PERSONAL_KEPT and lm.rank_of(plan.adapter or {}) == 4
    start = lm.plan_start(plan, MODULES)
    a_keys = sorted(lm.lora_a_key(m) for m in MODULES)
    assert sorted(wire.downlink_keys(plan, start)) == a_keys and wire.uplink_keys(plan, start) == a_keys
    packet = wire.encode_assignment(wire.Assignment(2, plan, start))
    assert sorted(packet.arrays[wire.keys.ADAPTER]) == a_keys and packet.config[wire.keys.PERSONAL] == PERSONAL_KEPT
    decoded = wire.decode_assignment(packet, MODULES)
    assert decoded.plan.personal == PERSONAL_KEPT and sorted(decoded.start) == a_keys  # the client adds its own
    # a client that holds none yet is sent B and the head too (the platform's first message to it)
    first = wire.decode_assignment(wire.encode_assignment(wire.Assignment(
        1, plan.__class__(**{**plan.__dict__, "personal": PERSONAL_START}), start)), MODULES)
    assert sorted(first.start) == sorted(start) and wire.uplink_keys(first.plan, first.start) == a_keys
    with pytest.raises(ValueError, match="rank 9; FedSA-LoRA needs 1 <= rank <= r_max=8"):
        strategy.plan(init.adapter, init.state, client_id=0, rank=9, server_round=1, seed=0)


# -- whole federations ---------------------------------------------------------------------------------
def federate(run_dir: Path, *, transport: InMemoryTransport | None = None, trainer: TinyTrainer | None = None,
             stop: threading.Event | None = None, saves_to: Path | None = None, strategy: FedSALoRA | None = None,
             client_dp: Any = None, **loop: Any) -> tuple[dict, list[str], InMemoryTransport]:
    settings = LoopSettings(**{"name": "t", "seed": 0, "num_clients": 3, "num_rounds": 3, "round_timeout": 30.0,
                               "client_eval_every": 0, **loop})
    transport = transport or InMemoryTransport(dict(enumerate(RANKS)), ClientSide(trainer=trainer or TinyTrainer()),
                                               stop=stop, saves_to=saves_to)
    lines: list[str] = []
    summary = Federation(settings, strategy=strategy or FedSALoRA(), transport=transport, model=TinyModel(run_dir),
                         run_dir=run_dir, recorder=RunRecorder(run_dir, tensorboard=False), say=lines.append,
                         stop=stop, client_dp=client_dp).run()
    return summary, lines, transport


def test_each_client_keeps_its_own_b_and_head_and_is_evaluated_on_its_own_model(tmp_path: Path) -> None:
    summary, lines, transport = federate(tmp_path)
    records = read_records(tmp_path)
    shared = load_checkpoint(tmp_path).adapter
    for r in records[1:]:
        # only A went down and up: a rank-r client's reply is r x n float32 per module (no B, no head)
        for c in r.clients:
            assert c.status == "ok" and c.bytes_up == 4 * c.rank * sum(n for _, n in MODULES.values())
    for cid, rank in enumerate(RANKS):
        own = transport.stores[cid].own
        assert sorted(own) == [2, 3]  # what it trained in round 3, and the newest before it
        b = own[3][lm.lora_b_key("enc.q")]
        assert b.shape == (8, rank) and float(b.abs().max()) > 0  # trained, on the client only
        assert sorted(own[3]) == sorted(k for k in shared if lm.is_personal_key(k))
    for k in shared:
        if lm.is_personal_key(k):  # the server's B and head never moved
            assert not bool(shared[k].any())
    # every round (round 0 too) each client evaluated its own model: the shared A with its own B and head
    assert all(r.client_eval is not None for r in records)
    final = records[-1].client_eval
    assert final is not None
    for cid, rank in enumerate(RANKS):
        model = personal_model(shared, transport.stores[cid].own[3], rank)
        expected = client_metrics(cid, model, [])["test_accuracy"]
        assert final.clients[cid]["test_accuracy"] == pytest.approx(expected, rel=1e-12)
    assert records[-1].metrics["test_accuracy"] == final.mean["test_accuracy"]  # no global model: the mean
    assert summary["personalized"] is True and summary["final_test_accuracy"] == final.mean["test_accuracy"]
    assert summary["client_worst_test_accuracy"] == final.worst
    assert "no global model" in lines[0] and lines[1].startswith("round 0/3: clients' own models, mean test accuracy")
    assert lines[-1].startswith("done: final mean test accuracy of the clients' own models ")


def test_after_the_last_round_each_client_saves_the_own_model_it_scored_and_the_summary_says_where(
        tmp_path: Path) -> None:
    trainer = TinyTrainer()
    summary, lines, transport = federate(tmp_path / "run", trainer=trainer, saves_to=tmp_path / "clients")
    shared = load_checkpoint(tmp_path / "run").adapter
    final = read_records(tmp_path / "run")[-1].client_eval
    assert final is not None
    # only the last round's evaluation saves (every round evaluates), one model per client, on its side
    assert sorted(trainer.saved) == [tmp_path / "clients" / str(cid) for cid in range(3)]
    for cid, rank in enumerate(RANKS):
        path = tmp_path / "clients" / str(cid)
        adapter, saved_rank = trainer.saved[path]
        expected = personal_model(shared, transport.stores[cid].own[3], rank)  # the shared A, its own B and head
        assert saved_rank == rank and sorted(adapter) == sorted(expected)
        assert all(torch.equal(adapter[k], expected[k]) for k in expected)
        scored = final.clients[cid]["test_accuracy"]
        assert client_metrics(cid, adapter, [])["test_accuracy"] == scored  # the model it scored
        assert (path / "adapter.safetensors").is_file() and final.clients[cid]["adapter_dir"] == str(path)
    assert summary["client_adapters"] == {str(cid): str(tmp_path / "clients" / str(cid)) for cid in range(3)}
    assert "adapter_dir" not in final.mean  # a path, not a metric
    assert lines[-2].startswith("each client's own model (its B and head with the shared A), saved by 3 of 3 clients")


def test_a_client_keeping_nothing_on_disk_saves_no_model_and_the_summary_says_none(tmp_path: Path) -> None:
    trainer = TinyTrainer()
    summary, lines, _ = federate(tmp_path, trainer=trainer)
    assert trainer.saved == {} and summary["client_adapters"] == {}
    assert "saved by 0 of 3 clients" in lines[-2]


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # z = 0 ("open"): epsilon is infinite
def test_with_zero_padding_client_level_dp_clips_and_noises_the_shared_a_alone(tmp_path: Path) -> None:
    from fedlora.runtime.training import dp as dpsgd
    from fedlora.serving.runtime import ClientDPLedger

    assert FedSALoRA(padding="zero").linear and not FedSALoRA().linear  # the default divides rows by their owners
    assert "padding=owners" in FedSALoRA().why_not_linear and "strategy.padding=zero" in FedSALoRA().why_not_linear

    def run(name: str, z: float | None, clip: float = 0.5) -> tuple[dict, InMemoryTransport]:
        ledger = None if z is None else ClientDPLedger(dpsgd.ClientDPSettings(noise_multiplier=z, clip=clip,
                                                                               rounds=3), 3)
        summary, _, transport = federate(tmp_path / name, trainer=TinyTrainer(examples=(30,)),
                                         strategy=FedSALoRA(padding="zero"), client_dp=ledger)
        return summary, transport

    run("plain", None)
    open_summary, _ = run("open", 0.0, clip=1e9)  # no noise, no clip reached: equal sizes, so FedSA's own mean
    plain, opened = load_checkpoint(tmp_path / "plain").adapter, load_checkpoint(tmp_path / "open").adapter
    for k, v in plain.items():
        torch.testing.assert_close(opened[k], v, rtol=1e-5, atol=1e-6)
    noisy_summary, transport = run("noisy", 0.8)
    noisy = load_checkpoint(tmp_path / "noisy").adapter
    a_keys = [k for k in noisy if lm.is_lora_a_key(k)]
    assert a_keys and all(not torch.allclose(noisy[k], plain[k]) for k in a_keys)  # clipped and noised
    for k in noisy:
        if lm.is_personal_key(k):  # B and the head never left a client: nothing of them is released or noised
            assert torch.equal(noisy[k], torch.zeros_like(noisy[k]) if lm.is_lora_b_key(k) else HEAD_OF_KIT[k])
    records = read_records(tmp_path / "noisy")
    assert all(r.strategy["dp_clipped_fraction"] == 1.0 for r in records[1:])  # TinyTrainer moves A far beyond 0.5
    assert noisy_summary["dp_level"] == "client" and noisy_summary["personalized"] is True
    assert all(sorted(transport.stores[c].own) == [2, 3] for c in range(3))  # each still keeps its own B and head


def test_a_client_that_lost_its_own_state_fails_one_round_and_starts_again(tmp_path: Path) -> None:
    _, _, transport = federate(tmp_path / "a", num_rounds=2)
    transport.stores[1].own.clear()  # its state is gone; the server still thinks it holds it
    federate(tmp_path / "a", transport=transport, num_rounds=4, resume=True)
    records = read_records(tmp_path / "a")
    status = [{c.client: (c.status, c.error or "") for c in r.clients} for r in records[3:]]
    assert status[0][1][0] == "failed" and "personal state lost" in status[0][1][1]
    assert status[1][1] == ("ok", "")  # round 4: sent B and the head again, it trained from them
    assert status[0][0][0] == status[0][2][0] == "ok"


@pytest.mark.parametrize("when", [2, 3])
def test_a_run_stopped_mid_round_resumes_to_what_the_uninterrupted_one_computes(tmp_path: Path, when: int) -> None:
    federate(tmp_path / "straight", num_rounds=4, client_eval_every=1)
    stop = threading.Event()

    class StopsMidRound(TinyTrainer):
        fired = False

        def train(self, client_id: int, assignment: wire.Assignment, merges: Any) -> Any:
            out = super().train(client_id, assignment, merges)
            if assignment.server_round == when and client_id == 1 and not self.fired:
                self.fired = True
                stop.set()  # after client 1 trained (it keeps its own B and head of this round as it replies)
            return out

    transport = InMemoryTransport(dict(enumerate(RANKS)), ClientSide(trainer=StopsMidRound()), stop=stop)
    with pytest.raises(RunInterrupted):
        federate(tmp_path / "killed", transport=transport, stop=stop, num_rounds=4, client_eval_every=1)
    # client 1 kept what it trained in the stopped round (and the newest before it); client 2 never started it
    assert sorted(transport.stores[1].own) == [when - 1, when]
    assert sorted(transport.stores[2].own) == list(range(max(1, when - 2), when))
    stop.clear()
    federate(tmp_path / "killed", transport=transport, stop=stop, num_rounds=4, client_eval_every=1, resume=True)

    assert untimed(jsonl_rows(tmp_path / "killed")) == untimed(jsonl_rows(tmp_path / "straight"))


@pytest.mark.parametrize("overrides,field,fix", [
    (["strategy=fedsa_lora"], "data.client_test_fraction=0", "set data.client_test_fraction=0.2"),
    (["strategy=fedsa_lora", "data.client_test_fraction=0.2", "downlink=compeft", "downlink.scale=mean_abs"],
     "downlink='compeft'", "downlink compression of that is not built"),
    (["strategy=fedsa_lora", "data.client_test_fraction=0.2", "privacy=secagg"], "privacy.secure=True",
     "use strategy.padding=zero"),
    (["strategy=fedsa_lora", "data.client_test_fraction=0.2", "privacy=dp_fedavg"], "privacy.kind='dp_fedavg'",
     "use strategy.padding=zero"),
    (["strategy=fedsa_lora", "data.client_test_fraction=0.2", "participation.fedau=true"], "participation.fedau=True",
     "use strategy.padding=zero"),
])
def test_what_fedsa_lora_cannot_run_with_is_refused_before_anything_starts(overrides: list[str], field: str,
                                                                           fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides), check_model=False, check_data=False)
    assert field in str(info.value) and fix in str(info.value)


def test_fedsa_lora_with_held_out_examples_is_accepted() -> None:
    validate(compose(["strategy=fedsa_lora", "data.client_test_fraction=0.2"]), check_model=False, check_data=False)
    validate(compose(["strategy=fedsa_lora", "data.client_test_fraction=0.2", "compression=compeft"]),
             check_model=False, check_data=False)
    zero = ["strategy=fedsa_lora", "data.client_test_fraction=0.2", "strategy.padding=zero"]
    for privacy in (["privacy=secagg"], ["privacy=dp_fedavg"], ["privacy=dp_fedavg", "privacy.secure=true"],
                    ["participation.fedau=true"]):  # the shared A is then a weighted mean of what each sends
        validate(compose([*zero, *privacy]), check_model=False, check_data=False)
