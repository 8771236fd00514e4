"""SCAFCOM (compression=scafcom): controlled averaging with ComPEFT-coded client messages.

The update rule against an independent SCAFFOLD on quadratic clients (identity compressor, no momentum), and
against rounds computed by hand with momentum and a biased top-k; the drift correction on the real model's
live parameters; then whole in-process federations through the real loop, wire codec and client side
(:mod:`federation_kit`): the identity reduces to FedAvg, ``c`` stays the mean of every client's ``c_k`` under
partial participation with mixed ranks, each client trains with ``c - c_k``, and a resumed run equals the
uninterrupted one; and the configurations it cannot run with, refused before anything starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose, jsonl_rows, untimed
from federation_kit import TinyModel, TinyTrainer

from fedlora.compression.compeft import ComPEFT
from fedlora.compression.scafcom import SCAFCOM
from fedlora.config.validate import validate
from fedlora.core import control as ctl
from fedlora.core import lora_math as lm
from fedlora.core.errors import ConfigError
from fedlora.core.faults import FaultSettings
from fedlora.federation import downlink as dl
from fedlora.federation import wire
from fedlora.federation.client import ClientSide
from fedlora.federation.loop import Federation, LoopSettings
from fedlora.federation.memory import InMemoryTransport
from fedlora.results import checkpoint as ckpt
from fedlora.results.record import read_records
from fedlora.results.recorder import RunRecorder
from strategies.fedavg import FedAvg

RANKS = {0: 2, 1: 4, 2: 8, 3: 4}


# -- the update rule -----------------------------------------------------------------------------------
def scaffold_reference(grads: list[Any], rounds: list[list[int]], steps: int, lr: float, server_lr: float,
                       dim: int) -> list[torch.Tensor]:
    """SCAFFOLD (Karimireddy et al. 2020, option II) in its own gradient units, float64: the iterates x."""
    n = len(grads)
    x, c = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    ci = [torch.zeros(dim, dtype=torch.float64) for _ in range(n)]
    out = []
    for sampled in rounds:
        dys, dcs = [], []
        for i in sampled:
            y = x.clone()
            for _ in range(steps):
                y = y - lr * (grads[i](y) - ci[i] + c)
            new = ci[i] - c + (x - y) / (steps * lr)
            dys.append(y - x)
            dcs.append(new - ci[i])
            ci[i] = new
        x = x + server_lr * sum(dys) / len(sampled)
        c = c + sum(dcs) / n
        out.append(x)
    return out


def test_with_the_identity_and_no_momentum_the_iterates_are_scaffolds() -> None:
    gen = torch.Generator().manual_seed(0)
    dim, n, steps, lr, server_lr = 5, 4, 3, 0.1, 0.8
    curv = [0.5 + torch.rand(dim, generator=gen, dtype=torch.float64) for _ in range(n)]
    targets = [torch.randn(dim, generator=gen, dtype=torch.float64) for _ in range(n)]
    grads = [lambda y, a=a, b=b: a * (y - b) for a, b in zip(curv, targets, strict=True)]
    rounds = [[0, 1, 2, 3], [1, 3], [0, 2], [0, 1, 2], [3]]  # partial participation after the first
    expected = scaffold_reference(grads, rounds, steps, lr, server_lr, dim)

    settings = ctl.ControlSettings(momentum=1.0, control_step=1.0, server_lr=server_lr)
    identity = SCAFCOM(density=1.0, scale="none", momentum=1.0, server_lr=server_lr)
    x = {"w": torch.zeros(dim)}
    control = {"w": torch.zeros(dim)}
    state: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for sampled, want in zip(rounds, expected, strict=True):
        effective, messages = [], []
        for i in sampled:
            own, momentum = ctl.split_client_state(state[i])
            correction = ctl.drift(control, own)
            y = x["w"].double()
            for _ in range(steps):  # SGD, with c - c_k spread over the steps
                y = y - lr * grads[i](y) + correction["w"].double() / steps
            update = {"w": (y - x["w"].double()).float()}
            message = ctl.client_message(update, correction, own, momentum, settings)
            payload, residual = identity.compress(message.target, None)
            assert residual == {}
            d = identity.decode(payload)
            torch.testing.assert_close(d, message.target, rtol=0, atol=0)  # the identity, bit for bit
            state[i] = ctl.join_client_state(ctl.advance_own(own, d, settings), message.momentum)
            effective.append(ctl.effective_update(x, control, d, settings))
            messages.append(d)
        x = {"w": sum(e["w"] for e in effective) / len(sampled)}
        control = ctl.advance_control(control, messages, [1 / n] * len(messages), settings)
        torch.testing.assert_close(x["w"].double(), want, rtol=1e-5, atol=1e-6)
        mean_own = sum(ctl.split_client_state(s)[0].get("w", torch.zeros(dim)) for s in state) / n
        torch.testing.assert_close(control["w"], mean_own, rtol=1e-6, atol=1e-7)  # c = (1/N) sum_i c_i (uniform)


def test_two_rounds_with_momentum_and_a_biased_top_k_by_hand() -> None:
    # One client of N = 2 (the other never sampled), beta = 1/2, top-2 of 4 entries with their exact values.
    comp = SCAFCOM(density=0.5, scale="none", momentum=0.5)
    settings = comp.control
    x, control, state = {"w": torch.zeros(4)}, {"w": torch.zeros(4)}, {}

    def round_(update: list[float]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        nonlocal x, control, state
        own, momentum = ctl.split_client_state(state)
        correction = ctl.drift(control, own)
        message = ctl.client_message({"w": torch.tensor(update)}, correction, own, momentum, settings)
        d = comp.decode(comp.compress(message.target, None)[0])
        state = ctl.join_client_state(ctl.advance_own(own, d, settings), message.momentum)
        x = ctl.effective_update(x, control, d, settings)
        control = ctl.advance_control(control, [d], [0.5], settings)
        return correction, d

    correction, d = round_([4.0, -2.0, 1.0, 0.5])
    # h = u; v = u / 2 = [2, -1, .5, .25]; d = top-2 = [2, -1, 0, 0]; x += c + d; c += d / 2
    assert correction["w"].tolist() == [0, 0, 0, 0]
    assert d["w"].tolist() == [2, -1, 0, 0]
    assert x["w"].tolist() == [2, -1, 0, 0] and control["w"].tolist() == [1, -0.5, 0, 0]
    correction, d = round_([1.0, 0.5, 3.0, 0.0])
    # c - c_k = [-1, .5, 0, 0]; h = u - (c - c_k) = [2, 0, 3, 0]; v = v/2 + h/2 = [2, -.5, 1.75, .125];
    # v - c_k = [0, .5, 1.75, .125]; d = [0, .5, 1.75, 0]; x += c + d = [1, 0, 1.75, 0]; c += d / 2
    assert correction["w"].tolist() == [-1, 0.5, 0, 0]
    assert d["w"].tolist() == [0, 0.5, 1.75, 0]
    assert x["w"].tolist() == [3, -1, 1.75, 0] and control["w"].tolist() == [1, -0.25, 0.875, 0]
    own, momentum = ctl.split_client_state(state)
    assert own["w"].tolist() == [2, -0.5, 1.75, 0] and momentum["w"].tolist() == [2, -0.5, 1.75, 0.125]


def test_scallions_control_step_moves_c_k_and_c_by_alpha_times_the_message() -> None:
    settings = ctl.ControlSettings(momentum=1.0, control_step=0.5)
    own = {"w": torch.tensor([1.0, -1.0])}
    message = ctl.client_message({"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([0.5, 0.5])}, own, {}, settings)
    # h = u - (c - c_k) = [2.5, 0.5]; sent h - c_k = [1.5, 1.5]
    assert message.target["w"].tolist() == [1.5, 1.5] and message.momentum["w"].tolist() == [2.5, 0.5]
    assert ctl.advance_own(own, message.target, settings)["w"].tolist() == [1.75, -0.25]
    control = ctl.advance_control({"w": torch.zeros(2)}, [message.target], [1 / 3], settings)
    torch.testing.assert_close(control["w"], torch.tensor([0.25, 0.25]))
    # the server's step is not scaled by alpha: x + eta_g (c + d)
    x = ctl.effective_update({"w": torch.zeros(2)}, {"w": torch.ones(2)}, message.target, settings)
    assert x["w"].tolist() == [2.5, 2.5]


def test_the_control_variate_pads_a_low_rank_message_into_its_first_slots() -> None:
    key_a, key_b = lm.lora_a_key("m"), lm.lora_b_key("m")
    control = {key_a: torch.zeros(4, 3), key_b: torch.zeros(2, 4)}
    d = {key_a: torch.ones(2, 3), key_b: torch.ones(2, 2)}
    out = ctl.advance_control(control, [d], [0.5], ctl.ControlSettings())
    assert out[key_a][:2].eq(0.5).all() and out[key_a][2:].eq(0).all()
    assert out[key_b][:, :2].eq(0.5).all() and out[key_b][:, 2:].eq(0).all()
    with pytest.raises(ValueError, match="does not hold"):
        ctl.advance_control(control, [{"other": torch.ones(1)}], [0.5], ctl.ControlSettings())


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"momentum": 0.0}, "compression.momentum=0.0 must be a number in (0, 1]"),
    ({"control_step": 1.5}, "compression.control_step=1.5 must be a number in (0, 1]"),
    ({"server_lr": -1.0}, "compression.server_lr=-1.0 must be a finite number > 0"),
    ({"scale": "std"}, "compression.scale='std' is not contractive"),
    ({"density": 5}, "compression.density=5 is not a fraction in (0, 1]"),
    ({"drift_correction": "yes"}, "compression.drift_correction='yes' must be true or false"),
])
def test_bad_settings_are_named(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError) as info:
        SCAFCOM(**kwargs)
    assert named in str(info.value), str(info.value)


# -- the drift correction on the real model ------------------------------------------------------------
def test_the_drift_moves_the_live_parameters_by_exactly_its_total_over_the_round() -> None:
    from fedlora.runtime.models import AdapterHost, ModelSettings
    from fedlora.runtime.training.local import Encoded, TrainSettings, train_steps

    host = AdapterHost(ModelSettings(dropout=0.0), num_labels=3, seed=0)
    gen = torch.Generator().manual_seed(0)
    data = Encoded(input_ids=torch.randint(1000, 2000, (8, 10), generator=gen),
                   attention_mask=torch.ones(8, 10, dtype=torch.long), labels=torch.randint(0, 3, (8,), generator=gen))
    spec = host.spec(4)
    start = lm.fresh_state(spec.modules, 4, seed=1, head=spec.head)
    host.load_state(4, start)
    live = host.state_parameters(4)
    assert set(live) == set(start)
    total = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    # lr 0: AdamW moves nothing, so the round's displacement is the drift alone
    train_steps(host.model, host.set_trainable(4, True), data, list(range(8)), TrainSettings(local_steps=3, lr=0.0),
                seed=0, drift=[(live[k], v) for k, v in total.items()])
    trained = host.get_state(4)
    for key in start:
        torch.testing.assert_close(trained[key] - start[key], total[key], rtol=1e-5, atol=1e-6)


# -- whole federations ---------------------------------------------------------------------------------
class Recording(TinyTrainer):
    """Keeps what each client trained with: the control variate it was sent and the drift it applied."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[tuple[int, int], tuple[dict, dict, dict]] = {}
        self.transport: InMemoryTransport | None = None  # to read each client's c_k as it trains

    def train(self, client_id: int, assignment: wire.Assignment, merges: Any) -> Any:
        own = ctl.split_client_state(self.transport.stores[client_id].kept)[0] if self.transport else {}
        self.seen[(assignment.server_round, client_id)] = (dict(assignment.control or {}), dict(assignment.drift or {}),
                                                          own)
        return super().train(client_id, assignment, merges)


