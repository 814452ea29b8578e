"""Companion sets: new fields for an existing shard set, without rewriting its images.

::

    base manifest ──▶ base samples, in order ──▶ workers (pool.py):  ──▶ ONE assembler: ──▶ ShardWriter
    (its shards)      (key tables only, for a    fn(sample), or the    one companion shard   (the base's shard
                       table)                    table's row -> new    per base shard        names, .idx,
                                                 fields, encoded                             manifest)

The companion has exactly the base's shards (same names, boundaries, keys and order,
see :mod:`shardkit.format.companion`) and a manifest that records the base manifest's
name, URL and sha256, so a joined read (``ShardDataset(base, join=[companion])``) can
prove they line up. As with :func:`shardkit.write`, one assembler in this process writes
the results in base order: the bytes do not depend on ``workers``, and ``resume=True``
carries on a killed write after its finished shards (read from the base's next shard,
not from its start).

A key without a value (``fn`` returned None or nothing, or the table has no row for it)
follows ``missing``, and keeps its place whatever it is: "error" (default) stops the
write naming the shard and key; "skip" writes the empty marker ``KEY.__missing__``, and
a joined read leaves that sample out (counted as filtered, like a ``select`` reject);
"empty" keeps the sample with nothing new: the table form writes its text and json
fields empty (``txt`` "", ``json`` nulls, so batches keep their shape), otherwise (a
function, or a table of labels only) the empty marker ``KEY.__empty__`` is written and a
joined read keeps the base's fields (a label-fix table then needs rows only for the fixes).
"""

from __future__ import annotations

import bisect
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ShardkitError
from ..format.companion import EMPTY, MISSING
from ..format.index import Manifest, manifest_name
from ..format.samples import Sample, encode_field
from ..storage.backend import DEFAULT_OPTIONS, SourceOptions, local_path
from . import resume as record
from .companion_base import BaseSet, open_base
from .pool import default_workers, ordered_results, require_picklable, start_method_for
from .progress import LateProgress
from .result import WriteResult, build_result
from .writer import ShardWriter

log = logging.getLogger(__name__)

MISSING_POLICIES = ("error", "skip", "empty")

#: A companion shard ends where its base shard does, never because of its size.
_NO_SIZE_LIMIT = 1 << 62


# -------------------------------------------------------------------------- worker side

#: What a worker gets: (where, key, payload): the base sample (function form) or the
#: table row, None when the table has none (table form).
Item = tuple[str, str, Any]


class NoNewFields(LookupError):
    """A base key got no new fields and ``missing="error"`` (the pool names the shard and key)."""


@dataclass(frozen=True)
class FieldsWork:
    """One base sample to its companion sample, in a worker (picklable when ``fields`` is).

    ``fields(payload)`` gives the new fields (a dict, or None when there are none); the
    result is ``(missing, sample)`` with every value already encoded to bytes, keyed
    with the base key.
    """

    fields: Callable[[Any], Mapping[str, Any] | None]
    missing: str = "error"
    empty: Mapping[str, Any] | None = None  # the fields missing="empty" writes
    absent: str = "fn returned None for it"  # why a key has no fields, for the message

    def __call__(self, item: Item) -> tuple[bool, dict[str, Any]]:
        _, key, payload = item
        out = self.fields(payload)
        if out is not None and not isinstance(out, Mapping):
            raise TypeError(f"fn returned a {type(out).__name__}; return a dict of new fields, or None")
        new = {k: v for k, v in (out or {}).items() if not k.startswith("_")}
        if out is not None and out.get("__key__", key) != key:
            raise ValueError(f"fn returned __key__ {out['__key__']!r}; a companion's keys stay the base's")
        if new:
            return False, {"__key__": key, **{ext: encode_field(ext, value) for ext, value in new.items()}}
        if self.missing == "skip":
            return True, {"__key__": key, MISSING: b""}
        if self.missing == "empty":
            if not self.empty:
                return True, {"__key__": key, EMPTY: b""}
            return True, {"__key__": key, **{ext: encode_field(ext, value) for ext, value in self.empty.items()}}
        raise NoNewFields(
            f"{self.absent}; with missing='error' that stops the write (missing='skip' keeps its place with a marker)"
        )


@dataclass(frozen=True)
class CallFn:
    """The function form's ``fields``: the user's ``fn`` on the base sample."""

    fn: Callable[[Sample], Mapping[str, Any] | None]

    def __call__(self, sample: Sample) -> Mapping[str, Any] | None:
        return self.fn(sample)


def describe_item(item: Item) -> str:
    where, key, _ = item
    return f"{where} sample {key!r}"


