"""ShardLoader: a DataLoader for ShardDataset that batches in workers and can resume.

It is a real ``torch.utils.data.DataLoader`` subclass (so frameworks that check for one
keep working). It never changes the dataset's configuration: the DataLoader runs a small
view that asks the dataset for items with this loader's batching, resume state and
progress records; the loader strips each batch's progress record off and keeps it,
which is what ``state_dict()`` saves.

The epoch has one owner, the dataset (it lives in shared memory there, so persistent
workers see it): ``loader.set_epoch``, ``loader.dataset.set_epoch`` and
``dataset.set_epoch`` are the same call, and the loader drives it through that public
method only: it advances it by one on each new pass unless ``set_epoch`` was called, and
``load_state_dict`` selects the saved epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from .decode.planar import opencv_available
from .errors import ShardkitError
from .gpu.batch import DeviceStage
from .gpu.batch_decoder import BatchDecoder
from .plan.epoch import simulate_consumption
from .plan.state import ResumeState
from .read.base import Batching, PlannedDataset, Progress
from .read.batchmem import BatchMemory, ReleaseTracker, slot_count
from .read.pipeline import collate

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
_UNSET: Any = object()


class LoaderView(IterableDataset):
    """What the DataLoader iterates: the user's dataset under one loader's settings.

    Attribute access falls through to the dataset, so ``loader.dataset.set_epoch(e)``
    and ``loader.dataset.urls`` work as with a plain DataLoader; the dataset itself is
    ``loader.shard_dataset``.
    """

    def __init__(
        self, dataset: PlannedDataset, batching: Batching, num_workers: int, memory: BatchMemory | None = None
    ) -> None:
        self.shard_dataset = dataset
        self.batching = batching
        self.num_workers = num_workers
        self.resume: ResumeState | None = None
        self.rotation = 0
        # The epoch the workers started from now on run; None: the dataset's, read as
        # they start (persistent workers follow set_epoch from one pass to the next).
        self.worker_epoch: int | None = None
        # The workers collate into this (reused) memory; the loader frees its slots.
        self._worker_batching = batching
        if memory is not None:
            self.use_memory(memory)

    def use_memory(self, memory: BatchMemory) -> None:
        """Batch memory for the workers started from now on."""
        self._worker_batching = dataclasses.replace(self.batching, memory=memory)

    def __iter__(self) -> Iterator[Any]:
        return self.shard_dataset.iter_items(
            self._worker_batching, resume=self.resume, progress=True, rotation=self.rotation, epoch=self.worker_epoch
        )

    def __len__(self) -> int:
        return self.shard_dataset.num_items(self.batching, num_workers=self.num_workers)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "shard_dataset":
            raise AttributeError(name)
        return getattr(self.shard_dataset, name)


def _batching(
    dataset: PlannedDataset, batch_size: Any, drop_last: Any, collate_fn: Callable[[list[Any]], Any] | None
) -> Batching:
    """The one batching in force: the dataset's when it batches, else the loader's.
    A conflict is an error, never a silent override."""
    own = dataset.batching
    if own.batch_size is None:
        return Batching(
            DEFAULT_BATCH_SIZE if batch_size is _UNSET else batch_size,
            False if drop_last is _UNSET else bool(drop_last),
            collate_fn or collate,
        )
    # The dataset batches. batch_size=None is the webdataset idiom for "the dataset
    # already batches": honour it, as an unset or equal value.
    if batch_size not in (_UNSET, None, own.batch_size):
        raise ShardkitError(
            f"the dataset already batches by {own.batch_size}; ShardLoader(batch_size="
            f"{batch_size}) would change it. Set batch_size in one place: on the dataset "
            "or on the loader"
        )
    if drop_last is not _UNSET and bool(drop_last) != own.drop_last:
        raise ShardkitError(
            f"the dataset batches with drop_last={own.drop_last}; ShardLoader(drop_last="
            f"{drop_last}) would change it. Set it in one place"
        )
    if collate_fn is not None and collate_fn is not own.collate_fn:
        raise ShardkitError(
            "the dataset batches with its own collate_fn; pass collate_fn to the dataset or to the loader, not both"
        )
    return own


def _forks(context: Any) -> bool:
    """Whether workers started with DataLoader's ``multiprocessing_context`` are forked
    (they then inherit what this process imported)."""
    if context is None:
        method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    else:
        method = context if isinstance(context, str) else context.get_start_method()
    return method == "fork"


def _batch_memory(
    reuse: bool | None, batching: Batching, num_workers: int, prefetch_factor: int | None
) -> BatchMemory | None:
    """The workers' reusable batch memory, as ``reuse_memory`` says (None: where it applies)."""
    if reuse is not None and not isinstance(reuse, bool):
        raise TypeError(f"reuse_memory must be None, True or False, got {reuse!r}")
    why = (
        "it needs worker processes (num_workers > 0)"
        if num_workers == 0
        else "it needs batch_size (batches collated in the workers)"
        if batching.batch_size is None
        else "it applies to the default collate_fn only"
        if batching.collate_fn is not collate
        else ""
    )
    if reuse is False or (reuse is None and why):
        return None
    if why:
        raise ShardkitError(f"reuse_memory=True cannot apply: {why}; leave it unset or pass False")
    return BatchMemory(num_workers, slot_count(prefetch_factor or 2))