def assert_c_is_the_weighted_mean(control: dict[str, torch.Tensor], owns: list[dict[str, torch.Tensor]]) -> None:
    """``c = sum_i w_i c_i`` over every client, ``w_i = n_i / sum_j n_j`` (FedAvg's example weighting), each ``c_i``
    zero-padded to the global rank."""
    sizes = [TinyTrainer().num_examples(cid) for cid in RANKS]
    weights = [n / sum(sizes) for n in sizes]
    assert control
    for key, c in control.items():
        mean = sum(w * ctl.pad_to(own[key], key, tuple(c.shape)) for w, own in zip(weights, owns, strict=True)
                   if key in own)
        torch.testing.assert_close(c, mean, rtol=1e-5, atol=1e-7)


class Decoding(Federation):
    """Keeps the control variate the server decoded each reply with (its copy of ``c`` for that client)."""

    decoded_with: dict[tuple[int, int], dict[str, torch.Tensor]]
    base_rounds: dict[tuple[int, int], int]  # the round of the copy each compressed start was relative to

    def _assign(self, state: Any, cid: int, rank: int, server_round: int, layout_rank: int = 0,
                dp_secure: Any = None) -> wire.Assignment:
        assignment = super()._assign(state, cid, rank, server_round, layout_rank, dp_secure)
        self.decoded_with = getattr(self, "decoded_with", {})
        self.decoded_with[(server_round, cid)] = {k: v.clone() for k, v in (assignment.control or {}).items()}
        self.base_rounds = getattr(self, "base_rounds", {})
        if assignment.downlink is not None:
            self.base_rounds[(server_round, cid)] = assignment.downlink.base_round
        return assignment


