"""The epoch planner: who reads which samples, and in what order. Pure functions, no I/O.

With sample counts known (index or manifest):

1. The epoch's shard order is a permutation seeded by (seed, epoch), identical on every
   rank. Concatenated, the shards form the epoch sequence of global sample ids.
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

A resume state is a chain of *stages*: each stage is one topology's plan over what was
left, plus how many samples each of its workers emitted. Resuming with the same topology
continues the last stage exactly; a different topology re-plans what is left.

Without counts, shards (not samples) are dealt round-robin to rank x worker cells,
as webdataset does.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

EVEN_MODES = (None, "pad", "drop")
T = TypeVar("T")


@dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` of shard number ``shard`` (an index into the shard list)."""

    shard: int
    start: int
    stop: int


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


@dataclass
class WorkerPlan:
    """What one DataLoader worker of one rank does in one epoch (or stage).

    The worker executes exactly this: it reads ``pieces`` in order (the samples at stream
    positions ``positions``) and emits them in ``emission_order()``. After a
    same-topology resume (``skip`` > 0) the positions already emitted are neither read
    nor emitted again.
    """

    pieces: list[Piece]  # read in this order
    ids: np.ndarray  # global sample ids of all stream positions, in read order
    buffer: int
    rng_seed: str
    skip: int = 0  # emissions already consumed (same-topology resume)
    positions: np.ndarray | None = None  # stream positions that ``pieces`` read; None: all

    @property
    def size(self) -> int:
        return len(self.ids)

    def emission_order(self) -> Iterator[int]:
        """Stream positions in the order they are emitted, after the first ``skip``."""
        order = shuffle_order(len(self.ids), self.buffer, random.Random(self.rng_seed))
        for _ in range(self.skip):
            next(order)
        return order

    def read_positions(self) -> np.ndarray:
        """The stream position of each sample ``pieces`` yields, in read order."""
        return np.arange(len(self.ids)) if self.positions is None else self.positions


def continues(stages: Sequence[Stage], topology: Topology) -> bool:
    """Whether a resume with ``topology`` continues the last stage (same topology: every
    worker picks up its own plan where it stopped) rather than re-planning what is left."""
    return bool(stages) and stages[-1].topology == topology


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


def shuffle_order(n: int, buffer: int, rng: random.Random) -> Iterator[int]:
    """Emission order of positions 0..n-1 through a shuffle buffer of ``buffer`` items.

    Each position enters the buffer; once it holds ``buffer`` items one leaves, chosen
    uniformly; at the end the rest leave in random order. An item is emitted at most
    ``buffer - 1`` steps after it is read, which bounds memory.
    """
    return shuffled(range(n), buffer, rng)


def shuffled(items: Iterable[T], buffer: int, rng: random.Random) -> Iterator[T]:
    """The shuffle buffer itself, over any iterable (used on data when counts are unknown)."""
    if buffer <= 1:
        yield from items
        return
    held: list[T] = []
    for item in items:
        held.append(item)
        if len(held) >= buffer:
            j = rng.randrange(len(held))
            held[j], held[-1] = held[-1], held[j]
            yield held.pop()
    rng.shuffle(held)
    yield from held


def shard_order(n_shards: int, *, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """This epoch's shard permutation (the same on every rank)."""
    if not shuffle:
        return np.arange(n_shards)
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, 7]).permutation(n_shards)


