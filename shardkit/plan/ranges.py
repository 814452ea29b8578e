"""What is left of an epoch after resume stages, as ranges plus a few holes.

A *level* is an ordered set of items, addressed by rank ``0..size-1``. :class:`Whole`
is the epoch (item ``i`` is epoch position ``i``). :class:`After` is what one stage left
of the level below: that level's items minus those its streams emitted. A stream that
emitted ``k`` items read a prefix of its range and still holds a few of them in its
shuffle buffer, so what it leaves is its unread suffix plus those *holes* (at most
``buffer - 1``). The counts are arithmetic (``n - k`` per stream); hole positions are
replayed (:func:`~shardkit.plan.shuffle.resume_shuffle`) only for the streams a caller
selects from, and for the few whose ranges overlap under "pad".

:meth:`Level.select` maps ranges of ranks to ranges of the level below, so a stream of
the current stage resolves, level by level, to ranges of epoch positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .layout import Layout
from .shuffle import ShuffleState, resume_shuffle

Ranges = tuple[np.ndarray, np.ndarray]  # (starts, stops), in order

GAP, HOLES, POINTS = 0, 1, 2  # block kinds: all left / one stream's holes / explicit items


def as_ranges(pairs: Sequence[tuple[int, int]]) -> Ranges:
    starts = np.array([a for a, _ in pairs], dtype=np.int64)
    stops = np.array([b for _, b in pairs], dtype=np.int64)
    return starts, stops


def merge_touching(starts: np.ndarray, stops: np.ndarray) -> Ranges:
    """Drop empty ranges and join each range to the next when it ends where that starts."""
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    if len(starts) < 2:
        return starts, stops
    new = np.concatenate([[True], starts[1:] != stops[:-1]])
    first = np.flatnonzero(new)
    last = np.concatenate([first[1:], [len(starts)]]) - 1
    return starts[first], stops[last]


class Level:
    """An ordered set of ``size`` items of the level below (``parent``)."""

    size: int
    parent: Level | None

    def select(self, starts: np.ndarray, stops: np.ndarray) -> Ranges:
        """The items with ranks in the given ranges (in that order), as ranges of the
        parent level's ranks."""
        raise NotImplementedError


class Whole(Level):
    """The epoch itself: item ``i`` is epoch position ``i``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.parent = None

    def select(self, starts: np.ndarray, stops: np.ndarray) -> Ranges:
        return merge_touching(starts, stops)


def resolve(level: Level, pairs: Sequence[tuple[int, int]]) -> Ranges:
    """Ranges of ``level``'s ranks as ranges of epoch positions (order kept)."""
    starts, stops = merge_touching(*as_ranges(pairs))
    node: Level | None = level
    while node is not None:
        starts, stops = node.select(starts, stops)
        node = node.parent
    return starts, stops