def federation(run_dir: Path, compressor: Any, *, transport: InMemoryTransport | None = None,
               trainer: TinyTrainer | None = None, faults: FaultSettings | None = None, downlink: Any = None,
               strategy: Any = None, **loop: Any) -> tuple[Decoding, InMemoryTransport]:
    settings = LoopSettings(**{"name": "t", "seed": 0, "num_clients": len(RANKS), "num_rounds": 5,
                               "round_timeout": 30.0, **loop})
    transport = transport or InMemoryTransport(RANKS, ClientSide(trainer=trainer or Recording(),
                                                                 compressor=compressor, downlink=downlink,
                                                                 faults=faults or FaultSettings()))
    fed = Decoding(settings, strategy=strategy or FedAvg(), transport=transport, model=TinyModel(run_dir),
                   run_dir=run_dir, recorder=RunRecorder(run_dir, tensorboard=False), say=lambda _: None,
                   compressor=compressor, downlink=downlink)
    return fed, transport


def downlink_compeft(density: float = 0.25, scale: str = "mean_abs") -> ComPEFT:
    """The downlink's compressor (conf/downlink/compeft.yaml's kind): EF21's copy, no residual."""
    return ComPEFT(density=density, scale=scale, error_feedback=False)


def test_with_the_identity_and_no_momentum_a_federation_is_fedavg(tmp_path: Path) -> None:
    # The tiny trainer ignores the drift, so each client's displacement u_k is the same in both runs, and
    # x + (c + mean_p (h_k - c_k)) = x + mean_p u_k: FedAvg's aggregate.
    plain, _ = federation(tmp_path / "plain", None)
    plain.run()
    identity = SCAFCOM(density=1.0, scale="none", momentum=1.0)
    controlled, _ = federation(tmp_path / "scafcom", identity)
    controlled.run()
    a, b = ckpt.load_checkpoint(tmp_path / "plain"), ckpt.load_checkpoint(tmp_path / "scafcom")
    assert a.adapter.keys() == b.adapter.keys()
    for key in a.adapter:
        torch.testing.assert_close(b.adapter[key], a.adapter[key], rtol=1e-5, atol=1e-5)
    assert b.control and not a.control
    acc = [(r.metrics["test_accuracy"], s.metrics["test_accuracy"])
           for r, s in zip(read_records(tmp_path / "plain"), read_records(tmp_path / "scafcom"), strict=True)]
    assert all(x == pytest.approx(y, rel=1e-5) for x, y in acc)


