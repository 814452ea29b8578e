"""Sidecars: a per-shard index of sample offsets and a per-dataset manifest.

Index (``SHARD.tar.idx``), little-endian binary, tiny and range-fetchable. Version 2
(what ``ShardWriter`` and ``shardkit index`` write)::

    8 bytes  magic b"SKIDX002"
    8 bytes  uint64 N, the number of samples
    8*(N+1)  uint64 offsets: where each sample's first tar header starts, then the
             offset where the end-of-archive blocks start
    8 bytes  uint64 K, the byte length of the key table
    K bytes  key table: the N sample keys in shard order, each UTF-8 (names that are not
             valid UTF-8 keep their raw bytes) followed by one NUL byte

so sample i occupies bytes ``[off[i], off[i+1])`` and a reader can seek to any sample,
or find a sample by key without reading the shard. Version 1 (magic b"SKIDX001") is the
same without the last two fields; it is still read everywhere, and key lookups fall back
to reading the shard. Keys cannot contain NUL (tar names are NUL-terminated), so the
table needs no escaping; it sits after the offsets so a reader that only wants offsets
can stop there.
Compressed shards (``.tar.gz``, ``.tar.zst``, ...) get no index: a compressed stream
cannot be entered at a byte offset. Their sample counts live in the manifest only, and
readers skip samples inside the decompressed stream.

The manifest (``NAME.manifest.json``) is :mod:`shardkit.format.manifest`; its names are
also importable from here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from ..errors import ShardFormatError
from .compression import CHUNK, compression_of
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_SUFFIX,
    Manifest,
    ShardInfo,
    ShardTable,
    dataset_name_for,
    manifest_name,
    manifest_text,
)
from .samples import group_members
from .tar import iter_member_tuples

__all__ = [
    "FORMAT_VERSION",
    "INDEX_MAGIC",
    "INDEX_MAGIC_V2",
    "INDEX_SUFFIX",
    "MANIFEST_SUFFIX",
    "Manifest",
    "ShardInfo",
    "ShardScan",
    "ShardTable",
    "dataset_name_for",
    "decode_index",
    "decode_index_keys",
    "encode_index",
    "index_url",
    "manifest_name",
    "manifest_text",
    "scan_shard",
]

INDEX_MAGIC = b"SKIDX001"  # version 1: offsets only
INDEX_MAGIC_V2 = b"SKIDX002"  # version 2: offsets, then the sample keys
INDEX_SUFFIX = ".idx"


def encode_index(offsets: Sequence[int], keys: Sequence[str] | None = None) -> bytes:
    """Index bytes for sample start offsets plus the final end offset; with ``keys`` (one
    per sample) a version-2 index that also holds the sample keys."""
    array = np.asarray(offsets, dtype="<u8")
    if array.ndim != 1 or len(array) < 1:
        raise ValueError("an index needs at least the end offset")
    head = np.uint64(len(array) - 1).astype("<u8").tobytes() + array.tobytes()
    if keys is None:
        return INDEX_MAGIC + head
    if len(keys) != len(array) - 1:
        raise ValueError(f"{len(keys)} keys for {len(array) - 1} samples")
    table = b"".join(k.encode("utf-8", "surrogateescape") + b"\0" for k in keys)
    if table.count(b"\0") != len(keys):
        raise ValueError("a sample key contains a NUL byte")
    return INDEX_MAGIC_V2 + head + np.uint64(len(table)).astype("<u8").tobytes() + table


def _split_index(data: bytes, url: str | None) -> tuple[np.ndarray, bytes | None]:
    """(offsets, key table or None for version 1), with the layout checked."""
    magic = data[:8]
    if len(data) < 16 or magic not in (INDEX_MAGIC, INDEX_MAGIC_V2):
        raise ShardFormatError("not a shardkit index (bad magic)", url=url, offset=0)
    count = int.from_bytes(data[8:16], "little")
    end = 16 + 8 * (count + 1)
    table: bytes | None = None
    if magic == INDEX_MAGIC:
        if len(data) != end:
            raise ShardFormatError(f"index claims {count} samples but has {len(data)} bytes", url=url, offset=8)
    else:
        if len(data) < end + 8:
            raise ShardFormatError(f"index claims {count} samples but has {len(data)} bytes", url=url, offset=8)
        size = int.from_bytes(data[end : end + 8], "little")
        if len(data) != end + 8 + size:
            raise ShardFormatError(
                f"index key table claims {size} bytes but {len(data) - end - 8} follow", url=url, offset=end
            )
        table = data[end + 8 :]
    offsets = np.frombuffer(data, dtype="<u8", count=count + 1, offset=16)
    if count and np.any(np.diff(offsets.astype(np.int64)) <= 0):
        raise ShardFormatError("index offsets are not increasing", url=url, offset=16)
    return offsets, table


def decode_index(data: bytes, *, url: str | None = None) -> np.ndarray:
    """Offsets array (N+1 uint64) from index bytes of either version; raises
    ShardFormatError if malformed."""
    return _split_index(data, url)[0]


def decode_index_keys(data: bytes, *, url: str | None = None) -> list[str] | None:
    """The N sample keys from version-2 index bytes, or None for a version-1 index;
    raises ShardFormatError if the index or its key table is malformed."""
    offsets, table = _split_index(data, url)
    if table is None:
        return None
    count = len(offsets) - 1
    where = len(data) - len(table)
    if count == 0:
        if table:
            raise ShardFormatError("index key table is not empty but there are no samples", url=url, offset=where)
        return []
    if not table.endswith(b"\0"):
        raise ShardFormatError("index key table does not end with a NUL byte", url=url, offset=where)
    keys = table[:-1].split(b"\0")
    if len(keys) != count:
        raise ShardFormatError(f"index key table holds {len(keys)} keys for {count} samples", url=url, offset=where)
    return [k.decode("utf-8", "surrogateescape") for k in keys]


def index_url(shard_url: str) -> str:
    return shard_url + INDEX_SUFFIX


class _HashingReader:
    """A stream wrapper that hashes and counts everything read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.head = b""  # the first bytes, to tell a compressed shard

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer) or 0  # type: ignore[attr-defined]
        if n:
            view = memoryview(buffer)[:n]
            self.sha256.update(view)
            if len(self.head) < 8:
                self.head += bytes(view[: 8 - len(self.head)])
            self.bytes += n
        return n

    def drain(self) -> None:
        """Hash the rest (zero blocks and record padding after the archive end)."""
        chunk = bytearray(CHUNK)
        while self.readinto(chunk):
            pass


