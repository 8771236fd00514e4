"""Conversions between adapter states / payloads and Flower records, and message sizes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedlora.types import AdapterState, BaseMerge


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack an adapter state (float32 CPU tensors) into an ``ArrayRecord`` (keys kept)."""
    return ArrayRecord(OrderedDict((k, Array(v.detach().cpu().contiguous().numpy())) for k, v in state.items()))


def record_to_state(record: ArrayRecord) -> AdapterState:
    """Unpack an ``ArrayRecord`` into float32 tensors."""
    return {k: torch.from_numpy(np.array(arr.numpy(), copy=True)) for k, arr in record.items()}


def numpy_to_record(payload: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack an encoded payload (numpy arrays of any dtype) into an ``ArrayRecord``."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in payload.items()))


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ``ArrayRecord`` into numpy arrays."""
    return {k: np.array(arr.numpy(), copy=True) for k, arr in record.items()}


def merges_to_record(merges: Sequence[tuple[int, BaseMerge]]) -> ArrayRecord:
    """Pack indexed factored merges as ``"<index>|<module>|B"`` and ``"...|A"`` arrays."""
    out: OrderedDict[str, Array] = OrderedDict()
    for index, merge in merges:
        for module, (b, a) in merge.items():
            out[f"{index}|{module}|B"] = Array(b.detach().cpu().contiguous().numpy())
            out[f"{index}|{module}|A"] = Array(a.detach().cpu().contiguous().numpy())
    return ArrayRecord(out)


def record_to_merges(record: ArrayRecord) -> list[tuple[int, BaseMerge]]:
    """Inverse of :func:`merges_to_record`, sorted by index."""
    by_index: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, arr in record.items():
        index, module, factor = key.split("|")
        tensor = torch.from_numpy(np.array(arr.numpy(), copy=True))
        by_index.setdefault(int(index), {}).setdefault(module, {})[factor] = tensor
    return [
        (i, {m: (f["B"], f["A"]) for m, f in sorted(mods.items())}) for i, mods in sorted(by_index.items())
    ]


def content_bytes(content: RecordDict) -> int:
    """Return the size in bytes of a message's content as Flower serializes it (protobuf)."""
    return int(recorddict_to_proto(content).ByteSize())
