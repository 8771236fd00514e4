"""Conversions between adapter states / payloads and Flower records, and message sizes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedlora.core.types import AdapterState, BaseMerge


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


_FIELD_SEP = "|"


def _keys_fingerprint(keys: Sequence[str]) -> int:
    import zlib  # noqa: PLC0415

    return zlib.crc32("\n".join(keys).encode())


def pack_payload(payload: Mapping[str, np.ndarray], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Pack a per-tensor payload ``{"<key>|<field>": array}`` into one array per field.

    Long tensor names would otherwise travel once per array (Flower's envelope per array is
    ~100 bytes plus the name), which for a small compressed adapter costs more than the data.
    Both sides know ``keys`` (the sorted names of the tensors sent), so only the per-field
    lengths and a fingerprint of the key list travel.
    """
    fields = sorted({name.rpartition(_FIELD_SEP)[2] for name in payload})
    packed: dict[str, np.ndarray] = {}
    lengths = np.zeros((len(keys), len(fields)), dtype=np.int64)
    for j, field in enumerate(fields):
        parts = []
        for i, key in enumerate(keys):
            arr = payload.get(f"{key}{_FIELD_SEP}{field}")
            if arr is not None:
                lengths[i, j] = arr.size
                parts.append(np.ravel(arr))
        packed[field] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    packed["_lengths"] = lengths
    packed["_meta"] = np.array([len(keys), _keys_fingerprint(keys)], dtype=np.int64)
    packed["_fields"] = np.frombuffer(",".join(fields).encode(), dtype=np.uint8).copy()
    return packed


def unpack_payload(packed: Mapping[str, np.ndarray], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_payload` given the same ``keys``."""
    n, fingerprint = (int(x) for x in packed["_meta"])
    if n != len(keys) or fingerprint != _keys_fingerprint(keys):
        raise ValueError(f"packed payload is for {n} other tensors than the {len(keys)} expected")
    fields = bytes(packed["_fields"]).decode().split(",") if packed["_fields"].size else []
    lengths = packed["_lengths"]
    out: dict[str, np.ndarray] = {}
    for j, field in enumerate(fields):
        offsets = np.concatenate([[0], np.cumsum(lengths[:, j])])
        for i, key in enumerate(keys):
            out[f"{key}{_FIELD_SEP}{field}"] = packed[field][offsets[i]:offsets[i + 1]]
    return out
