"""Parallel, resumable, partitioned writing: any number of processes, one set of bytes.

::

    inputs ──▶ part slice ──▶ worker processes: read, validate ──▶ ONE assembler, in ──▶ ShardWriter
    (list)     (pure)          (decode), build the sample dict     input order           (index, manifest)

Workers only turn inputs into sample dicts (or ``(where, reason)`` skips). The shard
boundaries are decided by a single assembler in this process from the samples in input
order, so the output bytes depend on the input and the options alone: ``workers=1`` and
``workers=8`` give byte-identical shards, indexes and manifests. At most ``prefetch``
batches per worker are in flight, so memory stays flat.

Workers are plain processes (``forkserver`` start by default: the parent may hold threads)
each fed by its own pipe. The parent watches their sentinels, so a worker that dies (killed,
out of memory, a crash in a decoder) fails the write at once with the input it was on;
the unfinished shard is dropped, never finished as a short, complete-looking one.

Resuming: after each finished shard a small ``NAME.resume.json`` records which input the
next shard starts at (and the options). With ``resume=True`` a killed write adopts the
finished shards listed in both the manifest and that file and carries on from there; the
result is byte-identical to an uninterrupted run. The file is removed when the write
completes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TypeVar

from ..decode.check import sample_problem
from ..errors import ShardkitError, WorkerDied
from ..format.index import Manifest, manifest_name
from ..sizes import parse_size
from ..storage.localfile import atomic_write
from .merge import part_name, part_slice, require_local
from .writer import ShardWriter, shard_path

log = logging.getLogger(__name__)

T = TypeVar("T")
Skip = tuple[str, str]  # (where, reason)
Result = dict[str, Any] | Skip
RESUME_SUFFIX = ".resume.json"


@dataclass
class WriteResult:
    """What a write did: shards and samples in the dataset, the inputs skipped in this run."""

    shards: int
    samples: int
    bytes: int
    seconds: float
    skipped: list[Skip] = field(default_factory=list)
    pattern: str = ""
    manifest: str = ""
    resumed_shards: int = 0
    workers: int = 1
    written: int | None = None  # samples written by this run (resumed shards excluded)

    @property
    def rate(self) -> float:
        """Samples written per second by this run."""
        done = self.samples if self.written is None else self.written
        return done / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "samples": self.samples,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.rate, 1),
            "skipped": len(self.skipped),
            "skipped_files": [{"path": where, "reason": reason} for where, reason in self.skipped],
            "resumed_shards": self.resumed_shards,
            "workers": self.workers,
            "pattern": self.pattern,
            "manifest": self.manifest,
        }


def default_workers() -> int:
    """The CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def shard_pattern(dest: str, name: str, n_shards: int) -> str:
    """The brace pattern that reads the shards back: ``dest/name-{000000..000009}.tar``."""
    if n_shards <= 1:
        return os.path.join(dest, f"{name}-000000.tar")
    return os.path.join(dest, f"{name}-{{000000..{n_shards - 1:06d}}}.tar")


@dataclass(frozen=True)
class SampleCheck:
    """Work for samples that are already read (migration sources): fully decode their
    images; the sample back, or ``(where, reason)``. Picklable."""

    max_pixels: int | None = None

    def __call__(self, sample: dict[str, Any]) -> Result:
        problem = sample_problem(sample, max_pixels=self.max_pixels)
        if problem is None:
            return sample
        return describe_sample(sample), problem


def describe_sample(sample: Mapping[str, Any]) -> str:
    """How a sample from a migration source is named in messages: its key and source id."""
    meta = sample.get("json")
    where = f"sample {sample.get('__key__')}"
    if isinstance(meta, dict) and meta:
        where += " (" + ", ".join(f"{k}={v}" for k, v in list(meta.items())[:2]) + ")"
    return where


# -------------------------------------------------------------------------- workers


