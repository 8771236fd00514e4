"""Wire packets as Flower records and back, one to one, and the size of a message as Flower sends it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedlora.federation import keys

if TYPE_CHECKING:  # the wire codec loads torch: the node worker's forwarding ClientApp imports this module
    from fedlora.federation.wire import Packet


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Numpy arrays (any dtype) as an ``ArrayRecord`` (names and order kept)."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ``ArrayRecord`` as numpy arrays (copies)."""
    return {k: np.array(arr.numpy(), copy=True) for k, arr in record.items()}


def to_content(packet: Packet) -> RecordDict:
    """A packet as a message's content: its array records, then ``config`` and ``metrics`` when set."""
    content = RecordDict({name: arrays_to_record(arrays) for name, arrays in packet.arrays.items()})
    if packet.config:
        content[keys.CONFIG] = ConfigRecord(dict(packet.config))
    if packet.metrics:
        content[keys.METRICS] = MetricRecord(dict(packet.metrics))
    return content


def to_packet(content: RecordDict) -> Packet:
    """A message's content as a packet: every array record by name, config and metric entries merged."""
    from fedlora.federation.wire import Packet  # noqa: PLC0415

    packet = Packet()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            packet.arrays[name] = record_to_arrays(record)
        elif isinstance(record, ConfigRecord):
            packet.config.update(dict(record))
        elif isinstance(record, MetricRecord):
            packet.metrics.update(dict(record))
    return packet


def content_bytes(content: RecordDict) -> int:
    """The size in bytes of a message's content as Flower serializes it (protobuf)."""
    return int(recorddict_to_proto(content).ByteSize())
