"""ShardLoader: a DataLoader for ShardDataset that batches in workers and can resume.

It is a real ``torch.utils.data.DataLoader`` subclass (so frameworks that check for one
keep working); batching happens inside the workers, and each batch carries a small
progress record that the loader strips off and keeps, which is what ``state_dict()``
saves. The epoch advances by itself on each new pass unless ``set_epoch`` was called.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader

from .dataset import STATE_VERSION, Progress, ShardDataset, stages_from_state, stages_to_state
from .errors import ShardkitError
from .plan import Stage, Topology, simulate_consumption

log = logging.getLogger(__name__)


class ShardLoader(DataLoader):
    """Iterate batches of a :class:`ShardDataset` with worker processes.

    Args:
        dataset: the ShardDataset (its batch_size/drop_last/collate_fn are set from here).
        batch_size: samples per batch (collated inside the worker); None = single samples.
        num_workers: worker processes (0 = in the main process).
        persistent_workers: keep workers between epochs (default: on when num_workers > 0).
        pin_memory: default on when CUDA is available.
        prefetch_factor: batches each worker prepares ahead (default 4 with workers).
        drop_last: drop each worker's partial last batch.
        collate_fn: how to collate a list of samples (default: stack tensors, keep lists).
        Other keyword arguments go to DataLoader.
    """

    def __init__(self, dataset: ShardDataset, *, batch_size: int | None = 64, num_workers: int = 2,
                 persistent_workers: bool | None = None, pin_memory: bool | None = None,
                 prefetch_factor: int | None = None, drop_last: bool = False,
                 collate_fn: Callable[[list[Any]], Any] | None = None, **kwargs: Any) -> None:
        if not isinstance(dataset, ShardDataset):
            raise TypeError("ShardLoader needs a ShardDataset; use DataLoader for other datasets")
        dataset.batch_size = batch_size
        dataset.drop_last = drop_last
        if collate_fn is not None:
            dataset.collate_fn = collate_fn
        dataset._num_workers_hint = num_workers
        dataset._emit_progress = True
        if persistent_workers is None:
            persistent_workers = num_workers > 0
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if num_workers > 0 and prefetch_factor is None:
            prefetch_factor = 4
        super().__init__(dataset, batch_size=None, num_workers=num_workers,
                         persistent_workers=persistent_workers, pin_memory=pin_memory,
                         prefetch_factor=prefetch_factor, **kwargs)
        self._progress: dict[int, int] = {}
        self._batches_taken = 0
        self._epoch_started = False
        self._epoch_set = False
        self._stats: dict[str, float] = {}
        self._worker_stats: dict[int, dict[str, int]] = {}

    # -- epochs ---------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch for the next pass (every rank must use the same value)."""
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        self._epoch_set = True

    @property
    def epoch(self) -> int:
        return self.dataset.epoch  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        dataset: ShardDataset = self.dataset  # type: ignore[assignment]
        if self._epoch_started and not self._epoch_set:
            dataset.set_epoch(dataset.epoch + 1)
            log.debug("set_epoch not called: advancing to epoch %d", dataset.epoch)
        self._epoch_started = True
        self._epoch_set = False
        resumed = dataset._stages_epoch == dataset.epoch and dataset._stages
        if not resumed:
            self._progress, self._batches_taken = {}, 0
        self._worker_stats = {}
        self._stats = {"wait_s": 0.0, "batches": 0, "samples": 0}
        if dataset.counts is not None and not dataset.resampled and dataset.epoch_length is None:
            info = dataset.epoch_info(num_workers=self.num_workers)
            self._stats.update(padded=info.padded, dropped=info.dropped, planned=info.rank_samples)
        started = time.perf_counter()
        it = super().__iter__()
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
        dataset._stages, dataset._stages_epoch, dataset._rotation = [], None, 0

    # -- resume ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Progress in the current epoch, to save with the model checkpoint.

        Other ranks' progress is replayed from this rank's batch count (DataLoader takes
        batches round-robin from workers and DDP ranks step in lockstep), so any rank's
        state can resume all ranks, under any world size or worker count. That holds
        with ``even="pad"``/``"drop"`` (equal batch counts on every rank) or while every
        rank still has batches left; with ``even=None`` a state saved after a shorter
        rank finished its epoch misjudges the longer ranks by up to a batch.
        """
        dataset: ShardDataset = self.dataset  # type: ignore[assignment]
        topo = dataset.topology(self.num_workers)
        rank, world = dataset._dist()
        prior = dataset._stages_for(dataset.epoch)
        last_same = bool(prior) and prior[-1].topology == topo
        history = prior[:-1] if last_same else prior
        bs = dataset.batch_size or 1
        sizes = None
        if dataset.counts is not None and not dataset.resampled and dataset.epoch_length is None:
            sizes = dataset._planner(dataset.epoch).stream_sizes(topo, prior)
        emitted: list[list[int]] = []
        for r in range(world):
            if r == rank or sizes is None:
                emitted.append([self._progress.get(w, self._base(prior, topo, r, w)) for w in range(topo.streams)])
                continue
            # Replay the same number of batches on rank r's stream sizes.
            batches = [n // bs if dataset.drop_last else -(-n // bs) for n in sizes[r]]
            taken = simulate_consumption(batches, self._batches_taken)
            emitted.append([min(t * bs, n) for t, n in zip(taken, sizes[r])])
        stages = list(history) + [Stage(topo, tuple(tuple(e) for e in emitted))]
        return {"version": STATE_VERSION, "kind": "loader", "epoch": dataset.epoch, "seed": dataset.seed,
                "batches": self._batches_taken, "stages": stages_to_state(stages)}

    @staticmethod
    def _base(prior: list[Stage], topo: Topology, rank: int, worker: int) -> int:
        if prior and prior[-1].topology == topo:
            return prior[-1].emitted[rank][worker]
        return 0

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (also with another world size or worker count)."""
        dataset: ShardDataset = self.dataset  # type: ignore[assignment]
        if state.get("kind") != "loader":
            raise ShardkitError("not a ShardLoader state (use dataset.load_state_dict for worker states)")
        dataset.load_state_dict(state)
        stages = stages_from_state(state["stages"])
        topo = dataset.topology(self.num_workers)
        if stages and stages[-1].topology == topo:
            rank, _ = dataset._dist()
            self._progress = dict(enumerate(stages[-1].emitted[rank]))
            self._batches_taken = int(state.get("batches", 0))
            # DataLoader restarts its round-robin at worker 0; rotate which plan each
            # worker runs so batches come in exactly the uninterrupted order.
            dataset._rotation = self._batches_taken % topo.streams
        else:
            self._progress, self._batches_taken = {}, 0
            dataset._rotation = 0
        self._epoch_set = True
        self._epoch_started = False
        # Persistent workers hold the old plan: start fresh ones on the next iteration.
        self._iterator = None

    def stats(self) -> dict[str, Any]:
        """This rank's numbers for the current/last epoch: batches and samples delivered,
        padded/dropped (even mode), samples and bytes read, skipped samples, shards opened,
        cache hits/misses/downloads (with a cache), and ``wait_s``, the seconds the
        training loop waited for data."""
        out: dict[str, Any] = {"epoch": self.epoch, **self._stats}
        keys = {k for s in self._worker_stats.values() for k in s}
        for key in sorted(keys | {"samples_read", "bytes_read", "skipped", "shards_opened"}):
            out[key] = sum(s.get(key, 0) for s in self._worker_stats.values())
        return out
