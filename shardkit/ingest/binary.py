"""Binary + index source: one big file of concatenated images and a text index.

Index layout (one record a line, whitespace-separated)::

    # comment lines start with '#'; blank lines are ignored
    OFFSET LENGTH [LABEL [ID...]]

- OFFSET, LENGTH: decimal byte offset and length of the record in the data file;
  every record must lie inside the file (checked up front, errors name the line).
- LABEL: an integer class index, ``-`` for none, or a class name. When any label is not
  an integer, all labels are class names: ``classes`` is their sorted set and ``cls``
  the position in it.
- ID: the rest of the line (may contain spaces): the record's original path or id, kept
  as ``json.source_id``; without it the source id is the line number.

The index is ``options.index``, else ``SRC.idx``, else ``SRC.index``. It is read twice
(a validation pass at open, a streaming pass per iteration), never held in memory.

This module also holds the helpers every migration source shares: image-format
sniffing, sample construction and the skip-or-raise policy for bad records.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from ..errors import ShardkitError
from . import IngestOptions
from .common import RecordSkipper, class_names, image_payload, make_sample

log = logging.getLogger(__name__)

FORMAT = "binary"
_INDEX_SUFFIXES = (".idx", ".index")


# -- shared helpers ---------------------------------------------------------------------


def resolve_index(src: str, options: IngestOptions) -> str | None:
    """The index file for ``src``: options.index, else SRC.idx, else SRC.index."""
    if options.index:
        return options.index
    for suffix in _INDEX_SUFFIXES:
        if os.path.isfile(src + suffix):
            return src + suffix
    return None


# -- the binary + index source ----------------------------------------------------------


def _parse_line(line: str) -> tuple[int, int, str | None, str | None] | None:
    """(offset, length, label, id) for an index line, None for blanks/comments.

    Raises ValueError with the reason when the line is malformed.
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    parts = text.split(None, 3)
    if len(parts) < 2:
        raise ValueError(f"expected 'offset length [label [id]]', got {text[:80]!r}")
    try:
        offset, length = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"offset and length must be integers, got {parts[0]!r} {parts[1]!r}") from None
    label = parts[2] if len(parts) > 2 and parts[2] != "-" else None
    ident = parts[3] if len(parts) > 3 else None
    return offset, length, label, ident


def detect(path: str) -> bool:
    """A regular file with a sidecar ``.idx``/``.index`` whose first record line parses."""
    if not os.path.isfile(path):
        return False
    index = resolve_index(path, IngestOptions())
    if index is None:
        return False
    try:
        with open(index, encoding="utf-8") as f:
            for _, line in zip(range(100), f):
                record = _parse_line(line)
                if record is not None:
                    return record[0] >= 0 and record[1] > 0
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return False


class BinarySource:
    """Records of a big file addressed by a text index (see module docstring)."""

    def __init__(self, path: str, options: IngestOptions) -> None:
        self.path = path
        self.options = options
        index = resolve_index(path, options)
        if index is None:
            raise ShardkitError(f"{path}: no index file; expected {path}.idx or {path}.index (or pass --index)")
        if not os.path.isfile(index):
            raise ShardkitError(f"{index}: index file not found")
        self.index = index
        self.skipped: list[tuple[str, str]] = []  # (where, reason), filled while iterating
        self._count, self.classes = self._validate()

    def _records(self) -> Iterator[tuple[int, int, int, str | None, str | None]]:
        """(line number, offset, length, label, id) of each index record."""
        with open(self.index, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = _parse_line(line)
                except ValueError as e:
                    raise ShardkitError(f"{self.index}: line {number}: {e}") from None
                if record is not None:
                    yield (number, *record)

    def _validate(self) -> tuple[int, list[str] | None]:
        size = os.path.getsize(self.path)
        count = 0
        labels: set[str] = set()
        try:
            for number, offset, length, label, _ in self._records():
                if offset < 0 or length <= 0 or offset + length > size:
                    raise ShardkitError(
                        f"{self.index}: line {number}: record at offset {offset} with length "
                        f"{length} does not fit in {self.path} ({size} bytes)"
                    )
                if label is not None:
                    labels.add(label)
                count += 1
        except UnicodeDecodeError as e:
            raise ShardkitError(f"{self.index}: not a UTF-8 text index ({e.reason})") from None
        return count, class_names(labels)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        lookup = {name: i for i, name in enumerate(self.classes)} if self.classes else None
        skipper = RecordSkipper(self.options, self.skipped)
        produced = 0
        with open(self.path, "rb") as f:
            for number, offset, length, label, ident in self._records():
                f.seek(offset)
                data = f.read(length)
                where = f"{self.path}: record at index line {number} (offset {offset})"
                if len(data) != length:
                    raise ShardkitError(f"{where}: file ends after {len(data)} of {length} bytes")
                result = image_payload(data, where)
                if isinstance(result, str):
                    skipper.bad(result, produced, where)
                    continue
                ext, payload = result
                cls = None
                if label is not None:
                    cls = lookup[label] if lookup is not None else int(label)
                meta = {
                    "source": self.path,
                    "source_format": FORMAT,
                    "source_id": ident if ident is not None else number,
                    "offset": offset,
                }
                yield make_sample(produced, ext, payload, cls, meta)
                produced += 1


def open_source(path: str, options: IngestOptions) -> BinarySource:
    """Open ``path`` (the big data file) with its index."""
    if os.path.isdir(path):
        raise ShardkitError(f"{path}: the binary source is a data file plus an index, not a folder")
    return BinarySource(path, options)
