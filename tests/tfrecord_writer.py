"""TFRecord writing for the tests and benchmarks: the reader lives in shardkit.ingest.

Encodes ``tf.train.Example`` records and frames them as TensorFlow does, so tests can
build TFRecord files without TensorFlow; :func:`reference_crc32c` is a plain bitwise
CRC-32C to check the library one against.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from shardkit.ingest.tfrecord import masked_crc32c

_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _byte_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _byte_table()


def reference_crc32c(data: bytes) -> int:
    """CRC-32C, one table lookup per byte: slow, but independent of the library."""
    state = 0xFFFFFFFF
    for byte in data:
        state = _TABLE[(state ^ byte) & 0xFF] ^ (state >> 8)
    return state ^ 0xFFFFFFFF


def enc_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def delimited(field: int, payload: bytes) -> bytes:
    return enc_varint(field << 3 | 2) + enc_varint(len(payload)) + payload


def encode_feature(value: Any) -> bytes:
    """A serialized ``tf.train.Feature`` for bytes/str, int or float (or a list of one kind)."""
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not values:
        return delimited(1, b"")
    first = values[0]
    if isinstance(first, (bytes, bytearray, memoryview, str)):
        items = (v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values)
        return delimited(1, b"".join(delimited(1, v) for v in items))
    if isinstance(first, (bool, int, np.integer)):
        return delimited(3, delimited(1, b"".join(enc_varint(int(v)) for v in values)))
    if isinstance(first, (float, np.floating)):
        return delimited(2, delimited(1, struct.pack(f"<{len(values)}f", *values)))
    raise TypeError(f"cannot encode a {type(first).__name__} as a tf.train.Feature")


def encode_example(features: Mapping[str, Any]) -> bytes:
    """A serialized ``tf.train.Example`` from ``{name: value or list of values}``."""
    entries = b"".join(
        delimited(1, delimited(1, name.encode("utf-8")) + delimited(2, encode_feature(value)))
        for name, value in features.items()
    )
    return delimited(1, entries)


def write_tfrecord(path: str, examples: Iterable[Mapping[str, Any] | bytes]) -> int:
    """Write ``examples`` (feature dicts, or already serialized records) to a TFRecord
    file readable by TensorFlow; returns the record count.

    >>> write_tfrecord("x.tfrecord", [{"image/encoded": jpeg, "image/class/label": 3}])
    """
    count = 0
    with open(path, "wb") as f:
        for example in examples:
            data = bytes(example) if isinstance(example, (bytes, bytearray, memoryview)) else encode_example(example)
            f.write(frame_record(data))
            count += 1
    return count


def frame_record(data: bytes) -> bytes:
    """One TFRecord record (length, CRCs and data) for ``data``."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))
