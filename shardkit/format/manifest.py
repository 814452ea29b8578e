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

Version 1 (``"shards"``: a list of ``{"name", "samples", "bytes", "sha256", "fields"}``
objects, ``sha256`` in hex) is still read; :meth:`Manifest.to_json` writes the version
the manifest has, 2 for new ones. The version number changed with the layout so that an
older shardkit says it cannot read a new manifest instead of calling it corrupt.
"""

from __future__ import annotations

import binascii
import json
import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from ..errors import ShardFormatError
from .columns import Digests, FieldSets, IntColumn, NamesBuilder, PackedNames, PatternNames, names_of, parse_digest

MANIFEST_SUFFIX = ".manifest.json"
FORMAT_VERSION = 2  # what new manifests are written as
READ_VERSIONS = (1, 2)


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
        if self.version == 1:
            rows = [
                {"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256, "fields": list(s.fields)}
                for s in self.shards
            ]
            return json.dumps({**head, "shards": rows}, indent=1, sort_keys=False) + "\n"
        lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
        columns = _columns_to_json(self.table)
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in columns.items())
        return "{\n" + "\n".join(lines) + '\n "shards": {\n' + body + "\n }\n}\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, url: str | None = None) -> Manifest:
        """Parse a manifest of either version; ShardFormatError naming ``url`` and the
        member when it is not a shardkit manifest or a value is wrong."""
        return _parse(text, url)


def manifest_name(name: str) -> str:
    return name + MANIFEST_SUFFIX


_SHARD_NUMBER = re.compile(r"[-_.]?\d+\.(?:tar|tgz|tbz2|txz|tar\.(?:gz|zst|zstd|bz2|xz))$", re.IGNORECASE)


def dataset_name_for(shard_names: Iterable[str]) -> str:
    """A dataset name from shard file names: ``train-000012.tar`` (or ``.tar.gz`` ...) -> ``train``."""
    names = [_SHARD_NUMBER.sub("", n.rsplit("/", 1)[-1]) for n in shard_names]
    names = [n for n in names if n]
    return names[0] if names and all(n == names[0] for n in names) else "data"


# -- writing version 2 ------------------------------------------------------------------
def _columns_to_json(table: ShardTable) -> dict[str, Any]:
    names = names_of(table.names)
    name: Any
    if isinstance(names, PatternNames):
        name = {"prefix": names.prefix, "start": names.start, "digits": names.digits, "suffix": names.suffix}
    else:
        name = list(names)
    sha256: Any = None
    if table.sha256.all_known:
        sha256 = {"base64": table.sha256.base64()}
    elif table.sha256.any_known:
        sha256 = list(table.sha256)
    return {
        "count": len(table),
        "name": name,
        "samples": table.samples.array.tolist(),
        "bytes": table.bytes.array.tolist(),
        "sha256": sha256,
        "field_sets": [list(s) for s in table.fields.sets],
        "fields": table.fields.ids.tolist(),
    }


# -- reading ------------------------------------------------------------------------------
_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")

_SCAN = json.scanner.make_scanner(_DECODER)  # type: ignore[attr-defined]
_ROW_BATCH = 4096  # version-1 shard objects converted to columns at a time

# Parses the JSON value at a position of the text: (value, position after it).
ValueReader = Callable[[str, int], tuple[Any, int]]


def _value(text: str, pos: int) -> tuple[Any, int]:
    try:
        return _SCAN(text, pos)
    except StopIteration as e:
        raise json.JSONDecodeError("Expecting value", text, e.value) from None


def _skip(text: str, pos: int) -> int:
    end = _SPACE.match(text, pos)
    assert end is not None
    return end.end()


def _expect(text: str, pos: int, char: str) -> int:
    if text.startswith(char, pos):
        return pos + 1
    raise json.JSONDecodeError(f"Expecting {char!r}", text, pos)


def _read_object(text: str, pos: int, readers: Mapping[str, ValueReader]) -> tuple[dict[str, Any], int]:
    """The JSON object at ``pos``, one member at a time: the value of a key in ``readers``
    is parsed by that reader, so a big one is converted (and its Python objects dropped)
    before the next is parsed."""
    out: dict[str, Any] = {}
    pos = _skip(text, _expect(text, pos, "{"))
    if text.startswith("}", pos):
        return out, pos + 1
    while True:
        key, pos = _value(text, pos) if text.startswith('"', pos) else (None, pos)
        if not isinstance(key, str):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
        pos = _skip(text, _expect(text, _skip(text, pos), ":"))
        out[key], pos = readers.get(key, _value)(text, pos)
        pos = _skip(text, pos)
        if text.startswith("}", pos):
            return out, pos + 1
        pos = _skip(text, _expect(text, pos, ","))


def _read_rows(text: str, pos: int) -> tuple[ShardTable, int]:
    """Version 1: a list of per-shard objects, parsed one at a time and converted to
    columns a batch at a time."""
    builder = TableBuilder()
    batch: list[Any] = []
    pos = _skip(text, _expect(text, pos, "["))
    if text.startswith("]", pos):
        return builder.build(), pos + 1
    while True:
        row, pos = _value(text, pos)
        batch.append(row)
        if len(batch) == _ROW_BATCH:
            builder.add_rows(batch)
            batch = []
        pos = _skip(text, pos)
        if text.startswith("]", pos):
            builder.add_rows(batch)
            return builder.build(), pos + 1
        pos = _skip(text, _expect(text, pos, ","))


_INT64_MAX = np.iinfo(np.int64).max


def _plain_counts(body: str) -> np.ndarray | None:
    """``body`` (a JSON list's text between the brackets) as int64 counts when it is
    written as shardkit writes it (decimal digits and commas, nothing else), else None.
    numpy parses it without making a Python int per shard."""
    if not body:
        return np.zeros(0, dtype=np.int64)
    if (
        not body.isascii()
        or body.encode("ascii").translate(None, b"0123456789,")
        or body[0] == ","
        or body[-1] == ","
        or ",," in body
    ):
        return None
    array = np.fromstring(body, dtype=np.int64, sep=",")
    # numpy clamps a number beyond int64 to its maximum: leave those to the JSON parser
    return array if len(array) == body.count(",") + 1 and array.max() < _INT64_MAX else None


def _int_list(what: str) -> ValueReader:
    def read(text: str, pos: int) -> tuple[IntColumn, int]:
        end = text.find("]", pos) + 1  # a list of numbers holds no "]": it ends at the first
        if text.startswith("[", pos) and end:
            array = _plain_counts(text[pos + 1 : end - 1])
            if array is not None:
                return IntColumn(array), end
        values, end = _value(text, pos)
        array = np.array(values) if isinstance(values, list) and values else np.zeros(0, dtype=np.int64)
        if not isinstance(values, list) or array.dtype.kind not in "iu" or (len(array) and array.min() < 0):
            raise ValueError(f'"{what}" is not a list of counts, one per shard')
        return IntColumn(array), end

    return read


def _read_digests(text: str, pos: int) -> tuple[Digests | None, int]:
    if text.startswith("{", pos):
        value, end = _read_object(text, pos, {"base64": _read_base64})
        if set(value) != {"base64"}:
            raise ValueError(f'"sha256" has members {sorted(value)}, not just "base64"')
        return value["base64"], end
    value, end = _value(text, pos)
    if value is None:
        return None, end
    if isinstance(value, list):
        return Digests.from_hex(value), end
    raise ValueError(f'"sha256" is a {type(value).__name__}, not {{"base64": ...}} or a list of hex digests')


def _read_base64(text: str, pos: int) -> tuple[Digests, int]:
    end = text.find('"', pos + 1)
    if text.startswith('"', pos) and end > 0 and text.find("\\", pos + 1, end) < 0:
        return Digests.from_base64(text, start=pos + 1, stop=end), end + 1  # decoded in place, no copy
    value, end = _value(text, pos)
    if not isinstance(value, str):
        raise ValueError(f'"sha256" "base64" is a {type(value).__name__}, not a string')
    return Digests.from_base64(value), end


def _read_names(text: str, pos: int) -> tuple[Sequence[str], int]:
    value, end = _value(text, pos)
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return PackedNames.of(value), end
    if isinstance(value, dict) and set(value) == {"prefix", "start", "digits", "suffix"}:
        prefix, start, digits, suffix = (value[k] for k in ("prefix", "start", "digits", "suffix"))
        if isinstance(prefix, str) and isinstance(suffix, str) and type(start) is int and type(digits) is int:
            return PatternNames(prefix, suffix, digits=digits, start=start, count=0), end
    raise ValueError('"name" is neither a list of file names nor a {prefix, start, digits, suffix} pattern')


_COLUMN_READERS: dict[str, ValueReader] = {
    "name": _read_names,
    "samples": _int_list("samples"),
    "bytes": _int_list("bytes"),
    "sha256": _read_digests,
    "fields": _int_list("fields"),
}


def _table_of_columns(columns: dict[str, Any]) -> ShardTable:
    count = columns.get("count")
    if type(count) is not int or count < 0:
        raise ValueError(f'"count" {count!r} is not a number of shards')
    missing = [k for k in ("name", "samples", "bytes") if k not in columns]
    if missing:
        raise ValueError(f"no {', '.join(repr(k) for k in missing)} column")
    names = columns["name"]
    if isinstance(names, PatternNames):
        names = PatternNames(names.prefix, names.suffix, digits=names.digits, start=names.start, count=count)
    digests = columns.get("sha256")
    if digests is None:
        digests = Digests.unknown(count)
    sets = columns.get("field_sets", [])
    if not isinstance(sets, list) or not all(isinstance(s, list) and all(isinstance(f, str) for f in s) for s in sets):
        raise ValueError('"field_sets" is not a list of lists of field names')
    index = columns.get("fields")
    if ("field_sets" in columns) != (index is not None):
        raise ValueError('"fields" and "field_sets" come together')
    if index is None:  # no field lists recorded: every shard's is empty
        sets, index = [[]], IntColumn(np.zeros(count, dtype=np.int64))
    fields = FieldSets(sets, index.array)
    checked = {"name": names, "samples": columns["samples"], "bytes": columns["bytes"], "sha256": digests}
    for what, column in {**checked, "fields": fields}.items():
        if len(column) != count:
            raise ValueError(f'"{what}" has {len(column)} entries for {count} shards')
    return ShardTable(names, columns["samples"], columns["bytes"], digests, fields)


def _read_shards(text: str, pos: int) -> tuple[tuple[int, ShardTable | Exception], int]:
    """(the version of the layout, the shards) for either layout: a list of objects
    (version 1) or columns (version 2). A bad value is returned, not raised, so that a
    foreign document or an unknown version is reported as such first."""
    version = 1 if text.startswith("[", pos) else 2
    try:
        if version == 1:
            table, end = _read_rows(text, pos)
            return (1, table), end
        if text.startswith("{", pos):
            columns, end = _read_object(text, pos, _COLUMN_READERS)
            return (2, _table_of_columns(columns)), end
        value, end = _value(text, pos)
        return (0, ValueError(f"a {type(value).__name__}, not a list or columns")), end
    except json.JSONDecodeError:
        raise
    except (ValueError, TypeError) as e:
        _, end = _value(text, pos)  # past the bad value, to check the rest of the document
        return (version, e), end


def manifest_text(data: str | bytes | bytearray, *, url: str | None = None) -> str:
    """The text of manifest bytes (UTF-8/16/32 as JSON allows); ShardFormatError naming
    ``url`` when they are not text. A caller that drops the bytes before
    :meth:`Manifest.from_json` parses with one copy of the text in memory, not two."""
    if isinstance(data, str):
        return data
    try:
        return bytes(data).decode(json.detect_encoding(data))
    except UnicodeDecodeError as e:
        raise ShardFormatError(f"manifest is not valid JSON: {e}", url=url) from None


def _parse(data: str | bytes, url: str | None) -> Manifest:
    where = url or "manifest"
    text = manifest_text(data, url=url)
    try:
        start = _skip(text, 0)
        if not text.startswith("{", start):
            json.loads(text)  # not valid JSON, or JSON but not an object
            raise ShardFormatError('not a shardkit manifest (missing "format": "shardkit")', url=url)
        doc, end = _read_object(text, start, {"shards": _read_shards})
        if _skip(text, end) != len(text):
            raise json.JSONDecodeError("Extra data", text, _skip(text, end))
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"manifest is not valid JSON: {e}", url=url) from None
    if doc.get("format") != "shardkit":
        raise ShardFormatError('not a shardkit manifest (missing "format": "shardkit")', url=url)
    version = doc.get("version")
    if type(version) is not int or version not in READ_VERSIONS:
        raise ShardFormatError(
            f"manifest version {version!r} is not supported (this shardkit reads versions "
            f"{', '.join(map(str, READ_VERSIONS))})",
            url=url,
        )
    if "shards" not in doc:
        raise ShardFormatError(f'{where}: bad shard entry (no "shards")', url=url)
    layout, shards = doc["shards"]
    if isinstance(shards, Exception):
        raise ShardFormatError(f'{where}: bad shard entry in "shards" ({shards})', url=url) from None
    if layout != version:
        raise ShardFormatError(
            f'{where}: "shards" has the layout of version {layout} in a version-{version} manifest', url=url
        )
    return Manifest(
        shards=shards,
        name=str(doc.get("name", "data")),
        classes=doc.get("classes"),
        complete=bool(doc.get("complete", True)),
        version=version,
    )