def test_with_the_identity_fedsa_lora_is_fedsa_lora_and_c_covers_its_shared_a_alone(tmp_path: Path) -> None:
    # zero-padded FedSA-LoRA averages what each client sends (A), so controlled averaging runs on A; B and the
    # head stay with the clients and never enter c
    from strategies.fedsa_lora import FedSALoRA

    plain, _ = federation(tmp_path / "plain", None, strategy=FedSALoRA(padding="zero"), client_eval_every=0)
    plain.run()
    identity = SCAFCOM(density=1.0, scale="none", momentum=1.0)
    controlled, transport = federation(tmp_path / "scafcom", identity, strategy=FedSALoRA(padding="zero"),
                                       client_eval_every=0)
    controlled.run()
    a, b = ckpt.load_checkpoint(tmp_path / "plain"), ckpt.load_checkpoint(tmp_path / "scafcom")
    for key in a.adapter:
        torch.testing.assert_close(b.adapter[key], a.adapter[key], rtol=1e-5, atol=1e-5)
    assert b.control and all(lm.is_lora_a_key(k) for k in b.control if b.control[k].any())
    assert all(transport.stores[c].own for c in RANKS)  # each still keeps its own B and head
    means = [(r.metrics["test_accuracy"], s.metrics["test_accuracy"])
             for r, s in zip(read_records(tmp_path / "plain"), read_records(tmp_path / "scafcom"), strict=True)]
    assert all(x == pytest.approx(y, rel=1e-5) for x, y in means)  # the clients' own models, on their own data