class After(Level):
    """What the streams of one stage (``layout`` over ``parent``, each stream having
    emitted ``emitted[s]`` through a shuffle buffer of ``buffer`` seeded ``seeds(s)``)
    left of ``parent``, in ``parent``'s order.

    The parent's ranks are cut into blocks: gaps nobody read (all left), ranges one
    stream read (left: its holes, counted arithmetically, placed when selected), and
    the few ranges several streams read or one stream read in two pieces (pad's wrap),
    whose leftovers are computed exactly at once.
    """

    def __init__(
        self, parent: Level, layout: Layout, emitted: np.ndarray, *, buffer: int, seeds: Callable[[int], str]
    ) -> None:
        self.parent = parent
        self.layout = layout
        self.buffer = buffer
        self.seeds = seeds
        sizes, k = layout.sizes, np.asarray(emitted, dtype=np.int64)
        over = np.flatnonzero(k > sizes)
        if len(over):
            s = int(over[0])
            raise ValueError(f"resume state says {k[s]} samples were emitted but the plan has only {sizes[s]}")
        self.emitted = k
        if buffer <= 1:
            read = k.copy()
        else:
            read = np.where(k == 0, 0, np.minimum(sizes, k + buffer - 1))
        self.read = read
        self._states: dict[int, ShuffleState] = {}
        self._build(self._extents())

    def _extents(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(start, stop, stream, offset in stream) of every range of parent ranks a stream
        read, sorted by start."""
        layout, m = self.layout, self.layout.m
        active = np.flatnonzero(self.read > 0)
        read = self.read[active]
        start = self.layout.starts[active]
        if not layout.wraps:
            pieces = [(start, start + read, active, np.zeros_like(active))]
        else:
            first = start % m
            whole = first + read <= m
            split = ~whole
            pieces = [
                (first[whole], first[whole] + read[whole], active[whole], np.zeros(int(whole.sum()), np.int64)),
                (first[split], np.full(int(split.sum()), m), active[split], np.zeros(int(split.sum()), np.int64)),
                (np.zeros(int(split.sum()), np.int64), first[split] + read[split] - m, active[split], m - first[split]),
            ]
        cols = [np.concatenate([p[i] for p in pieces]).astype(np.int64) for i in range(4)]
        order = np.argsort(cols[0], kind="stable")
        return cols[0][order], cols[1][order], cols[2][order], cols[3][order]

    def _build(self, extents: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
        x0, x1, stream, offset = extents
        m = self.layout.m
        # Clusters: extents that overlap (pad's wrap, or several ranks on a tiny remainder).
        if len(x0):
            reach = np.maximum.accumulate(x1)
            new = np.concatenate([[True], x0[1:] >= reach[:-1]])
        else:
            reach, new = x1, np.zeros(0, dtype=bool)
        cluster = np.cumsum(new) - 1
        firsts = np.flatnonzero(new)
        lasts = np.concatenate([firsts[1:], [len(x0)]]) - 1
        c0, c1 = x0[firsts], reach[lasts] if len(x0) else x1
        members = np.bincount(cluster, minlength=len(firsts)) if len(x0) else np.zeros(0, np.int64)
        in_two = np.bincount(stream, minlength=len(self.read)) > 1 if len(x0) else np.zeros(0, bool)
        simple = members == 1
        if len(x0):
            simple &= ~in_two[stream[firsts]]
        self._points: list[np.ndarray] = []
        kinds, refs, counts = [], [], []
        for c in range(len(firsts)):
            if simple[c]:
                s = int(stream[firsts[c]])
                kinds.append(HOLES)
                refs.append(s)
                counts.append(int(self.read[s] - self.emitted[s]))
            else:
                rows = range(firsts[c], lasts[c] + 1)
                left = self._left_in_cluster([(int(x0[i]), int(x1[i]), int(stream[i]), int(offset[i])) for i in rows])
                kinds.append(POINTS)
                refs.append(len(self._points))
                counts.append(len(left))
                self._points.append(left)
        # Blocks in rank order: gap, cluster, gap, cluster, ..., gap.
        gap0 = np.concatenate([[0], c1]).astype(np.int64)
        gap1 = np.concatenate([c0, [m]]).astype(np.int64)
        n_clusters = len(firsts)
        b0 = np.empty(2 * n_clusters + 1, np.int64)
        b1 = np.empty_like(b0)
        kind = np.empty_like(b0)
        ref = np.zeros_like(b0)
        count = np.empty_like(b0)
        b0[0::2], b1[0::2], kind[0::2], count[0::2] = gap0, gap1, GAP, gap1 - gap0
        b0[1::2], b1[1::2] = c0, c1
        kind[1::2] = kinds
        ref[1::2] = refs
        count[1::2] = counts
        keep = count > 0
        self._b0, self._kind, self._ref = b0[keep], kind[keep], ref[keep]
        self._cum = np.concatenate([[0], np.cumsum(count[keep])]).astype(np.int64)
        self.size = int(self._cum[-1])

    def state(self, s: int) -> ShuffleState:
        """Stream ``s``'s shuffle after its emissions (replayed once, then kept)."""
        if s not in self._states:
            self._states[s] = resume_shuffle(
                int(self.layout.sizes[s]), self.buffer, self.seeds(s), int(self.emitted[s])
            )
        return self._states[s]

    def _holes_at(self, s: int, base: int) -> np.ndarray:
        return base + self.state(s).holes()

    def _left_in_cluster(self, extents: list[tuple[int, int, int, int]]) -> np.ndarray:
        """Parent ranks left in a cluster of overlapping extents: those every extent
        covering them still holds (a hole of each)."""
        mapped = []
        for a, b, s, off in extents:
            h = self.state(s).holes()
            h = h[(h >= off) & (h < off + b - a)]
            mapped.append(a + h - off)
        candidates = np.unique(np.concatenate(mapped)) if mapped else np.zeros(0, np.int64)
        keep = np.ones(len(candidates), dtype=bool)
        for (a, b, _, _), holes in zip(extents, mapped):
            covered = (candidates >= a) & (candidates < b)
            keep &= ~covered | np.isin(candidates, holes)
        return candidates[keep]

    def _block_items(self, b: int) -> np.ndarray:
        if self._kind[b] == POINTS:
            return self._points[int(self._ref[b])]
        s = int(self._ref[b])
        start = int(self.layout.starts[s])
        base = start % self.layout.m if self.layout.wraps else start
        return self._holes_at(s, base)

    def select(self, starts: np.ndarray, stops: np.ndarray) -> Ranges:
        cum, out0, out1 = self._cum, [], []
        for lo, hi in zip(starts.tolist(), stops.tolist()):
            if lo >= hi:
                continue
            if lo < 0 or hi > self.size:
                raise ValueError(f"ranks [{lo}, {hi}) out of range for a level of {self.size}")
            b = int(np.searchsorted(cum, lo, side="right")) - 1
            while b < len(self._b0) and cum[b] < hi:
                u, v = max(lo, int(cum[b])) - int(cum[b]), min(hi, int(cum[b + 1])) - int(cum[b])
                if self._kind[b] == GAP:
                    base = int(self._b0[b])
                    out0.append(np.array([base + u], np.int64))
                    out1.append(np.array([base + v], np.int64))
                else:
                    items = self._block_items(b)[u:v]
                    out0.append(items)
                    out1.append(items + 1)
                b += 1
        if not out0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return merge_touching(np.concatenate(out0), np.concatenate(out1))


class StreamMap:
    """A stream's positions ``0..size-1`` as ranges of epoch positions, in stream order."""

    def __init__(self, ranges: Ranges) -> None:
        self.starts, self.stops = ranges
        self.offsets = np.concatenate([[0], np.cumsum(self.stops - self.starts)]).astype(np.int64)

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    def positions(self, stream_positions: np.ndarray) -> np.ndarray:
        """Epoch positions of the given stream positions."""
        p = np.asarray(stream_positions, dtype=np.int64)
        seg = np.searchsorted(self.offsets, p, side="right") - 1
        return self.starts[seg] + p - self.offsets[seg]

    def sub(self, lo: int, hi: int) -> Ranges:
        """Stream positions ``[lo, hi)`` as ranges of epoch positions."""
        if lo >= hi:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        a = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        b = int(np.searchsorted(self.offsets, hi, side="left"))
        starts = self.starts[a:b].copy()
        stops = self.stops[a:b].copy()
        starts[0] += lo - self.offsets[a]
        stops[-1] -= self.offsets[b] - hi
        return starts, stops
