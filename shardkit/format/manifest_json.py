"""The manifest's JSON, both layouts (:mod:`shardkit.format.manifest` describes them).

Reading never builds the document as one tree: :func:`parse_manifest` walks the top-level
object a member at a time and hands ``"shards"`` to a reader for its layout. Version 2's
columns are converted as they are reached (counts parsed by numpy from the text, the
digests' base64 decoded a slice at a time); version 1's list is parsed one shard object
at a time and converted a batch at a time. So a 580k-shard manifest never exists as
580k Python objects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ShardFormatError
from .columns import Digests, FieldSets, IntColumn, PackedNames, PatternNames, names_of
from .shardtable import ShardTable, TableBuilder

READ_VERSIONS = (1, 2)


@dataclass
class Parsed:
    """A parsed manifest: its top-level members (``"shards"`` aside), version and shards."""

    doc: dict[str, Any]
    version: int
    shards: ShardTable


def columns_to_json(table: ShardTable) -> dict[str, Any]:
    """Version 2's ``"shards"`` value for ``table``."""
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


def parse_manifest(data: str | bytes, url: str | None) -> Parsed:
    """The manifest in ``data``; ShardFormatError naming ``url`` and what is wrong."""
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
        raise ShardFormatError('bad shard entry (no "shards")', url=url)
    layout, shards = doc.pop("shards")
    if isinstance(shards, Exception):
        raise ShardFormatError(f'bad shard entry in "shards" ({shards})', url=url) from None
    if layout != version:
        raise ShardFormatError(f'"shards" has the layout of version {layout} in a version-{version} manifest', url=url)
    return Parsed(doc, version, shards)
