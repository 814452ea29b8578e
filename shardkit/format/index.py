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

Manifest (``NAME.manifest.json``): format version, shard file names (relative to the
manifest), sample counts, byte sizes, sha256 of each shard, the field extensions, class
names; a companion set's also ``base``, the name, URL and sha256 of the manifest of the
set it adds fields to (:mod:`shardkit.format.companion`). Readers never require either;
with them they gain len(), balanced splitting, seeking, resume and verification.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

import numpy as np

from ..errors import ShardFormatError
from .compression import compression_of
from .samples import group_members
from .tar import iter_member_tuples

INDEX_MAGIC = b"SKIDX001"  # version 1: offsets only
INDEX_MAGIC_V2 = b"SKIDX002"  # version 2: offsets, then the sample keys
INDEX_SUFFIX = ".idx"
MANIFEST_SUFFIX = ".manifest.json"
FORMAT_VERSION = 1


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


@dataclass
class ShardInfo:
    """One shard as the manifest describes it."""

    name: str
    samples: int
    bytes: int
    sha256: str | None = None
    fields: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    """A dataset: its shards in order, and what their samples hold."""

    shards: list[ShardInfo]
    name: str = "data"
    classes: list[str] | None = None
    complete: bool = True
    version: int = FORMAT_VERSION
    # A companion set (new fields for another set, see format/companion.py): which base
    # it aligns with, {"name", "manifest", "sha256"}; None for an ordinary dataset.
    base: dict[str, str] | None = None

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def fields(self) -> list[str]:
        return sorted({f for s in self.shards for f in s.fields})

    def to_json(self) -> str:
        doc = {
            "format": "shardkit",
            "version": self.version,
            "name": self.name,
            "complete": self.complete,
            "total_samples": self.total_samples,
            "total_bytes": self.total_bytes,
            "fields": self.fields,
            "classes": self.classes,
            "shards": [asdict(s) for s in self.shards],
        }
        if self.base is not None:  # only companions carry it: other manifests keep their bytes
            doc["base"] = dict(self.base)
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, url: str | None = None) -> Manifest:
        where = url or "manifest"
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ShardFormatError(f"manifest is not valid JSON: {e}", url=url) from None
        if not isinstance(doc, dict) or doc.get("format") != "shardkit":
            raise ShardFormatError('not a shardkit manifest (missing "format": "shardkit")', url=url)
        if doc.get("version") != FORMAT_VERSION:
            raise ShardFormatError(
                f"manifest version {doc.get('version')!r} is not supported "
                f"(this shardkit reads version {FORMAT_VERSION})",
                url=url,
            )
        try:
            shards = [
                ShardInfo(
                    name=str(s["name"]),
                    samples=int(s["samples"]),
                    bytes=int(s["bytes"]),
                    sha256=s.get("sha256"),
                    fields=list(s.get("fields", [])),
                )
                for s in doc["shards"]
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise ShardFormatError(f"{where}: bad shard entry ({e!r})", url=url) from None
        base = doc.get("base")
        if base is not None and not (
            isinstance(base, dict) and all(isinstance(base.get(k), str) for k in ("name", "manifest", "sha256"))
        ):
            raise ShardFormatError(f'{where}: "base" must hold the base\'s name, manifest and sha256', url=url)
        return cls(
            shards=shards,
            name=str(doc.get("name", "data")),
            classes=doc.get("classes"),
            complete=bool(doc.get("complete", True)),
            base=None if base is None else {k: base[k] for k in ("name", "manifest", "sha256")},
        )


def manifest_name(name: str) -> str:
    return name + MANIFEST_SUFFIX


_SHARD_NUMBER = re.compile(r"[-_.]?\d+\.(?:tar|tgz|tbz2|txz|tar\.(?:gz|zst|zstd|bz2|xz))$", re.IGNORECASE)


def dataset_name_for(shard_names: Iterable[str]) -> str:
    """A dataset name from shard file names: ``train-000012.tar`` (or ``.tar.gz`` ...) -> ``train``."""
    names = [_SHARD_NUMBER.sub("", n.rsplit("/", 1)[-1]) for n in shard_names]
    names = [n for n in names if n]
    return names[0] if names and all(n == names[0] for n in names) else "data"


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
        chunk = bytearray(1 << 20)
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
