"""A manifest's shards: :class:`ShardInfo` (one shard) and :class:`ShardTable` (all of
them as compact columns, see :mod:`shardkit.format.columns`), built by
:class:`TableBuilder` from shards one at a time or version-1 shard objects a batch at a
time."""

from __future__ import annotations

import binascii
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from .columns import Digests, FieldSets, IntColumn, NamesBuilder, parse_digest


@dataclass
class ShardInfo:
    """One shard as the manifest describes it."""

    name: str
    samples: int
    bytes: int
    sha256: str | None = None
    fields: list[str] = field(default_factory=list)


class ShardTable(Sequence[ShardInfo]):
    """A manifest's shards as columns; item ``i`` is a :class:`ShardInfo` made on access
    (a copy: changing it does not change the table)."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self, names: Sequence[str], samples: IntColumn, bytes: IntColumn, sha256: Digests, fields: FieldSets
    ) -> None:
        sizes = {len(names), len(samples), len(bytes), len(sha256), len(fields)}
        if len(sizes) != 1:
            raise ValueError(
                f"shard columns differ in length: {len(names)} names, {len(samples)} counts, "
                f"{len(bytes)} sizes, {len(sha256)} digests, {len(fields)} field lists"
            )
        self.names, self.samples, self.bytes, self.sha256, self.fields = names, samples, bytes, sha256, fields

    @classmethod
    def of(cls, shards: Iterable[ShardInfo]) -> ShardTable:
        if isinstance(shards, ShardTable):
            return shards
        builder = TableBuilder()
        for s in shards:
            builder.add(s.name, s.samples, s.bytes, s.sha256, s.fields)
        return builder.build()

    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, index: int) -> ShardInfo: ...
    @overload
    def __getitem__(self, index: slice) -> ShardTable: ...
    def __getitem__(self, index: int | slice) -> ShardInfo | ShardTable:
        if isinstance(index, slice):
            return ShardTable(
                self.names[index], self.samples[index], self.bytes[index], self.sha256[index], self.fields[index]
            )
        return ShardInfo(
            self.names[index], self.samples[index], self.bytes[index], self.sha256[index], self.fields[index]
        )

    def __iter__(self) -> Iterator[ShardInfo]:
        return map(ShardInfo, self.names, self.samples, self.bytes, self.sha256, self.fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return False
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"ShardTable({len(self)} shards)"


class TableBuilder:
    """Collects shards into a :class:`ShardTable`, one at a time (:meth:`add`) or a batch
    of version-1 objects at a time (:meth:`add_rows`); raises ValueError naming the shard
    when a value is wrong."""

    def __init__(self) -> None:
        self.names = NamesBuilder()
        self.counts = array("q")
        self.sizes = array("q")
        self.digests = bytearray()  # empty until the first known digest
        self.known = bytearray()  # per shard: has a digest
        self.any_digest = False
        self.field_sets: dict[tuple[str, ...], int] = {}
        self.field_ids = array("i")

    def add(self, name: str, samples: int, nbytes: int, sha256: str | None, fields: Iterable[str]) -> None:
        i = len(self.counts)
        if not isinstance(name, str) or not name:
            raise ValueError(f"shard {i}: name {name!r} is not a file name")
        for what, value in (("samples", samples), ("bytes", nbytes)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
                raise ValueError(f"shard {i}: {what} {value!r} is not a count")
        if isinstance(fields, str) or not all(isinstance(f, str) for f in fields):
            raise ValueError(f"shard {i}: fields {fields!r} is not a list of names")
        digest = None if sha256 is None else parse_digest(sha256, i)
        self.names.add(name)
        self.counts.append(samples)
        self.sizes.append(nbytes)
        self._add_digests(digest, 1)
        self.field_ids.append(self.field_sets.setdefault(tuple(fields), len(self.field_sets)))

    def add_rows(self, rows: list[Any]) -> None:
        """Version-1 shard objects ``{"name", "samples", "bytes", "sha256", "fields"}``, a
        batch at a time: checked and converted per column. A batch with anything unusual
        (some digests missing, a count given as a string) goes shard by shard instead,
        with version-1 readers' leniency (numbers may be strings)."""
        try:
            names = [r["name"] for r in rows]
            counts = np.array([r["samples"] for r in rows], dtype=object if not rows else None)
            sizes = np.array([r["bytes"] for r in rows], dtype=object if not rows else None)
            digests = [r.get("sha256") for r in rows]
            fields = [tuple(r.get("fields", ())) for r in rows]
            none_known = all(d is None for d in digests)
            usual = (
                bool(rows)
                and all(type(n) is str and n for n in names)
                and counts.dtype == sizes.dtype == np.int64
                and min(counts.min(), sizes.min()) >= 0
                and (none_known or all(type(d) is str and len(d) == 2 * Digests.SIZE for d in digests))
            )
            block = b"" if not usual or none_known else binascii.a2b_hex("".join(digests))
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
            usual = False
        if not usual:
            for row in rows:
                self._add_row(row)
            return
        self._add_digests(None if none_known else block, len(rows))
        self.names.extend(names)
        self.counts.extend(counts.tolist())
        self.sizes.extend(sizes.tolist())
        found = self.field_sets
        for distinct in set(fields) - found.keys():
            if not all(isinstance(f, str) for f in distinct):
                raise ValueError(f"shard {len(self.counts)}..: fields {list(distinct)!r} is not a list of names")
        self.field_ids.extend([found.setdefault(f, len(found)) for f in fields])

    def _add_digests(self, block: bytes | None, count: int) -> None:
        """The digests of the next ``count`` shards (None: unknown). The block starts with
        the first known one: a manifest without digests costs one flag per shard."""
        if block is not None and not self.any_digest:
            self.digests += bytes(Digests.SIZE * len(self.known))
            self.any_digest = True
        if self.any_digest:
            self.digests += bytes(Digests.SIZE * count) if block is None else block
        self.known += (b"\x00" if block is None else b"\x01") * count

    def _add_row(self, row: Any) -> None:
        try:  # as lenient as version-1 readers were: numbers may be given as strings
            name, samples, nbytes = str(row["name"]), int(row["samples"]), int(row["bytes"])
            sha256, fields = row.get("sha256"), list(row.get("fields", []))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"shard {len(self.counts)}: {e!r}") from None
        self.add(name, samples, nbytes, sha256, fields)

    def build(self) -> ShardTable:
        return ShardTable(
            self.names.build(),
            IntColumn(np.frombuffer(self.counts, dtype=np.int64)),
            IntColumn(np.frombuffer(self.sizes, dtype=np.int64)),
            Digests(bytes(self.digests), np.frombuffer(bytes(self.known), dtype=bool)),
            FieldSets(list(self.field_sets), np.frombuffer(self.field_ids, dtype=np.int32)),
        )
