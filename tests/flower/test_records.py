"""Wire packets survive Flower's records exactly; message sizes are what Flower serializes."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedlora.core import lora_math as lm
from fedlora.core.types import LoraPair
from fedlora.federation import keys, wire
from fedlora.flower import records


def _packet() -> wire.Packet:
    state = {"m.lora_A.weight": torch.randn(3, 5), "m.lora_B.weight": torch.randn(4, 3), "head.bias": torch.randn(2)}
    merges = [(0, {"m": LoraPair(torch.randn(2, 5), torch.randn(4, 2))})]
    return wire.Packet(
        arrays={keys.ADAPTER: wire.to_arrays(state), keys.BASE: wire.to_arrays(lm.merges_to_tensors(merges)),
                "payload": {"bits": np.arange(10, dtype=np.uint8), "scale": np.array([0.5], dtype=np.float32)}},
        config={keys.SERVER_ROUND: 3, keys.FRESH: True, keys.LABEL_NAMES: ["a", "b"]},
        metrics={keys.TRAIN_LOSS: 0.25, keys.NUM_EXAMPLES: 7})


def test_a_packet_survives_records_and_protobuf_exactly() -> None:
    packet = _packet()
    content = records.to_content(packet)
    back = records.to_packet(recorddict_from_proto(recorddict_to_proto(content)))  # what the other end gets
    assert back.config == packet.config and back.metrics == packet.metrics
    assert list(back.arrays) == list(packet.arrays)
    for name, arrays in packet.arrays.items():
        assert list(back.arrays[name]) == list(arrays)
        for key, value in arrays.items():
            got = back.arrays[name][key]
            assert got.dtype == value.dtype and np.array_equal(got, value), (name, key)
    assert isinstance(back.metrics[keys.NUM_EXAMPLES], int) and isinstance(back.config[keys.FRESH], bool)


def test_merges_on_the_wire_come_back_in_order() -> None:
    merges = [(1, {"m": LoraPair(torch.randn(6, 5), torch.randn(4, 6))}),
              (0, {"m": LoraPair(torch.randn(2, 5), torch.randn(4, 2))})]
    arrays = records.record_to_arrays(records.arrays_to_record(wire.to_arrays(lm.merges_to_tensors(merges))))
    back = lm.tensors_to_merges(wire.to_tensors(arrays))
    assert [i for i, _ in back] == [0, 1]
    assert torch.equal(back[1][1]["m"].a, merges[0][1]["m"].a) and torch.equal(back[1][1]["m"].b, merges[0][1]["m"].b)


def test_content_bytes_counts_the_serialized_payload() -> None:
    packet = wire.Packet(arrays={"adapter": {"w": np.zeros(1000, dtype=np.float32)}})
    size = records.content_bytes(records.to_content(packet))
    assert 4000 <= size < 4000 + 400  # 4 bytes per float32 plus a small protobuf envelope
    assert records.content_bytes(RecordDict()) == 0


def test_a_stopped_run_stops_waiting_at_once() -> None:
    # Nobody ever answers; the stop event (Ctrl-C, a failed engine) must end the waits well before
    # round_timeout or connect_timeout.
    import threading
    import time

    from fedlora.flower.grid import GridTransport

    class Silent:
        def get_node_ids(self) -> list[int]:
            return []

        def push_messages(self, messages: list) -> list[str]:
            return ["m-1"]

        def pull_messages(self, ids: set) -> list:
            return []

    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    transport = GridTransport(Silent(), stop)  # type: ignore[arg-type]
    t0 = time.monotonic()
    assert transport.send_and_receive([], timeout=600) == []
    assert transport.connect(3, ("a",), timeout=600) == {}
    assert time.monotonic() - t0 < 5


def test_a_compressed_reply_costs_little_more_than_its_coded_data() -> None:
    # The default task's reply at rank 8 (12 adapted 384 x 384 projections, a 5-label head), ComPEFT at
    # density 0.1: the serialized message is within 20% of the coded positions, signs and scales (the
    # int64 headers, length tables and one Flower array per field made it 1.8x: 10034 bytes for 5590)
    from fedlora.compression.compeft import ComPEFT

    g = torch.Generator().manual_seed(0)
    delta = {"classifier.weight": torch.randn(5, 384, generator=g), "classifier.bias": torch.randn(5, generator=g)}
    for layer in range(6):
        for proj in ("query", "value"):
            delta[f"l{layer}.{proj}.lora_A.weight"] = torch.randn(8, 384, generator=g)
            delta[f"l{layer}.{proj}.lora_B.weight"] = torch.randn(384, 8, generator=g)
    payload, _ = ComPEFT(density=0.1).compress(delta, None)
    report = wire.Report(num_examples=178, train_loss=1.0, train_seconds=1.0, rank=8, base_version=0)
    sent = records.content_bytes(records.to_content(wire.encode_compressed(payload, sorted(delta), report)))
    coded = sum(a.nbytes for k, a in payload.items() if not k.endswith("|hdr"))
    headers = sum(a.nbytes for k, a in payload.items() if k.endswith("|hdr"))
    assert headers <= 14 * len(delta)
    assert coded < sent <= 1.2 * coded, (sent, coded)
    plain = records.content_bytes(records.to_content(wire.encode_update(delta, report)))
    assert plain / sent > 45  # 55x for the coded data alone
