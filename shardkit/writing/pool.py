"""The ordered process pool: ``work(item)`` on N processes, results back in input order.

Workers are plain processes (``fork`` when the caller has no other thread, else
``forkserver``), each fed by its own pipe, at most ``prefetch`` batches ahead. The parent
watches their sentinels, so a worker that dies (killed, out of memory, a crash in a
decoder) fails the run at once, naming the input it was on.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, TypeVar

from ..errors import ShardkitError, WorkerDied

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """The CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def start_method_for(requested: str | None) -> str:
    """The start method a pool started now uses: ``requested``, else fork when this process
    has no other thread (nothing can hold a lock across the fork; it also starts fastest,
    see BENCHMARKS.md), else forkserver."""
    methods = multiprocessing.get_all_start_methods()
    if requested is not None:
        if requested not in methods:
            raise ValueError(f"start method {requested!r} is not available here; choose one of {', '.join(methods)}")
        return requested
    if "fork" in methods and threading.active_count() == 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def require_picklable(work: Any, start_method: str, what: str = "the work function") -> None:
    """Raise ShardkitError, at the start, when ``work`` cannot be sent to ``start_method``
    workers (under fork the children inherit it and nothing is pickled)."""
    if start_method == "fork":
        return
    try:
        data = pickle.dumps(work)
    except Exception as e:  # noqa: BLE001 - pickle raises PicklingError, AttributeError, TypeError...
        raise ShardkitError(
            f"{what} cannot be sent to worker processes started with {start_method!r}: it does not pickle "
            f"({type(e).__name__}: {e}). Define it at module level (a lambda, a nested function or a "
            "closure does not pickle), or use workers=1"
        ) from None
    main = sys.modules.get("__main__")
    if b"__main__" in data and getattr(main, "__file__", None) is None:
        # Pickled by reference to a __main__ the workers cannot import (a notebook, the REPL,
        # python -c): each worker would die unpickling it.
        raise ShardkitError(
            f"{what} is defined in an interactive session (a notebook, the REPL or python -c), which "
            f"worker processes started with {start_method!r} cannot import: define it in a module, "
            "or use workers=1 (or start_method='fork' where fork is safe)"
        )


def _worker_main(conn: Any, work: Callable[[Any], Any], slots: Any, slot: int, inherited: list[int]) -> None:
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
    # Batches are received by a thread of their own: the parent may block sending the next
    # batch (over the pipe's buffer) while this process blocks sending a large result, and
    # each would wait for the other forever if one thread did both.
    inbox: queue.Queue[Any] = queue.Queue()

    def receive() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                message = None
            inbox.put(message)
            if message is None:
                return

    threading.Thread(target=receive, name="shardkit-write-inbox", daemon=True).start()
    while True:
        message = inbox.get()
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


def _context(start_method: str, preload: Sequence[str]) -> Any:
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # Imported once in the server instead of in every worker (module objects, not names
        # typed here, give these paths: a moved module cannot silently fall out of the list).
        ctx.set_forkserver_preload([__name__, *preload])
    return ctx


class _Workers:
    """N worker processes, each with a pipe; the parent knows what each one is doing."""

    def __init__(self, work: Callable[[Any], Any], count: int, start_method: str, preload: Sequence[str]) -> None:
        ctx = _context(start_method, preload)
        forked = start_method == "fork"
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
    work: Callable[[T], R],
    items: Iterable[tuple[int, T]],
    *,
    workers: int,
    describe: Callable[[T], str] = str,
    batch_size: int = 8,
    prefetch: int = 2,
    start_method: str | None = None,
    preload: Sequence[str] = (),
    on_start: Callable[[list[int]], None] | None = None,
) -> Iterator[tuple[int, R]]:
    """``(index, work(item))`` for ``(index, item)`` in ``items``, in input order, on ``workers`` processes.

    ``workers=1`` runs ``work`` in this process. Raises ShardkitError naming the input when
    ``work`` raises, WorkerDied when a worker exits. ``preload``: modules a forkserver
    imports once for all workers. ``on_start`` gets the worker pids (tests use it to kill one).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        for index, item in items:
            try:
                yield index, work(item)
            except (ShardkitError, KeyboardInterrupt):
                raise
            except Exception as e:
                raise ShardkitError(f"{describe(item)}: {type(e).__name__}: {e}") from e
        return
    method = start_method_for(start_method)
    require_picklable(work, method)
    pool = _Workers(work, workers, method, preload)
    if on_start is not None:
        on_start(pool.pids)
    source = iter(items)
    outstanding: list[deque[tuple[int, list[tuple[int, T]]]]] = [deque() for _ in range(workers)]
    done: dict[int, list[tuple[int, R]]] = {}
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
                try:
                    pool.conns[slot].send((next_seq, batch[0][0], [item for _, item in batch]))
                except OSError:  # a broken pipe: the worker exited before its sentinel was seen
                    proc = pool.procs[slot]
                    proc.join(5)
                    if proc.exitcode is None:
                        raise
                    raise WorkerDied(_death_message(proc, pool.slots[slot], outstanding[slot], describe)) from None
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
