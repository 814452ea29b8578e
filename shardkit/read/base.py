"""What ShardDataset and Mix share: a shared epoch, rank discovery, worker-level resume
state, stage views (:meth:`PlannedDataset.with_stages`) and the tail of the worker loop
(batching and progress records)."""

from __future__ import annotations

import copy
import gc
import multiprocessing
import multiprocessing.context
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import ShardkitError
from ..plan.epoch import EVEN_MODES, EpochInfo, Topology
from ..plan.state import PlanIdentity, ResumeState
from .batcher import stream_batches
from .batchmem import BatchMemory, Ticket
from .pipeline import batched, collate
from .stages import KEEP, HooksFactory, Keep, StageHooks, check_hooks

if TYPE_CHECKING:
    from typing_extensions import Self


@dataclass(frozen=True)
class Batching:
    """How items are grouped inside the workers: ``batch_size=None`` yields samples.

    ``memory``: where the default ``collate`` puts batches (a ShardLoader's reusable
    :class:`~shardkit.read.batchmem.BatchMemory`); None gives every batch fresh memory.
    """

    batch_size: int | None = None
    drop_last: bool = False
    collate_fn: Callable[[list[Any]], Any] = collate
    memory: BatchMemory | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")

    def items(self, samples: int) -> int:
        """Items a stream of ``samples`` samples yields."""
        if self.batch_size is None:
            return samples
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)


class Progress:
    """Attached to each item when a ShardLoader drives the dataset (never seen by users).

    ``samples`` is how many samples the item holds; ``stats`` the worker's counters;
    ``ticket`` the batch-memory slot the batch was collated into (None: fresh memory).
    """

    __slots__ = ("worker", "emitted", "samples", "epoch", "stats", "ticket")

    def __init__(
        self, worker: int, emitted: int, samples: int, epoch: int, stats: dict[str, int], ticket: Ticket | None = None
    ) -> None:
        self.worker, self.emitted, self.samples, self.epoch, self.stats = worker, emitted, samples, epoch, stats
        self.ticket = ticket


class SharedEpoch:
    """A dataset's epoch, in shared memory so that ``set_epoch`` reaches persistent workers.

    Workers started by spawn or forkserver share it (it travels while a process is being
    spawned); any other pickle or deep copy carries the value only. One per dataset: the
    views :meth:`PlannedDataset.with_stages` makes share their original's.
    """

    def __init__(self, epoch: int = 0, shared: Any = None) -> None:
        # ``shared``: the value a spawned process received (see __reduce__)
        self._value = multiprocessing.get_context().Value("q", int(epoch), lock=False) if shared is None else shared

    @property
    def value(self) -> int:
        return int(self._value.value)

    @value.setter
    def value(self, epoch: int) -> None:
        self._value.value = int(epoch)

    def __reduce__(self) -> tuple[Any, ...]:
        if multiprocessing.context.get_spawning_popen() is not None:
            return SharedEpoch, (0, self._value)
        return SharedEpoch, (self.value,)


_frozen_in = -1  # the process that froze its inherited objects


def freeze_inherited_objects() -> None:
    """Once per DataLoader worker process: exempt every object it has so far (what it
    inherited from the main process, torch's modules among them) from garbage-collector
    scans (``gc.freeze()``). A full collection walks every tracked object; in a forked
    worker that writes to each page of the parent's heap, so the first one copies the
    whole heap (see BENCHMARKS.md); these objects live as long as the process anyway."""
    global _frozen_in
    if _frozen_in != os.getpid():
        gc.freeze()
        _frozen_in = os.getpid()


