"""Just enough protobuf to read a ``tf.train.Example`` without TensorFlow or protobuf.

``Example`` = ``Features features = 1`` -> ``map<string, Feature> feature = 1`` ->
``Feature`` = oneof ``BytesList bytes_list = 1``, ``FloatList float_list = 2``,
``Int64List int64_list = 3``, each ``repeated ... value = 1`` (packed or not).
Fields are read as memoryview slices of the record, so values are copied once.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    byte = buf[pos]
    if byte < 0x80:
        return byte, pos + 1
    result, shift = byte & 0x7F, 7
    pos += 1
    while True:
        byte = buf[pos]  # IndexError on truncation, turned into a parse error by callers
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)``: int for varints, memoryview otherwise."""
    pos, end = 0, len(buf)
    value: Any
    while pos < end:
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value = buf[pos : pos + size]
            pos += size
        elif wire == 1:
            value = buf[pos : pos + 8]
            pos += 8
        elif wire == 5:
            value = buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("field runs past the end of its message")
        yield tag >> 3, wire, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_feature(buf: memoryview) -> list[Any]:
    for field, wire, value in _fields(buf):
        if wire != 2:
            continue
        if field == 1:  # BytesList
            return [bytes(v) for f, w, v in _fields(value) if f == 1 and w == 2]
        if field == 2:  # FloatList
            floats: list[float] = []
            for f, w, v in _fields(value):
                if f == 1 and w == 2:
                    floats.extend(struct.unpack(f"<{len(v) // 4}f", v[: len(v) // 4 * 4]))
                elif f == 1 and w == 5:
                    floats.append(struct.unpack("<f", v)[0])
            return floats
        if field == 3:  # Int64List
            ints: list[int] = []
            for f, w, v in _fields(value):
                if f == 1 and w == 2:
                    pos = 0
                    while pos < len(v):
                        item, pos = _varint(v, pos)
                        ints.append(_signed(item))
                elif f == 1 and w == 0:
                    ints.append(_signed(v))
            return ints
    return []  # a Feature with no kind set


def parse_example(data: bytes | memoryview) -> dict[str, list[Any]]:
    """Features of a serialized ``tf.train.Example`` as ``{name: [values]}``.

    Raises ValueError on malformed protobuf.
    """
    features: dict[str, list[Any]] = {}
    try:
        for field, wire, value in _fields(memoryview(data)):
            if field != 1 or wire != 2:
                continue
            for f2, w2, entry in _fields(value):
                if f2 != 1 or w2 != 2:
                    continue
                name, feature = "", None
                for f3, w3, v3 in _fields(entry):
                    if f3 == 1 and w3 == 2:
                        name = bytes(v3).decode("utf-8")
                    elif f3 == 2 and w3 == 2:
                        feature = v3
                features[name] = _parse_feature(feature) if feature is not None else []
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"malformed tf.train.Example ({e})") from None
    return features
