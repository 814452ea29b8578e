"""Tables as a sample source: CSV, TSV, JSONL and Parquet rows, every column kept.

- csv: a header row, then one row per sample (``csv`` module quoting; a UTF-8 BOM is fine);
- tsv: the same with tabs (a ``.tsv`` whose header names an image column; one without a
  header is a ``path<TAB>label`` list);
- jsonl: one JSON object per line (``.jsonl``/``.ndjson``); the columns are every key seen,
  a key a row lacks is null there;
- parquet: a ``.parquet`` file, a folder of them (the Hugging Face layout
  ``data/train-00000-of-00010.parquet``: a folder holding several splits is refused, pick
  one with a pattern such as ``'DIR/data/train-*.parquet'``), or such a pattern. Needs
  ``pyarrow`` (``pip install 'shardkit[parquet]'``); see :mod:`shardkit.ingest.parquet`.

Where each column goes is :mod:`shardkit.ingest.columns`; the files are read by
:mod:`shardkit.ingest.text_table` and :mod:`shardkit.ingest.parquet`. Rows stream: the table is read
once up front to count rows and, when there is a label or key column, that column (a
Parquet table only reads its metadata and those columns), then once more as it is
written. Only ``shuffle`` holds the rows of a text table in memory; a Parquet table is
never shuffled here (readers shuffle). Images load in the writer's worker processes
(:class:`RowLoader`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import ShardkitError
from ..threadmap import ordered_map
from . import IngestOptions
from .columns import ColumnPlan, image_refs, plan_columns, row_fields
from .common import Warned
from .files import ImageChecks
from .text_table import TextTable, names_an_image_column
from .values import ValueNotes, check_key, label_classes

log = logging.getLogger(__name__)

SUFFIXES = {"csv": (".csv",), "tsv": (".tsv",), "jsonl": (".jsonl", ".ndjson"), "parquet": (".parquet",)}


class Table(Protocol):
    """Rows of a table: what :class:`TableSource` reads."""

    path: str
    typed: bool  # values carry their types (JSONL, Parquet); False: text cells (CSV, TSV)
    columns: list[str]
    kinds: dict[str, str | None]  # column -> kind (see ingest.columns), None when unknown

    def __len__(self) -> int: ...

    def rows(
        self, start: int = 0, stop: int | None = None, columns: Sequence[str] | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(where, row)`` for rows ``start`` to ``stop``: where names the file and row."""
        ...

    def class_names(self, column: str) -> list[str] | None:
        """Label names the table declares for ``column`` (Hugging Face ClassLabel), or None."""
        ...


# -- detection --------------------------------------------------------------------------


def detect(src: str, fmt: str) -> bool:
    lower = src.lower()
    if fmt == "parquet":
        from .parquet import is_parquet_input

        return is_parquet_input(src)
    if not os.path.isfile(src) or not lower.endswith(SUFFIXES[fmt]):
        return False
    return fmt != "tsv" or names_an_image_column(src)


def open_table(src: str, fmt: str) -> Table:
    if fmt == "parquet":
        from .parquet import ParquetTable

        return ParquetTable(src)
    if fmt not in SUFFIXES:
        raise ShardkitError(f"{src}: {fmt} is not a table format ({', '.join(SUFFIXES)})")
    return TextTable(src, fmt)