class PlannedDataset(IterableDataset):
    """Base of the planned datasets: subclasses set ``seed``, ``even`` and ``batching`` and
    implement ``iter_items`` with :meth:`_worker_context` and :meth:`_emit`."""

    seed: int
    even: str | None
    batching: Batching

    def __init__(self, *, rank: int | None, world_size: int | None, even: str | None) -> None:
        super().__init__()
        if even not in EVEN_MODES:
            raise ValueError(f"even must be 'pad', 'drop' or None, got {even!r}")
        if world_size is not None and rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.even = even
        self._rank, self._world_size = rank, world_size
        self._epoch = SharedEpoch()  # written by set_epoch only
        self._resume: ResumeState | None = None  # owned here when no ShardLoader drives us
        self._worker_state: dict[str, Any] = {}  # this worker's progress, for state_dict()
        self._hooks: HooksFactory | None = None

    # -- epochs and topology ------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (orders and seeds); reaches persistent workers and every view
        of this dataset (:meth:`with_stages`): the epoch has this one owner."""
        self._epoch.value = epoch

    # -- views with other stages ----------------------------------------------------------
    def with_stages(self, *, hooks: HooksFactory | None | Keep = KEEP) -> Self:
        """This dataset with its worker stages observed by ``hooks``.

        ``hooks`` (see :class:`~shardkit.read.stages.StageHooks`) is called in each worker
        at the start of each epoch; None removes the hooks. The view shares this dataset's
        epoch (``set_epoch`` on either reaches both) and plan, so it yields the same items
        in the same order; this dataset is not modified.
        """
        view = copy.copy(self)  # shallow: the SharedEpoch object is shared, not copied
        if not isinstance(hooks, Keep):
            view._hooks = check_hooks(hooks)
        return view

    @property
    def hooks(self) -> HooksFactory | None:
        """The stage hooks factory given to :meth:`with_stages` (None: no hooks)."""
        return self._hooks

    def _start_hooks(self) -> StageHooks:
        """This worker's hooks for the epoch starting (a no-op one without hooks)."""
        if self._hooks is None:
            return StageHooks()
        hooks = self._hooks()
        if not isinstance(hooks, StageHooks):
            raise TypeError(f"hooks must return a StageHooks, {self._hooks!r} returned {hooks!r}")
        return hooks

    @property
    def explicit_rank_and_world(self) -> tuple[int | None, int | None]:
        """(rank, world_size) as given to the constructor (None: from torch.distributed)."""
        return self._rank, self._world_size

    def rank_and_world(self) -> tuple[int, int]:
        """(rank, world_size): the constructor's values, else torch.distributed's, else (0, 1)."""
        world, rank = self._world_size, self._rank
        if world is None or rank is None:
            if dist.is_available() and dist.is_initialized():
                world = dist.get_world_size() if world is None else world
                rank = dist.get_rank() if rank is None else rank
            else:
                world = 1 if world is None else world
                rank = 0 if rank is None else rank
        if not 0 <= rank < world:
            raise ShardkitError(f"rank {rank} out of range for world_size {world}")
        return rank, world

    # -- what a driver (ShardLoader) asks of every planned dataset ------------------------
    def topology(self, num_workers: int = 0) -> Topology:
        """The topology this rank runs with ``num_workers`` DataLoader workers."""
        raise NotImplementedError

    @property
    def planned(self) -> bool:
        """True when the epoch follows a sample-level plan, so every count is exact."""
        raise NotImplementedError

    def epoch_info(
        self, epoch: int | None = None, *, num_workers: int = 0, resume: ResumeState | None = None
    ) -> EpochInfo:
        """Counts for this rank's epoch: samples, padded, dropped, per worker."""
        raise NotImplementedError

    def plan_identity(self) -> PlanIdentity:
        """The plan saved states count in; loading one saved under another is refused."""
        raise NotImplementedError

    def stream_sizes(self, *, num_workers: int, resume: ResumeState | None = None) -> list[list[int]] | None:
        """Samples in each [rank][worker] stream of the current epoch, or None when unplanned."""
        raise NotImplementedError

    def num_items(self, batching: Batching, *, num_workers: int = 0) -> int:
        """Items this rank yields per epoch under ``batching`` with ``num_workers`` workers."""
        raise NotImplementedError

    def __len__(self) -> int:
        """Items this rank yields per epoch: samples, or batches when batch_size is set."""
        return self.num_items(self.batching)

    def _resume_stages(self, epoch: int, resume: ResumeState | None) -> list:
        resume = self._resume if resume is None else resume
        return resume.stages if resume is not None and resume.epoch == epoch else []

    # -- the worker loop's frame ---------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        return self.iter_items(self.batching, resume=self._resume)

    def iter_items(
        self,
        batching: Batching,
        *,
        resume: ResumeState | None = None,
        progress: bool = False,
        rotation: int = 0,
        epoch: int | None = None,
    ) -> Iterator[Any]:
        """This worker's items for the current epoch (what ``__iter__`` runs).

        For drivers such as ShardLoader: ``resume`` is the state to continue from;
        ``progress`` pairs each item with a :class:`Progress`; ``rotation`` shifts which
        plan each DataLoader worker runs when the resume continues its topology (the
        DataLoader restarts its round-robin at worker 0); ``epoch`` is the epoch to run
        (None: the dataset's when the worker starts, which ``set_epoch`` may have moved
        since the driver began its pass).
        """
        raise NotImplementedError

    def _worker_context(
        self, resume: ResumeState | None, rotation: int, epoch: int | None = None
    ) -> tuple[int, int, int, Topology, ResumeState]:
        """(rank, worker, epoch, topology, resume) of the calling DataLoader worker."""
        info = get_worker_info()
        if info is not None:
            freeze_inherited_objects()
        worker, num_workers = (0, 0) if info is None else (info.id, info.num_workers)
        rank, _ = self.rank_and_world()
        epoch = self.epoch if epoch is None else epoch
        topo = self.topology(num_workers)
        resume = resume if resume is not None and resume.epoch == epoch else ResumeState(epoch)
        if resume.continues(topo):
            worker = (worker + rotation) % topo.streams
        self._worker_state = {
            "epoch": epoch,
            "rank": rank,
            "worker": worker,
            "topology": topo,
            "resume": resume,
            "emitted": resume.skip(topo, rank, worker),
        }
        return rank, worker, epoch, topo, resume

    def _emit(
        self,
        mapped: Iterable[tuple[int, Any]],
        batching: Batching,
        *,
        progress: bool,
        counters: Callable[[], dict[str, int]],
        hooks: StageHooks,
    ) -> Iterator[Any]:
        """Batch ``(position count, item)`` pairs and record the progress of each item;
        ``hooks`` observe the collate and the stream of items handed out. The default
        collate copies each sample into its batch as it comes (:mod:`~shardkit.read.batcher`)."""
        ws = self._worker_state
        memory_counts: dict[str, int] = {}  # batches in reused / new batch memory
        items: Iterator[tuple[int, tuple[int, Ticket | None, Any]]]
        if batching.batch_size is None:
            items = ((n, (1, None, item)) for n, item in mapped)
        elif batching.collate_fn is collate:
            items = stream_batches(
                mapped,
                batching.batch_size,
                drop_last=batching.drop_last,
                memory=batching.memory,
                hooks=hooks,
                counts=memory_counts,
            )
        else:
            collate_fn = hooks.wrap("collate", batching.collate_fn)
            items = batched(
                mapped,
                batching.batch_size,
                drop_last=batching.drop_last,
                collate_fn=lambda chunk: (len(chunk), None, collate_fn(chunk)),
            )

        def emit() -> Iterator[Any]:
            worker, epoch = ws["worker"], ws["epoch"]
            for emitted, (size, ticket, item) in items:
                ws["emitted"] = emitted
                if progress:
                    stats = {**counters(), **memory_counts, **hooks.counters()}
                    yield item, Progress(worker, emitted, size, epoch, stats, ticket)
                else:
                    yield item

        return hooks.wrap_iter("items", emit())

    # -- resume (when no ShardLoader drives the dataset) ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This worker's (or the main process's) progress, for torchdata's StatefulDataLoader.

        ShardLoader users should call ``loader.state_dict()`` instead, which knows every worker.
        """
        ws = self._worker_state
        if not ws:
            return ResumeState(self.epoch).to_dict(kind="worker", seed=self.seed, plan=self.plan_identity())
        topo: Topology = ws["topology"]
        emitted = [[0] * topo.streams for _ in range(topo.world_size)]
        emitted[ws["rank"]][ws["worker"]] = ws["emitted"]
        return (
            ws["resume"].with_progress(topo, emitted).to_dict(kind="worker", seed=self.seed, plan=self.plan_identity())
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume mid-epoch from :meth:`state_dict` (sets the epoch too)."""
        self._resume = ResumeState.from_dict(state, seed=self.seed, plan=self.plan_identity())
        self.set_epoch(self._resume.epoch)
