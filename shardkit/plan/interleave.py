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

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

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


def seed64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


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
        self.key = seed64(rng_seed)

    def __len__(self) -> int:
        return self.total

    def _schedule(self, x: int, lo: int, hi: int, out: list[int]) -> None:
        """Add the labels of parts ``lo..hi-1`` among the first ``x`` of their group to ``out``."""
        if hi - lo == 1 or x == 0:
            out[lo] += x
            return
        mid = (lo + hi) // 2
        group = self.prefix[hi] - self.prefix[lo]
        left = self.prefix[mid] - self.prefix[lo]
        u = mix64(self.key ^ mix64((lo << 32) | hi))
        to_left = (x * left * (1 << 64) + u * group) // (group << 64)
        self._schedule(to_left, lo, mid, out)
        self._schedule(x - to_left, mid, hi, out)

    def boundary_counts(self, x: int) -> list[int]:
        """Labels of each part among the first ``x`` when ``x`` is a block boundary (or the end)."""
        out = [0] * len(self.sizes)
        if self.sizes:
            self._schedule(x, 0, len(self.sizes), out)
        return out

    def _blocks(self, first: int, stop: int) -> np.ndarray:
        """Labels of blocks ``first..stop-1`` (the last block may be short), concatenated."""
        parts = len(self.sizes)
        edges = [min(b * BLOCK, self.total) for b in range(first, stop + 1)]
        at = np.array([self.boundary_counts(x) for x in edges], dtype=np.int64)  # (blocks + 1, parts)
        counts = np.diff(at, axis=0)
        lengths = np.diff(np.array(edges, dtype=np.int64))
        keys0 = np.array([mix64(self.key ^ mix64(b + (1 << 40))) for b in range(first, stop)], dtype=np.uint64)
        keys = mix64_array(keys0[:, None] + np.arange(BLOCK, dtype=np.uint64)[None, :])
        slot = np.arange(BLOCK)[None, :]
        keys[slot >= lengths[:, None]] = np.iinfo(np.uint64).max  # past a short block's end
        order = np.argsort(keys, axis=1, kind="stable")
        cum = np.cumsum(counts, axis=1)[:, : parts - 1]
        in_key_order = (slot[:, :, None] >= cum[:, None, :]).sum(axis=2)  # label of the t-th smallest key
        labels = np.empty_like(in_key_order)
        np.put_along_axis(labels, order, in_key_order, axis=1)
        return labels[slot < lengths[:, None]]

    def counts_before(self, x: int) -> list[int]:
        """Labels of each part among the first ``x``."""
        if not 0 <= x <= self.total:
            raise ValueError(f"resume state says {x} samples were emitted but the plan has only {self.total}")
        block, into = divmod(x, BLOCK)
        out = self.boundary_counts(block * BLOCK)
        if into:
            extra = np.bincount(self._blocks(block, block + 1)[:into], minlength=len(self.sizes))
            out = [a + int(b) for a, b in zip(out, extra.tolist())]
        return out

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