def _worker_main(conn: Any, work: Callable[[Any], Result], slots: Any, slot: int, inherited: list[int]) -> None:
    """Worker process: batches in, results out; ``slots[slot]`` = the input index it is on.

    ``inherited``: the parent's pipe ends a forked child holds; closed so that the pipe
    reports EOF (and the worker exits) when the parent dies.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for fd in inherited:
        try:
            os.close(fd)
        except OSError:
            pass
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        seq, first, items = message
        results = []
        index = first
        try:
            for index, item in enumerate(items, first):
                slots[slot] = index
                results.append(work(item))
        except Exception as e:  # noqa: BLE001 - reported by the parent with the input named
            results, status, first = f"{type(e).__name__}: {e}", "error", index  # type: ignore[assignment]
        else:
            status = "ok"
        slots[slot] = -1
        try:
            conn.send((seq, status, first, results))
        except OSError:  # the parent is gone
            return


def _context(start_method: str | None) -> Any:
    """fork when this process has no other thread (nothing can hold a lock across the fork;
    measured 0.6 s to start 2 workers here vs 1.3 s forkserver, 2.1 s spawn), else forkserver."""
    if start_method is None:
        methods = multiprocessing.get_all_start_methods()
        if "fork" in methods and threading.active_count() == 1:
            start_method = "fork"
        else:
            start_method = "forkserver" if "forkserver" in methods else "spawn"
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["shardkit.ingest.files", "shardkit.writing.parallel"])
    return ctx


class _Workers:
    """N worker processes, each with a pipe; the parent knows what each one is doing."""

    def __init__(self, work: Callable[[Any], Result], count: int, start_method: str | None) -> None:
        ctx = _context(start_method)
        forked = ctx.get_start_method() == "fork"
        self.slots = ctx.RawArray("q", [-1] * count)
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        for slot in range(count):
            parent, child = ctx.Pipe(duplex=True)
            inherited = [c.fileno() for c in (*self.conns, parent)] if forked else []
            proc = ctx.Process(
                target=_worker_main,
                args=(child, work, self.slots, slot, inherited),
                name=f"shardkit-write-{slot}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self, *, busy: bool = False) -> None:
        """Stop the workers: let them finish, or (``busy``, e.g. after an error) terminate them."""
        if busy:
            for proc in self.procs:
                proc.terminate()
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(1)
        for conn in self.conns:
            conn.close()


def ordered_results(
    work: Callable[[T], Result],
    items: Iterable[tuple[int, T]],
    *,
    workers: int,
    describe: Callable[[T], str] = str,
    batch_size: int = 8,
    prefetch: int = 2,
    start_method: str | None = None,
    on_start: Callable[[list[int]], None] | None = None,
) -> Iterator[tuple[int, Result]]:
    """``(index, work(item))`` for ``(index, item)`` in ``items``, in input order, on ``workers`` processes.

    Raises ShardkitError naming the input when ``work`` raises, WorkerDied when a worker exits.
    ``on_start`` gets the worker pids (tests use it to kill one).
    """
    if workers <= 1:
        for index, item in items:
            try:
                yield index, work(item)
            except (ShardkitError, KeyboardInterrupt):
                raise
            except Exception as e:
                raise ShardkitError(f"{describe(item)}: {type(e).__name__}: {e}") from e
        return
    pool = _Workers(work, workers, start_method)
    if on_start is not None:
        on_start(pool.pids)
    source = iter(items)
    outstanding: list[deque[tuple[int, list[tuple[int, T]]]]] = [deque() for _ in range(workers)]
    done: dict[int, list[tuple[int, Result]]] = {}
    next_seq = next_out = 0
    exhausted = False
    try:
        while True:
            # Feed idle workers (bounded: at most `prefetch` batches each).
            while not exhausted:
                slot = min(range(workers), key=lambda k: len(outstanding[k]))
                if len(outstanding[slot]) >= prefetch:
                    break
                batch = list(islice(source, batch_size))
                if not batch:
                    exhausted = True
                    break
                pool.conns[slot].send((next_seq, batch[0][0], [item for _, item in batch]))
                outstanding[slot].append((next_seq, batch))
                next_seq += 1
            while next_out in done:
                yield from done.pop(next_out)
                next_out += 1
            if exhausted and next_out == next_seq:
                return
            ready = multiprocessing.connection.wait(pool.conns + [p.sentinel for p in pool.procs])
            for slot, conn in enumerate(pool.conns):
                if conn not in ready:
                    continue
                try:
                    seq, status, first, payload = conn.recv()
                except (EOFError, OSError):
                    continue  # the sentinel tells
                batch_seq, batch = outstanding[slot].popleft()
                assert batch_seq == seq, (batch_seq, seq)
                if status == "error":
                    item = batch[first - batch[0][0]][1]
                    raise ShardkitError(f"{describe(item)}: {payload}")
                done[seq] = [(index, result) for (index, _), result in zip(batch, payload)]
            for slot, proc in enumerate(pool.procs):
                if proc.sentinel in ready or not proc.is_alive():
                    proc.join(1)
                    raise WorkerDied(_death_message(proc, pool.slots[slot], outstanding[slot], describe))
    finally:
        pool.close(busy=any(outstanding))


def _death_message(proc: Any, index: int, batches: deque, describe: Callable[[Any], str]) -> str:
    code = proc.exitcode
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
    on = "while idle"
    queued = [item for _, batch in batches for item in batch]
    for i, item in queued:
        if i == index:
            on = f"while reading {describe(item)}"
    if index < 0 and queued:
        on = f"between inputs, with {describe(queued[0][1])} next in its queue"
    return (
        f"worker process {proc.pid} {how} {on}; the unfinished shard was dropped. "
        "If that input crashes the decoder, remove it; re-run with --resume to carry on"
    )


# -------------------------------------------------------------------------- resume


def _resume_path(dest: str, name: str) -> str:
    return os.path.join(dest, name + RESUME_SUFFIX)


def _load_resume(dest: str, name: str, fingerprint: Mapping[str, Any]) -> tuple[list, int] | None:
    """(shards to adopt, next input) for a killed write of ``name``; None when it is complete.

    Only shards listed in both the manifest and the resume file, present with the right
    size and an index, are adopted; everything after them is written again.
    """
    manifest_path = os.path.join(dest, manifest_name(name))
    if not os.path.exists(manifest_path):
        return [], 0
    with open(manifest_path, "rb") as f:
        manifest = Manifest.from_json(f.read(), url=manifest_path)
    state_path = _resume_path(dest, name)
    state: dict[str, Any] = {}
    if os.path.exists(state_path):
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    if manifest.complete:
        return None
    if state and state.get("options") != json.loads(json.dumps(dict(fingerprint))):
        raise ShardkitError(
            f"{dest}: the interrupted write of {name!r} used other options or input "
            f"({state.get('options')}); re-run with those, or use --overwrite"
        )
    starts: list[int] = list(state.get("next_input", []))
    adopt = []
    for number, info in enumerate(manifest.shards[: len(starts)]):
        path = shard_path(dest, name, number)
        if (
            info.name != os.path.basename(path)
            or not os.path.exists(path + ".idx")
            or not os.path.exists(path)
            or os.path.getsize(path) != info.bytes
        ):
            break
        adopt.append(info)
    return adopt, (starts[len(adopt) - 1] if adopt else 0)


def _save_resume(dest: str, name: str, fingerprint: Mapping[str, Any], starts: list[int]) -> None:
    doc = {"version": 1, "options": dict(fingerprint), "next_input": starts}
    atomic_write(_resume_path(dest, name), (json.dumps(doc, sort_keys=True) + "\n").encode())


# -------------------------------------------------------------------------- the write


def write_parallel(
    items: Iterable[T],
    work: Callable[[T], Result],
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
    describe: Callable[[T], str] = str,
    fingerprint: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    prefetch: int = 2,
    start_method: str | None = None,
    source_options: Any = None,
    on_start: Callable[[list[int]], None] | None = None,
) -> WriteResult:
    """Write ``work(item)`` for every item into shards in ``dest``, on ``workers`` processes.

    ``work`` (picklable; runs in the workers) returns a sample dict for ShardWriter or a
    ``(where, reason)`` skip: skips are logged and listed in the result (with ``strict``
    the first one raises). Output bytes do not depend on ``workers``.

    ``part=(I, N)``: write only input slice I of N (``total`` needed), as dataset
    ``NAME-partIIIIIofNNNNN`` (see :mod:`shardkit.writing.merge`); a re-run of a part resumes it.
    ``resume``: carry on a killed write of the same input and options (``fingerprint``
    describes them; a mismatch is refused).
    """
    started = time.perf_counter()
    workers = default_workers() if workers is None else max(1, int(workers))
    fingerprint = dict(fingerprint or {})
    fingerprint.update(shard_size=parse_size(shard_size), max_count=max_count, name=name, total=total)
    writer_name = name
    if part is not None:
        require_local(dest, "--part")
        if total is None:
            raise ShardkitError("--part needs an input whose size is known")
        index, count = part
        start, stop = part_slice(total, index, count)
        items = islice(items, start, stop)
        writer_name = part_name(name, index, count)
        fingerprint["part"] = [index, count]
        total = stop - start
        resume = resume or not overwrite
    if total is not None:  # no process start-up for inputs a few batches long (same bytes either way)
        workers = max(1, min(workers, -(-total // batch_size)))
    from ..storage.dispatch import local_path

    local = local_path(dest) is not None
    if resume and not local:
        raise ShardkitError(f"--resume needs a local DEST, not {dest}")
    adopt: list = []
    first_input = 0
    if resume and os.path.isdir(dest):
        point = _load_resume(dest, writer_name, fingerprint)
        if point is None:
            with open(os.path.join(dest, manifest_name(writer_name)), "rb") as f:
                manifest = Manifest.from_json(f.read())
            log.warning(
                "%s is already complete; nothing to do (--overwrite rewrites it)",
                os.path.join(dest, manifest_name(writer_name)),
            )
            if os.path.exists(_resume_path(dest, writer_name)):
                os.remove(_resume_path(dest, writer_name))
            return _result(manifest, dest, writer_name, started, [], len(manifest.shards), workers)
        adopt, first_input = point
        if adopt:
            log.warning("resuming %s after %d complete shard(s), at input %d", writer_name, len(adopt), first_input)
    writer = ShardWriter(
        dest,
        name=writer_name,
        shard_size=shard_size,
        max_count=max_count,
        classes=classes,
        overwrite=overwrite or resume,
        source_options=source_options,
    )
    starts: list[int] = []
    if adopt:
        writer.adopt(adopt)
        starts = _load_starts(dest, writer_name)[: len(adopt)]
    if local:
        _save_resume(writer.dest, writer_name, fingerprint, starts)
    skipped: list[Skip] = []
    bar = None
    try:
        indexed = enumerate(islice(items, first_input, None), first_input)
        for index, result in ordered_results(
            work,
            indexed,
            workers=workers,
            describe=describe,
            batch_size=batch_size,
            prefetch=prefetch,
            start_method=start_method,
            on_start=on_start,
        ):
            if isinstance(result, tuple):
                where, reason = result
                if strict:
                    raise ShardkitError(f"{where}: {reason}")
                log.warning("skipping %s: %s", where, reason)
                skipped.append(result)
            else:
                before = len(writer.shards)
                writer.write(result)
                if len(writer.shards) > before:
                    starts.extend([index] * (len(writer.shards) - before))
                    if local:
                        _save_resume(writer.dest, writer_name, fingerprint, starts)
            if bar is None and progress:  # after the workers start: tqdm starts a thread
                from tqdm import tqdm

                bar = tqdm(total=total, initial=index, unit="sample", smoothing=0.1, dynamic_ncols=True)
            if bar is not None:
                bar.update(1)
    except BaseException:
        writer.discard_open_shard()
        writer.close(complete=False)
        raise
    finally:
        if bar is not None:
            bar.close()
    manifest = writer.close()
    if local and os.path.exists(_resume_path(dest, writer_name)):
        os.remove(_resume_path(dest, writer_name))
    return _result(manifest, dest, writer_name, started, skipped, len(adopt), workers)


def _load_starts(dest: str, name: str) -> list[int]:
    try:
        with open(_resume_path(dest, name), encoding="utf-8") as f:
            return list(json.load(f).get("next_input", []))
    except FileNotFoundError:
        return []


def _result(
    manifest: Manifest, dest: str, name: str, started: float, skipped: list[Skip], resumed: int, workers: int
) -> WriteResult:
    written = sum(s.samples for s in manifest.shards[resumed:])
    return WriteResult(
        shards=len(manifest.shards),
        samples=manifest.total_samples,
        bytes=manifest.total_bytes,
        seconds=time.perf_counter() - started,
        skipped=skipped,
        pattern=shard_pattern(dest, name, len(manifest.shards)),
        manifest=os.path.join(dest, manifest_name(name)),
        resumed_shards=resumed,
        workers=workers,
        written=written,
    )


# -------------------------------------------------------------------------- sources


def write_source(
    src: str,
    dest: str,
    *,
    fmt: str | None = None,
    options: Any = None,
    shuffle: bool = False,
    seed: int = 0,
    resize: int | None = None,
    quality: int | None = None,
    workers: int | None = None,
    part: tuple[int, int] | None = None,
    name: str = "data",
    shard_size: int | str = "1GB",
    max_count: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    start_method: str | None = None,
    on_start: Callable[[list[int]], None] | None = None,
) -> WriteResult:
    """``shardkit write``: any source :func:`shardkit.ingest.open_source` reads, into shards.

    Image files (folder, list, CSV, JSONL) are read, fully decoded (``options.validate``)
    and turned into samples by ``workers`` processes; migration formats are read here and
    their images decoded by the workers. Output bytes do not depend on ``workers``.
    """
    from ..ingest import IngestOptions, open_source
    from ..ingest.files import FileSource

    options = options or IngestOptions()
    source = open_source(src, fmt=fmt, options=options, shuffle=shuffle, seed=seed, resize=resize, quality=quality)
    fingerprint = {
        "src": os.path.abspath(src),
        "format": fmt,
        "shuffle": shuffle,
        "seed": seed if shuffle else 0,
        "resize": resize,
        "quality": quality,
        "validate": options.validate,
        "max_pixels": options.max_pixels,
    }
    common: dict[str, Any] = dict(
        workers=workers,
        part=part,
        name=name,
        shard_size=shard_size,
        max_count=max_count,
        classes=getattr(source, "classes", None),
        overwrite=overwrite,
        resume=resume,
        strict=options.strict,
        progress=progress,
        fingerprint=fingerprint,
        start_method=start_method,
        on_start=on_start,
    )
    if isinstance(source, FileSource):
        return write_parallel(
            source.entries, source.loader(), dest, total=len(source.entries), describe=_describe_entry, **common
        )
    try:
        total: int | None = len(source)
    except TypeError:
        total = None
    if not options.validate:
        common["workers"] = 1  # nothing to do in parallel: the source reads in this process
    result = write_parallel(
        iter(source),
        SampleCheck(options.max_pixels) if options.validate else _identity,
        dest,
        total=total,
        describe=describe_sample,
        batch_size=4,
        prefetch=1,
        **common,
    )
    result.skipped = list(getattr(source, "skipped", [])) + result.skipped
    return result


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
    from ..ingest.files import Entry, EntryLoader

    paths = list(paths)
    label_list = list(labels) if labels is not None else [None] * len(paths)
    if len(label_list) != len(paths):
        raise ValueError(f"{len(label_list)} labels for {len(paths)} paths")
    width = max(6, len(str(len(paths) - 1)))
    entries = [(f"{i:0{width}d}", Entry(p, p, lab, None)) for i, (p, lab) in enumerate(zip(paths, label_list))]
    fingerprint = {"paths": len(paths), "validate": validate, "max_pixels": max_pixels}
    return write_parallel(
        entries,
        EntryLoader(validate=validate, max_pixels=max_pixels),
        dest,
        total=len(entries),
        workers=workers,
        describe=_describe_entry,
        fingerprint=fingerprint,
        **kwargs,
    )


def _describe_entry(item: Any) -> str:
    return item[1].path


def _identity(sample: dict[str, Any]) -> Result:
    return sample
