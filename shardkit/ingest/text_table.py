"""CSV, TSV and JSONL tables, read as streams (see :mod:`shardkit.ingest.table`).

CSV and TSV use the ``csv`` module's quoting (the TSV with tabs), a UTF-8 BOM is fine, and
a row with more or fewer fields than the header is an error naming its line. JSONL is one
JSON object per line; its columns are every key seen, and each column's kind is what its
values agree on (a column of lists of paths is a column of images).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import ShardkitError
from .columns import IMAGE_NAMES


def names_an_image_column(path: str) -> bool:
    """Whether the first line of a TSV file is a header naming an image column."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return any(name.strip().lower() in IMAGE_NAMES for name in first.rstrip("\r\n").split("\t"))


class TextTable:
    """A CSV, TSV or JSONL file, read as a stream (module docstring)."""

    def __init__(self, path: str, fmt: str) -> None:
        self.path = path
        self.fmt = fmt
        self.typed = fmt == "jsonl"
        self._count = 0
        if fmt == "jsonl":
            self.kinds = self._scan_json()
            self.columns = list(self.kinds)
        else:
            with self._open() as f:
                header = next(self._reader(f), None)
            if not header:
                raise ShardkitError(f"{path}: no header row (a {fmt.upper()} table names its columns first)")
            self.columns = header
            self.kinds = dict.fromkeys(header)  # text cells: typed one by one
            self._count = sum(1 for _ in self._records())

    def _scan_json(self) -> dict[str, str | None]:
        """Count the rows; each column (every key seen) and the kind its values agree on
        (None when they do not): a column of lists of paths is a column of images."""
        seen: dict[str, set[str]] = {}
        for _, record in self._records():
            for column, value in record.items():
                seen.setdefault(column, set()).add(value_kind(value))
            self._count += 1
        kinds: dict[str, str | None] = {}
        for column, found in seen.items():
            found.discard("null")
            if found == {"int", "float"}:
                found = {"float"}
            kinds[column] = found.pop() if len(found) == 1 else None
        return kinds

    def _open(self):
        return open(self.path, encoding="utf-8-sig", newline="")

    def _reader(self, f):
        return csv.reader(f, delimiter="\t" if self.fmt == "tsv" else ",")

    def _records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            with self._open() as f:
                if self.fmt == "jsonl":
                    for number, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        where = f"{self.path}: line {number}"
                        try:
                            record = json.loads(line)
                        except ValueError as e:
                            raise ShardkitError(f"{where}: not JSON ({e})") from None
                        if not isinstance(record, dict):
                            raise ShardkitError(f"{where}: a JSON {type(record).__name__}, not an object")
                        yield where, record
                    return
                reader = self._reader(f)
                header = next(reader, None) or []
                for cells in reader:
                    if not cells:
                        continue  # a blank line
                    where = f"{self.path}: line {reader.line_num}"
                    if len(cells) != len(header):
                        raise ShardkitError(f"{where}: {len(cells)} fields, the header has {len(header)}")
                    yield where, dict(zip(header, cells))
        except UnicodeDecodeError as e:
            raise ShardkitError(f"{self.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except csv.Error as e:
            raise ShardkitError(f"{self.path}: {e}") from None

    def __len__(self) -> int:
        return self._count

    def rows(
        self, start: int = 0, stop: int | None = None, columns: Sequence[str] | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for index, (where, record) in enumerate(self._records()):
            if stop is not None and index >= stop:
                return
            if index >= start:
                yield where, {c: record.get(c) for c in (columns or self.columns)}

    def class_names(self, column: str) -> list[str] | None:
        return None


def value_kind(value: Any) -> str:
    """The kind (see :mod:`shardkit.ingest.columns`) of one JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float, str)):
        return {int: "int", float: "float", str: "text"}[type(value)]
    if isinstance(value, list):
        inner = {value_kind(v) for v in value} - {"null"}
        return "list:" + inner.pop() if len(inner) == 1 else "list"
    return "struct"
