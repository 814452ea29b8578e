"""SQLite source: one row per sample, image bytes in a BLOB column.

- table: ``options.table``; default the only table, or else the only table that has the
  image column.
- image column: ``options.image_column``, default ``image`` (encoded bytes; the format
  is sniffed).
- label column: ``options.label_column``, default ``label`` if the table has one. Integer
  labels are used as they are; text labels are class names: ``classes`` is their sorted
  set (one ``SELECT DISTINCT`` at open) and ``cls`` the position in it. NULL: no label.
- id column: ``options.key_column``, default ``key`` if present, else the rowid (else
  the row number for WITHOUT ROWID tables); kept as ``json.source_id``.

The database is opened read-only (``mode=ro``) in ``__iter__`` and streamed with
``fetchmany``, in rowid order when the table has rowids.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from ..errors import ShardkitError
from . import IngestOptions
from .common import RecordSkipper, image_payload, make_sample

log = logging.getLogger(__name__)

FORMAT = "sqlite"
MAGIC = b"SQLite format 3\0"
_FETCH = 256


def detect(path: str) -> bool:
    """A file starting with the SQLite 3 header string."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(16) == MAGIC


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _connect(path: str) -> sqlite3.Connection:
    try:
        return sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise ShardkitError(f"{path}: cannot open as SQLite ({e})") from None


class SQLiteSource:
    """Rows of one table of a SQLite database as samples."""

    def __init__(self, path: str, options: IngestOptions) -> None:
        self.path = path
        self.options = options
        self.skipped: list[tuple[str, str]] = []  # (where, reason), filled while iterating
        self.classes: list[str] | None = None
        conn = _connect(path)
        try:
            self._inspect(conn)
        except sqlite3.DatabaseError as e:
            raise ShardkitError(f"{path}: cannot read as SQLite ({e})") from None
        finally:
            conn.close()

    def _inspect(self, conn: sqlite3.Connection) -> None:
        opts = self.options
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        columns = {t: [r[1] for r in conn.execute(f"PRAGMA table_info({_quote(t)})")] for t in tables}
        image_column = opts.image_column or "image"
        if opts.table is not None:
            if opts.table not in tables:
                raise ShardkitError(f"{self.path}: no table {opts.table!r}; it has: {', '.join(tables) or 'no tables'}")
            table = opts.table
        elif len(tables) == 1:
            table = tables[0]
        else:
            with_image = [t for t in tables if image_column in columns[t]]
            if len(with_image) != 1:
                raise ShardkitError(
                    f"{self.path}: cannot tell which table holds the images; it has: "
                    f"{', '.join(tables) or 'no tables'} (pass --table)"
                )
            table = with_image[0]
        cols = columns[table]
        listing = f"table {table!r} has columns: {', '.join(cols)}"
        for wanted in (opts.image_column or "image", opts.label_column, opts.key_column):
            if wanted is not None and wanted not in cols:
                raise ShardkitError(f"{self.path}: no column {wanted!r}; {listing}")
        self.table = table
        self.image_column = image_column
        self.label_column = opts.label_column or ("label" if "label" in cols else None)
        self.key_column = opts.key_column or ("key" if "key" in cols else None)
        try:
            conn.execute(f"SELECT rowid FROM {_quote(table)} LIMIT 1").fetchall()
            self.has_rowid = True
        except sqlite3.OperationalError:  # WITHOUT ROWID table, or a view
            self.has_rowid = False
        self.count = conn.execute(f"SELECT COUNT(*) FROM {_quote(table)}").fetchone()[0]
        if self.label_column is not None:
            label = _quote(self.label_column)
            texts = [
                r[0]
                for r in conn.execute(
                    f"SELECT DISTINCT {label} FROM {_quote(table)} WHERE typeof({label}) = 'text' ORDER BY {label}"
                )
            ]
            if texts:
                # Class names: every non-NULL label is read as text, integers included.
                numbers = [
                    str(r[0])
                    for r in conn.execute(
                        f"SELECT DISTINCT {label} FROM {_quote(table)} WHERE typeof({label}) IN ('integer', 'real')"
                    )
                ]
                self.classes = sorted(set(texts) | set(numbers))

    def __len__(self) -> int:
        return self.count

    def _query(self) -> str:
        key = _quote(self.key_column) if self.key_column else ("rowid" if self.has_rowid else "NULL")
        label = _quote(self.label_column) if self.label_column else "NULL"
        order = " ORDER BY rowid" if self.has_rowid else ""
        return f"SELECT {key}, {_quote(self.image_column)}, {label} FROM {_quote(self.table)}{order}"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skipper = RecordSkipper(self.options, self.skipped)
        lookup = {name: i for i, name in enumerate(self.classes)} if self.classes else None
        produced = number = 0
        conn = _connect(self.path)
        try:
            cursor = conn.execute(self._query())
            while True:
                rows = cursor.fetchmany(_FETCH)
                if not rows:
                    break
                for key, image, label in rows:
                    sample = self._sample(number, key, image, label, lookup, skipper, produced)
                    number += 1
                    if sample is not None:
                        yield sample
                        produced += 1
        except sqlite3.DatabaseError as e:
            raise ShardkitError(f"{self.path}: table {self.table!r}: read failed after {number} rows ({e})") from None
        finally:
            conn.close()

    def _sample(
        self,
        number: int,
        key: Any,
        image: Any,
        label: Any,
        lookup: dict[str, int] | None,
        skipper: RecordSkipper,
        produced: int,
    ) -> dict[str, Any] | None:
        source_id = key if key is not None else number
        if isinstance(source_id, bytes):
            source_id = source_id.decode("utf-8", errors="backslashreplace")
        where = f"{self.path}: table {self.table!r} record {number} ({self.key_column or 'rowid'} {source_id!r})"
        if not isinstance(image, bytes):
            kind = "NULL" if image is None else type(image).__name__
            skipper.bad(f"{where}: column {self.image_column!r} holds {kind}, not image bytes", produced, where)
            return None
        result = image_payload(image, where)
        if isinstance(result, str):
            skipper.bad(result, produced, where)
            return None
        cls = None
        if label is not None:
            if lookup is not None and str(label) in lookup:
                cls = lookup[str(label)]
            elif lookup is None and isinstance(label, float) and label.is_integer():
                cls = int(label)
            elif lookup is None and isinstance(label, int):
                cls = label
            else:
                raise ShardkitError(f"{where}: label {label!r} is not a class index or name")
        meta = {"source": self.path, "source_format": FORMAT, "source_id": source_id}
        return make_sample(produced, result[0], result[1], cls, meta)


def open_source(path: str, options: IngestOptions) -> SQLiteSource:
    """Open one table of a SQLite database."""
    if not os.path.isfile(path):
        raise ShardkitError(f"{path}: not a SQLite database file")
    return SQLiteSource(path, options)
