"""Epoch positions to shards: the shard permutation of an epoch (or a chain of passes).

Positions are arithmetic over O(shards) arrays: the epoch order concatenates the shards
in permuted order, so position ``p`` lies in the permuted shard whose cumulative count
range holds it. A range of positions becomes :class:`Piece` s, runs of consecutive
samples of one shard, which is what a worker reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .ranges import Ranges


@dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` of shard number ``shard`` (an index into the shard list)."""

    shard: int
    start: int
    stop: int


def shard_order(n_shards: int, *, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """This epoch's shard permutation (the same on every rank)."""
    if not shuffle:
        return np.arange(n_shards)
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, 7]).permutation(n_shards)


def shard_starts(counts: np.ndarray) -> np.ndarray:
    """Global id of each shard's first sample, and the total at the end."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


RunArrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # (shard, start, stop) per run


def empty_runs() -> RunArrays:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)


def to_piece_list(runs: RunArrays) -> list[Piece]:
    """Runs in read order as pieces, joining a run to the next one of the same shard that
    starts where it stops (as reading them would)."""
    shard, lo, hi = runs
    keep = hi > lo
    shard, lo, hi = shard[keep], lo[keep], hi[keep]
    if not len(shard):
        return []
    new = np.concatenate([[True], (shard[1:] != shard[:-1]) | (lo[1:] != hi[:-1])])
    first = np.flatnonzero(new)
    last = np.concatenate([first[1:], [len(shard)]]) - 1
    return [Piece(s, a, b) for s, a, b in zip(shard[first].tolist(), lo[first].tolist(), hi[last].tolist())]


class ShardOrder:
    """One pass over the shards in permuted order: positions ``0..total-1``."""

    def __init__(self, counts: np.ndarray, starts: np.ndarray, *, epoch: int, seed: int, shuffle: bool) -> None:
        self.counts = counts
        self.starts = starts  # shard_starts(counts), shared between passes
        self.perm = shard_order(len(counts), epoch=epoch, seed=seed, shuffle=shuffle)
        self.cum = shard_starts(counts[self.perm])

    @property
    def total(self) -> int:
        return int(self.cum[-1])

    def runs(self, ranges: Ranges) -> RunArrays:
        """The runs of shard samples that position ranges cover, in order."""
        starts, stops = ranges
        keep = stops > starts
        starts, stops = starts[keep], stops[keep]
        if not len(starts):
            return empty_runs()
        first = np.searchsorted(self.cum, starts, side="right") - 1
        end = np.searchsorted(self.cum, stops, side="left")  # shards first..end-1 intersect
        per = end - first
        which = np.repeat(np.arange(len(starts)), per)
        idx = np.repeat(first, per) + np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)
        base = self.cum[idx]
        lo = np.maximum(starts[which], base) - base
        hi = np.minimum(stops[which], self.cum[idx + 1]) - base
        return self.perm[idx].astype(np.int64), lo, hi

    def ids(self, positions: np.ndarray) -> np.ndarray:
        """Global sample ids at the given positions."""
        p = np.asarray(positions, dtype=np.int64)
        i = np.searchsorted(self.cum, p, side="right") - 1
        return self.starts[self.perm[i]] + p - self.cum[i]


class EpochSource:
    """The samples of one epoch: positions ``0..total-1`` of one shard permutation."""

    def __init__(self, counts: np.ndarray, *, epoch: int, seed: int, shuffle: bool) -> None:
        self.counts = counts
        self.epoch, self.seed, self.shuffle = epoch, seed, shuffle

    @cached_property
    def order(self) -> ShardOrder:
        return ShardOrder(
            self.counts, shard_starts(self.counts), epoch=self.epoch, seed=self.seed, shuffle=self.shuffle
        )

    def runs(self, ranges: Ranges) -> RunArrays:
        return self.order.runs(ranges)

    def ids(self, positions: np.ndarray) -> np.ndarray:
        return self.order.ids(positions)


class PassChain:
    """Draws ``[offset, offset + length)`` of an endless chain of passes over the shards,
    pass ``p`` permuted as epoch ``p`` with ``seed`` (a Mix part's draws in one epoch)."""

    def __init__(self, counts: np.ndarray, *, seed: int, shuffle: bool, offset: int, length: int) -> None:
        self.counts = counts
        self.seed, self.shuffle = seed, shuffle
        self.offset, self.length = offset, length
        self.size = int(counts.sum())
        self._passes: dict[int, ShardOrder] = {}

    @cached_property
    def starts(self) -> np.ndarray:
        return shard_starts(self.counts)

    def order(self, p: int) -> ShardOrder:
        if p not in self._passes:
            self._passes[p] = ShardOrder(self.counts, self.starts, epoch=p, seed=self.seed, shuffle=self.shuffle)
        return self._passes[p]

    def _by_pass(self, ranges: Ranges) -> list[tuple[int, Ranges]]:
        """Position ranges cut at pass boundaries: (pass, ranges within that pass)."""
        out: list[tuple[int, Ranges]] = []
        for a, b in zip(*(r.tolist() for r in ranges)):
            a, b = a + self.offset, b + self.offset
            while a < b:
                p = a // self.size
                end = min(b, (p + 1) * self.size)
                out.append((p, (np.array([a - p * self.size]), np.array([end - p * self.size]))))
                a = end
        return out

    def runs(self, ranges: Ranges) -> RunArrays:
        parts = [self.order(p).runs(r) for p, r in self._by_pass(ranges)]
        if not parts:
            return empty_runs()
        return tuple(np.concatenate([part[i] for part in parts]) for i in range(3))  # type: ignore[return-value]

    def ids(self, positions: np.ndarray) -> np.ndarray:
        chain = np.asarray(positions, dtype=np.int64) + self.offset
        out = np.empty(len(chain), np.int64)
        passes = chain // self.size if self.size else chain
        for p in np.unique(passes).tolist():
            sel = passes == p
            out[sel] = self.order(p).ids(chain[sel] - p * self.size)
        return out
