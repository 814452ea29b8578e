"""Batch memory: where the workers collate batches, and when that memory may be reused.

Without a driver, every batch gets fresh memory (shared memory in a DataLoader worker,
as torch's default_collate does): nothing tells a worker when the consumer is done
with a batch. ShardLoader does know, so it gives its workers a :class:`BatchMemory`:
per worker a small ring of shared-memory buffers, and a board in shared memory on
which the loader marks a ring slot free once every tensor (and view) of the batch it
held has been dropped in the main process. A worker takes a free slot for its next
batch and falls back to fresh memory while none is free (a consumer that keeps
batches), so reuse never changes what a batch holds.

The board holds one cell per (worker, slot): 0 is free; a positive value is the loader
iteration ("run") that the batch in the slot was made for, so a slot whose batch was
never handed out (the DataLoader drops batches in flight when an iteration ends early)
is free again in the next run; ``HELD`` marks a slot of an earlier run whose batch the
consumer still holds. Only the worker takes a free cell and only the loader frees a
taken one, so the two never write the same cell at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import get_worker_info

FREE = 0
HELD = -1

#: What a batch made in a ring slot carries to the loader: (worker row, slot, run).
Ticket = tuple[int, int, int]


def empty_batch_tensor(shape: tuple[int, ...], dtype: torch.dtype, *, shared: bool) -> torch.Tensor:
    """A contiguous tensor to collate into: in shared memory when ``shared`` (a DataLoader
    worker: the batch then crosses to the main process without a copy), else private."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # What default_collate does in a worker: a new shared storage, no copy at pickling.
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, _contiguous_strides(shape))


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class Slot:
    """One batch's buffers in a worker's ring: a contiguous tensor per batched leaf."""

    __slots__ = ("index", "buffers", "allocations")

    def __init__(self, index: int) -> None:
        self.index = index
        self.buffers: dict[int, torch.Tensor] = {}
        self.allocations = 0  # buffers made so far

    def buffer(self, leaf: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The slot's tensor for ``leaf``, made (again) when its shape or dtype changed."""
        tensor = self.buffers.get(leaf)
        if tensor is None or tensor.shape != shape or tensor.dtype != dtype:
            tensor = self.buffers[leaf] = empty_batch_tensor(shape, dtype, shared=True)
            self.allocations += 1
        return tensor


class BatchMemory:
    """The rings of a ShardLoader's workers and the board that says which slots are free.

    Made by the loader in the main process before its workers start (they inherit it
    with the dataset view); each worker keeps its own ring of ``slots`` slots, made
    as they are first needed.
    """

    def __init__(self, workers: int, slots: int) -> None:
        if workers < 1 or slots < 1:
            raise ValueError(f"need workers >= 1 and slots >= 1, got {workers} and {slots}")
        self.workers, self.slots = workers, slots
        self.board = torch.zeros((workers, slots), dtype=torch.int64).share_memory_()
        self.run = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._ring: list[Slot | None] = []
        self._pid = -1  # the process the ring belongs to (a forked worker starts its own)

    def __getstate__(self) -> dict[str, Any]:
        return {"workers": self.workers, "slots": self.slots, "board": self.board, "run": self.run}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ring, self._pid = [], -1

    # -- the worker's side -------------------------------------------------------------
    def acquire(self) -> tuple[Slot, Ticket] | None:
        """A free slot of this worker's ring for the next batch, taken; None when every
        slot holds a batch still in flight or held by the consumer (use fresh memory),
        or when not in a DataLoader worker."""
        info = get_worker_info()
        if info is None or info.id >= self.workers:
            return None
        if self._pid != os.getpid():
            self._ring, self._pid = [None] * self.slots, os.getpid()
        cells = self.board.numpy()[info.id]
        run = int(self.run.numpy()[0])
        for index in range(self.slots):
            state = int(cells[index])
            if state == FREE or 0 < state < run:
                cells[index] = run
                slot = self._ring[index]
                if slot is None:
                    slot = self._ring[index] = Slot(index)
                return slot, (info.id, index, run)
        return None

    def give_back(self, ticket: Ticket) -> None:
        """Free a slot the worker took but did not hand out (a partial or uncollatable batch)."""
        row, index, run = ticket
        cells = self.board.numpy()[row]
        if cells[index] == run:
            cells[index] = FREE

    # -- the loader's side (main process) ------------------------------------------------
    def tracker(self) -> ReleaseTracker:
        """What the loader uses to hand slots back as the consumer drops batches."""
        return ReleaseTracker(self)


class _Watched:
    """A batch the consumer may still hold: its slot, the weak references that say
    when it has been dropped, and the slot storages held meanwhile."""

    __slots__ = ("ticket", "refs", "held")

    def __init__(self, ticket: Ticket, refs: list[StorageWeakRef], held: list[torch.UntypedStorage]) -> None:
        self.ticket, self.refs, self.held = ticket, refs, held


class ReleaseTracker:
    """Main-process bookkeeping: the slots whose batches the consumer may still hold.

    The consumer gets each ring-slot tensor of a batch as an alias: the same memory
    under a storage object of the batch's own (:func:`alias`). The batch is watched
    through weak references to those storages (any view keeps one alive); once they
    have all expired its slot is free. Meanwhile the tracker keeps the slot's own
    storage, so this process keeps the slot mapped: torch finds the slot's next batch
    already mapped instead of mapping it afresh, which would cost the consumer a page
    fault per few pages on its first read of every batch. The aliases are not in
    shared memory, so sending one on to another process copies it (torch moves a
    tensor to shared memory for that), and a worker refilling the slot later cannot
    change what the other process got. While a batch is watched its slot's storage is
    held too, so memory a numpy view of an alias still points to after such a move
    stays mapped (and its slot stays taken) until the consumer drops the batch.

    A shared tensor outside the dicts, tuples and lists an alias is made through is
    watched as before, through its own storage. A batch that reaches the loader without
    shared tensors (the pin-memory thread copied it) frees its slot at once: the copy
    is all the consumer holds.
    """

    def __init__(self, memory: BatchMemory) -> None:
        self.memory = memory
        self.watched: list[_Watched] = []
        # (worker row, slot) -> the storages of the last batch made in that slot
        self.mapped: dict[tuple[int, int], list[torch.UntypedStorage]] = {}

    def start_run(self) -> None:
        """Before a new iteration: free what was dropped, mark what the consumer still
        holds, and start a run (slots of earlier runs never handed out become free)."""
        self.collect()
        board = self.memory.board.numpy()
        for batch in self.watched:
            row, index, _ = batch.ticket
            board[row, index] = HELD
            batch.ticket = (row, index, HELD)
        self.memory.run.numpy()[0] += 1

    def received(self, item: Any, ticket: Ticket | None) -> Any:
        """A batch reached the loader; ``ticket`` says which slot it was made in.
        Returns the batch to hand the consumer (its slot tensors as aliases)."""
        if ticket is None:
            return item
        made: list[tuple[torch.Tensor, torch.UntypedStorage]] = []
        handed = _aliased(item, made)
        if not made:  # nothing to alias: the batch as it came
            handed = item
        held = [storage for _, storage in made]
        refs = [StorageWeakRef(a.untyped_storage()) for a, _ in made]
        refs += [StorageWeakRef(t.untyped_storage()) for t in _shared_tensors(handed)]  # not aliased
        if not refs:
            self._free(ticket)
            return item
        if held:
            row, index, _ = ticket
            self.mapped[(row, index)] = held
        self.watched.append(_Watched(ticket, refs, held))
        return handed

    def unmap(self) -> None:
        """Stop keeping the slots mapped (their workers are gone); batches the consumer
        still holds keep their own memory."""
        self.mapped.clear()

    def collect(self) -> None:
        """Free the slots of every watched batch the consumer has dropped."""
        if not self.watched:
            return
        kept = []
        for batch in self.watched:
            if all(ref.expired() for ref in batch.refs):
                self._free(batch.ticket)
            else:
                kept.append(batch)
        self.watched = kept

    def _free(self, ticket: Ticket) -> None:
        row, index, run = ticket
        cells = self.memory.board.numpy()[row]
        if cells[index] == run:  # taken again since? then it is not ours to free
            cells[index] = FREE


def _shared_tensors(item: Any) -> Iterator[torch.Tensor]:
    """The CPU tensors in shared memory anywhere in a collated batch."""
    if isinstance(item, torch.Tensor):
        if item.device.type == "cpu" and item.is_shared():
            yield item
    elif isinstance(item, dict):
        for value in item.values():
            yield from _shared_tensors(value)
    elif isinstance(item, (tuple, list)):
        for value in item:
            yield from _shared_tensors(value)


def alias(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s memory under a storage object of its own (not in shared memory).

    The alias keeps the original storage alive (through the buffer it was made from),
    and the original can be kept or dropped without touching the alias's weak
    references, which is what lets the tracker hold a slot mapped and still see when
    the consumer has dropped the batch."""
    whole = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
    own = torch.frombuffer(whole.numpy(), dtype=torch.uint8).untyped_storage()
    return torch.empty(0, dtype=tensor.dtype).set_(own, tensor.storage_offset(), tensor.size(), tensor.stride())


def _aliased(item: Any, made: list[tuple[torch.Tensor, torch.UntypedStorage]]) -> Any:
    """``item`` with each CPU tensor in shared memory replaced by its :func:`alias`
    (appended to ``made`` with the original's storage), looking into the dicts, tuples
    and lists a streamed batch is built of (:func:`shardkit.read.batcher.stream_batches`
    makes dicts and tuples; the DataLoader hands tuples over as lists)."""
    if type(item) is torch.Tensor:
        if item.device.type != "cpu" or not item.is_shared() or item.untyped_storage().nbytes() == 0:
            return item
        handed = alias(item)
        made.append((handed, item.untyped_storage()))
        return handed
    if type(item) is dict:
        return {key: _aliased(value, made) for key, value in item.items()}
    if type(item) is tuple:
        return tuple(_aliased(value, made) for value in item)
    if type(item) is list:
        return [_aliased(value, made) for value in item]
    return item


def slot_count(prefetch_factor: int) -> int:
    """Slots per worker: the batches it may have in flight, plus the one the consumer
    holds and the one it has just dropped (seen at the next step)."""
    return prefetch_factor + 2