class ShardLoader(DataLoader):
    """Iterate batches of a :class:`ShardDataset` (or a :class:`~shardkit.read.mix.Mix`) with worker processes.

    Args:
        dataset: the ShardDataset or Mix (never modified by the loader).
        batch_size: samples per batch, collated inside the worker (default 64); None
            yields single samples. When the dataset was built with its own batch_size,
            that one is used: leave this unset (or None, the webdataset idiom), since a
            different value raises.
        num_workers: worker processes (0 = in the main process).
        persistent_workers: keep workers between epochs (default: on when num_workers > 0).
        pin_memory: default on when CUDA is available.
        prefetch_factor: batches each worker prepares ahead (default 4 with workers).
        drop_last: drop each worker's partial last batch (same rule as batch_size).
        collate_fn: how to collate a list of samples (default: stack tensors, keep lists).
        device: "cuda" (or "cuda:N"): batches arrive on that GPU, copied from pinned memory
            on a side stream one batch ahead. Raises at construction without CUDA.
        decode_device: "cuda": workers only read and ship encoded images with their drawn
            crop/flip parameters; the main process decodes, crops, resizes, flips and
            normalises each batch on the GPU (see :mod:`shardkit.gpu.batch`). "cpu" runs
            the same main-process stage with the CPU decoder (what CI tests).
        decode_backend: with decode_device: "auto" (on CUDA TorchCodec when installed,
            else nvImageCodec; the CPU decoder on "cpu"), "torchcodec" (TorchCodec's batched
            nvJPEG; "nvjpeg" is the same), "nvimgcodec", "cpu", or a
            :class:`~shardkit.gpu.batch_decoder.BatchDecoder` instance (see
            :func:`shardkit.gpu.decoders.make_backend`).
        reuse_memory: the workers collate batches into a few shared-memory buffers each,
            reused once the training loop has dropped every tensor (and view) of a batch
            (a loop that keeps batches gets fresh memory meanwhile: values never change).
            The main process keeps the buffers mapped and hands out unpinned batch
            tensors as views of them, not in shared memory: sending one on to another
            process copies it, so a refill never reaches the other process.
            None (default): with worker processes and the default collate; True: the
            same, refused where it cannot apply; False: fresh shared memory for every
            batch, as a DataLoader gives it (sent on to other processes without a copy).
        Other keyword arguments go to DataLoader.
    """

    def __init__(
        self,
        dataset: PlannedDataset,
        *,
        batch_size: int | None = _UNSET,
        num_workers: int = 2,
        persistent_workers: bool | None = None,
        pin_memory: bool | None = None,
        prefetch_factor: int | None = None,
        drop_last: bool = _UNSET,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        device: str | torch.device | None = None,
        decode_device: str | torch.device | None = None,
        decode_backend: str | BatchDecoder = "auto",
        reuse_memory: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(dataset, PlannedDataset):
            raise TypeError("ShardLoader needs a ShardDataset or a Mix; use DataLoader for other datasets")
        batching = _batching(dataset, batch_size, drop_last, collate_fn)
        # The workers of the GPU-decode path iterate a view of the dataset that ships encoded images.
        stage = DeviceStage.build(
            dataset, batching, device=device, decode_device=decode_device, decode_backend=decode_backend
        )
        if persistent_workers is None:
            persistent_workers = num_workers > 0
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if num_workers > 0 and prefetch_factor is None:
            prefetch_factor = 4
        memory = _batch_memory(reuse_memory, batching, num_workers, prefetch_factor)
        if num_workers > 0 and _forks(kwargs.get("multiprocessing_context")):
            opencv_available()  # import OpenCV (if installed) once here, not in each worker's first batch
        view = LoaderView(dataset if stage is None else stage.worker_dataset, batching, num_workers, memory)
        super().__init__(
            view,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=persistent_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
            **kwargs,
        )
        self.shard_dataset = dataset
        self._view = view
        self._progress: dict[int, int] = {}
        self._batches_taken = 0
        self._epoch_started = False
        self._epoch_set = False
        self._stats: dict[str, float] = {}
        self._worker_stats: dict[int, dict[str, int]] = {}
        self._device_stage = stage
        self._release = memory.tracker() if memory is not None else None
        self._workers_kept = False  # persistent workers started (they hold the plan they began with)

    @property
    def batching(self) -> Batching:
        """The batch size, drop_last and collate_fn in force."""
        return self._view.batching

    # -- epochs ---------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch for the next pass (every rank must use the same value)."""
        self.shard_dataset.set_epoch(epoch)
        self._epoch_set = True

    @property
    def epoch(self) -> int:
        return self.shard_dataset.epoch

    def _resume_for_epoch(self) -> ResumeState:
        resume = self._view.resume
        return resume if resume is not None and resume.epoch == self.epoch else ResumeState(self.epoch)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        dataset = self.shard_dataset
        if self._epoch_started and not self._epoch_set:
            dataset.set_epoch(dataset.epoch + 1)
            log.debug("set_epoch not called: advancing to epoch %d", dataset.epoch)
        self._epoch_started = True
        self._epoch_set = False
        self._workers_kept = self._workers_kept or (self.persistent_workers and self.num_workers > 0)
        resume = self._resume_for_epoch()
        if not resume.stages:
            self._progress, self._batches_taken = {}, 0
        self._worker_stats = {}
        self._stats = {"wait_s": 0.0, "batches": 0, "samples": 0}
        if dataset.planned:
            info = dataset.epoch_info(num_workers=self.num_workers, resume=resume)
            self._stats.update(padded=info.padded, dropped=info.dropped, planned=info.rank_samples)
        started = time.perf_counter()
        # Workers of this pass alone run its epoch, whenever each starts reading: another
        # iterator begun meanwhile (zip(loader, loader)) moves the dataset's epoch on.
        self._view.worker_epoch = None if self.persistent_workers and self.num_workers > 0 else dataset.epoch
        release = self._release
        if release is not None:
            if not self.persistent_workers:
                # Each iterator starts workers of its own, and two may run at once: their
                # rings get a board of their own, or one iterator's dropped batches would
                # free slots whose batches the other still holds.
                memory = BatchMemory(self.num_workers, release.memory.slots)
                self._view.use_memory(memory)
                release = self._release = memory.tracker()
            release.start_run()
        it: Iterator[Any] = super().__iter__()
        if release is not None:
            it = self._released(it, release, workers_stay=self.persistent_workers)
        if self._device_stage is not None:  # pairs stay paired: progress is recorded when handed out
            it = self._device_stage.wrap(it)
        while True:
            t0 = time.perf_counter()
            try:
                item, progress = next(it)
            except StopIteration:
                break
            self._stats["wait_s"] += time.perf_counter() - t0
            assert isinstance(progress, Progress)
            self._progress[progress.worker] = progress.emitted
            self._worker_stats[progress.worker] = progress.stats
            self._batches_taken += 1
            self._stats["batches"] += 1
            self._stats["samples"] += progress.samples
            yield item
        self._stats["epoch_s"] = time.perf_counter() - started
        # A finished epoch leaves nothing to resume.
        self._view.resume, self._view.rotation = None, 0

    @staticmethod
    def _released(pairs: Iterator[Any], release: ReleaseTracker, *, workers_stay: bool) -> Iterator[Any]:
        """``pairs`` with each batch watched from where it leaves the DataLoader (and its
        slot tensors handed out as aliases), and the slots of the batches dropped since
        freed each time the next is asked for. Workers that exit with the iterator take
        their rings along: their slots are no longer kept mapped then."""
        try:
            for item, progress in pairs:
                yield release.received(item, progress.ticket), progress
                release.collect()
        finally:
            if not workers_stay:
                release.unmap()

    # -- resume ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Progress in the current epoch, to save with the model checkpoint.

        Other ranks' progress is replayed from this rank's batch count (DataLoader takes
        batches round-robin from workers and DDP ranks step in lockstep), so any rank's
        state can resume all ranks, under any world size or worker count. That holds
        with ``even="pad"``/``"drop"`` (equal batch counts on every rank) or while every
        rank still has batches left; with ``even=None`` a state saved after a shorter
        rank finished its epoch misjudges the longer ranks by up to a batch. With
        ``select=`` the batch count no longer says how many positions another rank
        passed: each rank must then save and load its own state (same topology).
        """
        dataset = self.shard_dataset
        topo = dataset.topology(self.num_workers)
        rank, world = dataset.rank_and_world()
        resume = self._resume_for_epoch()
        sizes = dataset.stream_sizes(num_workers=self.num_workers, resume=resume)
        batching = self._view.batching
        emitted: list[list[int]] = []
        for r in range(world):
            if r == rank or sizes is None:
                emitted.append([self._progress.get(w, resume.skip(topo, r, w)) for w in range(topo.streams)])
                continue
            # Replay the same number of batches on rank r's stream sizes.
            taken = simulate_consumption([batching.items(n) for n in sizes[r]], self._batches_taken)
            bs = batching.batch_size or 1
            emitted.append([min(t * bs, n) for t, n in zip(taken, sizes[r])])
        return resume.with_progress(topo, emitted).to_dict(
            kind="loader", seed=dataset.seed, plan=dataset.plan_identity(), batches=self._batches_taken
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (also with another world size or worker count).

        Load before the first pass: persistent workers, once started, keep the plan they
        began with, so a loader that has iterated with them refuses (build a new
        ShardLoader over the same dataset and load the state into it).
        """
        if state.get("kind") != "loader":
            raise ShardkitError("not a ShardLoader state (use dataset.load_state_dict for worker states)")
        if self._workers_kept:
            raise ShardkitError(
                "this ShardLoader has started its persistent workers, which keep the plan they began "
                "with; load the state into a new ShardLoader (the dataset can be reused) before it "
                "iterates, or use persistent_workers=False"
            )
        dataset = self.shard_dataset
        resume = ResumeState.from_dict(state, seed=dataset.seed, plan=dataset.plan_identity())
        dataset.set_epoch(resume.epoch)
        topo = dataset.topology(self.num_workers)
        self._view.resume = resume
        if resume.continues(topo):
            rank, _ = dataset.rank_and_world()
            self._progress = dict(enumerate(resume.stages[-1].emitted[rank]))
            self._batches_taken = int(state.get("batches", 0))
            # DataLoader restarts its round-robin at worker 0; rotate which plan each
            # worker runs so batches come in exactly the uninterrupted order.
            self._view.rotation = self._batches_taken % topo.streams
        else:
            self._progress, self._batches_taken = {}, 0
            self._view.rotation = 0
        self._epoch_set = True
        self._epoch_started = False

    def stats(self) -> dict[str, Any]:
        """This rank's numbers for the current/last epoch: batches and samples delivered,
        padded/dropped (even mode), samples and bytes read, skipped samples, shards opened,
        cache hits/misses/downloads (with a cache), ``memory_reused``/``memory_fresh``
        (with reused batch memory: batches collated into memory an earlier batch had
        used, or into new memory), and ``wait_s``, the seconds the
        training loop waited for data (with ``device``/``decode_device`` this includes
        the main-process stage, which ``stage_s`` also reports alone)."""
        out: dict[str, Any] = {"epoch": self.epoch, **self._stats}
        if self._device_stage is not None:
            out.update(self._device_stage.stats())
        keys = {k for s in self._worker_stats.values() for k in s}
        for key in sorted(keys | {"samples_read", "bytes_read", "skipped", "shards_opened"}):
            out[key] = sum(s.get(key, 0) for s in self._worker_stats.values())
        return out