def test_c_stays_the_weighted_mean_of_every_clients_c_k_under_partial_participation(tmp_path: Path) -> None:
    comp = SCAFCOM(density=0.3, scale="mean_abs", momentum=0.5)
    trainer = Recording()
    fed, transport = federation(tmp_path, comp, trainer=trainer, fraction_train=0.5, num_rounds=6)
    trainer.transport = transport
    fed.run()
    records = read_records(tmp_path)
    assert all(c.status == "ok" for r in records[1:] for c in r.clients)
    assert all(len(r.clients) == 2 for r in records[1:])  # half the clients a round
    control = ckpt.load_checkpoint(tmp_path).control
    owns = [ctl.split_client_state(transport.stores[cid].kept)[0] for cid in RANKS]
    assert_c_is_the_weighted_mean(control, owns)
    # each client was sent c at its rank and trained with c - c_k, its c_k as it left its previous round
    assert len(trainer.seen) == 12
    for (_, cid), (sent, drift, own) in trainer.seen.items():
        assert lm.rank_of({k: v for k, v in sent.items() if lm.is_lora_key(k)}) == RANKS[cid]
        assert set(drift) == set(sent)
        for key, c in sent.items():
            torch.testing.assert_close(drift[key], c - own.get(key, torch.zeros_like(c)), rtol=0, atol=0)
    assert sum(bool(own) for _, _, own in trainer.seen.values()) >= 6  # most rounds ran with a c_k already formed
    # the downlink carries c: more than the start alone
    plain, _ = federation(tmp_path / "plain", ComPEFT(density=0.3, scale="mean_abs"), fraction_train=0.5, num_rounds=1)
    plain.run()
    down = [{c.client: c.bytes_down for c in r[1].clients} for r in (records, read_records(tmp_path / "plain"))]
    assert down[0].keys() == down[1].keys() and all(down[0][c] > down[1][c] for c in down[0])


def test_ef21_without_the_drift_correction_sends_no_control_and_keeps_c_the_mean_under_partial_participation(
        tmp_path: Path) -> None:
    ef21 = SCAFCOM(density=0.3, scale="mean_abs", momentum=1.0, drift_correction=False)
    trainer = Recording()
    fed, transport = federation(tmp_path / "ef21", ef21, trainer=trainer, fraction_train=0.5, num_rounds=6)
    trainer.transport = transport
    fed.run()
    assert all(not sent and not drift for sent, drift, _ in trainer.seen.values())  # no c down, no correction
    control = ckpt.load_checkpoint(tmp_path / "ef21").control
    owns = [ctl.split_client_state(transport.stores[cid].kept)[0] for cid in RANKS]
    assert_c_is_the_weighted_mean(control, owns)
    # what the server sends is the start alone: the same bytes as with ComPEFT's residual
    plain, _ = federation(tmp_path / "compeft", ComPEFT(density=0.3, scale="mean_abs"), fraction_train=0.5,
                          num_rounds=1)
    plain.run()
    down = [{c.client: c.bytes_down for c in read_records(d)[1].clients} for d in (tmp_path / "ef21",
                                                                                   tmp_path / "compeft")]
    assert down[0] == down[1]
    assert {cid for (_, cid) in trainer.seen} == set(RANKS)  # every client sat out some rounds and took part in some


def test_scallion_with_unbiased_random_k_keeps_c_the_mean_and_resumes_to_the_uninterrupted_run(
        tmp_path: Path) -> None:
    scallion = SCAFCOM(codec="rand_k", density=0.3, control_step=0.3)  # alpha = 1 / (1 + omega) = k / n
    straight, transport = federation(tmp_path / "straight", scallion, fraction_train=0.5)
    straight.run()
    control = ckpt.load_checkpoint(tmp_path / "straight").control
    owns = [ctl.split_client_state(transport.stores[cid].kept)[0] for cid in RANKS]
    assert_c_is_the_weighted_mean(control, owns)
    # the positions are drawn from (run seed, round, client): a resumed run draws the same ones
    killed = tmp_path / "killed"
    first, transport = federation(killed, scallion, fraction_train=0.5, num_rounds=2)
    first.run()
    (killed / "summary.json").unlink()
    federation(killed, scallion, fraction_train=0.5, transport=transport, resume=True)[0].run()
    assert untimed(jsonl_rows(killed)) == untimed(jsonl_rows(tmp_path / "straight"))


