"""A Mix worker's sequence of part labels, seekable: any prefix's counts in O(parts).

The sequence holds exactly ``sizes[i]`` labels ``i``. It is cut into blocks of
:data:`BLOCK` labels. How many labels of each part lie before a block boundary ``x`` is
a monotone schedule: a balanced binary tree over the parts splits ``x`` between the left
and right groups as ``floor(x * left / total + u)`` with a seeded offset ``u`` per tree
node (systematic rounding), which is exact at the end and never decreases. Inside a
block its labels are in a seeded random order (sorted by hashed keys). So every block
holds each part in proportion (less than one off per level of the tree: one for two parts,
two for up to four), the order within blocks is random, and
neither counting a prefix nor starting mid-sequence needs the labels before it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .seeds import int_seed

BLOCK = 64
CHUNK_BLOCKS = 256  # blocks generated per numpy step when iterating
MASK = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser on a Python int (a 64-bit hash)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def mix64_array(x: np.ndarray) -> np.ndarray:
    """:func:`mix64` on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def block_labels(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of blocks, one per row: block ``i`` holds ``counts[i, p]`` labels ``p`` in
    the order of hashed keys seeded by ``keys[i]``. Returns ``(blocks, BLOCK)`` labels
    (a short block's tail is filler) and each block's length."""
    lengths = counts.sum(axis=1)
    slot = np.arange(BLOCK)[None, :]
    hashed = mix64_array(keys[:, None] + slot.astype(np.uint64))
    hashed[slot >= lengths[:, None]] = np.iinfo(np.uint64).max  # past a short block's end
    order = np.argsort(hashed, axis=1, kind="stable")
    cum = np.cumsum(counts, axis=1)[:, :-1]
    in_key_order = (slot[:, :, None] >= cum[:, None, :]).sum(axis=2)  # label of the t-th smallest key
    labels = np.empty_like(in_key_order)
    np.put_along_axis(labels, order, in_key_order, axis=1)
    return labels, lengths


def counts_before_many(labels: Sequence[Interleave], emitted: Sequence[int]) -> np.ndarray:
    """``labels[i].counts_before(emitted[i])`` for many sequences of as many parts at once
    (a stage's workers), as a ``(sequences, parts)`` array."""
    out = np.zeros((len(labels), len(labels[0].sizes) if labels else 0), dtype=np.int64)
    partial: list[int] = []
    keys: list[int] = []
    counts: list[np.ndarray] = []
    into: list[int] = []
    for i, (seq, x) in enumerate(zip(labels, emitted)):
        if not 0 <= x <= seq.total:
            raise ValueError(f"resume state says {x} samples were emitted but the plan has only {seq.total}")
        block, rest = divmod(x, BLOCK)
        out[i] = seq.boundary_counts(block * BLOCK)
        if rest:
            partial.append(i)
            keys.append(seq.block_key(block))
            counts.append(np.subtract(seq.boundary_counts(min((block + 1) * BLOCK, seq.total)), out[i]))
            into.append(rest)
    if partial:
        labels_in, _ = block_labels(np.array(keys, dtype=np.uint64), np.array(counts, dtype=np.int64))
        taken = np.arange(BLOCK)[None, :] < np.array(into)[:, None]
        parts = out.shape[1]
        flat = (labels_in + parts * np.arange(len(partial))[:, None])[taken]
        out[partial] += np.bincount(flat, minlength=parts * len(partial)).reshape(len(partial), parts)
    return out


class Interleave:
    """A seeded sequence of part labels holding exactly ``sizes[i]`` labels ``i``."""

    def __init__(self, sizes: Sequence[int], rng_seed: str) -> None:
        self.sizes = [int(s) for s in sizes]
        if any(s < 0 for s in self.sizes):
            raise ValueError(f"part sizes must be >= 0, got {self.sizes}")
        self.prefix = [0]
        for s in self.sizes:
            self.prefix.append(self.prefix[-1] + s)
        self.total = self.prefix[-1]
        self.key = int_seed(rng_seed)
        self._nodes: dict[tuple[int, int], tuple[int, int, int, int]] = {}

    def __len__(self) -> int:
        return self.total

    def _split_node(self, lo: int, hi: int) -> tuple[int, int, int, int]:
        """(mid, left, group, offset) of the parts tree's node over parts ``lo..hi-1``."""
        node = self._nodes.get((lo, hi))
        if node is None:
            mid = (lo + hi) // 2
            group = self.prefix[hi] - self.prefix[lo]
            node = (mid, self.prefix[mid] - self.prefix[lo], group, mix64(self.key ^ mix64((lo << 32) | hi)))
            self._nodes[(lo, hi)] = node
        return node

    def boundary_counts(self, x: int) -> list[int]:
        """Labels of each part among the first ``x`` when ``x`` is a block boundary (or the end):
        each tree node sends ``floor(x * left / group + u)`` of its ``x`` to its left half."""
        out = [0] * len(self.sizes)
        todo = [(0, len(self.sizes), x)] if self.sizes else []
        while todo:
            lo, hi, n = todo.pop()
            if hi - lo == 1 or n == 0:
                out[lo] += n
                continue
            mid, left, group, u = self._split_node(lo, hi)
            to_left = (n * left * (1 << 64) + u * group) // (group << 64)
            todo.append((lo, mid, to_left))
            todo.append((mid, hi, n - to_left))
        return out

    def block_key(self, block: int) -> int:
        return mix64(self.key ^ mix64(block + (1 << 40)))

    def _blocks(self, first: int, stop: int) -> np.ndarray:
        """Labels of blocks ``first..stop-1`` (the last block may be short), concatenated."""
        edges = [min(b * BLOCK, self.total) for b in range(first, stop + 1)]
        at = np.array([self.boundary_counts(x) for x in edges], dtype=np.int64)  # (blocks + 1, parts)
        keys = np.array([self.block_key(b) for b in range(first, stop)], dtype=np.uint64)
        labels, lengths = block_labels(keys, np.diff(at, axis=0))
        return labels[np.arange(BLOCK)[None, :] < lengths[:, None]]

    def counts_before(self, x: int) -> list[int]:
        """Labels of each part among the first ``x``."""
        return counts_before_many([self], [x])[0].tolist()

    def labels(self, start: int = 0) -> Iterator[int]:
        """The labels from position ``start`` on."""
        n_blocks = -(-self.total // BLOCK)
        block, into = divmod(start, BLOCK)
        while block < n_blocks:
            stop = min(n_blocks, block + CHUNK_BLOCKS)
            yield from self._blocks(block, stop)[into:].tolist()
            block, into = stop, 0

    def array(self) -> np.ndarray:
        """All labels (for small sequences)."""
        if not self.total:
            return np.zeros(0, np.int64)
        return self._blocks(0, -(-self.total // BLOCK))