# -------------------------------------------------------------------------- the result


@dataclass
class CompanionResult(WriteResult):
    """What a companion write did: a WriteResult, plus the keys written without a value
    (``missing``: ``(shard, key)``, this run) and the table keys the base lacks."""

    missing: list[tuple[str, str]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = super().as_dict()
        out["missing"] = len(self.missing)
        out["missing_keys"] = [{"shard": s, "key": k} for s, k in self.missing]
        out["unmatched"] = len(self.unmatched)
        out["unmatched_keys"] = list(self.unmatched)
        return out


def _result(base: WriteResult, **extra: Any) -> CompanionResult:
    return CompanionResult(**vars(base), **extra)


# -------------------------------------------------------------------------- the entry point


def write_companion(
    base: str | os.PathLike[str],
    dest: str,
    fn: Callable[[Sample], Mapping[str, Any] | None] | None = None,
    *,
    table: str | os.PathLike[str] | None = None,
    key_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    columns: Sequence[str] | None = None,
    workers: int | None = None,
    name: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    missing: str = "error",
    progress: bool | None = None,
    start_method: str | None = None,
    source_options: SourceOptions | None = None,
    on_start: Callable[[list[int]], None] | None = None,
) -> CompanionResult:
    """Write a companion set of ``base`` into ``dest``: new fields for every base sample.

    ``base``: the base set's manifest (``NAME.manifest.json``) or its folder, local,
    ``http(s)://`` or ``s3://``. Either ``fn(sample) -> {"txt": ..., "npy": array, ...}``
    runs on every raw base sample (bytes, as stored) in ``workers`` processes (default:
    the CPU cores), and must pickle for the start method (a module-level function); or
    ``table`` (CSV, TSV, JSONL or Parquet) gives the fields, one row per key in
    ``key_column`` (default ``key``), columns to fields as ``shardkit write`` makes them:
    ``caption_column`` to ``txt``, ``label_column`` to ``cls`` (names mapped to the base's
    classes), ``columns`` (default: every other; ``[]`` none) to ``json`` (see
    :mod:`shardkit.writing.companion_table`; the table form runs in this process unless
    ``workers`` is given). Values are stored as ``ShardWriter`` stores them (str as UTF-8,
    dict/list as JSON, numpy arrays as ``.npy``).

    The companion's shards are named as the base's and hold the same keys in the same
    order; its manifest is ``dest/NAME.manifest.json`` (``name``: default the base's).
    ``missing``: "error", "skip" or "empty", see the module docstring. Output bytes do
    not depend on ``workers``;
    ``resume`` carries on a killed write (local ``dest``), ``overwrite`` replaces one.
    ``progress``: a progress bar (default: when stderr is a terminal). Returns a
    :class:`CompanionResult`; table keys the base lacks are logged and listed in it.
    """
    started = time.perf_counter()
    if (fn is None) == (table is None):
        raise ValueError("give the new fields either as fn (a function of the base sample) or as table=, not both")
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {', '.join(MISSING_POLICIES)}, got {missing!r}")
    table_options: dict[str, Any] = {
        "key_column": key_column,
        "caption_column": caption_column,
        "label_column": label_column,
        "columns": columns,
    }
    given = [k for k, v in table_options.items() if v is not None]
    if given and table is None:
        raise ValueError(f"{', '.join(given)} name columns of table=; they mean nothing to fn")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if resume and overwrite:
        raise ValueError("resume carries on a write and overwrite replaces it: choose one")
    options = source_options or DEFAULT_OPTIONS
    base_set = open_base(os.fspath(base), options)
    name = name or base_set.manifest.name
    fingerprint: dict[str, Any] = {"companion_of": base_set.sha256, "missing": missing}
    lookup: Any = None
    classes = None
    if fn is not None:
        work = FieldsWork(CallFn(fn), missing)
        fingerprint["fn"] = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        batch_size = 4  # samples carry their image bytes through the pipes
        if workers is None:
            workers = max(1, min(default_workers(), -(-base_set.manifest.total_samples // batch_size)))
    else:
        from .companion_table import TableLookup

        assert table is not None
        lookup = TableLookup.open(
            os.fspath(table),
            key_column=key_column,
            caption_column=caption_column,
            label_column=label_column,
            columns=columns,
            base_classes=base_set.manifest.classes,
        )
        empty = lookup.fields.empty() if missing == "empty" else None
        work = FieldsWork(lookup.fields, missing, empty, f"{os.fspath(table)} has no row for it")
        if lookup.fields.plan.label is not None:
            classes = base_set.manifest.classes  # a companion's cls means what the base's means
        fingerprint.update(lookup.fingerprint)
        batch_size = 64
        workers = workers or 1
    method = start_method_for(start_method) if workers > 1 else None
    if method is not None:
        require_picklable(work, method, "fn" if fn is not None else "the table's column plan")

    local = local_path(dest)
    if local is not None:
        dest = local
    elif resume:
        raise ShardkitError(f"--resume needs a local DEST, not {dest}")
    names = base_set.companion_names
    point: record.ResumePoint | None = record.ResumePoint([], [])
    if resume and os.path.isdir(dest):
        point = record.load(dest, name, fingerprint, shard_names=names)
        if point is None:
            return _already_complete(dest, name, base_set, started, workers)
    assert point is not None
    writer = ShardWriter(
        dest,
        name=name,
        shard_size=_NO_SIZE_LIMIT,
        shard_names=names,
        base=base_set.ref,
        classes=classes,
        overwrite=overwrite or resume,
        source_options=source_options,
    )
    first = len(point.adopt)
    if point.adopt:
        writer.adopt(point.adopt)
        log.warning("resuming companion %s after %d complete shard(s)", name, first)
    counts = base_set.counts
    starts_at = [0]
    for n in counts:
        starts_at.append(starts_at[-1] + n)  # input index where each shard starts
    starts = list(point.starts)
    if local is not None:
        record.save(writer.dest, name, fingerprint, starts)
    if lookup is not None:
        for shard in range(first):  # so the adopted shards' keys do not read as unmatched
            lookup.mark_used(base_set.keys(shard, options))

    def items() -> Iterator[tuple[int, Item]]:
        index = starts_at[first]
        for shard in range(first, len(counts)):
            where = base_set.urls[shard]
            if lookup is None:
                for sample in base_set.samples(shard, options):
                    yield index, (where, sample["__key__"], sample)
                    index += 1
            else:
                for key in base_set.keys(shard, options):
                    yield index, (where, key, lookup.row(key))
                    index += 1

    def finish_through(shard: int) -> None:
        """Finish shards up to (not including) ``shard``, empty ones included."""
        while len(writer.shards) < shard:
            writer.next_shard(allow_empty=True)
            starts.append((starts_at[len(writer.shards)], 0))
            if local is not None:
                record.save(writer.dest, name, fingerprint, starts)

    missing_keys: list[tuple[str, str]] = []
    bar = LateProgress(total=starts_at[-1], unit="sample", show=sys.stderr.isatty() if progress is None else progress)
    try:
        for index, (was_missing, sample) in ordered_results(
            work,
            items(),
            workers=workers,
            describe=describe_item,
            batch_size=batch_size,
            # One batch per worker: with two, the pool's parent can block sending a batch of
            # more than a pipe's buffer (64 KiB) to a worker blocked sending its results.
            prefetch=1,
            start_method=method,
            preload=(__name__,),
            on_start=on_start,
        ):
            shard = bisect.bisect_right(starts_at, index) - 1
            finish_through(shard)
            writer.write(sample)
            if index + 1 == starts_at[shard + 1]:  # its last sample: finish it now, not at the next one
                finish_through(shard + 1)
            if was_missing:
                missing_keys.append((names[shard], sample["__key__"]))
            bar.step(index)
        finish_through(len(counts))
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    manifest = writer.close()
    if local is not None:
        record.remove(dest, name)
    if missing_keys:
        log.warning(
            "%d key(s) had no new fields (missing=%r), first: %s in %s",
            len(missing_keys),
            missing,
            missing_keys[0][1],
            missing_keys[0][0],
        )
    unmatched = lookup.unmatched() if lookup is not None else []
    if unmatched:
        log.warning(
            "%d key(s) of the table are not in the base (not written), first: %s",
            len(unmatched),
            ", ".join(map(repr, unmatched[:5])),
        )
    done = build_result(manifest, dest, name, started, [], first, workers, 0)
    return _result(done, missing=missing_keys, unmatched=unmatched)


def _already_complete(dest: str, name: str, base: BaseSet, started: float, workers: int) -> CompanionResult:
    path = os.path.join(dest, manifest_name(name))
    with open(path, "rb") as f:
        manifest = Manifest.from_json(f.read(), url=path)
    if manifest.base is None or manifest.base["sha256"] != base.sha256:
        raise ShardkitError(f"{path}: a complete set that is not a companion of {base.manifest_url}; use --overwrite")
    log.warning("%s is already complete; nothing to do (--overwrite rewrites it)", path)
    record.remove(dest, name)
    return _result(build_result(manifest, dest, name, started, [], len(manifest.shards), workers, 0))
