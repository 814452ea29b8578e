"""Sources for ``shardkit write``: turn existing datasets into a stream of sample dicts.

Every source yields samples shaped like the shards they become::

    {"__key__": "000123", "jpg": b"...", "cls": 3, "json": {"source_id": ...}}

and exposes ``len()`` when it knows its size (for the progress bar) and ``classes``
(label names, or None). Sources stream: memory stays bounded whatever the source size.

Formats: ``folder`` (ImageFolder layout), ``list`` (``path<TAB>label`` lines), the tables
``csv``, ``tsv``, ``jsonl`` and ``parquet`` (every column kept: images, caption, label,
the rest as JSON; :mod:`shardkit.ingest.table`, :mod:`shardkit.ingest.columns`), and the
migration formats ``hdf5``, ``numpy``, ``lmdb``, ``sqlite``, ``tfrecord``, ``binary`` (a
big file plus an offset/length/label index). Each migration format lives in its own
module exposing ``detect(path) -> bool`` and ``open_source(path, options) -> SampleSource``.
"""

from __future__ import annotations

import glob
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ShardkitError


class SampleSource(Protocol):
    """What ``shardkit write`` consumes."""

    classes: list[str] | None

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def __len__(self) -> int: ...


@dataclass
class IngestOptions:
    """Options for the sources; each source reads the ones it understands.

    images_key / labels_key / keys_key: HDF5 dataset (or npz array) names; None = defaults.
    image_format: how dense pixel arrays are stored: "png" (lossless, default), "jpg"
        (lossy, only when asked), "npy" (raw array).
    quality: JPEG quality when encoding dense arrays as jpg.
    shape / dtype: layout of a raw memmap file.
    table: SQLite table.
    image_column / label_column / key_column: the columns of the images, class labels and
        sample keys (tables and SQLite; default: found by type and name, no key column).
    caption_column: the column of the captions (tables; default: found by name).
    columns: the columns to keep in ``KEY.json`` (tables; default: every other column).
    image_feature / label_feature: TFRecord tf.train.Example feature names.
    index: the index file of a binary+index source (default: SRC + ".idx" or ".index").
    labels: optional labels file for numpy sources.
    allow_pickle: unpickle LMDB values (only for sources you trust).
    workers: threads for reading/probing image files when a source is iterated by hand.
    strict: a corrupt/unreadable input is an error instead of a reported skip.
    validate: fully decode every image before storing it (skip, or with strict fail, on
        files that do not decode); off only for trusted data.
    max_pixels: the decompression-bomb limit for that check (None: PIL's MAX_IMAGE_PIXELS).
    """

    images_key: str | None = None
    labels_key: str | None = None
    keys_key: str | None = None
    image_format: str = "png"
    quality: int = 95
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    table: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    key_column: str | None = None
    caption_column: str | None = None
    columns: tuple[str, ...] | None = None
    image_feature: str | None = None
    label_feature: str | None = None
    index: str | None = None
    labels: str | None = None
    allow_pickle: bool = False
    workers: int = 1
    strict: bool = False
    validate: bool = True
    max_pixels: int | None = None


# Format name -> module below shardkit.ingest; detection tries them in this order.
FORMATS: dict[str, str] = {
    "tsv": "table",  # before list: a .tsv whose header names an image column is a table
    "list": "files",
    "csv": "table",
    "jsonl": "table",
    "parquet": "table",
    "hdf5": "hdf5",
    "numpy": "numpy_source",
    "lmdb": "lmdb_source",
    "sqlite": "sqlite",
    "tfrecord": "tfrecord",
    "binary": "binary",
    "folder": "files",  # last: any directory matches, LMDB and TFRecord folders included
}

TABLE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
FILE_FORMATS = ("folder", "list", *TABLE_FORMATS)  # detect(src, fmt); shuffle, resize and quality apply