@dataclass
class ShardScan:
    """One pass over a shard. For a compressed shard (``compression`` set) ``offsets``
    refer to the decompressed tar stream: they count samples but must never be used to
    seek into the file; ``sha256`` and ``bytes`` are those of the file itself."""

    offsets: list[int]
    sha256: str
    bytes: int
    fields: list[str]
    keys: list[str] = field(default_factory=list)  # one per sample, in order
    compression: str | None = None


def scan_shard(stream: BinaryIO, *, url: str | None = None) -> ShardScan:
    """Read a whole tar once: sample offsets and keys, sha256, byte size and field set."""
    reader = _HashingReader(stream)
    offsets: list[int] = []
    keys: list[str] = []
    fields: set[str] = set()
    end = 0
    for start, stop, sample in group_members(iter_member_tuples(reader, url=url), url=url):  # type: ignore[arg-type]
        offsets.append(start)
        keys.append(sample["__key__"])
        fields.update(k for k in sample if not k.startswith("__"))
        end = stop
    # The end-of-archive marker starts right after the last member (or at 0).
    # Members skipped between samples (directories, metadata) may sit before it.
    reader.drain()
    if not offsets:
        end = 0
    return ShardScan(
        offsets + [max(end, offsets[-1] if offsets else 0)],
        reader.sha256.hexdigest(),
        reader.bytes,
        sorted(fields),
        keys,
        compression_of(reader.head),
    )
