"""The wire codec: both ends hold the same start adapter, only what must travel travels, bad replies are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from federation_kit import MODULES, TinyTrainer

from fedlora.compression.compeft import ComPEFT
from fedlora.core import lora_math as lm
from fedlora.core.types import LoraPair
from fedlora.federation import keys, wire
from fedlora.federation.client import ClientSide, MemoryStore, train_round
from strategies.fedavg import FedAvg
from strategies.ffa_lora import FFALoRA
from strategies.flora import FLoRA
from strategies.rolora import RoLoRA

STRATEGIES = {"fedavg": FedAvg, "flora": FLoRA, "ffa_lora": FFALoRA, "rolora": RoLoRA}


def assignment(name: str, rank: int = 4, merges: tuple = (), server_round: int = 3) -> wire.Assignment:
    strategy = STRATEGIES[name]()
    init = strategy.init(TinyTrainer.spec(8), 7)
    plan = strategy.plan(init.adapter, init.state, client_id=1, rank=rank, server_round=server_round, seed=7)
    return wire.Assignment(server_round, plan, lm.plan_start(plan, MODULES), merges, resume_round=2)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_the_client_rebuilds_the_servers_start_bit_for_bit(name: str) -> None:
    merge = {"enc.q": LoraPair(torch.randn(3, 6), torch.randn(8, 3))}
    sent = assignment(name, merges=((0, merge),))
    got = wire.decode_assignment(wire.encode_assignment(sent), MODULES)
    assert got.server_round == 3 and got.resume_round == 2 and got.plan.rank == 4
    assert (got.plan.init_seed, got.plan.train_lora_a, got.plan.train_lora_b, got.plan.send_lora_a) == (
        sent.plan.init_seed, sent.plan.train_lora_a, sent.plan.train_lora_b, sent.plan.send_lora_a)
    assert (got.plan.adapter is None) == (sent.plan.adapter is None)
    assert got.start.keys() == sent.start.keys()
    assert all(torch.equal(got.start[k], sent.start[k]) for k in sent.start)
    ((index, back),) = got.merges
    assert index == 0 and torch.equal(back["enc.q"].a, merge["enc.q"].a)
    assert torch.equal(back["enc.q"].b, merge["enc.q"].b)


def test_only_what_the_client_cannot_rebuild_goes_down() -> None:
    head = sorted(k for k in assignment("fedavg").start if not lm.is_lora_key(k))
    down = {name: sorted(wire.encode_assignment(assignment(name)).arrays[keys.ADAPTER]) for name in STRATEGIES}
    assert down["flora"] == head  # fresh factors: drawn on the client from the seed
    assert down["ffa_lora"] == sorted(head + [lm.lora_b_key(m) for m in MODULES])  # A regenerated
    assert down["fedavg"] == sorted(assignment("fedavg").start)
    assert wire.uplink_keys(assignment("ffa_lora").plan, assignment("ffa_lora").start) == down["ffa_lora"]
    assert wire.uplink_keys(assignment("flora").plan, assignment("flora").start) == sorted(assignment("flora").start)
    # RoLoRA: both factors down (neither is a function of the seed), only the trained one up
    assert down["rolora"] == sorted(assignment("rolora").start)
    b_round, a_round = assignment("rolora", server_round=3), assignment("rolora", server_round=4)
    assert wire.uplink_keys(b_round.plan, b_round.start) == sorted(head + [lm.lora_b_key(m) for m in MODULES])
    assert wire.uplink_keys(a_round.plan, a_round.start) == sorted(head + [lm.lora_a_key(m) for m in MODULES])


def test_the_train_lora_b_flag_travels_only_when_b_is_frozen() -> None:
    # absent means "train B", so the messages of every other strategy are unchanged byte for byte
    assert keys.TRAIN_LORA_B not in wire.encode_assignment(assignment("fedavg")).config
    assert wire.decode_assignment(wire.encode_assignment(assignment("fedavg")), MODULES).plan.train_lora_b is True
    a_round = wire.encode_assignment(assignment("rolora", server_round=4))
    assert a_round.config[keys.TRAIN_LORA_B] is False
    assert wire.decode_assignment(a_round, MODULES).plan.train_lora_b is False


def test_client_level_dp_under_secure_aggregation_sends_the_reference_the_clip_and_the_weight() -> None:
    import dataclasses

    plain = assignment("fedavg")
    reference = {k: torch.randn(8, 6) for k in ("x",)}
    dp = dataclasses.replace(plain, secure_rank=8, secure_seed=5, secure_weight=512, clip_reference=reference, clip=0.3)
    got = wire.decode_assignment(wire.encode_assignment(dp), MODULES)
    assert (got.secure_rank, got.secure_seed, got.secure_weight, got.clip) == (8, 5, 512, 0.3)
    assert got.clip_reference is not None and torch.equal(got.clip_reference["x"], reference["x"])
    # absent from every other round's message
    packet = wire.encode_assignment(plain)
    assert keys.CLIP_REFERENCE not in packet.arrays and keys.DP_CLIP not in packet.config
    back = wire.decode_assignment(packet, MODULES)
    assert back.clip_reference is None and back.secure_weight == 0
    report = wire.Report(num_examples=30, train_loss=0.5, train_seconds=1.0)
    assert wire.encode_secure(torch.zeros(3), report, 512).metrics[keys.SECURE_WEIGHT] == 512
    assert keys.SECURE_WEIGHT not in wire.encode_secure(torch.zeros(3), report).metrics


def test_a_client_reply_decodes_to_what_it_trained() -> None:
    a = assignment("fedavg")
    trained, _ = TinyTrainer().train(1, a, [])
    reply = train_round(wire.encode_assignment(a), 1, ClientSide(trainer=TinyTrainer()), MemoryStore())
    received, report = wire.decode_reply(reply, a, None)
    assert all(torch.equal(received[k], trained[k]) for k in trained)
    assert (report.num_examples, report.rank, report.base_version) == (20, 4, 0)
    assert report.train_loss == pytest.approx(1 / 3 + 0.01) and report.train_seconds >= 0


def test_a_compressed_reply_decodes_onto_the_start() -> None:
    a = assignment("fedavg")
    exact = ComPEFT(density=1.0, scale="none")
    reply = train_round(wire.encode_assignment(a), 1, ClientSide(trainer=TinyTrainer(), compressor=exact),
                        MemoryStore())
    assert list(reply.arrays) == [keys.COMPRESSED]
    received, _ = wire.decode_reply(reply, a, exact)
    trained, _ = TinyTrainer().train(1, a, [])
    assert all(torch.allclose(received[k], trained[k], atol=1e-6) for k in trained)


def test_undecodable_replies_are_named() -> None:
    a = assignment("fedavg")
    with pytest.raises(wire.WireError, match=r"malformed reply: records \['config'\]; expected an adapter"):
        wire.decode_reply(wire.Packet(config={"x": 1}), a, None)
    compressed = wire.Packet(arrays={keys.COMPRESSED: {}}, metrics={keys.NUM_EXAMPLES: 1})
    with pytest.raises(wire.WireError, match="cannot decode the update: ValueError: a compressed update, but"):
        wire.decode_reply(compressed, a, None)
    no_loss = wire.encode_update(a.start, wire.Report(1, 0.5, 0.1))
    del no_loss.metrics[keys.TRAIN_LOSS]
    with pytest.raises(wire.WireError, match="cannot decode the update: KeyError: 'train-loss'"):
        wire.decode_reply(no_loss, a, None)


def test_complete_fills_in_only_what_stayed_on_the_client() -> None:
    a = assignment("ffa_lora")
    b_only = {k: v + 1 for k, v in a.start.items() if not lm.is_lora_a_key(k)}
    state = wire.complete(b_only, a.start)
    assert all(torch.equal(state[lm.lora_a_key(m)], a.start[lm.lora_a_key(m)]) for m in MODULES)
    assert all(torch.equal(state[k], v) for k, v in b_only.items())


def test_hello_both_ways() -> None:
    assert wire.decode_hello(wire.encode_hello(("a", "b"))) == ("a", "b")
    assert wire.decode_hello(wire.Packet()) is None
    assert wire.decode_hello_reply(wire.encode_hello_reply(3, 8, 120)) == (3, 8, 120)


def test_payload_packing_round_trip_and_fingerprint() -> None:
    payload = {"a|hdr": np.arange(4, dtype=np.int64), "a|sign": np.array([1, 2], dtype=np.uint8),
               "b|hdr": np.arange(3, dtype=np.int64)}
    packed = wire.pack_payload(payload, ["a", "b"])
    back = wire.unpack_payload(packed, ["a", "b"])
    assert set(back) == {"a|hdr", "a|sign", "b|hdr", "b|sign"}
    assert all(np.array_equal(back[k], payload[k]) for k in payload) and back["b|sign"].size == 0
    with pytest.raises(ValueError, match="other tensors"):
        wire.unpack_payload(packed, ["a", "c"])


def test_a_packed_payload_is_one_byte_array_that_keeps_every_dtype() -> None:
    rng = np.random.default_rng(0)
    payload = {"a|val": rng.standard_normal(5).astype(np.float32), "a|wide": np.array([2**40, 7], dtype=np.int64),
               "b|val": rng.standard_normal(3).astype(np.float32), "b|bits": np.array([255, 0, 9], dtype=np.uint8),
               "c|val": np.zeros(0, dtype=np.float32), "c|f64": np.array([np.pi])}
    names = ["a", "b", "c"]
    packed = wire.pack_payload(payload, names)
    assert list(packed) == ["packed"] and packed["packed"].dtype == np.uint8
    back = wire.unpack_payload(packed, names)
    for key, arr in payload.items():
        assert back[key].dtype == arr.dtype and np.array_equal(back[key], arr), key
        back[key][...] = 0  # writable copies, not views of the message
    assert back["a|bits"].size == 0 and back["c|wide"].dtype == np.int64
    # the framing costs what it carries: data + a few bytes per field and tensor
    data = sum(a.nbytes for a in payload.values())
    assert data < packed["packed"].size <= data + 60


@pytest.mark.parametrize("damage", ["truncated", "trailing", "format", "two_arrays"])
def test_a_damaged_packed_payload_is_refused_with_the_reason(damage: str) -> None:
    names = ["a", "b"]
    payload = {"a|x": np.arange(4, dtype=np.int64), "b|x": np.arange(2, dtype=np.int64)}
    blob = wire.pack_payload(payload, names)["packed"]
    bad = {"truncated": {"packed": blob[:-3]}, "trailing": {"packed": np.concatenate([blob, blob[:2]])},
           "format": {"packed": np.concatenate([[9], blob[1:]]).astype(np.uint8)},
           "two_arrays": {"packed": blob, "_lengths": blob}}[damage]
    reason = {"truncated": "ends at byte", "trailing": "after its last field", "format": "format 9",
              "two_arrays": "one array"}[damage]
    with pytest.raises(ValueError, match=reason):
        wire.unpack_payload(bad, names)


def test_packing_refuses_what_it_cannot_frame() -> None:
    with pytest.raises(ValueError, match="dtypes"):
        wire.pack_payload({"a|x": np.zeros(2, np.float32), "b|x": np.zeros(2, np.float64)}, ["a", "b"])
    with pytest.raises(ValueError, match="not among"):
        wire.pack_payload({"z|x": np.zeros(2, np.float32)}, ["a", "b"])
