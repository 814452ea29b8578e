"""The write driver: :func:`write` (what ``shardkit write`` runs) and the engine under it.

::

    inputs ──▶ part slice ──▶ worker processes (pool.py): load,  ──▶ ONE assembler, in ──▶ ShardWriter
    (path or    (pure)         fn, check the images (work.py)         input order           (index, manifest)
     items)

Workers only turn inputs into sample dicts (or ``(where, reason)`` skips). The shard
boundaries are decided by a single assembler in this process from the samples in input
order, so the output bytes depend on the input and the options alone: ``workers=1`` and
``workers=8`` give byte-identical shards, indexes and manifests. At most ``prefetch``
batches per worker are in flight, so memory stays flat. A worker that dies fails the
write with the input it was on; the unfinished shard is dropped, never finished as a
short, complete-looking one.

Resuming (:mod:`shardkit.writing.resume`): with ``resume=True`` a killed write adopts its
finished shards and carries on from there, to the bytes an uninterrupted run gives.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

from ..errors import ShardkitError
from ..format.index import Manifest, manifest_name
from ..ingest import IngestOptions
from ..ingest.common import Warned
from ..ingest.files import Entry, EntryLoader, ImageChecks
from ..sizes import parse_size
from ..storage.backend import SourceOptions, local_path
from . import resume as record
from .inputs import plan_items, plan_source
from .merge import parse_part, part_name, part_slice, require_local
from .pool import default_workers, ordered_results, require_picklable, start_method_for
from .progress import LateProgress
from .result import WriteResult, build_result, shard_pattern
from .work import Result, SampleWork, Skip, describe_input
from .writer import ShardWriter

log = logging.getLogger(__name__)

# What shardkit.write_parallel (this module's 0.1 name, an alias now) offered, pool names included.
__all__ = [
    "WriteResult",
    "default_workers",
    "ordered_results",
    "shard_pattern",
    "write",
    "write_files",
    "write_parallel",
    "write_source",
]

#: Modules a forkserver imports once for all workers (the work classes and their loaders).
PRELOAD = (SampleWork.__module__, EntryLoader.__module__)


# -------------------------------------------------------------------------- the entry point


def write(
    inputs: str | os.PathLike[str] | Iterable[Any],
    dest: str,
    *,
    fn: Callable[[Any], Any] | None = None,
    shard_size: int | str = "1GB",
    max_count: int | None = None,
    name: str = "data",
    workers: int | None = None,
    part: tuple[int, int] | str | None = None,
    resume: bool = False,
    validate: bool = True,
    overwrite: bool = False,
    strict: bool = False,
    max_pixels: int | None = None,
    classes: list[str] | None = None,
    fmt: str | None = None,
    options: IngestOptions | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    resize: int | None = None,
    quality: int | None = None,
    progress: bool | None = None,
    start_method: str | None = None,
    source_options: SourceOptions | None = None,
    on_start: Callable[[list[int]], None] | None = None,
) -> WriteResult:
    """Write ``inputs`` into tar shards in ``dest`` (what ``shardkit write`` runs).

    ``inputs``: a path ``shardkit write`` accepts (an image folder, a list file, a table:
    CSV, TSV, JSONL or Parquet (a file, a folder or a pattern of files), or a dataset
    format: HDF5, numpy, LMDB, SQLite, TFRecord, binary + index; ``fmt`` names it when
    detection cannot, ``options`` carries its layout, see
    :class:`shardkit.ingest.IngestOptions`), or a sequence (any iterable) of items. A
    table keeps every column (image -> ``KEY.jpg``, a list of images -> ``KEY.0.jpg``...,
    caption -> ``KEY.txt``, label -> ``KEY.cls``, the rest -> ``KEY.json``, see
    :mod:`shardkit.ingest.columns`); ``result.columns`` says which went where and
    ``result.notes`` what changed on the way (NaN stored as null...).

    ``fn(item)``: optional; returns a sample dict (``{"jpg": bytes, "txt": "a caption",
    "json": {...}}``), a list of them, or None to drop the item. For a path input the item
    is the sample the source reads. It runs in the worker processes, so it must pickle for
    the start method in use (a module-level function; a lambda works only under fork): one
    that does not is refused at the start. Without ``fn`` every item must be a sample
    dict. A sample without ``__key__`` is keyed by its input's position (``000042``;
    ``000042_0``, ``000042_1``... for a list).

    Output bytes are identical for any ``workers`` (default: the CPU cores, or 1 when the
    workers would have nothing to do: a dataset format, or a table holding its images, with
    ``validate=False`` and no ``fn``). ``validate``: every image of every sample is fully
    decoded first; an input whose image does not decode is skipped and listed in
    ``result.skipped`` (``strict``: the first one raises); an image that decodes only with a
    decoder warning the reader tolerates (extraneous bytes before a marker, a bad ICC
    segment) is kept and listed in ``result.warned`` (``strict``: it is a problem too, so it
    raises); ``max_pixels`` is that check's decompression-bomb limit.
    ``part=(I, N)`` or ``"I/N"``: write input slice I of N (merge with
    :func:`shardkit.writing.merge.merge_parts`); ``resume``: carry on a killed write of the
    same input and options; ``overwrite``: replace a dataset of the same ``name``.
    ``shuffle``/``seed``/``resize``/``quality``: image-file and table inputs (a Parquet
    table is not shuffled; ``quality`` also for dense arrays stored as JPEG). ``classes``:
    label names for the manifest of an item sequence. ``progress``: a progress bar
    (default: when stderr is a terminal).
    """
    _refuse_contradictions(
        workers=workers, resume=resume, overwrite=overwrite, validate=validate, max_pixels=max_pixels
    )
    if seed is not None and not shuffle:
        raise ValueError("seed is the seed of shuffle=True; without shuffle it would change nothing")
    if isinstance(part, str):
        part = parse_part(part)
    if isinstance(inputs, (str, os.PathLike)):
        plan = plan_source(
            os.fspath(inputs),
            fn=fn,
            validate=validate,
            strict=strict,
            max_pixels=max_pixels,
            fmt=fmt,
            options=options,
            shuffle=shuffle,
            seed=seed,
            resize=resize,
            quality=quality,
            classes=classes,
        )
    else:
        path_only = {"fmt": fmt, "options": options, "shuffle": shuffle, "resize": resize, "quality": quality}
        given = [k for k, v in path_only.items() if v not in (None, False)]
        if given:
            raise ValueError(f"{', '.join(given)} apply to a path input (a folder, list file or dataset), not to items")
        plan = plan_items(inputs, fn=fn, validate=validate, strict=strict, max_pixels=max_pixels, classes=classes)
    if fn is not None:
        plan.fingerprint["fn"] = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    result = write_parallel(
        plan.items,
        plan.work,
        dest,
        total=plan.total,
        workers=1 if workers is None and plan.idle else workers,
        part=part,
        name=name,
        shard_size=shard_size,
        max_count=max_count,
        classes=plan.classes,
        overwrite=overwrite,
        resume=resume,
        strict=strict,
        progress=sys.stderr.isatty() if progress is None else progress,
        describe=describe_input,
        fingerprint=plan.fingerprint,
        batch_size=plan.batch_size,
        prefetch=plan.prefetch,
        start_method=start_method,
        source_options=source_options,
        on_start=on_start,
        what="fn" if fn is not None else "the work function",
    )
    result.skipped = list(getattr(plan.source, "skipped", [])) + result.skipped
    result.columns = plan.columns
    result.notes = plan.notes
    return result


# -------------------------------------------------------------------------- the engine


def write_parallel(
    items: Iterable[Any],
    work: Callable[[Any], Result],
    dest: str,
    *,
    total: int | None = None,
    workers: int | None = None,
    part: tuple[int, int] | None = None,
    name: str = "data",
    shard_size: int | str = "1GB",
    max_count: int | None = None,
    classes: list[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    strict: bool = False,
    progress: bool = False,
    describe: Callable[[Any], str] = str,
    fingerprint: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    prefetch: int = 2,
    start_method: str | None = None,
    source_options: Any = None,
    on_start: Callable[[list[int]], None] | None = None,
    what: str = "the work function",
) -> WriteResult:
    """Write ``work(item)`` for every item into shards in ``dest``, on ``workers`` processes.

    ``work`` (runs in the workers; must pickle unless they fork) returns a sample dict, a
    list of them, None (nothing to write) or a ``(where, reason)`` skip: skips are logged
    and listed in the result (with ``strict`` the first one raises). Output bytes do not
    depend on ``workers`` (default: the cores, fewer for an input a few batches long).

    ``part=(I, N)``: write only input slice I of N (``total`` needed), as dataset
    ``NAME-partIIIIIofNNNNN`` (see :mod:`shardkit.writing.merge`); a re-run of a part resumes it.
    ``resume``: carry on a killed write of the same input and options (``fingerprint``
    describes them; a mismatch is refused).
    """
    started = time.perf_counter()
    _refuse_contradictions(workers=workers, resume=resume, overwrite=overwrite)
    fingerprint = dict(fingerprint or {})
    fingerprint.update(shard_size=parse_size(shard_size), max_count=max_count, name=name, total=total)
    writer_name = name
    start, stop = 0, None  # the slice of the inputs this write covers
    if part is not None:
        require_local(dest, "--part")
        if total is None:
            raise ShardkitError("--part needs an input whose size is known")
        index, count = part
        start, stop = part_slice(total, index, count)
        writer_name = part_name(name, index, count)
        fingerprint["part"] = [index, count]
        total = stop - start
        resume = resume or not overwrite
    if workers is None:
        workers = default_workers()
        if total is not None:  # no process start-up for inputs a few batches long (same bytes either way)
            workers = max(1, min(workers, -(-total // batch_size)))
    method = start_method_for(start_method) if workers > 1 else None
    if method is not None:
        require_picklable(work, method, what)
    local = local_path(dest)
    if local is not None:
        dest = local
    elif resume:
        raise ShardkitError(f"--resume needs a local DEST, not {dest}")
    point: record.ResumePoint | None = record.ResumePoint([], [])
    if resume and os.path.isdir(dest):
        point = record.load(dest, writer_name, fingerprint)
        if point is None:
            path = os.path.join(dest, manifest_name(writer_name))
            with open(path, "rb") as f:
                manifest = Manifest.from_json(f.read(), url=path)
            log.warning("%s is already complete; nothing to do (--overwrite rewrites it)", path)
            record.remove(dest, writer_name)
            return build_result(manifest, dest, writer_name, started, [], len(manifest.shards), workers, 0)
        if point.adopt:
            log.warning(
                "resuming %s after %d complete shard(s), at input %d", writer_name, len(point.adopt), point.next[0]
            )
    assert point is not None
    writer = ShardWriter(
        dest,
        name=writer_name,
        shard_size=shard_size,
        max_count=max_count,
        classes=classes,
        overwrite=overwrite or resume,
        source_options=source_options,
    )
    starts = list(point.starts)
    if point.adopt:
        writer.adopt(point.adopt)
    if local is not None:
        record.save(writer.dest, writer_name, fingerprint, starts)
    first_input, first_sample = point.next
    skipped: list[Skip] = []
    warned: list[Skip] = []
    filtered = 0
    bar = LateProgress(total=total, unit="input", show=progress)
    try:
        indexed = enumerate(window(items, start + first_input, stop), first_input)
        for index, result in ordered_results(
            work,
            indexed,
            workers=workers,
            describe=describe,
            batch_size=batch_size,
            prefetch=prefetch,
            start_method=method,
            preload=PRELOAD,
            on_start=on_start,
        ):
            if isinstance(result, Warned):
                for where, warning in result.warnings:
                    log.info("%s: decoded with a warning (kept): %s", where, warning)
                warned.extend(result.warnings)
                result = result.sample
            if isinstance(result, tuple):
                where, reason = result
                if strict:
                    raise ShardkitError(f"{where}: {reason}")
                log.warning("skipping %s: %s", where, reason)
                skipped.append(result)
            elif not result:
                filtered += 1
            else:
                samples = result if isinstance(result, list) else [result]
                for j, sample in enumerate(samples):
                    if index == first_input and j < first_sample:
                        continue  # in the adopted shards already
                    before = len(writer.shards)
                    writer.write(sample)
                    if len(writer.shards) > before:
                        starts.extend([(index, j)] * (len(writer.shards) - before))
                        if local is not None:
                            record.save(writer.dest, writer_name, fingerprint, starts)
            bar.step(index)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    manifest = writer.close()
    if local is not None:
        record.remove(dest, writer_name)
    return build_result(manifest, dest, writer_name, started, skipped, len(point.adopt), workers, filtered, warned)


def window(items: Iterable[Any], start: int, stop: int | None) -> Iterator[Any]:
    """Items ``start`` to ``stop``: through the items' own ``window(start, stop)`` when they
    have one (a table seeks to the row instead of reading the rows before it)."""
    own = getattr(items, "window", None)
    return own(start, stop) if callable(own) else islice(items, start, stop)


def _refuse_contradictions(
    *,
    workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    validate: bool = True,
    max_pixels: int | None = None,
) -> None:
    """Options that cannot all be honoured are refused, before anything is written."""
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if resume and overwrite:
        raise ValueError("resume carries on a write and overwrite replaces it: choose one")
    if max_pixels is not None and not validate:
        raise ValueError("max_pixels is the limit of the decode check, which validate=False turns off")


# -------------------------------------------------------------------------- 0.1 entry points


def write_source(
    src: str,
    dest: str,
    *,
    options: IngestOptions | None = None,
    **kwargs: Any,
) -> WriteResult:
    """:func:`write` for a path, with the check's settings taken from ``options`` (``validate``,
    ``strict``, ``max_pixels``), as shardkit 0.1 called it. New code calls :func:`write`."""
    options = options or IngestOptions()
    return write(
        src,
        dest,
        options=options,
        validate=options.validate,
        strict=options.strict,
        max_pixels=options.max_pixels,
        **kwargs,
    )


def write_files(
    paths: Iterable[str],
    dest: str,
    *,
    labels: Iterable[int] | None = None,
    workers: int | None = None,
    validate: bool = True,
    max_pixels: int | None = None,
    **kwargs: Any,
) -> WriteResult:
    """Write image files (in the given order; keys 000000, 000001, ...) with a process pool.

    ``labels`` gives one integer class per path. ``kwargs`` go to :func:`write_parallel`
    (``name``, ``shard_size``, ``max_count``, ``part``, ``resume``, ``overwrite``, ``strict``...).
    """
    _refuse_contradictions(validate=validate, max_pixels=max_pixels)
    paths = list(paths)
    label_list = list(labels) if labels is not None else [None] * len(paths)
    if len(label_list) != len(paths):
        raise ValueError(f"{len(label_list)} labels for {len(paths)} paths")
    width = max(6, len(str(len(paths) - 1)))
    entries = [(f"{i:0{width}d}", Entry(p, p, lab, None)) for i, (p, lab) in enumerate(zip(paths, label_list))]
    fingerprint = {"paths": len(paths), "validate": validate, "max_pixels": max_pixels}
    return write_parallel(
        entries,
        SampleWork(
            load=EntryLoader(ImageChecks(validate=validate, max_pixels=max_pixels, strict=bool(kwargs.get("strict")))),
            validate=False,
        ),
        dest,
        total=len(entries),
        workers=workers,
        describe=describe_input,
        fingerprint=fingerprint,
        **kwargs,
    )
