"""The epoch planner: who reads which samples, and in what order. Pure functions, no I/O.

With sample counts known (index or manifest):

1. The epoch's shard order is a permutation seeded by (seed, epoch), identical on every
   rank. Concatenated, the shards form the epoch sequence of sample positions.
2. Samples already consumed in this epoch (a resumed run) are removed from it.
3. The sequence is cut into ``world_size`` contiguous rank ranges: ``even=None`` splits
   as evenly as possible (sizes differ by at most one); ``"drop"`` gives every rank
   ``M // world_size`` (dropping at most ``world_size - 1``); ``"pad"`` gives every rank
   ``ceil(M / world_size)`` by wrapping around to the start (repeating at most
   ``world_size - 1``). Each rank range is cut into ``num_workers`` contiguous worker
   ranges, so every worker has work even with one shard and eight workers.
4. A worker reads its range sequentially (pieces of shards, seeking where a piece starts
   mid-shard) and emits through a shuffle buffer whose choices depend only on a seeded
   RNG and the count, so the emitted order is computable here, without data.

Nothing here is of the size of the dataset: the epoch is a shard permutation with
cumulative counts (:mod:`~shardkit.plan.source`), ranks and workers are arithmetic cuts
of it (:mod:`~shardkit.plan.layout`), and a process resolves only the stream it asks for.

A resume state is a chain of *stages*: each stage is one topology's plan over what was
left, plus how many samples each of its workers emitted. Resuming with the same topology
continues the last stage exactly; a different topology re-plans what is left, which is
each stream's unread suffix plus the few samples its shuffle buffer still held
(:mod:`~shardkit.plan.ranges`).

Without counts, shards (not samples) are dealt round-robin to rank x worker cells,
as webdataset does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from .layout import Layout, padded_dropped
from .ranges import After, Level, Ranges, StreamMap, Whole, merge_touching, resolve
from .seeds import rng_seed
from .shuffle import ShuffleState, resume_shuffle, shuffle_order, shuffled
from .source import EpochSource, Piece, RunArrays, empty_runs, shard_order, shard_starts, to_piece_list

EVEN_MODES = (None, "pad", "drop")

__all__ = [
    "EVEN_MODES",
    "EpochInfo",
    "EpochPlanner",
    "Piece",
    "Stage",
    "Topology",
    "WorkerPlan",
    "check_stage",
    "continues",
    "deal_shards",
    "shard_order",
    "shuffle_order",
    "shuffled",
    "simulate_consumption",
    "to_pieces",
]


@dataclass(frozen=True)
class Topology:
    world_size: int = 1
    num_workers: int = 1  # DataLoader workers; 0 and 1 both mean one stream per rank
    even: str | None = "pad"
    buffer: int = 0  # shuffle buffer size; 0 or 1 = emit in read order

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.even not in EVEN_MODES:
            raise ValueError(f"even must be one of {EVEN_MODES}, got {self.even!r}")

    @property
    def streams(self) -> int:
        return max(1, self.num_workers)


@dataclass(frozen=True)
class Stage:
    """One topology's plan over the samples left, and how far each worker got.

    ``emitted[rank][worker]`` counts samples that reached the training loop.
    """

    topology: Topology
    emitted: tuple[tuple[int, ...], ...]


def continues(stages: Sequence[Stage], topology: Topology) -> bool:
    """Whether a resume with ``topology`` continues the last stage (same topology: every
    worker picks up its own plan where it stopped) rather than re-planning what is left."""
    return bool(stages) and stages[-1].topology == topology


def check_stage(stage: Stage) -> None:
    topo = stage.topology
    if len(stage.emitted) != topo.world_size or any(len(e) != topo.streams for e in stage.emitted):
        raise ValueError("resume state does not match its own topology")


def check_cell(topology: Topology, rank: int, worker: int) -> None:
    if not 0 <= rank < topology.world_size:
        raise ValueError(f"rank {rank} out of range for world_size {topology.world_size}")
    if not 0 <= worker < topology.streams:
        raise ValueError(f"worker {worker} out of range for {topology.num_workers} workers")


@dataclass
class EpochInfo:
    """What an epoch looks like for one rank (``dataset.epoch_info()``)."""

    epoch: int
    total: int  # samples in the dataset
    remaining: int  # samples the current stage plans (after resume exclusions)
    rank_samples: int  # samples this rank yields this epoch (including pads)
    padded: int  # samples repeated across all ranks (pad mode)
    dropped: int  # samples left out across all ranks (drop mode)
    worker_samples: list[int] = field(default_factory=list)


class Source(Protocol):
    """Where epoch positions lie in the shards (see :mod:`~shardkit.plan.source`)."""

    def runs(self, ranges: Ranges) -> RunArrays: ...

    def ids(self, positions: np.ndarray) -> np.ndarray: ...


class WorkerPlan:
    """What one DataLoader worker of one rank does in one epoch (or stage).

    The worker executes exactly this: it reads ``pieces`` in order (the samples at stream
    positions ``read_positions()``) and emits them in ``emission_order()``. After a
    same-topology resume (``skip`` > 0) the positions already emitted are neither read
    nor emitted again. Everything is computed on first use and holds O(pieces), never
    O(samples): positions come as iterators.
    """

    def __init__(
        self,
        *,
        size: int,
        buffer: int,
        rng_seed: str,
        skip: int,
        locate: Callable[[], Ranges],
        source: Source,
    ) -> None:
        if skip > size:
            raise ValueError(f"resume state says {skip} samples were emitted but the plan has only {size}")
        self.size = size
        self.buffer = buffer
        self.rng_seed = rng_seed
        self.skip = skip
        self._locate = locate  # the stream's epoch-position ranges, resolved when first needed
        self.source = source

    @cached_property
    def stream(self) -> StreamMap:
        """The stream's positions as ranges of epoch positions."""
        stream = StreamMap(self._locate())
        if stream.size != self.size:
            raise AssertionError(f"internal: stream resolved to {stream.size} positions, planned {self.size}")
        return stream

    @cached_property
    def shuffle(self) -> ShuffleState:
        """The shuffle buffer after the ``skip`` emissions already consumed."""
        return resume_shuffle(self.size, self.buffer, self.rng_seed, self.skip)

    def _read_ranges(self) -> Ranges:
        """Epoch-position ranges this worker reads, in read order."""
        if not self.skip:
            return self.stream.starts, self.stream.stops
        held = self.stream.positions(self.shuffle.holes())
        tail0, tail1 = self.stream.sub(self.shuffle.read, self.size)
        return merge_touching(np.concatenate([held, tail0]), np.concatenate([held + 1, tail1]))

    @cached_property
    def pieces(self) -> list[Piece]:
        """Pieces of shards to read, in order."""
        if not self.size:
            return to_piece_list(empty_runs())
        return to_piece_list(self.source.runs(self._read_ranges()))

    def emission_order(self) -> Iterator[int]:
        """Stream positions in the order they are emitted, after the first ``skip``."""
        return self.shuffle.order()

    def read_positions(self) -> Iterator[int]:
        """The stream position of each sample ``pieces`` yields, in read order."""
        if not self.skip:
            return iter(range(self.size))
        return itertools.chain(self.shuffle.holes().tolist(), range(self.shuffle.read, self.size))

    def ids_at(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Global sample ids at the given stream positions."""
        return self.source.ids(self.stream.positions(np.asarray(positions, dtype=np.int64)))

    def emitted_ids(self) -> Iterator[int]:
        """Global sample ids in emission order (after ``skip``), computed without data."""
        order = self.emission_order()
        while True:
            block = np.fromiter(itertools.islice(order, 1 << 16), dtype=np.int64)
            if not len(block):
                return
            yield from self.ids_at(block).tolist()


def to_pieces(ids: np.ndarray, shard_starts: np.ndarray) -> list[Piece]:
    """Group a read sequence of global ids into runs of consecutive samples of one shard."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return []
    shards = np.searchsorted(shard_starts, ids, side="right") - 1
    local = ids - shard_starts[shards]
    return to_piece_list((shards.astype(np.int64), local, local + 1))


def stream_seed(seed: int, epoch: int, stage_no: int, rank: int, worker: int) -> str:
    """The shuffle-buffer seed of one stream of one stage."""
    return rng_seed(seed, epoch, stage_no, rank, worker)


def stage_level(parent: Level, stage: Stage, *, buffer: int, seeds: Callable[[int, int], str]) -> After:
    """What ``stage`` (its streams seeded ``seeds(rank, worker)``) left of ``parent``."""
    check_stage(stage)
    topo = stage.topology
    layout = Layout.of(parent.size, topo.world_size, topo.streams, topo.even)
    emitted = np.asarray(stage.emitted, dtype=np.int64).reshape(-1)
    return After(parent, layout, emitted, buffer=buffer, seeds=lambda s: seeds(s // topo.streams, s % topo.streams))


def stream_plan(level: Level, layout: Layout, *, rank: int, worker: int, **kwargs: Any) -> WorkerPlan:
    """The :class:`WorkerPlan` of one stream of ``layout`` over ``level``."""
    start, size = layout.stream(rank, worker)
    return WorkerPlan(size=size, locate=lambda: resolve(level, layout.index_ranges(start, size)), **kwargs)


class EpochPlanner:
    """Plans for one epoch of a dataset with known per-shard sample counts.

    Construction is O(shards) at most (the shard permutation is made only when a plan
    needs positions); counts (``stream_sizes``, ``EpochInfo``) are arithmetic.
    """

    def __init__(self, counts: Sequence[int], *, epoch: int, seed: int = 0, shuffle_shards: bool = True) -> None:
        self.counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        if np.any(self.counts < 0):
            raise ValueError("sample counts must be >= 0")
        self.epoch = epoch
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.total = int(self.counts.sum())
        self.source = EpochSource(self.counts, epoch=epoch, seed=seed, shuffle=shuffle_shards)

    @cached_property
    def shard_starts(self) -> np.ndarray:
        return shard_starts(self.counts)

    def _rng_seed(self, stage_no: int, rank: int, worker: int) -> str:
        return stream_seed(self.seed, self.epoch, stage_no, rank, worker)

    def _current(self, topology: Topology, stages: Sequence[Stage]) -> tuple[Level, int, bool]:
        """(what is left for the current stage, its stage number, whether it continues the last)."""
        continuing = continues(stages, topology)
        history = stages[:-1] if continuing else stages
        level: Level = Whole(self.total)
        for stage_no, stage in enumerate(history):
            level = stage_level(
                level,
                stage,
                buffer=stage.topology.buffer,
                seeds=lambda r, w, no=stage_no: self._rng_seed(no, r, w),  # type: ignore[misc]
            )
        return level, len(history), continuing

    def stream_sizes(self, topology: Topology, stages: Sequence[Stage] = ()) -> list[list[int]]:
        """Samples in each [rank][worker] stream of the current stage (before any skip)."""
        level, _, _ = self._current(topology, stages)
        layout = Layout.of(level.size, topology.world_size, topology.streams, topology.even)
        return layout.sizes.reshape(topology.world_size, topology.streams).tolist()

    def plan(
        self, topology: Topology, *, rank: int, worker: int, stages: Sequence[Stage] = ()
    ) -> tuple[WorkerPlan, EpochInfo]:
        """The plan of one worker of one rank, after the resume ``stages`` (if any)."""
        check_cell(topology, rank, worker)
        level, stage_no, continuing = self._current(topology, stages)
        layout = Layout.of(level.size, topology.world_size, topology.streams, topology.even)
        plan = stream_plan(
            level,
            layout,
            rank=rank,
            worker=worker,
            buffer=topology.buffer,
            rng_seed=self._rng_seed(stage_no, rank, worker),
            skip=stages[-1].emitted[rank][worker] if continuing else 0,
            source=self.source,
        )
        sizes = layout.sizes[rank * topology.streams : (rank + 1) * topology.streams].tolist()
        padded, dropped = padded_dropped(level.size, topology.world_size, topology.even)
        info = EpochInfo(self.epoch, self.total, level.size, sum(sizes), padded, dropped, sizes)
        return plan, info


def deal_shards(
    n_shards: int,
    *,
    epoch: int,
    seed: int,
    shuffle_shards: bool,
    world_size: int,
    rank: int,
    num_workers: int,
    worker: int,
) -> list[int]:
    """Shard-level split (no counts): this worker's shards, webdataset style."""
    order = shard_order(n_shards, epoch=epoch, seed=seed, shuffle=shuffle_shards)
    streams = max(1, num_workers)
    return [int(s) for s in order[rank * streams + worker :: world_size * streams]]


def simulate_consumption(worker_batches: Sequence[int], batches_taken: int) -> list[int]:
    """Batches each worker delivered after ``batches_taken`` batches of a DataLoader.

    DataLoader takes batches from its workers round-robin, skipping exhausted workers;
    this replays that to know other ranks' progress from this rank's batch count. After
    ``R`` full rounds worker ``w`` gave ``min(b_w, R)``; the largest ``R`` that fits is
    found by bisection and the rest go to the first workers not yet exhausted.
    """
    batches = [int(b) for b in worker_batches]
    if batches_taken <= 0:
        return [0] * len(batches)
    if batches_taken >= sum(batches):
        return batches
    lo, hi = 0, max(batches)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(b, mid) for b in batches) <= batches_taken:
            lo = mid
        else:
            hi = mid - 1
    taken = [min(b, lo) for b in batches]
    left = batches_taken - sum(taken)
    for w, b in enumerate(batches):
        if left and b > lo:
            taken[w] += 1
            left -= 1
    return taken
