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
   (:mod:`shardkit.plan.layout`; pad/drop per part, so every rank gets the same count of
   every part).
3. A worker reads each of its part streams sequentially (pieces of shards), emits each
   through that part's shuffle buffer, and interleaves the parts by a seeded sequence of
   part labels holding exactly as many labels of a part as it has samples of it
   (:class:`~shardkit.plan.interleave.Interleave`: every block of 64 emissions holds the
   parts in proportion, in random order).

Progress is one count per worker (emissions of the interleaved stream): the labels before
``k`` say how many of each part were emitted, each part's buffer order says which.
Resume with the same topology continues; with another one the rest is re-planned per
part, exactly as :class:`~shardkit.plan.EpochPlanner` does. As there, nothing is of the
size of the parts: draws are ranges of passes, streams are arithmetic cuts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .epoch import EpochInfo, Stage, Topology, WorkerPlan, check_cell, check_stage, continues, stream_plan
from .interleave import Interleave, counts_before_many
from .layout import Layout, padded_dropped
from .ranges import After, Level, Whole
from .seeds import int_seed, rng_seed
from .source import PassChain


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

    ``labels`` from position ``skip`` on is the part of each emission still to come; the
    part plans already skip what was emitted.
    """

    parts: list[WorkerPlan]
    labels: Interleave
    skip: int = 0

    @property
    def size(self) -> int:
        return self.labels.total

    def emission_labels(self) -> Iterator[int]:
        """The part of each emission still to come, in order."""
        return self.labels.labels(self.skip)

    def emitted_ids(self) -> list[tuple[int, int]]:
        """(part, id within the part) of each emission still to come, in order -- what
        the worker will yield, computed without data (for small plans: it is a list)."""
        orders = [p.emitted_ids() for p in self.parts]
        return [(label, next(orders[label])) for label in self.emission_labels()]


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


def interleave(sizes: Sequence[int], rng_seed: str) -> np.ndarray:
    """A random sequence of part labels holding exactly ``sizes[i]`` labels ``i`` (all of
    it; workers use :class:`~shardkit.plan.interleave.Interleave` lazily)."""
    return Interleave(sizes, rng_seed).array()


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
    ) -> None:
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
        self.sources = [
            PassChain(
                np.asarray(p.counts, dtype=np.int64),
                seed=self._part_seed(i),
                shuffle=p.shuffle_shards,
                offset=epoch * n,
                length=n,
            )
            for i, (p, n) in enumerate(zip(self.parts, self.draws))
        ]

    def _part_seed(self, i: int) -> int:
        return int_seed(rng_seed(self.seed, i, self.parts[i].seed, domain="mix")) & 0xFFFFFFFF

    @property
    def total(self) -> int:
        return sum(self.draws)

    def part_ids(self, i: int) -> np.ndarray:
        """Ids (within part ``i``) of the part's draws this epoch, in draw order (small parts)."""
        return self.sources[i].ids(np.arange(self.draws[i], dtype=np.int64))

    def _rng(self, what: str, stage_no: int, rank: int, worker: int) -> str:
        return rng_seed(self.seed, self.epoch, stage_no, rank, worker, what, domain="shardkit-mix")

    def _layouts(self, levels: Sequence[Level], topology: Topology) -> list[Layout]:
        return [Layout.of(level.size, topology.world_size, topology.streams, topology.even) for level in levels]

    def _emitted_per_part(self, layouts: Sequence[Layout], stage: Stage, stage_no: int) -> np.ndarray:
        """(parts, streams): how many of each part every stream of ``stage`` emitted."""
        sizes = np.stack([layout.sizes for layout in layouts])
        emitted = np.asarray(stage.emitted, dtype=np.int64).reshape(-1)
        out = np.zeros_like(sizes)
        whole = emitted == sizes.sum(axis=0)
        out[:, whole] = sizes[:, whole]
        streams = stage.topology.streams
        cells = np.flatnonzero(~whole & (emitted > 0)).tolist()
        labels = [
            Interleave(sizes[:, s].tolist(), self._rng("labels", stage_no, s // streams, s % streams)) for s in cells
        ]
        if cells:
            out[:, cells] = counts_before_many(labels, emitted[cells].tolist()).T
        return out

    def _current(self, topology: Topology, stages: Sequence[Stage]) -> tuple[list[Level], int, bool]:
        """(what is left of each part for the current stage, its stage number, whether it
        continues the last)."""
        continuing = continues(stages, topology)
        history = stages[:-1] if continuing else stages
        levels: list[Level] = [Whole(n) for n in self.draws]
        for stage_no, stage in enumerate(history):
            check_stage(stage)
            topo = stage.topology
            layouts = self._layouts(levels, topo)
            per_part = self._emitted_per_part(layouts, stage, stage_no)
            levels = [
                After(
                    level,
                    layout,
                    per_part[i],
                    buffer=self.parts[i].buffer,
                    seeds=lambda s, i=i, no=stage_no, p=topo.streams: self._rng(f"part{i}", no, s // p, s % p),  # type: ignore[misc]
                )
                for i, (level, layout) in enumerate(zip(levels, layouts))
            ]
        return levels, len(history), continuing

    def stream_sizes(self, topology: Topology, stages: Sequence[Stage] = ()) -> list[list[int]]:
        """Samples in each [rank][worker] stream of the current stage (before any skip)."""
        levels, _, _ = self._current(topology, stages)
        total = sum(layout.sizes for layout in self._layouts(levels, topology))
        return np.asarray(total).reshape(topology.world_size, topology.streams).tolist()

    def plan(
        self, topology: Topology, *, rank: int, worker: int, stages: Sequence[Stage] = ()
    ) -> tuple[MixWorkerPlan, EpochInfo]:
        """The plan of one worker of one rank, after the resume ``stages`` (if any)."""
        check_cell(topology, rank, worker)
        levels, stage_no, continuing = self._current(topology, stages)
        layouts = self._layouts(levels, topology)
        cell = rank * topology.streams + worker
        labels = Interleave(
            [int(layout.sizes[cell]) for layout in layouts], self._rng("labels", stage_no, rank, worker)
        )
        skip = stages[-1].emitted[rank][worker] if continuing else 0
        per_part = labels.counts_before(skip)
        plans = [
            stream_plan(
                level,
                layout,
                rank=rank,
                worker=worker,
                buffer=self.parts[i].buffer,
                rng_seed=self._rng(f"part{i}", stage_no, rank, worker),
                skip=per_part[i],
                source=self.sources[i],
            )
            for i, (level, layout) in enumerate(zip(levels, layouts))
        ]
        row = slice(rank * topology.streams, (rank + 1) * topology.streams)
        worker_sizes = np.sum([layout.sizes[row] for layout in layouts], axis=0).tolist()
        padded = sum(padded_dropped(level.size, topology.world_size, topology.even)[0] for level in levels)
        dropped = sum(padded_dropped(level.size, topology.world_size, topology.even)[1] for level in levels)
        info = EpochInfo(
            self.epoch,
            self.total,
            sum(level.size for level in levels),
            sum(worker_sizes),
            padded,
            dropped,
            worker_sizes,
        )
        return MixWorkerPlan(plans, labels, skip), info

    def rank_part_counts(self, topology: Topology, rank: int, stages: Sequence[Stage] = ()) -> list[int]:
        """Samples of each part this rank yields in the current stage."""
        levels, _, _ = self._current(topology, stages)
        row = slice(rank * topology.streams, (rank + 1) * topology.streams)
        return [int(layout.sizes[row].sum()) for layout in self._layouts(levels, topology)]
