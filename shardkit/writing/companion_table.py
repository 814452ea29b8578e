"""The table form of a companion write: a CSV, TSV, JSONL or Parquet table, one row per key.

The table is read once into memory as key -> row (a caption table is small next to its
images); each base key then takes its row. Columns become fields as ``shardkit write``
makes them: the caption column (``caption``, ``text`` or ``txt``, when exactly one is
there) becomes ``txt``, a class column (``cls``, ``label`` or ``class``: integers)
becomes ``cls``, every other column goes into ``json`` with its type (numbers stay
numbers, an empty CSV cell is null). Parquet needs ``pyarrow`` (``pip install pyarrow``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ShardkitError

CAPTION_COLUMNS = ("caption", "text", "txt")
CLASS_COLUMNS = ("cls", "label", "class")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class ColumnPlan:
    """Which column becomes which field (picklable: it runs in the writer's workers)."""

    text: str | None = None
    label: str | None = None
    extra: tuple[str, ...] = ()

    @classmethod
    def for_columns(cls, columns: Sequence[str], key_column: str, where: str) -> ColumnPlan:
        rest = [c for c in columns if c != key_column]

        def one_of(names: tuple[str, ...], what: str) -> str | None:
            found = [c for c in rest if c.lower() in names]
            if len(found) > 1:
                raise ShardkitError(f"{where}: several {what} columns ({', '.join(found)}); keep one")
            return found[0] if found else None

        text = one_of(CAPTION_COLUMNS, "caption")
        label = one_of(CLASS_COLUMNS, "class")
        extra = tuple(c for c in rest if c not in (text, label))
        if not (text or label or extra):
            raise ShardkitError(f"{where}: no columns besides the key column {key_column!r}: nothing to write")
        return cls(text, label, extra)

    def __call__(self, row: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if row is None:
            return None
        out: dict[str, Any] = {}
        if self.text is not None:
            value = row.get(self.text)
            out["txt"] = "" if value is None else str(value)
        if self.label is not None and row.get(self.label) is not None:
            out["cls"] = row[self.label]
        if self.extra:
            out["json"] = {c: row.get(c) for c in self.extra}
        return out

    def empty(self) -> dict[str, Any]:
        """The fields a key without a row gets with ``missing="empty"`` (no ``cls``: no class
        is not a class; with nothing else the key gets the ``__empty__`` marker)."""
        out: dict[str, Any] = {}
        if self.text is not None:
            out["txt"] = ""
        if self.extra:
            out["json"] = dict.fromkeys(self.extra)
        return out

    def describe(self) -> str:
        parts = [f"{self.text} -> txt"] if self.text else []
        parts += [f"{self.label} -> cls"] if self.label else []
        parts += [f"{', '.join(self.extra)} -> json"] if self.extra else []
        return "; ".join(parts)


@dataclass
class TableLookup:
    """A table as key -> row, remembering which keys were asked for."""

    path: str
    plan: ColumnPlan
    rows: dict[str, dict[str, Any]]
    fingerprint: dict[str, Any]
    used: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, path: str, *, key_column: str | None = None) -> TableLookup:
        kind = TABLE_SUFFIXES.get(os.path.splitext(path)[1].lower())
        if kind is None:
            raise ShardkitError(f"{path}: a companion table is .csv, .tsv, .jsonl or .parquet")
        if not os.path.isfile(path):
            raise ShardkitError(f"{path}: no such file")
        columns, records = _read(path, kind)
        key_column = key_column or ("key" if "key" in columns else None)
        if key_column is None or key_column not in columns:
            raise ShardkitError(
                f"{path}: no key column {key_column or 'key'!r} (columns: {', '.join(columns)}); "
                "name it with key_column (--key-column)"
            )
        plan = ColumnPlan.for_columns(columns, key_column, path)
        rows: dict[str, dict[str, Any]] = {}
        text = kind in ("csv", "tsv")  # cells are strings: type the ones that go to cls and json
        for number, row in enumerate(records, 1):
            if text:
                row = {c: v if c in (key_column, plan.text) else _cell(v) for c, v in row.items()}
            key = row.get(key_column)
            if key is None or key == "":
                raise ShardkitError(f"{path}: row {number} has no key in {key_column!r}")
            key = str(key)
            if key in rows:
                raise ShardkitError(f"{path}: row {number}: key {key!r} appears twice")
            if plan.label is not None:
                _check_label(row.get(plan.label), path, number, plan.label)
            rows[key] = row
        stat = os.stat(path)
        fingerprint = {
            "table": os.path.abspath(path),
            "table_size": stat.st_size,
            "table_mtime_ns": stat.st_mtime_ns,
            "key_column": key_column,
        }
        return cls(path, plan, rows, fingerprint)

    def row(self, key: str) -> dict[str, Any] | None:
        row = self.rows.get(key)
        if row is not None:
            self.used.add(key)
        return row

    def mark_used(self, keys: Sequence[str]) -> None:
        self.used.update(k for k in keys if k in self.rows)

    def unmatched(self) -> list[str]:
        """Table keys no base sample asked for, in table order."""
        return [k for k in self.rows if k not in self.used]


def _check_label(value: Any, path: str, number: int, column: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShardkitError(f"{path}: row {number}: class column {column!r} holds {value!r}, not an integer")


def _read(path: str, kind: str) -> tuple[list[str], Iterator[dict[str, Any]]]:
    if kind in ("csv", "tsv"):
        return _read_csv(path, "\t" if kind == "tsv" else ",")
    if kind == "jsonl":
        return _read_jsonl(path)
    return _read_parquet(path)


def _cell(text: str) -> Any:
    """A CSV cell for ``cls`` or ``json``, typed: integers and floats stay numbers, empty is null."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if math.isfinite(value) else text  # JSON has no NaN or infinity
    return text


def _read_csv(path: str, delimiter: str) -> tuple[list[str], Iterator[dict[str, Any]]]:
    f = open(path, newline="", encoding="utf-8")  # closed when the rows run out
    reader = csv.reader(f, delimiter=delimiter)
    header = next(reader, None)
    if not header:
        f.close()
        raise ShardkitError(f"{path}: empty table (no header row)")

    def rows() -> Iterator[dict[str, Any]]:
        with f:
            for number, cells in enumerate(reader, 2):
                if len(cells) != len(header):
                    raise ShardkitError(f"{path}: line {number} has {len(cells)} cells, the header {len(header)}")
                yield dict(zip(header, cells))

    return header, rows()


def _read_jsonl(path: str) -> tuple[list[str], Iterator[dict[str, Any]]]:
    records = []
    columns: dict[str, None] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ShardkitError(f"{path}: line {number} is not JSON: {e}") from None
            if not isinstance(record, dict):
                raise ShardkitError(f"{path}: line {number} is not a JSON object")
            columns.update(dict.fromkeys(record))
            records.append(record)
    return list(columns), iter(records)


def _read_parquet(path: str) -> tuple[list[str], Iterator[dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ShardkitError(f"{path}: Parquet tables need pyarrow: pip install pyarrow") from None
    table = pq.ParquetFile(path)

    def rows() -> Iterator[dict[str, Any]]:
        for batch in table.iter_batches(batch_size=65536):
            yield from batch.to_pylist()

    return list(table.schema_arrow.names), rows()
