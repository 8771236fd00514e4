"""Adapter states and merges survive Flower's records; message sizes are measured."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict

from fedlora.flower import records


def test_state_round_trip_is_exact() -> None:
    state = {"m.lora_A.weight": torch.randn(3, 5), "m.lora_B.weight": torch.randn(4, 3), "head.bias": torch.randn(2)}
    back = records.record_to_state(records.state_to_record(state))
    assert list(back) == list(state)
    for key in state:
        assert torch.equal(back[key], state[key])


def test_merges_round_trip_is_exact_and_ordered() -> None:
    merges = [(1, {"m": (torch.randn(4, 6), torch.randn(6, 5))}), (0, {"m": (torch.randn(4, 2), torch.randn(2, 5))})]
    back = records.record_to_merges(records.merges_to_record(merges))
    assert [i for i, _ in back] == [0, 1]
    assert torch.equal(back[1][1]["m"][0], merges[0][1]["m"][0])


def test_numpy_payload_round_trip() -> None:
    payload = {"k|bits": np.arange(10, dtype=np.uint8), "k|scale": np.array([0.5], dtype=np.float32)}
    back = records.record_to_numpy(records.numpy_to_record(payload))
    assert back["k|bits"].dtype == np.uint8 and np.array_equal(back["k|bits"], payload["k|bits"])


def test_content_bytes_counts_the_serialized_payload() -> None:
    state = {"w": torch.zeros(1000)}
    size = records.content_bytes(RecordDict({"adapter": records.state_to_record(state)}))
    assert 4000 <= size < 4000 + 400  # 4 bytes per float32 plus a small protobuf envelope