# -- rows to the writer's workers ---------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row on its way to a worker: where it is, its non-image fields (``txt``, ``cls``,
    ``json``) and its images (paths, bytes, or None for a missing one)."""

    where: str
    fields: dict[str, Any]
    images: tuple[Any, ...]
    multi: bool


@dataclass(frozen=True)
class RowLoader:
    """A row's images read and checked (:func:`shardkit.ingest.files.prepare_image`) and
    its sample built, in a worker process; or ``(where, reason)`` when one image cannot
    be stored. A list column's images are ``KEY.0.EXT``, ``KEY.1.EXT``..."""

    column: str
    checks: ImageChecks = ImageChecks()

    def __call__(self, item: tuple[str, Row]) -> dict[str, Any] | Warned | tuple[str, str]:
        key, row = item
        sample: dict[str, Any] = {"__key__": key}
        warned: list[tuple[str, str]] = []
        for i, ref in enumerate(row.images):
            what = f"image {i} of column {self.column!r}" if row.multi else f"column {self.column!r}"
            if ref is None:
                return row.where, f"{what}: no image (null or empty)"
            data = ref
            if isinstance(ref, str):
                try:
                    with open(ref, "rb") as f:
                        data = f.read()
                except OSError as e:
                    return row.where, f"{what}: {ref}: cannot read: {e.strerror}"
            image = self.checks.prepare(data)
            if isinstance(image, str):
                return row.where, f"{what}: {image}"
            name = f"{i}.{image.ext}" if row.multi else image.ext
            sample[name] = image.data
            if image.warning:
                warned.append((row.where, f"{name}: {image.warning}"))
        sample.update(row.fields)
        return Warned(sample, tuple(warned)) if warned else sample


def _digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def check_keys(table: Table, column: str) -> None:
    """Every key valid and unique, or ShardkitError naming the row; 8 bytes a row in memory."""
    digests = array("q")
    for where, row in table.rows(columns=[column]):
        digests.append(_digest(check_key(row[column], column, where)))
    ordered = np.sort(np.frombuffer(digests, dtype=np.int64))
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not repeated:
        return
    first: dict[str, str] = {}
    for where, row in table.rows(columns=[column]):
        key = str(row[column])
        if _digest(key) in repeated:
            if key in first:
                raise ShardkitError(f"{where}: key {key!r} (column {column!r}) is also the key of {first[key]}")
            first[key] = where


