"""Unsigned LEB128 varints: small non-negative integers in as few bytes as they need (stdlib only).

Seven bits per byte, least significant group first, the high bit set on every byte but the last
(the encoding protobuf uses for its own integers): 0..127 take one byte, up to 16383 two, up to
2**21 - 1 three. Used for the headers and length tables of compressed payloads
(:mod:`fedlora.compression.compeft`, :func:`fedlora.federation.wire.pack_payload`), where int64
fields cost more than the coded data of a small tensor.
"""

from __future__ import annotations

from collections.abc import Iterable


def encode(values: Iterable[int]) -> bytes:
    """The varints of ``values`` back to back.

    Raises
    ------
    ValueError
        On a negative value (these varints are unsigned).
    """
    out = bytearray()
    for value in values:
        v = int(value)
        if v < 0:
            raise ValueError(f"varint: {v} is negative; only non-negative integers are encoded")
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def decode(buffer: bytes | bytearray | memoryview, count: int, offset: int = 0) -> tuple[list[int], int]:
    """``count`` varints read from ``buffer`` at ``offset``; returns them and the offset after the last.

    Raises
    ------
    ValueError
        When the buffer ends inside a varint or before ``count`` of them.
    """
    data = memoryview(buffer)
    values: list[int] = []
    pos = offset
    for _ in range(count):
        value, shift = 0, 0
        while True:
            if pos >= len(data):
                raise ValueError(f"varint: the buffer ends at byte {pos} after {len(values)} of {count} values")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        values.append(value)
    return values, pos