def test_a_malformed_reply_is_rejected_and_neither_end_counts_it(tmp_path: Path) -> None:
    # an injected malformed update travels uncompressed, as the faults config does for every method
    faults = FaultSettings(corrupt_prob=0.3, corrupt_kind="scale")
    fed, transport = federation(tmp_path, SCAFCOM(density=0.3), faults=faults, num_rounds=4)
    fed.run()
    rows = [c for r in read_records(tmp_path)[1:] for c in r.clients]
    rejected = [c for c in rows if c.status == "rejected"]
    assert rejected and all("an uncompressed update in a run with control variates" in (c.error or "")
                            for c in rejected)
    assert any(c.status == "ok" for c in rows)
    control = ckpt.load_checkpoint(tmp_path).control
    owns = [ctl.split_client_state(transport.stores[cid].kept)[0] for cid in RANKS]
    assert_c_is_the_weighted_mean(control, owns)  # the client kept its c_k, the server its c


@pytest.mark.parametrize("down", [None, "compeft"])
def test_resumed_from_a_checkpoint_equals_uninterrupted(tmp_path: Path, down: str | None) -> None:
    comp = SCAFCOM(density=0.3, scale="mean_abs", momentum=0.5)
    downlink = downlink_compeft() if down else None
    straight, _ = federation(tmp_path / "straight", comp, fraction_train=0.5, downlink=downlink)
    straight.run()
    killed = tmp_path / "killed"
    # as if stopped after round 3
    first, transport = federation(killed, comp, fraction_train=0.5, num_rounds=3, downlink=downlink)
    first.run()
    saved = ckpt.load_checkpoint(killed)
    assert saved.control  # the server's c, checkpointed
    if down:  # and its mirror of each client's copy, c included
        assert saved.views and all(any(k.startswith(dl.CONTROL) for k in view) for _, view in saved.views.values())
    (killed / "summary.json").unlink()
    # the clients kept c_k, v_k and their copies (on disk in Flower: fedlora.flower.node_worker.StateStore)
    resumed, _ = federation(killed, comp, fraction_train=0.5, transport=transport, resume=True, downlink=downlink)
    resumed.run()
    assert untimed(jsonl_rows(killed)) == untimed(jsonl_rows(tmp_path / "straight"))


# -- with a compressed downlink -------------------------------------------------------------------------
def test_with_a_compressed_downlink_c_travels_in_the_copy_and_the_server_decodes_with_the_clients_copy(
        tmp_path: Path) -> None:
    comp = SCAFCOM(density=0.3, scale="mean_abs", momentum=0.5)
    trainer = Recording()
    fed, transport = federation(tmp_path / "down", comp, trainer=trainer, fraction_train=0.5, num_rounds=6,
                                downlink=downlink_compeft())
    trainer.transport = transport
    fed.run()
    records = read_records(tmp_path / "down")
    assert all(c.status == "ok" for r in records[1:] for c in r.clients)
    # c moves by the decoded messages exactly, whatever copy of it the clients hold
    control = ckpt.load_checkpoint(tmp_path / "down").control
    owns = [ctl.split_client_state(transport.stores[cid].kept)[0] for cid in RANKS]
    assert_c_is_the_weighted_mean(control, owns)
    # every client corrected its drift with the copy of c the server decoded its reply with, bit for bit
    assert trainer.seen.keys() == fed.decoded_with.keys() and len(trainer.seen) == 12
    for key, (sent, drift, own) in trainer.seen.items():
        assert sent.keys() == fed.decoded_with[key].keys() and sent
        assert all(torch.equal(sent[k], fed.decoded_with[key][k]) for k in sent)
        for k, c in sent.items():
            torch.testing.assert_close(drift[k], c - own.get(k, torch.zeros_like(c)), rtol=0, atol=0)
    # the copy is an approximation: some client's c_hat differs from c at its rank (the exact run's)
    exact, _ = federation(tmp_path / "exact", comp, fraction_train=0.5, num_rounds=6)
    exact.run()
    assert any(not torch.equal(fed.decoded_with[key][k], exact.decoded_with[key][k])
               for key in fed.decoded_with if key in exact.decoded_with and key[0] > 2
               for k in fed.decoded_with[key] if k in exact.decoded_with[key])
    # c and the start travel compressed: fewer bytes down than SCAFCOM with the start and c as they are
    down = [{(r.round, c.client): c.bytes_down for r in read_records(d)[1:] for c in r.clients}
            for d in (tmp_path / "down", tmp_path / "exact")]
    assert down[0].keys() == down[1].keys()
    assert all(down[0][k] < down[1][k] for k in down[0] if k[0] > 1)