class TableSource:
    """Samples from the rows of a table (module docstring); iterate for sample dicts.

    ``plan``: where each column goes; ``classes``: label names (or None); ``notes``: what
    a user should hear about the columns and values (filled while rows are read).
    """

    def __init__(
        self,
        src: str,
        fmt: str,
        options: IngestOptions,
        *,
        shuffle: bool = False,
        seed: int = 0,
        resize: int | None = None,
        quality: int | None = None,
    ) -> None:
        if shuffle and fmt == "parquet":
            raise ShardkitError(
                f"{src}: --shuffle holds a table in memory to reorder it, and a Parquet table is streamed; "
                "readers shuffle (ShardDataset(..., shuffle=...)), or shuffle the table first"
            )
        self.src = src
        self.options = options
        self.resize = resize
        self.quality = quality
        self.table = open_table(src, fmt)
        self.count = len(self.table)
        if self.count == 0:
            raise ShardkitError(f"{src}: has no rows")
        plan: ColumnPlan = plan_columns(
            self.table.columns,
            kinds=self.table.kinds,
            image=options.image_column,
            caption=options.caption_column,
            label=options.label_column,
            key=options.key_column,
            keep=options.columns,
            where=src,
        )
        assert plan.image is not None  # plan_columns always finds one (images=True)
        self.plan = plan
        self.image: str = plan.image
        self.classes: list[str] | None = None
        self._lookup: dict[str, int] | None = None  # label name -> cls, when labels are names
        label = self.plan.label
        if label is not None:
            declared = self.table.class_names(label)  # Hugging Face ClassLabel: values are the indices
            if declared is not None:
                self.classes = declared
            else:
                self.classes = label_classes(row[label] for _, row in self.table.rows(columns=[label]))
                self._lookup = {name: i for i, name in enumerate(self.classes)} if self.classes else None
        if self.plan.key is not None:
            check_keys(self.table, self.plan.key)
        self.base = os.path.dirname(os.path.abspath(self.table.path))
        self.values = ValueNotes()
        self.skipped: list[tuple[str, str]] = []  # (where, reason), when iterated by hand
        self.warned: list[tuple[str, str]] = []
        self._order: list[int] | None = None
        self._rows: list[tuple[str, dict[str, Any]]] | None = None
        if shuffle:
            self._rows = list(self.table.rows())
            self._order = list(range(self.count))
            random.Random(seed).shuffle(self._order)
        log.info("%s: %s", src, self.plan.describe())
        for note in self.plan.notes:
            log.warning("%s: %s", src, note)

    def __len__(self) -> int:
        return self.count

    @property
    def embedded(self) -> bool:
        """Whether rows carry their image bytes (then they are heavy to pass around)."""
        return self.plan.image_kind in ("binary", "image")

    @property
    def notes(self) -> list[str]:
        """The plan's notes and what happened to values so far."""
        return list(self.plan.notes) + self.values.lines(self.plan.caption)

    def _key(self, index: int, row: dict[str, Any], where: str) -> str:
        if self.plan.key is not None:
            return check_key(row[self.plan.key], self.plan.key, where)
        return f"{index:0{max(6, len(str(self.count - 1)))}d}"

    def _path(self, ref: Any, where: str) -> Any:
        """A path as the worker opens it: relative to the table's folder; ``file://`` URLs
        are paths; other URLs are refused (shardkit writes what it can read locally)."""
        if not isinstance(ref, str):
            return ref
        if ref.startswith("file://"):
            ref = ref[len("file://") :]
        elif "://" in ref[:16]:
            raise ShardkitError(
                f"{where}: column {self.plan.image!r} holds the URL {ref[:80]!r}; shardkit write reads images "
                "from local paths or from the table itself: download them first (e.g. with img2dataset)"
            )
        return ref if os.path.isabs(ref) else os.path.join(self.base, ref)

    def _row(self, where: str, row: dict[str, Any]) -> Row:
        refs = [self._path(r, where) for r in image_refs(row.get(self.image), self.plan, where)]
        if not self.plan.multi and isinstance(refs[0], str):
            where = f"{where} ({refs[0]})"
        fields = row_fields(
            row, self.plan, where=where, classes=self._lookup, typed=self.table.typed, notes=self.values
        )
        return Row(where, fields, tuple(refs), self.plan.multi)

    def window(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, Row]]:
        """``(key, Row)`` for rows ``start`` to ``stop`` in write order (a part, or a resume)."""
        stop = self.count if stop is None else min(stop, self.count)
        if self._order is not None and self._rows is not None:
            for index in self._order[start:stop]:
                where, row = self._rows[index]
                yield self._key(index, row, where), self._row(where, row)
        else:
            for index, (where, row) in enumerate(self.table.rows(start, stop), start):
                yield self._key(index, row, where), self._row(where, row)
        for note in self.values.lines(self.plan.caption):
            log.warning("%s: %s", self.src, note)

    def items(self) -> TableItems:
        return TableItems(self)

    def loader(self) -> RowLoader:
        """The picklable per-row work (read, check, build the sample) for worker processes."""
        return RowLoader(self.image, ImageChecks.of(self.options, resize=self.resize, quality=self.quality))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        load = self.loader()
        workers = max(1, self.options.workers)
        items = self.window()
        results = map(load, items) if workers == 1 else ordered_map(load, items, workers, window=workers * 8)
        for result in results:
            if isinstance(result, tuple):
                where, reason = result
                if self.options.strict:
                    raise ShardkitError(f"{where}: {reason}")
                log.warning("skipping %s: %s", where, reason)
                self.skipped.append(result)
                continue
            if isinstance(result, Warned):
                self.warned.extend(result.warnings)
                result = result.sample
            yield result


class TableItems:
    """The rows of a :class:`TableSource` as ``(key, Row)`` items for the writer, with their
    count and a ``window(start, stop)`` that parts and resumes start from (a Parquet table
    seeks to the row group instead of reading the rows before it)."""

    def __init__(self, source: TableSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[tuple[str, Row]]:
        return self.source.window()

    def window(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, Row]]:
        return self.source.window(start, stop)


def open_source(src: str, fmt: str, options: IngestOptions, **kwargs: Any) -> TableSource:
    return TableSource(src, fmt, options, **kwargs)