# The IngestOptions fields each format reads, besides the check's (strict, validate,
# max_pixels) that every source honours. Any other field set away from its default is
# refused for that format, never silently ignored.
_DENSE = {"image_format", "quality"}
FORMAT_OPTIONS: dict[str, frozenset[str]] = {
    **{fmt: frozenset({"workers"}) for fmt in FILE_FORMATS},
    **{
        fmt: frozenset({"workers", "image_column", "caption_column", "label_column", "key_column", "columns"})
        for fmt in TABLE_FORMATS
    },
    "hdf5": frozenset({"images_key", "labels_key", "keys_key", *_DENSE}),
    "numpy": frozenset({"images_key", "labels_key", "keys_key", "shape", "dtype", "labels", "allow_pickle", *_DENSE}),
    "lmdb": frozenset({"allow_pickle", *_DENSE}),
    "sqlite": frozenset({"table", "image_column", "label_column", "key_column"}),
    "tfrecord": frozenset({"image_feature", "label_feature"}),
    "binary": frozenset({"index"}),
}

# Optional libraries and the extra that installs them.
EXTRAS = {"h5py": "hdf5", "lmdb": "lmdb", "pyarrow": "parquet"}


def missing_library(library: str, fmt: str) -> ShardkitError:
    """The error to raise when an optional library is not installed."""
    extra = EXTRAS.get(library, fmt)
    return ShardkitError(f"reading {fmt} needs the {library!r} package: pip install 'shardkit[{extra}]'")


def _module(fmt: str):
    return importlib.import_module(f"{__name__}.{FORMATS[fmt]}")


def _exists(src: str) -> bool:
    """A file or folder, or a pattern matching files (a Parquet table's files)."""
    return os.path.exists(src) or (any(c in src for c in "*?[") and bool(glob.glob(src, recursive=True)))


def detect_format(src: str) -> str:
    """Guess the source format of ``src`` from its type, suffix and magic bytes."""
    if not _exists(src):
        raise ShardkitError(f"{src}: no such file or folder")
    for fmt in FORMATS:
        try:
            module = _module(fmt)
        except ImportError:
            continue
        if module.detect(src, fmt) if fmt in FILE_FORMATS else module.detect(src):
            return fmt
    raise ShardkitError(
        f"{src}: cannot tell what kind of dataset this is; pass --from with one of {', '.join(FORMATS)}"
    )


def open_source(
    src: str, *, fmt: str | None = None, options: IngestOptions | None = None, **file_options: Any
) -> SampleSource:
    """Open ``src`` as a sample stream (format detected unless ``fmt`` is given).

    ``file_options`` (shuffle, seed, resize, quality) apply to image-file sources only.
    """
    options = options or IngestOptions()
    fmt = fmt or detect_format(src)
    if fmt not in FORMATS:
        raise ShardkitError(f"unknown source format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not _exists(src):
        raise ShardkitError(f"{src}: no such file or folder")
    check_options(options, fmt)
    module = _module(fmt)
    if fmt in FILE_FORMATS:
        return module.open_source(src, fmt, options, **file_options)
    if any(file_options.values()):
        raise ShardkitError(
            f"{', '.join(k for k, v in file_options.items() if v)} only apply to "
            f"image-file sources ({', '.join(FILE_FORMATS)}), not {fmt}"
        )
    return module.open_source(src, options)


def _named(option: str) -> str:
    """How a message names an option: its field and its ``shardkit write`` flag."""
    if option == "workers":  # threads of a FileSource iterated by hand; no flag
        return "IngestOptions.workers"
    flag = "--format" if option == "image_format" else "--" + option.replace("_", "-")
    return f"IngestOptions.{option} ({flag})"


def check_options(options: IngestOptions, fmt: str) -> None:
    """Raise ShardkitError when ``options`` sets something ``fmt`` does not read."""
    default = IngestOptions()
    reads = FORMAT_OPTIONS[fmt]
    for option in sorted(set().union(*FORMAT_OPTIONS.values())):
        if option in reads or getattr(options, option) == getattr(default, option):
            continue
        users = [f for f, names in FORMAT_OPTIONS.items() if option in names and f not in ("folder", "list")]
        raise ShardkitError(
            f"{_named(option)} does not apply to {fmt} sources"
            + (f"; it is read by {', '.join(users)}" if users else "")
        )