def test_with_an_exact_downlink_it_is_scafcom_without_one(tmp_path: Path) -> None:
    comp = SCAFCOM(density=0.3, scale="mean_abs", momentum=0.5)
    plain, _ = federation(tmp_path / "plain", comp, fraction_train=0.5)
    plain.run()
    exact, _ = federation(tmp_path / "exact", comp, fraction_train=0.5, downlink=downlink_compeft(1.0, "none"))
    exact.run()
    a, b = ckpt.load_checkpoint(tmp_path / "plain"), ckpt.load_checkpoint(tmp_path / "exact")
    for mine, theirs in ((a.adapter, b.adapter), (a.control, b.control)):
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(theirs[key], mine[key], rtol=1e-5, atol=1e-6)
    acc = [(r.metrics["test_accuracy"], s.metrics["test_accuracy"])
           for r, s in zip(read_records(tmp_path / "plain"), read_records(tmp_path / "exact"), strict=True)]
    assert all(x == pytest.approx(y, rel=1e-5) for x, y in acc)


def test_ef21_with_a_compressed_downlink_sends_no_control_in_the_copy(tmp_path: Path) -> None:
    ef21 = SCAFCOM(density=0.3, scale="mean_abs", drift_correction=False)
    trainer = Recording()
    fed, transport = federation(tmp_path, ef21, trainer=trainer, fraction_train=0.5, num_rounds=4,
                                downlink=downlink_compeft())
    trainer.transport = transport
    fed.run()
    assert all(not sent and not drift for sent, drift, _ in trainer.seen.values())
    saved = ckpt.load_checkpoint(tmp_path)
    assert saved.views and all(not any(k.startswith(dl.CONTROL) for k in view) for _, view in saved.views.values())
    owns = [ctl.split_client_state(transport.stores[cid].kept)[0] for cid in RANKS]
    assert_c_is_the_weighted_mean(saved.control, owns)


# -- what it refuses before anything starts ------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "field", "fix"), [
    (["strategy=flora"], "strategy='FLoRA'", "use a linear strategy (fedavg, ffa_lora, rolora)"),
    (["strategy=lora_fair"], "strategy='LoRAFAIR'", "or compression=compeft"),
    (["privacy=dp_sgd"], "privacy.kind='dp_sgd'", "use compression=compeft with differential privacy"),
    (["privacy=dp_fedavg"], "privacy.kind='dp_fedavg'", "use compression=compeft with differential privacy"),
    (["participation=bernoulli", "participation.fedau=true"], "participation.fedau=True", "turn one of them off"),
    (["compression.scale=std"], "compression", "compression.scale='std' is not contractive"),
    (["compression.momentum=0"], "compression", "compression.momentum=0 must be a number in (0, 1]"),
])
def test_what_scafcom_cannot_run_with_is_refused_before_anything_starts(overrides: list[str], field: str,
                                                                        fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose(["compression=scafcom", *overrides]), check_model=False, check_data=False)
    assert field in str(info.value) and fix in str(info.value), str(info.value)


@pytest.mark.parametrize("strategy", ["fedavg", "ffa_lora", "rolora"])
@pytest.mark.parametrize("compression", ["scafcom", "ef21", "scallion"])
def test_the_linear_strategies_are_accepted(strategy: str, compression: str) -> None:
    validate(compose([f"compression={compression}", f"strategy={strategy}"]), check_model=False, check_data=False)
    if strategy != "rolora":  # whose frozen factor must be the global one (tests/strategies/test_rolora.py)
        validate(compose([f"compression={compression}", f"strategy={strategy}", "downlink=compeft"]),
                 check_model=False, check_data=False)