def epoch_sequence(counts: Sequence[int] | np.ndarray, *, epoch: int, seed: int, shuffle_shards: bool) -> np.ndarray:
    """Global sample ids in epoch order (shards permuted, samples in shard order)."""
    counts_arr = np.asarray(counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts_arr)[:-1]]) if len(counts_arr) else counts_arr
    order = shard_order(len(counts_arr), epoch=epoch, seed=seed, shuffle=shuffle_shards)
    parts = [np.arange(starts[s], starts[s] + counts_arr[s], dtype=np.int64) for s in order]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def rank_slices(m: int, world_size: int, even: str | None) -> tuple[list[np.ndarray], int, int]:
    """Positions (into a sequence of ``m``) for each rank; also (padded, dropped)."""
    if even == "drop":
        q = m // world_size
        return [np.arange(r * q, (r + 1) * q) for r in range(world_size)], 0, m - q * world_size
    if even == "pad":
        q = -(-m // world_size)
        if m == 0:
            return [np.zeros(0, dtype=np.int64) for _ in range(world_size)], 0, 0
        return [np.arange(r * q, (r + 1) * q) % m for r in range(world_size)], q * world_size - m, 0
    return [np.arange(r * m // world_size, (r + 1) * m // world_size) for r in range(world_size)], 0, 0


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    return [(w * n // parts, (w + 1) * n // parts) for w in range(parts)]


def to_pieces(ids: np.ndarray, shard_starts: np.ndarray) -> list[Piece]:
    """Group a read sequence of global ids into runs of consecutive samples of one shard."""
    if len(ids) == 0:
        return []
    shards = np.searchsorted(shard_starts, ids, side="right") - 1
    local = ids - shard_starts[shards]
    breaks = np.flatnonzero((np.diff(shards) != 0) | (np.diff(local) != 1)) + 1
    bounds = np.concatenate([[0], breaks, [len(ids)]])
    return [Piece(int(shards[a]), int(local[a]), int(local[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:])]


def split_streams(remaining: np.ndarray, topology: Topology) -> tuple[list[list[np.ndarray]], int, int]:
    """Cut ``remaining`` (in epoch order) into [rank][worker] contiguous streams; also
    (padded, dropped) under the topology's even mode."""
    slices, padded, dropped = rank_slices(len(remaining), topology.world_size, topology.even)
    streams = []
    for positions in slices:
        rank_items = remaining[positions]
        streams.append([rank_items[a:b] for a, b in _split(len(rank_items), topology.streams)])
    return streams, padded, dropped


def emitted_first(size: int, buffer: int, rng_seed: str, k: int) -> np.ndarray:
    """Stream positions of the first ``k`` emissions of a stream of ``size`` positions."""
    if k > size:
        raise ValueError(f"resume state says {k} samples were emitted but the plan has only {size}")
    order = shuffle_order(size, buffer, random.Random(rng_seed))
    return np.fromiter(itertools.islice(order, k), dtype=np.int64, count=k)


def check_stage(stage: Stage) -> None:
    topo = stage.topology
    if len(stage.emitted) != topo.world_size or any(len(e) != topo.streams for e in stage.emitted):
        raise ValueError("resume state does not match its own topology")


def worker_plan(ids: np.ndarray, shard_starts: np.ndarray, *, buffer: int, rng_seed: str, skip: int = 0) -> WorkerPlan:
    """The plan of one stream of global ``ids`` whose first ``skip`` emissions were consumed:
    read only what is still to be emitted (pieces rebuilt around the holes)."""
    if not skip:
        return WorkerPlan(to_pieces(ids, shard_starts), ids, buffer, rng_seed)
    needed = np.ones(len(ids), dtype=bool)
    needed[emitted_first(len(ids), buffer, rng_seed, skip)] = False
    return WorkerPlan(
        to_pieces(ids[needed], shard_starts), ids, buffer, rng_seed, skip=skip, positions=np.flatnonzero(needed)
    )


class EpochPlanner:
    """Plans for one epoch of a dataset with known per-shard sample counts."""

    def __init__(self, counts: Sequence[int], *, epoch: int, seed: int = 0, shuffle_shards: bool = True) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        if np.any(self.counts < 0):
            raise ValueError("sample counts must be >= 0")
        self.epoch = epoch
        self.seed = seed
        self.shard_starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.sequence = epoch_sequence(self.counts, epoch=epoch, seed=seed, shuffle_shards=shuffle_shards)

    @property
    def total(self) -> int:
        return len(self.sequence)

    def _rng_seed(self, stage_no: int, rank: int, worker: int) -> str:
        return f"shardkit:{self.seed}:{self.epoch}:{stage_no}:{rank}:{worker}"

    def _current(self, topology: Topology, stages: Sequence[Stage]):
        """Plan the current stage: (streams, padded, dropped, remaining, stage_no, continuing)."""
        remaining = self.sequence
        continuing = continues(stages, topology)
        history = stages[:-1] if continuing else stages
        for stage_no, stage in enumerate(history):
            remaining = self._without_consumed(remaining, stage, stage_no)
        streams, padded, dropped = split_streams(remaining, topology)
        return streams, padded, dropped, remaining, len(history), continuing

    def stream_sizes(self, topology: Topology, stages: Sequence[Stage] = ()) -> list[list[int]]:
        """Samples in each [rank][worker] stream of the current stage (before any skip)."""
        streams = self._current(topology, stages)[0]
        return [[len(ids) for ids in per_worker] for per_worker in streams]

    def plan(
        self, topology: Topology, *, rank: int, worker: int, stages: Sequence[Stage] = ()
    ) -> tuple[WorkerPlan, EpochInfo]:
        """The plan of one worker of one rank, after the resume ``stages`` (if any)."""
        if not 0 <= rank < topology.world_size:
            raise ValueError(f"rank {rank} out of range for world_size {topology.world_size}")
        if not 0 <= worker < topology.streams:
            raise ValueError(f"worker {worker} out of range for {topology.num_workers} workers")
        streams, padded, dropped, remaining, stage_no, continuing = self._current(topology, stages)
        ids = streams[rank][worker]
        skip = stages[-1].emitted[rank][worker] if continuing else 0
        plan = worker_plan(
            ids, self.shard_starts, buffer=topology.buffer, rng_seed=self._rng_seed(stage_no, rank, worker), skip=skip
        )
        info = EpochInfo(
            self.epoch,
            self.total,
            len(remaining),
            sum(len(s) for s in streams[rank]),
            padded,
            dropped,
            [len(s) for s in streams[rank]],
        )
        return plan, info

    def _without_consumed(self, remaining: np.ndarray, stage: Stage, stage_no: int) -> np.ndarray:
        check_stage(stage)
        topo = stage.topology
        streams, _, _ = split_streams(remaining, topo)
        consumed = []
        for rank, per_worker in enumerate(streams):
            for worker, ids in enumerate(per_worker):
                k = stage.emitted[rank][worker]
                consumed.append(ids[emitted_first(len(ids), topo.buffer, self._rng_seed(stage_no, rank, worker), k)])
        done = np.concatenate(consumed) if consumed else np.zeros(0, dtype=np.int64)
        return remaining[~np.isin(remaining, done)]


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
    this replays that to know other ranks' progress from this rank's batch count.
    """
    taken = [0] * len(worker_batches)
    left = batches_taken
    while left > 0 and any(t < b for t, b in zip(taken, worker_batches)):
        for w, b in enumerate(worker_batches):
            if left and taken[w] < b:
                taken[w] += 1
                left -= 1
    return taken
