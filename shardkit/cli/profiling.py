"""Per-stage timing inside the workers, for ``shardkit doctor``; off the normal path.

:class:`ProfiledShardDataset` is a :class:`~shardkit.read.dataset.ShardDataset` whose worker
pipeline is wrapped with ``time.perf_counter`` counters: read (tar parsing and I/O),
decode (with a fused crop, the crop and resize too), transform, collate, the rest of the
worker's time ("other": planning, shuffle buffer, per-sample dispatch) and the time spent
outside the worker's generator ("handoff": handing the batch to the DataLoader queue, or
blocking when its prefetch queue is full). The counters (integer microseconds, cumulative
per worker and epoch) ride on the per-batch progress records, so ``loader.stats()`` sums
them over the workers. A plain ShardDataset has none of these wrappers and pays nothing.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..read.base import Batching
from ..read.dataset import ShardDataset
from ..read.pipeline import SamplePipeline
from ..read.reader import ReadStats, ShardReader

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


class StageTimes:
    """Microseconds spent per stage in one worker (plain ints, summed by the loader)."""

    def __init__(self) -> None:
        self.us = dict.fromkeys(STAGES, 0)

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


class _TimedReader:
    """A ShardReader whose sample streams count as the "read" stage."""

    def __init__(self, reader: ShardReader, times: StageTimes) -> None:
        self._reader = reader
        self._times = times

    def read_piece(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        return self._times.timed_iter("read", self._reader.read_piece(*args, **kwargs))

    def read_shard(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        return self._times.timed_iter("read", self._reader.read_shard(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


class ProfiledShardDataset(ShardDataset):
    """A ShardDataset that times its worker stages (same arguments, same items).

    With ``threads > 1`` the decode and transform times are summed over the threads
    (thread-seconds, not wall time).
    """

    def _times(self) -> StageTimes:
        times = self.__dict__.get("_stage_times")
        if times is None:
            times = self.__dict__["_stage_times"] = StageTimes()
        return times

    def iter_items(self, batching: Batching, **kwargs: Any) -> Iterator[Any]:
        times = self.__dict__["_stage_times"] = StageTimes()  # one per worker and epoch
        timed = dataclasses.replace(batching, collate_fn=times.timed("collate", batching.collate_fn))
        inner = super().iter_items(timed, **kwargs)
        us = times.us
        while True:
            start = time.perf_counter()
            staged = sum(us[s] for s in STAGES if s not in ("other", "handoff"))
            try:
                item = next(inner)
            except StopIteration:
                return
            # The worker's own time for this item, less what the stages already counted.
            spent = int((time.perf_counter() - start) * 1e6)
            us["other"] += max(0, spent - (sum(us[s] for s in STAGES if s not in ("other", "handoff")) - staged))
            handed = time.perf_counter()
            yield item
            us["handoff"] += int((time.perf_counter() - handed) * 1e6)

    def reader(self, handler: Callable[[Exception], None], stats: ReadStats) -> ShardReader:
        return _TimedReader(super().reader(handler, stats), self._times())  # type: ignore[return-value]

    def pipeline(self, handler: Callable[[Exception], None]) -> SamplePipeline:
        pipeline = super().pipeline(handler)
        times = self._times()
        if pipeline.decoder is not None:
            pipeline.decoder = times.timed("decode", pipeline.decoder)
        if isinstance(pipeline.transform, Mapping):
            pipeline.transform = {k: times.timed("transform", fn) for k, fn in pipeline.transform.items()}
        elif pipeline.transform is not None:
            pipeline.transform = times.timed("transform", pipeline.transform)
        return pipeline

    def _counters(self, stats: ReadStats, cache_before: dict[str, int]) -> dict[str, int]:
        counters = super()._counters(stats, cache_before)
        counters.update({f"{stage}_us": value for stage, value in self._times().us.items()})
        return counters
