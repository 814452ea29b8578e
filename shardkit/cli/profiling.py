"""Per-stage timing inside the workers, for ``shardkit doctor``; off the normal path.

:class:`StageTimes` is a stage hook (:class:`~shardkit.read.stages.StageHooks`):
``profiled(dataset)`` is ``dataset.with_stages(hooks=StageTimes)``, whose workers time
with ``time.perf_counter``: read (tar parsing and I/O), decode (with a fused crop, the
crop and resize too), transform, collate (with the default collate, the copy of each
sample into its batch too: the "batch" stage), the rest of the worker's time ("other":
planning, shuffle buffer, per-sample dispatch) and the time spent outside the worker's
generator ("handoff": handing the batch to the DataLoader queue, or blocking when its
prefetch queue is full). The counters (integer microseconds, cumulative per worker and
epoch) ride on the per-batch progress records, so ``loader.stats()`` sums them over the
workers. A dataset without hooks has none of these wrappers and pays nothing.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..read.base import PlannedDataset
from ..read.stages import StageHooks

P = TypeVar("P", bound=PlannedDataset)

#: The timed stages, in pipeline order; each is a ``<stage>_us`` key in ``loader.stats()``.
STAGES = ("read", "decode", "transform", "collate", "other", "handoff")


def children_cpu_by_pid() -> dict[int, float]:
    """CPU seconds used so far by each live child of this process (the DataLoader
    workers, but also any other child), from Linux /proc; empty elsewhere. getrusage
    only counts children after they exit."""
    out: dict[int, float] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            out[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return out


def children_cpu() -> float:
    """CPU seconds used so far by this process's live children (see :func:`children_cpu_by_pid`)."""
    return sum(children_cpu_by_pid().values())


def rusage_cpu(who: int) -> float:
    """User + system CPU seconds from getrusage (``resource.RUSAGE_SELF`` or ``RUSAGE_CHILDREN``)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def children_cpu_snapshot() -> tuple[dict[int, float], float]:
    """What :func:`children_cpu_since` needs: live children's CPU by pid, and reaped children's total."""
    return children_cpu_by_pid(), rusage_cpu(resource.RUSAGE_CHILDREN)


def children_cpu_since(before: tuple[dict[int, float], float]) -> float:
    """CPU seconds this process's children used since the snapshot ``before``.

    Live children count from /proc; a child that exited and was reaped in between (a
    DataLoader joins its workers when the data runs out) counts through getrusage, less
    what it had used before the snapshot; a new child counts whole.
    """
    live_before, reaped_before = before
    live, reaped = children_cpu_snapshot()
    exited_before = sum(cpu for pid, cpu in live_before.items() if pid not in live)
    since = sum(cpu - live_before.get(pid, 0.0) for pid, cpu in live.items())
    return since + max(0.0, reaped - reaped_before - exited_before)


class StageTimes(StageHooks):
    """Microseconds spent per stage in one worker's epoch (plain ints, summed by the loader).

    With ``threads > 1`` the decode and transform times are summed over the threads
    (thread-seconds, not wall time).
    """

    def __init__(self) -> None:
        self.us = dict.fromkeys(STAGES, 0)

    # -- the hook ------------------------------------------------------------------------
    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        stage = "collate" if stage == "batch" else stage  # copying samples into batches is collating
        return self.timed(stage, fn) if stage in self.us else fn

    def wrap_iter(self, stage: str, items: Iterator[Any]) -> Iterator[Any]:
        if stage == "items":
            return self._worker_items(items)
        return self.timed_iter(stage, items) if stage in self.us else items

    def counters(self) -> dict[str, int]:
        return {f"{stage}_us": value for stage, value in self.us.items()}

    # -- timing ----------------------------------------------------------------------------
    def timed(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with its wall time added to ``stage`` (exceptions still counted)."""
        us = self.us

        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                us[stage] += int((time.perf_counter() - start) * 1e6)

        return call

    def timed_iter(self, stage: str, items: Iterator[Any]) -> Iterator[Any]:
        """Yield from ``items`` adding the time spent producing each one to ``stage``."""
        us = self.us
        items = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                us[stage] += int((time.perf_counter() - start) * 1e6)
                return
            us[stage] += int((time.perf_counter() - start) * 1e6)
            yield item

    def _worker_items(self, inner: Iterator[Any]) -> Iterator[Any]:
        """The worker's items: the time producing each one that no stage counted is
        "other"; the time between handing it out and being asked for the next, "handoff"."""
        us = self.us
        timed = [s for s in STAGES if s not in ("other", "handoff")]
        while True:
            start = time.perf_counter()
            staged = sum(us[s] for s in timed)
            try:
                item = next(inner)
            except StopIteration:
                return
            # The worker's own time for this item, less what the stages already counted.
            spent = int((time.perf_counter() - start) * 1e6)
            us["other"] += max(0, spent - (sum(us[s] for s in timed) - staged))
            handed = time.perf_counter()
            yield item
            us["handoff"] += int((time.perf_counter() - handed) * 1e6)


def profiled(dataset: P) -> P:
    """A view of ``dataset`` (a ShardDataset or Mix) whose workers time their stages
    (:class:`StageTimes`); same items, same order, the dataset itself unchanged."""
    return dataset.with_stages(hooks=StageTimes)
