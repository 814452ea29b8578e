"""Where each [rank][worker] stream lies in a sequence of ``m`` items: arithmetic only.

The sequence is cut into ``world_size`` contiguous rank ranges, each cut into ``streams``
contiguous worker ranges. ``even=None`` splits as evenly as possible (sizes differ by at
most one); ``"drop"`` gives every rank ``m // world_size`` (the tail is left out);
``"pad"`` gives every rank ``ceil(m / world_size)`` by wrapping around to the start. A
stream is then a *virtual* range ``[start, start + size)``: under "pad" its positions
are taken modulo ``m``, otherwise they are the positions themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rank_quota(m: int, world_size: int, even: str | None) -> int:
    """Samples every rank gets under "pad"/"drop" (unused for None)."""
    if even == "drop":
        return m // world_size
    return -(-m // world_size) if m else 0


def rank_span(m: int, world_size: int, even: str | None, rank: int) -> tuple[int, int]:
    """(virtual start, size) of ``rank``'s range."""
    if even is None:
        start = rank * m // world_size
        return start, (rank + 1) * m // world_size - start
    q = rank_quota(m, world_size, even)
    return rank * q, q


def padded_dropped(m: int, world_size: int, even: str | None) -> tuple[int, int]:
    """(samples repeated, samples left out) across all ranks."""
    if even == "drop":
        return 0, m - (m // world_size) * world_size
    if even == "pad":
        return rank_quota(m, world_size, even) * world_size - m, 0
    return 0, 0


def worker_sizes(rank_size: int, streams: int) -> list[int]:
    return [(w + 1) * rank_size // streams - w * rank_size // streams for w in range(streams)]


@dataclass(frozen=True)
class Layout:
    """Every stream of one topology over ``m`` items, flattened as ``rank * streams + worker``."""

    m: int
    world_size: int
    streams: int
    even: str | None
    starts: np.ndarray  # virtual start of each stream
    sizes: np.ndarray

    @classmethod
    def of(cls, m: int, world_size: int, streams: int, even: str | None) -> Layout:
        ranks = np.arange(world_size, dtype=np.int64)
        if even is None:
            rank_starts = ranks * m // world_size
            rank_sizes = (ranks + 1) * m // world_size - rank_starts
        else:
            q = rank_quota(m, world_size, even)
            rank_starts, rank_sizes = ranks * q, np.full(world_size, q, dtype=np.int64)
        w = np.arange(streams, dtype=np.int64)
        offsets = w[None, :] * rank_sizes[:, None] // streams
        ends = (w[None, :] + 1) * rank_sizes[:, None] // streams
        starts = (rank_starts[:, None] + offsets).ravel()
        return cls(m, world_size, streams, even, starts, (ends - offsets).ravel())

    @property
    def wraps(self) -> bool:
        """Whether virtual positions are taken modulo ``m`` ("pad")."""
        return self.even == "pad"

    def stream(self, rank: int, worker: int) -> tuple[int, int]:
        """(virtual start, size) of one stream."""
        s = rank * self.streams + worker
        return int(self.starts[s]), int(self.sizes[s])

    def index_ranges(self, start: int, size: int) -> list[tuple[int, int]]:
        """The virtual range ``[start, start + size)`` as ranges of positions, in order
        (two when it wraps past the end; ``size <= m`` always)."""
        if size <= 0:
            return []
        if not self.wraps:
            return [(start, start + size)]
        first = start % self.m
        if first + size <= self.m:
            return [(first, first + size)]
        return [(first, self.m), (0, first + size - self.m)]
