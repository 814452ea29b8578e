"""The Mix planner: which samples of which part each worker reads, and in what order.
Pure functions, no I/O, like :mod:`shardkit.plan.epoch`, which it builds on.

For epoch ``e`` of a mix of parts with sizes ``N_i``:

1. Part ``i`` contributes ``n_i`` draws: ``N_i`` without weights; with weights,
   ``round(L * w_i / sum(w))`` by largest remainder so they add up to the epoch length
   ``L``. A part's draws come from an endless chain of *passes*, each a permutation of all
   its samples (shard order permuted per pass, seeded by the mix seed and the part); epoch
   ``e`` takes draws ``[e * n_i, (e + 1) * n_i)``, so no sample repeats before every
   sample of the part was drawn, and the next epoch continues the pass.
2. Each part's draws are split across ranks and workers exactly like a single dataset
   (:func:`shardkit.plan.split_streams`; pad/drop per part, so every rank gets the same
   count of every part).
3. A worker reads each of its part streams sequentially (pieces of shards), emits each
   through that part's shuffle buffer, and interleaves the parts by a seeded sequence of
   part labels holding exactly as many labels of a part as it has samples of it.

Progress is one count per worker (emissions of the interleaved stream): the first ``k``
labels say how many of each part were emitted, each part's buffer order says which.
Resume with the same topology continues; with another one the rest is re-planned per
part, exactly as :class:`~shardkit.plan.EpochPlanner` does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .epoch import (
    EpochInfo,
    Stage,
    Topology,
    WorkerPlan,
    check_stage,
    continues,
    emitted_first,
    epoch_sequence,
    split_streams,
    worker_plan,
)


@dataclass(frozen=True)
class MixPart:
    """What the planner needs to know of one part."""

    counts: tuple[int, ...]  # samples per shard
    buffer: int = 0  # the part's shuffle buffer
    shuffle_shards: bool = True
    seed: int = 0  # the part dataset's own seed, mixed with the Mix seed

    @property
    def size(self) -> int:
        return sum(self.counts)


@dataclass
class MixWorkerPlan:
    """One worker's plan: a :class:`WorkerPlan` per part and the interleaving labels.

    ``labels[skip:]`` is the part of each emission still to come; the part plans
    already skip what was emitted.
    """

    parts: list[WorkerPlan]
    labels: np.ndarray
    skip: int = 0

    @property
    def size(self) -> int:
        return len(self.labels)

    def emission_labels(self) -> np.ndarray:
        return self.labels[self.skip :]

    def emitted_ids(self) -> list[tuple[int, int]]:
        """(part, id within the part) of each emission still to come, in order -- what
        the worker will yield, computed without data."""
        orders = [iter([int(p.ids[i]) for i in p.emission_order()]) for p in self.parts]
        return [(label, next(orders[label])) for label in self.emission_labels().tolist()]


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to ``weights`` adding up to ``total`` (ties go to the
    earlier part)."""
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    exact = [total * w / sum(weights) for w in weights]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return out


def _int_seed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def interleave(sizes: Sequence[int], rng_seed: str) -> np.ndarray:
    """A random sequence of part labels holding exactly ``sizes[i]`` labels ``i``."""
    labels = np.repeat(np.arange(len(sizes), dtype=np.int64), np.asarray(sizes, dtype=np.int64))
    np.random.default_rng(_int_seed(rng_seed)).shuffle(labels)
    return labels


def part_draws(part: MixPart, *, epoch: int, draws: int, seed: int) -> np.ndarray:
    """Global ids (within the part) of the part's ``draws`` draws in ``epoch``."""
    size = part.size
    if draws == 0:
        return np.zeros(0, dtype=np.int64)
    if size == 0:
        raise ValueError("a part with no samples cannot be drawn from")
    start = epoch * draws
    first, last = start // size, (start + draws - 1) // size
    passes = [
        epoch_sequence(part.counts, epoch=p, seed=seed, shuffle_shards=part.shuffle_shards)
        for p in range(first, last + 1)
    ]
    offset = start - first * size
    return np.concatenate(passes)[offset : offset + draws]


