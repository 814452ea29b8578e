"""The per-dataset manifest (``NAME.manifest.json``): format version, the shards (file
names relative to the manifest, sample counts, byte sizes, sha256 of each shard, field
extensions) and the class names. Readers never require one; with it they gain len(),
balanced splitting, seeking, resume and verification.

Version 2 (what shardkit writes) stores the shards as columns, one JSON value each, so
that reading 580k shards makes a few arrays, not 580k objects::

    {
     "format": "shardkit",
     "version": 2,
     "name": "train",
     "complete": true,
     "total_samples": 30000,
     "total_bytes": 1048578048,
     "fields": ["jpg", "json", "txt"],
     "classes": null,
     "shards": {
      "count": 3,
      "name": {"prefix":"train-","start":0,"digits":6,"suffix":".tar"},
      "samples": [10000,10000,10000],
      "bytes": [349525504,349526016,349526528],
      "sha256": {"base64":"n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg..."},
      "field_sets": [["jpg","json","txt"]],
      "fields": [0,0,0]
     }
    }

- ``name``: a list of file names, or a numbering pattern: shard ``i`` is ``prefix``,
  then ``start + i`` zero-padded to ``digits`` digits, then ``suffix``.
- ``samples``, ``bytes``: one integer per shard.
- ``sha256``: ``{"base64": ...}``, the 32-byte digests back to back in base64 (a third
  smaller than hex, and what dominates a large manifest); a list of 64-digit hex strings
  or nulls when only some shards have one; null when none has.
- ``fields``: per shard, an index into ``field_sets`` (each distinct list stored once).
- ``base`` (only in a companion set's manifest, after ``classes``): the name, URL and
  sha256 of the manifest of the set it adds fields to (:mod:`shardkit.format.companion`).

Version 1 (``"shards"``: a list of ``{"name", "samples", "bytes", "sha256", "fields"}``
objects, ``sha256`` in hex) is still read; :meth:`Manifest.to_json` writes the version
the manifest has, 2 for new ones. The version number changed with the layout so that an
older shardkit says it cannot read a new manifest instead of calling it corrupt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import ShardFormatError
from .manifest_json import READ_VERSIONS, columns_to_json, manifest_text, parse_manifest
from .shardtable import ShardInfo, ShardTable

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_SUFFIX",
    "Manifest",
    "ShardInfo",
    "ShardTable",
    "dataset_name_for",
    "manifest_name",
    "manifest_text",
]

MANIFEST_SUFFIX = ".manifest.json"
FORMAT_VERSION = 2  # what new manifests are written as


@dataclass
class Manifest:
    """A dataset: its shards in order, and what their samples hold.

    ``shards`` is a list of :class:`ShardInfo` (as a writer builds it) or, for a manifest
    read from JSON, a :class:`ShardTable` (same items, held as columns). ``version`` is
    the layout :meth:`to_json` writes (see the module docstring)."""

    shards: Sequence[ShardInfo]
    name: str = "data"
    classes: list[str] | None = None
    complete: bool = True
    version: int = FORMAT_VERSION
    # A companion set (new fields for another set, see format/companion.py): which base
    # it aligns with, {"name", "manifest", "sha256"}; None for an ordinary dataset.
    base: dict[str, str] | None = None

    @property
    def table(self) -> ShardTable:
        """The shards as columns (made from the list when the manifest holds one)."""
        return ShardTable.of(self.shards)

    @property
    def total_samples(self) -> int:
        if isinstance(self.shards, ShardTable):
            return self.shards.samples.total
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        if isinstance(self.shards, ShardTable):
            return self.shards.bytes.total
        return sum(s.bytes for s in self.shards)

    @property
    def fields(self) -> list[str]:
        if isinstance(self.shards, ShardTable):
            return sorted({f for fields in self.shards.fields.used() for f in fields})
        return sorted({f for s in self.shards for f in s.fields})

    def to_json(self) -> str:
        if self.version not in READ_VERSIONS:
            raise ValueError(f"cannot write manifest version {self.version} (versions: {READ_VERSIONS})")
        head = {
            "format": "shardkit",
            "version": self.version,
            "name": self.name,
            "complete": self.complete,
            "total_samples": self.total_samples,
            "total_bytes": self.total_bytes,
            "fields": self.fields,
            "classes": self.classes,
        }
        if self.base is not None:  # only companions carry it: other manifests keep their bytes
            head["base"] = dict(self.base)
        if self.version == 1:
            rows = [
                {"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256, "fields": list(s.fields)}
                for s in self.shards
            ]
            return json.dumps({**head, "shards": rows}, indent=1, sort_keys=False) + "\n"
        lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
        columns = columns_to_json(self.table)
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in columns.items())
        return "{\n" + "\n".join(lines) + '\n "shards": {\n' + body + "\n }\n}\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, url: str | None = None) -> Manifest:
        """Parse a manifest of either version; ShardFormatError naming ``url`` and the
        member when it is not a shardkit manifest or a value is wrong."""
        parsed = parse_manifest(text, url)
        doc = parsed.doc
        base = doc.get("base")
        if base is not None and not (
            isinstance(base, dict) and all(isinstance(base.get(k), str) for k in ("name", "manifest", "sha256"))
        ):
            raise ShardFormatError('"base" must hold the base\'s name, manifest and sha256', url=url, member="base")
        return cls(
            shards=parsed.shards,
            name=str(doc.get("name", "data")),
            classes=doc.get("classes"),
            complete=bool(doc.get("complete", True)),
            version=parsed.version,
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
