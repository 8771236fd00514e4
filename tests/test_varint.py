"""Unsigned LEB128 varints (fedlora.core.varint) against hand-written bytes and Python's own arithmetic."""

from __future__ import annotations

import random

import pytest

from fedlora.core import varint


def test_known_encodings() -> None:
    # the protobuf documentation's examples: 1 -> 01, 150 -> 96 01; and the byte-length boundaries
    assert varint.encode([1]) == b"\x01"
    assert varint.encode([150]) == b"\x96\x01"
    assert varint.encode([0, 127, 128, 16383, 16384]) == b"\x00\x7f\x80\x01\xff\x7f\x80\x80\x01"


def test_round_trip_and_lengths() -> None:
    rng = random.Random(0)
    values = [0, 1, 127, 128, 2**21 - 1, 2**21, 2**32, 2**63 - 1, 2**64 + 5]
    values += [rng.randrange(0, 2 ** rng.randrange(1, 70)) for _ in range(2000)]
    blob = varint.encode(values)
    got, end = varint.decode(blob, len(values))
    assert got == values and end == len(blob)
    for v in values[:9]:
        assert len(varint.encode([v])) == max(1, -(-v.bit_length() // 7))


def test_decode_from_an_offset_and_its_errors() -> None:
    blob = b"xy" + varint.encode([300, 5])
    assert varint.decode(blob, 2, offset=2) == ([300, 5], len(blob))
    with pytest.raises(ValueError, match="ends at byte"):
        varint.decode(blob, 3, offset=2)  # one value more than there is
    with pytest.raises(ValueError, match="ends at byte"):
        varint.decode(b"\x80", 1)  # cut inside a varint
    with pytest.raises(ValueError, match="negative"):
        varint.encode([3, -1])