class MixPlanner:
    """Plans for one epoch of a mix (see the module docstring)."""

    def __init__(
        self,
        parts: Sequence[MixPart],
        *,
        epoch: int,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        epoch_length: int | None = None,
        interleave: Callable[[Sequence[int], str], np.ndarray] = interleave,  # oracle hook (not in 0fc6f58)
    ) -> None:
        self.interleave = interleave
        if not parts:
            raise ValueError("a mix needs at least one part")
        self.parts = list(parts)
        self.epoch = epoch
        self.seed = seed
        sizes = [p.size for p in self.parts]
        if weights is None and epoch_length is None:
            self.draws = sizes
        else:
            if weights is not None and len(weights) != len(self.parts):
                raise ValueError(f"{len(weights)} weights for {len(self.parts)} parts")
            length = sum(sizes) if epoch_length is None else epoch_length
            self.draws = largest_remainder(length, sizes if weights is None else weights)
        for i, (n, size) in enumerate(zip(self.draws, sizes)):
            if n and not size:
                raise ValueError(f"part {i} has no samples but its weight asks for {n} per epoch")
        self.shard_starts = [np.concatenate([[0], np.cumsum(p.counts)]).astype(np.int64) for p in self.parts]
        self.sequences = [
            part_draws(p, epoch=epoch, draws=n, seed=self._part_seed(i))
            for i, (p, n) in enumerate(zip(self.parts, self.draws))
        ]

    def _part_seed(self, i: int) -> int:
        return _int_seed(f"mix:{self.seed}:{i}:{self.parts[i].seed}") & 0xFFFFFFFF

    @property
    def total(self) -> int:
        return sum(self.draws)

    def _rng(self, what: str, stage_no: int, rank: int, worker: int) -> str:
        return f"shardkit-mix:{self.seed}:{self.epoch}:{stage_no}:{rank}:{worker}:{what}"

    def _cell(
        self, streams: list[list[list[np.ndarray]]], rank: int, worker: int, stage_no: int
    ) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
        """(slots per part, labels, part rng seeds) of one [rank][worker] cell."""
        slots = [per_part[rank][worker] for per_part in streams]
        labels = self.interleave([len(s) for s in slots], self._rng("labels", stage_no, rank, worker))
        seeds = [self._rng(f"part{i}", stage_no, rank, worker) for i in range(len(self.parts))]
        return slots, labels, seeds

    def _emitted_per_part(self, labels: np.ndarray, k: int) -> list[int]:
        if k > len(labels):
            raise ValueError(f"resume state says {k} samples were emitted but the plan has only {len(labels)}")
        return np.bincount(labels[:k], minlength=len(self.parts)).tolist()

    def _current(self, topology: Topology, stages: Sequence[Stage]):
        remaining = [np.arange(len(seq), dtype=np.int64) for seq in self.sequences]  # slots per part
        continuing = continues(stages, topology)
        history = stages[:-1] if continuing else stages
        for stage_no, stage in enumerate(history):
            remaining = self._without_consumed(remaining, stage, stage_no)
        split = [split_streams(r, topology) for r in remaining]
        streams = [s for s, _, _ in split]
        padded = sum(p for _, p, _ in split)
        dropped = sum(d for _, _, d in split)
        return streams, padded, dropped, remaining, len(history), continuing

    def _without_consumed(self, remaining: list[np.ndarray], stage: Stage, stage_no: int) -> list[np.ndarray]:
        check_stage(stage)
        topo = stage.topology
        streams = [split_streams(r, topo)[0] for r in remaining]
        consumed: list[list[np.ndarray]] = [[] for _ in self.parts]
        for rank in range(topo.world_size):
            for worker in range(topo.streams):
                slots, labels, seeds = self._cell(streams, rank, worker, stage_no)
                per_part = self._emitted_per_part(labels, stage.emitted[rank][worker])
                for i, k in enumerate(per_part):
                    consumed[i].append(slots[i][emitted_first(len(slots[i]), self.parts[i].buffer, seeds[i], k)])
        return [r[~np.isin(r, np.concatenate(c))] if c else r for r, c in zip(remaining, consumed)]

    def stream_sizes(self, topology: Topology, stages: Sequence[Stage] = ()) -> list[list[int]]:
        """Samples in each [rank][worker] stream of the current stage (before any skip)."""
        streams = self._current(topology, stages)[0]
        return [
            [sum(len(per_part[r][w]) for per_part in streams) for w in range(topology.streams)]
            for r in range(topology.world_size)
        ]

    def plan(
        self, topology: Topology, *, rank: int, worker: int, stages: Sequence[Stage] = ()
    ) -> tuple[MixWorkerPlan, EpochInfo]:
        """The plan of one worker of one rank, after the resume ``stages`` (if any)."""
        if not 0 <= rank < topology.world_size:
            raise ValueError(f"rank {rank} out of range for world_size {topology.world_size}")
        if not 0 <= worker < topology.streams:
            raise ValueError(f"worker {worker} out of range for {topology.num_workers} workers")
        streams, padded, dropped, remaining, stage_no, continuing = self._current(topology, stages)
        slots, labels, seeds = self._cell(streams, rank, worker, stage_no)
        skip = stages[-1].emitted[rank][worker] if continuing else 0
        per_part = self._emitted_per_part(labels, skip)
        plans = [
            worker_plan(
                self.sequences[i][slots[i]],
                self.shard_starts[i],
                buffer=self.parts[i].buffer,
                rng_seed=seeds[i],
                skip=per_part[i],
            )
            for i in range(len(self.parts))
        ]
        worker_sizes = [
            sum(len(per_part_streams[rank][w]) for per_part_streams in streams) for w in range(topology.streams)
        ]
        info = EpochInfo(
            self.epoch, self.total, sum(len(r) for r in remaining), sum(worker_sizes), padded, dropped, worker_sizes
        )
        return MixWorkerPlan(plans, labels, skip), info

    def rank_part_counts(self, topology: Topology, rank: int, stages: Sequence[Stage] = ()) -> list[int]:
        """Samples of each part this rank yields in the current stage."""
        streams = self._current(topology, stages)[0]
        return [sum(len(s) for s in per_part[rank]) for per_part in streams]
