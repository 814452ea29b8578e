"""The table form of a companion write: a CSV, TSV, JSONL or Parquet table, one row per key.

The table is read with the writer's table readers (:mod:`shardkit.ingest.table`) and its
columns become fields by the same plan as ``shardkit write`` (:mod:`shardkit.ingest.columns`,
with no image column: the base holds the images): the caption column becomes ``txt``, a
class column ``cls``, the other columns ``json`` (``columns=`` chooses them; ``[]``
keeps none, e.g. for a table of label fixes). The key column (``key`` unless named)
matches rows to base keys. Class names map to the base's class indices (its manifest's
``classes``): a companion's ``cls`` means what the base's means.

The rows are held in memory as key -> row (a caption table is small beside its images),
then each base key takes its row in base order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ShardkitError
from ..ingest.columns import ColumnPlan, plan_columns, row_fields
from ..ingest.table import SUFFIXES, detect, open_table
from ..ingest.values import check_key, label_classes

log = logging.getLogger(__name__)


def table_format(path: str) -> str:
    """The table format of ``path`` (by its name; a folder or pattern of Parquet files too).
    A ``.tsv`` is a table here whatever its header names (no image list to tell it from)."""
    if detect(path, "parquet"):
        return "parquet"
    for fmt, suffixes in SUFFIXES.items():
        if fmt != "parquet" and os.path.isfile(path) and path.lower().endswith(suffixes):
            return fmt
    raise ShardkitError(
        f"{path}: not a table shardkit reads (.csv, .tsv, .jsonl, .ndjson, .parquet, or a folder of .parquet)"
    )


@dataclass(frozen=True)
class RowFields:
    """A row (``(where, row)``, None when the table has none) to its new fields, in a
    worker process (picklable)."""

    plan: ColumnPlan
    typed: bool
    classes: Mapping[str, int] | None = None

    def __call__(self, item: tuple[str, Mapping[str, Any]] | None) -> dict[str, Any] | None:
        if item is None:
            return None
        where, row = item
        return row_fields(row, self.plan, where=where, classes=self.classes, typed=self.typed)

    def empty(self) -> dict[str, Any]:
        """The fields a key without a row gets with ``missing="empty"``: an empty ``txt`` and
        null ``json`` values (so batches keep their shape), no ``cls`` (no class is not a
        class); none at all for a table of labels only (then the ``__empty__`` marker)."""
        out: dict[str, Any] = {}
        if self.plan.caption is not None:
            out["txt"] = ""
        if self.plan.json:
            out["json"] = dict.fromkeys(self.plan.json)
        return out


@dataclass
class TableLookup:
    """A table as key -> row, remembering which keys were asked for."""

    path: str
    fields: RowFields
    rows: dict[str, tuple[str, dict[str, Any]]]
    fingerprint: dict[str, Any]
    used: set[str] = field(default_factory=set)

    @classmethod
    def open(
        cls,
        path: str,
        *,
        key_column: str | None = None,
        caption_column: str | None = None,
        label_column: str | None = None,
        columns: Sequence[str] | None = None,
        base_classes: Sequence[str] | None = None,
    ) -> TableLookup:
        fmt = table_format(path)
        table = open_table(path, fmt)
        key_column = key_column or ("key" if "key" in table.columns else None)
        if key_column is None or key_column not in table.columns:
            raise ShardkitError(
                f"{path}: no key column {key_column or 'key'!r} (columns: {', '.join(table.columns)}); "
                "name it with key_column (--key-column)"
            )
        plan = plan_columns(
            table.columns,
            kinds=table.kinds,
            caption=caption_column,
            label=label_column,
            key=key_column,
            keep=columns,
            where=path,
            images=False,
        )
        if plan.caption is None and plan.label is None and not plan.json:
            raise ShardkitError(f"{path}: no column but the key column {key_column!r} is kept: nothing to write")
        log.info("%s: %s", path, plan.describe())
        for note in plan.notes:
            log.warning("%s: %s", path, note)
        rows: dict[str, tuple[str, dict[str, Any]]] = {}
        for where, row in table.rows():
            key = check_key(row.get(key_column), key_column, where)
            if key in rows:
                raise ShardkitError(f"{where}: key {key!r} (column {key_column!r}) is also the key of {rows[key][0]}")
            rows[key] = (where, row)
        classes = _class_indices(plan, table, rows, base_classes, path)
        stat = os.stat(path) if os.path.isfile(path) else None
        fingerprint = {
            "table": os.path.abspath(path),
            "table_size": stat.st_size if stat else None,
            "table_mtime_ns": stat.st_mtime_ns if stat else None,
            "key_column": key_column,
            "columns": plan.describe(),
        }
        return cls(path, RowFields(plan, table.typed, classes), rows, fingerprint)

    def row(self, key: str) -> tuple[str, dict[str, Any]] | None:
        found = self.rows.get(key)
        if found is not None:
            self.used.add(key)
        return found

    def mark_used(self, keys: Sequence[str]) -> None:
        self.used.update(k for k in keys if k in self.rows)

    def unmatched(self) -> list[str]:
        """Table keys no base sample asked for, in table order."""
        return [k for k in self.rows if k not in self.used]


def _class_indices(
    plan: ColumnPlan,
    table: Any,
    rows: Mapping[str, tuple[str, Mapping[str, Any]]],
    base_classes: Sequence[str] | None,
    path: str,
) -> dict[str, int] | None:
    """Label name -> the base's class index, when the labels are names (None: indices)."""
    if plan.label is None:
        return None
    declared = table.class_names(plan.label)  # Hugging Face ClassLabel: the values are indices already
    if declared is not None:
        if base_classes is not None and list(declared) != list(base_classes):
            raise ShardkitError(
                f"{path}: column {plan.label!r} declares classes {list(declared)[:5]}..., the base "
                f"{list(base_classes)[:5]}...: its indices would mean other classes"
            )
        return None
    names = label_classes(row.get(plan.label) for _, row in rows.values())
    if names is None:
        return None
    if base_classes is None:
        raise ShardkitError(
            f"{path}: column {plan.label!r} holds class names, and the base names no classes to map them to; "
            "give class indices"
        )
    lookup = {name: i for i, name in enumerate(base_classes)}
    unknown = sorted(set(names) - set(lookup))
    if unknown:
        raise ShardkitError(
            f"{path}: column {plan.label!r} holds {', '.join(map(repr, unknown[:5]))}, not among the base's "
            f"classes ({', '.join(list(base_classes)[:8])}...)"
        )
    return lookup
