"""Collate each sample into its batch as it arrives, into reusable batch memory.

:func:`stream_batches` is what a worker runs with the default ``collate``: the first
sample of a batch decides its layout as :func:`~shardkit.read.pipeline.collate` would
(dicts and tuples recursed into; tensors and numeric arrays of one shape and dtype
stacked; ints and floats made int64 and float64 tensors; anything else collated at the
end), and each later sample is copied into the batch's rows straight away, while its
pixels are still in cache, into a slot of the worker's :class:`~shardkit.read.batchmem.BatchMemory`
when a ShardLoader provides one. A sample that does not fit the layout (another shape,
dtype or type) makes the whole batch fall back to ``collate(samples)``, so a batch is
always exactly what ``collate`` gives for its samples. For that fallback a batch keeps
each sample, but a copied tensor or array that its row can give back exactly (same
values, shape, dtype and strides: dense ones) is dropped at once, so its memory is
reused for the next sample instead of piling up until the batch is complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from ..decode.planar import to_planar
from ..errors import ShardkitError
from .batchmem import BatchMemory, Slot, Ticket, empty_batch_tensor
from .pipeline import collate
from .stages import StageHooks

# torch dtypes numpy can copy (not bfloat16 or complex: numpy() refuses or differs)
_TENSOR_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
    | {torch.float16, torch.float32, torch.float64, torch.bool}
)
_ARRAY_KINDS = frozenset("biuf")


class _Rows:
    """Tensors (or numeric arrays) of one shape and dtype, copied into a (n, *shape) batch."""

    __slots__ = ("kind", "shape", "dtype", "torch_dtype", "target", "out")

    def __init__(self, first: Any) -> None:
        self.kind = type(first)
        self.shape = first.shape
        self.dtype = first.dtype
        self.torch_dtype = first.dtype if self.kind is torch.Tensor else torch.from_numpy(first[:0]).dtype
        self.out: torch.Tensor | None = None
        self.target: np.ndarray | None = None

    @staticmethod
    def fits(value: Any) -> bool:
        """Whether ``value`` can start a rows leaf (else the leaf collates at the end)."""
        if type(value) is torch.Tensor:
            return (
                value.dtype in _TENSOR_DTYPES
                and value.is_cpu
                and value.layout == torch.strided
                and not value.requires_grad
                and value.numel() > 0
            )
        if type(value) is np.ndarray:
            return value.dtype.kind in _ARRAY_KINDS and value.dtype.isnative and value.size > 0
        return False

    def bind(self, out: torch.Tensor) -> None:
        self.out, self.target = out, out.numpy()

    def put(self, row: int, value: Any) -> bool:
        if type(value) is not self.kind or value.shape != self.shape or value.dtype != self.dtype:
            return False
        assert self.target is not None
        if self.kind is torch.Tensor and _channels_last_chw(value):  # the decoders' pixels, de-interleaved
            to_planar(self.target[row], value.numpy().transpose(1, 2, 0))
            return True
        # numpy copies a strided tensor into rows several times faster than torch
        # ([row, ...]: a row of 0-d values is still an array to copy into)
        np.copyto(self.target[row, ...], value.numpy() if self.kind is torch.Tensor else value)
        return True

    def dropped(self, value: Any) -> _Dropped | None:
        """What :meth:`restore` needs to give ``value`` back from its row, or None when
        the row cannot (not dense: a view with gaps or overlaps)."""
        if self.kind is torch.Tensor:
            if value.is_contiguous() or _channels_last_chw(value):
                return _Dropped(value.stride())
            return None
        return _Dropped(None) if value.flags.c_contiguous else None

    def restore(self, row: int, dropped: _Dropped) -> Any:
        """The dropped value of ``row``, from the copy in the batch."""
        assert self.target is not None
        if self.kind is not torch.Tensor:
            return self.target[row, ...].copy()
        assert dropped.stride is not None
        value = torch.empty_strided(self.shape, dropped.stride, dtype=self.dtype)
        np.copyto(value.numpy(), self.target[row, ...])
        return value


class _Dropped:
    """Stands in a kept sample for a value its batch row holds (the value's strides)."""

    __slots__ = ("stride",)

    def __init__(self, stride: tuple[int, ...] | None) -> None:
        self.stride = stride


def _channels_last_chw(t: torch.Tensor) -> bool:
    """A CHW view of HWC pixels (what the decoders give): dense, channels innermost."""
    if t.dim() != 3:
        return False
    c, _, w = t.shape
    return t.stride() == (1, w * c, c)


def _replace(obj: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A shallow copy of ``obj`` with ``obj[path]`` replaced (TypeError for containers
    other than tuples, lists and dicts)."""
    key = path[0]
    value = new if len(path) == 1 else _replace(obj[key], path[1:], new)
    if isinstance(obj, tuple):  # collate turns any tuple (namedtuple too) into a tuple
        return (*obj[:key], value, *obj[key + 1 :])
    if isinstance(obj, (dict, list)):
        out = dict(obj) if isinstance(obj, dict) else list(obj)
        out[key] = value
        return out
    raise TypeError(type(obj).__name__)


class _Numbers:
    """Python ints (int64) or floats (float64), as ``torch.tensor(values)`` makes them."""

    __slots__ = ("kind", "shape", "torch_dtype", "target", "out")

    def __init__(self, first: Any) -> None:
        self.kind = type(first)
        self.shape: tuple[int, ...] = ()
        self.torch_dtype = torch.int64 if self.kind is int else torch.float64
        self.out: torch.Tensor | None = None
        self.target: np.ndarray | None = None

    def bind(self, out: torch.Tensor) -> None:
        self.out, self.target = out, out.numpy()

    def put(self, row: int, value: Any) -> bool:
        if type(value) is not self.kind:
            return False
        assert self.target is not None
        self.target[row] = value  # OverflowError past int64: the batch falls back
        return True


class _Later:
    """Anything else: the values, collated when the batch is complete."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: list[Any] = []

    def put(self, row: int, value: Any) -> bool:
        self.values.append(value)
        return True


_Leaf = _Rows | _Numbers | _Later


def _layout(sample: Any, path: tuple[Any, ...], leaves: list[tuple[tuple[Any, ...], _Leaf]]) -> Any:
    """The batch's shape tree from its first sample (collate's recursion); appends each
    leaf with its path of keys to ``leaves`` and returns the tree with leaf indices."""
    if isinstance(sample, dict):
        return {k: _layout(v, (*path, k), leaves) for k, v in sample.items()}
    if isinstance(sample, tuple):
        return tuple(_layout(v, (*path, i), leaves) for i, v in enumerate(sample))
    leaf: _Leaf
    if _Rows.fits(sample):
        leaf = _Rows(sample)
    elif type(sample) in (int, float):
        leaf = _Numbers(sample)
    else:
        leaf = _Later()
    leaves.append((path, leaf))
    return len(leaves) - 1


class StreamingBatch:
    """One batch being collated sample by sample: :meth:`add` each, then :meth:`finish`."""

    def __init__(self, capacity: int, *, memory: BatchMemory | None = None) -> None:
        self.capacity = capacity
        self.memory = memory
        self.shared = get_worker_info() is not None
        self.samples: list[Any] = []  # kept for the fallback: collate(samples)
        self.shadowed: set[int] = set()  # rows kept with _Dropped in place of copied values
        self.tree: Any = None
        self.leaves: list[tuple[tuple[Any, ...], _Leaf]] = []
        self.failed = False
        self.slot: Slot | None = None
        self.ticket: Ticket | None = None
        self.reused = False  # collated into ring memory that held an earlier batch

    def __len__(self) -> int:
        return len(self.samples)

    def _start(self, first: Any) -> None:
        self.tree = _layout(first, (), self.leaves)
        buffered = [(i, leaf) for i, (_, leaf) in enumerate(self.leaves) if not isinstance(leaf, _Later)]
        if buffered and self.memory is not None:
            taken = self.memory.acquire()
            if taken is not None:
                self.slot, self.ticket = taken
        allocations = self.slot.allocations if self.slot is not None else 0
        for index, leaf in buffered:
            assert isinstance(leaf, (_Rows, _Numbers))
            shape = (self.capacity, *leaf.shape)
            if self.slot is not None:
                leaf.bind(self.slot.buffer(index, shape, leaf.torch_dtype))
            else:
                leaf.bind(empty_batch_tensor(shape, leaf.torch_dtype, shared=self.shared))
        self.reused = self.slot is not None and self.slot.allocations == allocations

    def add(self, sample: Any) -> None:
        """Copy ``sample`` into its row (a sample that does not fit: fall back)."""
        row = len(self.samples)
        if row >= self.capacity:
            raise ShardkitError(f"internal: batch of {self.capacity} is full")
        self.samples.append(sample)
        if self.failed:
            return
        if row == 0:
            self._start(sample)
        drops: list[tuple[tuple[Any, ...], _Dropped]] | None = []
        try:
            for path, leaf in self.leaves:
                value = sample
                for key in path:
                    value = value[key]
                if not leaf.put(row, value):
                    self.failed = True
                    return
                if type(leaf) is _Rows and drops is not None:
                    dropped = leaf.dropped(value)
                    if dropped is None:
                        drops = None  # keep this sample whole
                    else:
                        drops.append((path, dropped))
        except Exception:  # noqa: BLE001 - collate(samples) at the end raises or copes as before
            self.failed = True
            return
        if drops:
            try:
                kept = sample
                for path, dropped in drops:
                    kept = _replace(kept, path, dropped) if path else dropped
            except TypeError:  # a container we cannot copy: keep the sample whole
                return
            self.samples[row] = kept
            self.shadowed.add(row)

    def _restored(self, row: int) -> Any:
        """Sample ``row`` as it came (its dropped values given back from the batch)."""
        sample = self.samples[row]
        if row not in self.shadowed:
            return sample
        for path, leaf in self.leaves:
            if type(leaf) is not _Rows:
                continue
            value = sample
            for key in path:
                value = value[key]
            if isinstance(value, _Dropped):
                restored = leaf.restore(row, value)
                sample = _replace(sample, path, restored) if path else restored
        return sample

    def finish(self) -> tuple[Any, Ticket | None]:
        """The collated batch, and the ticket of its ring slot (None: fresh memory)."""
        if self.failed or not self.samples:
            self.discard()
            return collate([self._restored(row) for row in range(len(self.samples))]), None
        n = len(self.samples)
        outs: list[Any] = []
        for _, leaf in self.leaves:
            if isinstance(leaf, _Later):
                outs.append(collate(leaf.values))
                continue
            assert leaf.out is not None
            if n == self.capacity:
                outs.append(leaf.out)
            else:  # a short last batch gets memory of its own size, as collate gives it
                out = empty_batch_tensor((n, *leaf.shape), leaf.torch_dtype, shared=self.shared)
                np.copyto(out.numpy(), leaf.out.numpy()[:n])
                outs.append(out)
        if n < self.capacity:
            self.discard()
        return _build(self.tree, outs), self.ticket

    def discard(self) -> None:
        """Give the batch's ring slot back unused (a dropped or fallen-back batch)."""
        if self.ticket is not None and self.memory is not None:
            self.memory.give_back(self.ticket)
        self.ticket = None


def _build(tree: Any, outs: list[Any]) -> Any:
    if isinstance(tree, dict):
        return {k: _build(v, outs) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_build(v, outs) for v in tree)
    return outs[tree]


def stream_batches(
    tagged: Iterable[tuple[Any, Any]],
    batch_size: int,
    *,
    drop_last: bool,
    memory: BatchMemory | None = None,
    hooks: StageHooks | None = None,
    counts: dict[str, int] | None = None,
) -> Iterator[tuple[Any, tuple[int, Ticket | None, Any]]]:
    """Group ``(tag, sample)`` pairs into ``(tag of the last sample, (size, ticket, batch))``
    with ``batch == collate(samples)``; ``hooks`` observe the copy of each sample as the
    "batch" stage and the completion of each batch as "collate". With ``memory``,
    ``counts`` gets ``memory_reused`` (batches collated into memory an earlier batch
    used) and ``memory_fresh`` (batches that needed new memory)."""
    if batch_size < 1:
        raise ShardkitError(f"batch_size must be >= 1, got {batch_size}")
    hooks = hooks or StageHooks()
    add: Callable[[StreamingBatch, Any], None] = hooks.wrap("batch", StreamingBatch.add)
    finish: Callable[[StreamingBatch], tuple[Any, Ticket | None]] = hooks.wrap("collate", StreamingBatch.finish)
    if memory is not None and counts is not None:
        counts.update(memory_reused=0, memory_fresh=0)

    def done(batch: StreamingBatch) -> tuple[int, Ticket | None, Any]:
        out, ticket = finish(batch)
        if memory is not None and counts is not None:
            counts["memory_reused" if ticket is not None and batch.reused else "memory_fresh"] += 1
        return len(batch.samples), ticket, out

    batch = StreamingBatch(batch_size, memory=memory)
    tag = None
    for tag, sample in tagged:
        add(batch, sample)
        if len(batch.samples) == batch_size:
            yield tag, done(batch)
            batch = StreamingBatch(batch_size, memory=memory)
    if batch.samples:
        if drop_last:
            batch.discard()
        else:
            yield tag, done(batch)
