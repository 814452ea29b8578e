"""Parquet tables (and a folder or pattern of them), read a row group at a time.

Memory stays bounded by a row group or two whatever the table's size: rows are read with
``pyarrow`` one row group at a time, in batches of about 32 MB of rows, and only the
columns asked for (the label or key column alone for the first pass). A part or a resume
(``--part``, ``--resume``) starts at its row group instead of reading the rows before it.

Inputs: a ``.parquet`` file; a folder of them (every ``*.parquet`` below it, in path
order; the Hugging Face layout ``data/train-00000-of-00010.parquet`` is found from the
dataset's folder, and a folder holding several splits is refused: name one with a pattern
such as ``'DIR/data/train-*.parquet'``); or such a pattern. Every file must have the same
columns and types.

Column kinds come from the schema (:func:`arrow_kind`); the Hugging Face ``Image``
feature is the struct ``{bytes: binary, path: string}``, a list of images
``list<struct<...>>``; ``ClassLabel`` names come from the schema's ``huggingface``
metadata. Needs ``pyarrow``: ``pip install 'shardkit[parquet]'``.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import ShardkitError

_BATCH_BYTES = 32 << 20  # rows converted to Python objects at once
_SPLIT = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}\.parquet$")


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        from . import missing_library

        raise missing_library("pyarrow", "parquet") from None
    return pq


def _has_glob(src: str) -> bool:
    return any(c in src for c in "*?[")


def _parquet_files(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, n) for n in filenames if n.lower().endswith(".parquet")]
    return sorted(found)


def is_parquet_input(src: str) -> bool:
    """A .parquet file, a folder with .parquet files (at its top or in ``data/``), or a
    pattern naming .parquet files. Cheap: never walks a whole image folder."""
    if _has_glob(src) and not os.path.exists(src):
        matches = glob.glob(src, recursive=True)
        return bool(matches) and all(m.lower().endswith(".parquet") for m in matches)
    if os.path.isfile(src):
        return src.lower().endswith(".parquet")
    if os.path.isdir(src):
        for folder in (src, os.path.join(src, "data")):
            if os.path.isdir(folder) and any(n.lower().endswith(".parquet") for n in os.listdir(folder)):
                return True
    return False


def list_files(src: str) -> list[str]:
    """The Parquet files of an input (module docstring), or ShardkitError saying why none."""
    if _has_glob(src) and not os.path.exists(src):
        files = sorted(glob.glob(src, recursive=True))
        if not files:
            raise ShardkitError(f"{src}: the pattern matches no file")
        odd = [f for f in files if not f.lower().endswith(".parquet")]
        if odd:
            raise ShardkitError(f"{src}: the pattern matches {odd[0]}, which is not a .parquet file")
        return files
    if not os.path.isdir(src):
        return [src]
    files = _parquet_files(src)
    if not files:
        raise ShardkitError(f"{src}: no .parquet files in this folder")
    splits = sorted({m["split"] for m in (_SPLIT.match(os.path.basename(f)) for f in files) if m})
    if len(splits) > 1:
        example = os.path.join(os.path.dirname(files[0]), f"{splits[0]}-*.parquet")
        raise ShardkitError(f"{src}: holds the splits {', '.join(splits)}; write one at a time, e.g. {example!r}")
    return files


def arrow_kind(t: Any) -> str:
    """A column's kind (see :mod:`shardkit.ingest.columns`) from its Arrow type."""
    import pyarrow as pa
    import pyarrow.types as pt

    if pt.is_dictionary(t):
        return arrow_kind(t.value_type)
    if pt.is_string(t) or pt.is_large_string(t) or getattr(pt, "is_string_view", lambda _: False)(t):
        return "text"
    if pt.is_binary(t) or pt.is_large_binary(t) or pt.is_fixed_size_binary(t):
        return "binary"
    if getattr(pt, "is_binary_view", lambda _: False)(t):
        return "binary"
    if pt.is_boolean(t):
        return "bool"
    if pt.is_integer(t):
        return "int"
    if pt.is_floating(t):
        return "float"
    if pt.is_null(t):
        return "null"
    if pt.is_temporal(t):
        return "temporal"
    if pt.is_decimal(t):
        return "decimal"
    if pt.is_struct(t):
        names = {t.field(i).name: arrow_kind(t.field(i).type) for i in range(t.num_fields)}
        if names == {"bytes": "binary", "path": "text"}:
            return "image"  # the Hugging Face Image feature
        return "struct:binary" if any("binary" in k or "image" in k for k in names.values()) else "struct"
    if pt.is_list(t) or pt.is_large_list(t) or pt.is_fixed_size_list(t):
        return "list:" + arrow_kind(t.value_type)
    if isinstance(t, pa.MapType):
        inner = arrow_kind(t.item_type) + arrow_kind(t.key_type)
        return "map:binary" if "binary" in inner or "image" in inner else "map"
    return str(t)


