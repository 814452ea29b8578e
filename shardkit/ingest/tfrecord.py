"""TFRecord source, without TensorFlow: record framing, CRC checks, samples from records.

Record framing (little-endian)::

    uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with ``masked(c) = ((c >> 15) | (c << 17)) + 0xA282EAD8 (mod 2**32)``. Both CRCs are
checked; a bad CRC or a truncated record is an error naming the file, the record number
and its byte offset. GZIP-compressed files (``tf.io.TFRecordOptions("GZIP")``) are read
transparently; ZLIB-compressed ones are not supported.

Each record is a ``tf.train.Example``, parsed by :mod:`shardkit.ingest.protobuf`.
The image is the first value of ``options.image_feature`` (default
``image/encoded``, else ``image``), the label that of ``options.label_feature`` (default
``image/class/label``, else ``label``). Other small features (e.g. ``image/filename``)
are kept under ``json.features``. SequenceExample records are not supported.

CRC32C comes from ``google_crc32c`` (a C extension); the standard library has no CRC-32C.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Iterator
from typing import IO, Any

import google_crc32c

from ..errors import ShardkitError
from . import IngestOptions
from .common import RecordSkipper, image_payload, make_sample
from .protobuf import parse_example

log = logging.getLogger(__name__)

FORMAT = "tfrecord"
SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec")
_GZIP_MAGIC = b"\x1f\x8b"
_IMAGE_FEATURES = ("image/encoded", "image")
_LABEL_FEATURES = ("image/class/label", "label")
_META_LIMIT = 1024  # bytes of small features copied into json.features per record


# -- CRC32C (Castagnoli) ----------------------------------------------------------------

_MASK_DELTA = 0xA282EAD8


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``crc`` (the result for earlier bytes)."""
    # google_crc32c takes bytes only; bytes(data) is free when data already is bytes.
    return google_crc32c.extend(crc, bytes(data))


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """The masked CRC TFRecord stores (a CRC of CRC-bearing data stays meaningful)."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# -- record framing -----------------------------------------------------------------------


def _open(path: str) -> IO[bytes]:
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else open(path, "rb")  # type: ignore[return-value]  # noqa: SIM115


def _error(path: str, number: int, offset: int, message: str) -> ShardkitError:
    return ShardkitError(f"{path}: record {number} (byte offset {offset}): {message}")


def iter_records(path: str, *, verify: bool = True) -> Iterator[tuple[int, int, memoryview]]:
    """``(record number, byte offset, data)`` for each record of a TFRecord file.

    ``verify=False`` skips the CRC checks (what most PyTorch TFRecord readers do).
    Offsets are in the uncompressed stream for GZIP files.
    """
    with _open(path) as f:
        size = os.path.getsize(path) if not isinstance(f, gzip.GzipFile) else None
        number = offset = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise _error(
                    path,
                    number,
                    offset,
                    f"truncated: the file ends inside the record header ({len(header)} of 12 bytes)",
                )
            length, length_crc = struct.unpack("<QI", header)
            if verify and masked_crc32c(header[:8]) != length_crc:
                raise _error(path, number, offset, "bad length CRC: the file is corrupt or not a TFRecord file")
            if size is not None and offset + 16 + length > size:
                raise _error(
                    path,
                    number,
                    offset,
                    f"truncated: the record claims {length} bytes but the file ends {size - offset - 12} bytes later",
                )
            body = f.read(length + 4)
            if len(body) < length + 4:
                raise _error(
                    path,
                    number,
                    offset,
                    f"truncated: the file ends inside the record ({len(body)} of {length + 4} bytes)",
                )
            data = memoryview(body)[:length]
            if verify and masked_crc32c(data) != struct.unpack("<I", body[length:])[0]:
                raise _error(path, number, offset, "bad data CRC: the record is corrupt")
            yield number, offset, data
            number += 1
            offset += 16 + length


def count_records(path: str) -> int:
    """Number of whole records, by hopping from header to header (no CRC check)."""
    count = offset = 0
    with _open(path) as f:
        size = os.path.getsize(path) if not isinstance(f, gzip.GzipFile) else None
        while True:
            header = f.read(12)
            if len(header) < 12:
                return count
            (length,) = struct.unpack("<Q", header[:8])
            offset += 16 + length
            if size is not None and offset > size:
                return count  # truncated: iteration reports it
            if f.seek(length + 4, os.SEEK_CUR) < offset:  # GzipFile stops at the end
                return count
            count += 1


# -- the source ---------------------------------------------------------------------------


def _has_suffix(name: str) -> bool:
    name = name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith(SUFFIXES)


def _first_record_ok(path: str) -> bool:
    try:
        with _open(path) as f:
            header = f.read(12)
    except (OSError, EOFError):
        return False
    if not header:
        return True  # an empty TFRecord file is valid
    return len(header) == 12 and masked_crc32c(header[:8]) == struct.unpack("<I", header[8:])[0]


def _list_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    names = sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
    suffixed = [n for n in names if _has_suffix(n)]
    # Without suffixes (e.g. ImageNet's train-00000-of-01024) take every file but sidecars.
    chosen = suffixed or [n for n in names if not n.lower().endswith((".idx", ".index", ".txt", ".json"))]
    return [os.path.join(path, n) for n in chosen]


def detect(path: str) -> bool:
    """A .tfrecord/.tfrec(.gz) file whose first record's length CRC checks out, or a
    folder of such files."""
    if os.path.isdir(path):
        files = [f for f in _list_files(path) if _has_suffix(os.path.basename(f))]
        return bool(files) and _first_record_ok(files[0])
    return _has_suffix(os.path.basename(path)) and _first_record_ok(path)


def _small_features(features: dict[str, list[Any]], skip: tuple[str | None, ...]) -> dict[str, Any]:
    """JSON-able copies of short non-image features (filename, text label, size, ...)."""
    out: dict[str, Any] = {}
    budget = _META_LIMIT
    for name, values in features.items():
        if name in skip or not values or len(values) > 16:
            continue
        if isinstance(values[0], bytes):
            if sum(len(v) for v in values) > budget:
                continue
            try:
                values = [v.decode("utf-8") for v in values]
            except UnicodeDecodeError:
                continue
        budget -= sum(len(v) if isinstance(v, str) else 8 for v in values)
        if budget < 0:
            break
        out[name] = values[0] if len(values) == 1 else values
    return out


class TFRecordSource:
    """Samples from a TFRecord file, or a folder of them (read in name order)."""

    def __init__(self, path: str, options: IngestOptions) -> None:
        self.path = path
        self.options = options
        self.files = _list_files(path)
        if not self.files:
            raise ShardkitError(f"{path}: no TFRecord files in this folder")
        self.classes: list[str] | None = None
        self.skipped: list[tuple[str, str]] = []  # (where, reason), filled while iterating
        self._count: int | None = None

    def __len__(self) -> int:
        # One header hop per record, no CRC and no parsing: cheap even for millions.
        if self._count is None:
            self._count = sum(count_records(f) for f in self.files)
        return self._count

    def _pick(self, features: dict[str, list[Any]], wanted: str | None, defaults: tuple[str, ...]) -> str | None:
        if wanted is not None:
            return wanted if wanted in features else None
        return next((name for name in defaults if name in features), None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        options = self.options
        skipper = RecordSkipper(options, self.skipped)
        produced = 0
        for path in self.files:
            for number, offset, data in iter_records(path):
                where = f"{path}: record {number} (byte offset {offset})"
                try:
                    features = parse_example(data)
                except ValueError as e:
                    raise ShardkitError(f"{where}: {e}") from None
                image_name = self._pick(features, options.image_feature, _IMAGE_FEATURES)
                if image_name is None:
                    wanted = " or ".join(
                        map(repr, (options.image_feature,) if options.image_feature else _IMAGE_FEATURES)
                    )
                    raise ShardkitError(
                        f"{where}: no image feature {wanted}; the record has {sorted(features)} (pass --image-feature)"
                    )
                values = features[image_name]
                if len(values) != 1 or not isinstance(values[0], bytes):
                    kind = (
                        "values" if not values or isinstance(values[0], bytes) else f"{type(values[0]).__name__} values"
                    )
                    raise ShardkitError(
                        f"{where}: feature {image_name!r} holds {len(values)} {kind}; "
                        "expected exactly one encoded image (bytes_list)"
                    )
                result = image_payload(values[0], where)
                if isinstance(result, str):
                    skipper.bad(result, produced, where)
                    continue
                label_name = self._pick(features, options.label_feature, _LABEL_FEATURES)
                if label_name is None and options.label_feature is not None:
                    raise ShardkitError(
                        f"{where}: no label feature {options.label_feature!r}; the record has {sorted(features)}"
                    )
                label = None
                if label_name is not None:
                    label = self._label(features[label_name], label_name, where)
                meta: dict[str, Any] = {"source": path, "source_format": FORMAT, "source_id": number, "offset": offset}
                extra = _small_features(features, (image_name, label_name))
                if extra:
                    meta["features"] = extra
                yield make_sample(produced, result[0], result[1], label, meta)
                produced += 1

    @staticmethod
    def _label(values: list[Any], name: str, where: str) -> int | None:
        if not values:
            return None
        value = values[0]
        if isinstance(value, bytes):
            raise ShardkitError(
                f"{where}: label feature {name!r} holds bytes, not an int64 class "
                "index (pass --label-feature with the int64 label)"
            )
        if isinstance(value, float) and not value.is_integer():
            raise ShardkitError(f"{where}: label feature {name!r} holds {value}, not a class index")
        return int(value)


def open_source(path: str, options: IngestOptions) -> TFRecordSource:
    """Open a TFRecord file (or a folder of them) of tf.train.Example records."""
    return TFRecordSource(path, options)