class ParquetTable:
    """The rows of one or more Parquet files with the same schema (module docstring)."""

    typed = True

    def __init__(self, src: str) -> None:
        pq = _pyarrow()
        self.src = src
        self.files = list_files(src)
        self.path = self.files[0]  # relative image paths resolve against its folder
        self._root = src if os.path.isdir(src) else os.path.dirname(self.files[0])
        try:
            schema = pq.read_schema(self.files[0])
            self._groups = []  # per file: the row counts of its row groups
            self._sizes = []  # per file: bytes per row of each row group (for the batch size)
            for path in self.files:
                meta = pq.read_metadata(path)
                if path != self.files[0]:
                    other = meta.schema.to_arrow_schema()
                    if other.names != schema.names or other.types != schema.types:
                        mine = ", ".join(f"{f.name}: {f.type}" for f in other)
                        raise ShardkitError(
                            f"{path}: its columns ({mine}) differ from {os.path.basename(self.files[0])}'s "
                            f"({', '.join(f'{f.name}: {f.type}' for f in schema)}); every file of a table "
                            "must have the same columns and types"
                        )
                groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
                self._groups.append([g.num_rows for g in groups])
                self._sizes.append([g.total_byte_size / max(1, g.num_rows) for g in groups])
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise ShardkitError(f"{src}: not a readable Parquet table ({e})") from None
        self.columns = list(schema.names)
        self.kinds: dict[str, str | None] = {f.name: arrow_kind(f.type) for f in schema}
        self._features = _hf_features(schema)

    def __len__(self) -> int:
        return sum(sum(groups) for groups in self._groups)

    def class_names(self, column: str) -> list[str] | None:
        feature = self._features.get(column) or {}
        names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
        return list(names) if names else None

    def _name(self, path: str) -> str:
        return os.path.relpath(path, self._root) if self._root else path

    def rows(
        self, start: int = 0, stop: int | None = None, columns: Sequence[str] | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        pq = _pyarrow()
        first = 0  # the table's index of the first row of the file
        for path, groups, sizes in zip(self.files, self._groups, self._sizes):
            total = sum(groups)
            if (stop is None or first < stop) and first + total > start:
                yield from self._file_rows(pq, path, groups, sizes, start - first, stop, first, columns)
            first += total

    def _file_rows(
        self,
        pq: Any,
        path: str,
        groups: list[int],
        sizes: list[float],
        start: int,
        stop: int | None,
        first: int,
        columns: Sequence[str] | None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Rows ``start`` (file index) to ``stop`` (table index) of one file, group by group."""
        name = self._name(path)
        begin = 0  # the file's index of the row group's first row
        number = -1
        try:
            with pq.ParquetFile(path) as f:
                for number, (count, size) in enumerate(zip(groups, sizes)):
                    end = count if stop is None else min(count, stop - first - begin)
                    if end <= 0:
                        return
                    if begin + count <= start:
                        begin += count
                        continue
                    at = 0  # the group's index of the batch's first row
                    batch = max(1, min(4096, int(_BATCH_BYTES // max(size, 1.0))))
                    for records in f.iter_batches(
                        batch_size=batch, row_groups=[number], columns=columns, use_threads=False
                    ):
                        lo, hi = max(0, start - begin - at), min(records.num_rows, end - at)
                        if lo < hi:
                            for offset, row in enumerate(records.slice(lo, hi - lo).to_pylist(), begin + at + lo):
                                yield f"{name}: row {offset}", row
                        at += records.num_rows
                        if at >= end:
                            break
                    begin += count
        except (OSError, ValueError) as e:
            what = f"row group {number}" if number >= 0 else "the file"
            raise ShardkitError(f"{path}: {what} cannot be read ({e})") from None


def _hf_features(schema: Any) -> dict[str, Any]:
    """The Hugging Face ``datasets`` features recorded in the schema metadata (or {})."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        features = json.loads(raw).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return {}
    return features if isinstance(features, dict) else {}
