"""Mix: several ShardDatasets as one, weighted, exact and resumable.

The order is :class:`~shardkit.mixplan.MixPlanner`'s (pure, property-tested); each
worker runs one planned stream per part through that part's own reader and
select/decode/transform/fields pipeline and interleaves them by the planned labels.
The Mix offers the same driver surface as ShardDataset, so ShardLoader, a plain
DataLoader and torchdata's StatefulDataLoader drive it the same way.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
from typing import Any, Iterator, Mapping, Sequence

import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from .dataset import Batching, Progress, ShardDataset
from .errors import ShardkitError
from .mixplan import MixPart, MixPlanner
from .pipeline import batched, make_handler, map_parts
from .plan import EpochInfo, Topology
from .reader import ReadStats
from .state import ResumeState
from .worker import execute

log = logging.getLogger(__name__)


class Mix(IterableDataset):
    """Samples from several :class:`ShardDataset` s, interleaved, split across ranks and workers.

    Args:
        datasets: the parts; each keeps its own decode, decode_size, transform, fields,
            select, handler, shuffle buffer and shard shuffling. Each needs sample
            counts (an index or manifest) and must not batch, resample or set
            epoch_length (the Mix decides the epoch).
        weights: None: every sample of every part exactly once per epoch (with
            ``even=None``), parts interleaved in proportion to their sizes. A list: the
            epoch holds exactly ``round(epoch_length * w_i / sum(w))`` samples of part i
            (largest remainder, so they add up); a part drawn more than its size is
            upsampled, less is downsampled, always without replacement within a pass
            over the part, and the next epoch continues the pass.
        epoch_length: samples per epoch over all ranks (default: the parts' total).
        seed: the interleaving and each part's order are a pure function of (seed, epoch).
        rank, world_size: override what torch.distributed says.
        even: "pad" / "drop" / None as for ShardDataset, applied per part so every rank
            gets the same number of samples of each part. The Mix splits all parts: a
            part set to another even mode than "pad" (the default) or the Mix's is refused.
    """

    def __init__(self, datasets: Sequence[ShardDataset], *, weights: Sequence[float] | None = None,
                 epoch_length: int | None = None, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, even: str | None = "pad") -> None:
        super().__init__()
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("Mix needs at least one dataset")
        if even not in (None, "pad", "drop"):
            raise ValueError(f"even must be 'pad', 'drop' or None, got {even!r}")
        if world_size is not None and rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if weights is not None and len(weights) != len(self.datasets):
            raise ValueError(f"{len(weights)} weights for {len(self.datasets)} datasets")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError("epoch_length must be >= 1")
        self.weights = None if weights is None else [float(w) for w in weights]
        self.epoch_length = epoch_length
        self.seed = seed
        self.even = even
        self._rank, self._world_size = rank, world_size
        for i, part in enumerate(self.datasets):
            self._check_part(i, part)
        self.parts = [MixPart(tuple(part.counts or ()), part.buffer, part.shuffle_shards, part.seed)
                      for part in self.datasets]
        MixPlanner(self.parts, epoch=0, seed=seed, weights=self.weights, epoch_length=epoch_length)  # validate
        self.batching = Batching()
        self.threads = max(part.threads for part in self.datasets)
        self._epoch = multiprocessing.get_context().Value("q", 0, lock=False)
        self._resume: ResumeState | None = None
        self._worker_state: dict[str, Any] = {}

    def _check_part(self, i: int, part: ShardDataset) -> None:
        what = f"Mix part {i} ({part.urls[0] if part.urls else '?'}...)"
        if not isinstance(part, ShardDataset):
            raise TypeError(f"Mix parts must be ShardDatasets, part {i} is a {type(part).__name__}")
        if part.counts is None:
            raise ShardkitError(f"{what} has no sample counts: run `shardkit index` on its shards")
        if part.batch_size is not None:
            raise ShardkitError(f"{what} batches by itself (batch_size={part.batch_size}); batch the Mix "
                                "instead, e.g. ShardLoader(mix, batch_size=...)")
        if part.resampled or part.epoch_length is not None:
            raise ShardkitError(f"{what} sets resampled/epoch_length; the Mix decides the epoch "
                                "(use weights= and epoch_length= on the Mix)")
        if part.even not in ("pad", self.even):  # "pad" is ShardDataset's default: the Mix's even rules
            raise ShardkitError(f"{what} has even={part.even!r} but the Mix has even={self.even!r}; "
                                "the Mix splits all parts, set it there")
        if part._rank is not None or part._world_size is not None:
            raise ShardkitError(f"{what} sets rank/world_size; the Mix splits all parts, set them on the Mix")

    # -- pickling: the shared epoch travels to spawned workers; plain copies get a value
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            state["_epoch"] = int(self._epoch.value)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_epoch"], int):
            state["_epoch"] = multiprocessing.get_context().Value("q", state["_epoch"], lock=False)
        self.__dict__.update(state)

    # -- epochs and topology ------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (interleaving, part orders, pass positions); reaches persistent workers."""
        self._epoch.value = int(epoch)

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

    def topology(self, num_workers: int = 0) -> Topology:
        # buffer=0: each part applies its own shuffle buffer (MixPart.buffer).
        _, world = self.rank_and_world()
        return Topology(world_size=world, num_workers=num_workers, even=self.even, buffer=0)

    planned = True  # exact counts always: every part has them

    def _planner(self, epoch: int) -> MixPlanner:
        return MixPlanner(self.parts, epoch=epoch, seed=self.seed, weights=self.weights,
                          epoch_length=self.epoch_length)

    def _stages(self, epoch: int, resume: ResumeState | None) -> list:
        resume = self._resume if resume is None else resume
        return resume.stages if resume is not None and resume.epoch == epoch else []

    def epoch_info(self, epoch: int | None = None, *, num_workers: int = 0,
                   resume: ResumeState | None = None) -> EpochInfo:
        """Counts for this rank's epoch: samples, padded, dropped, per worker."""
        epoch = self.epoch if epoch is None else epoch
        rank, _ = self.rank_and_world()
        _, info = self._planner(epoch).plan(self.topology(num_workers), rank=rank, worker=0,
                                            stages=self._stages(epoch, resume))
        return info

    def part_samples(self, epoch: int | None = None) -> list[int]:
        """Samples of each part this rank yields in the epoch (before any select)."""
        epoch = self.epoch if epoch is None else epoch
        rank, _ = self.rank_and_world()
        return self._planner(epoch).rank_part_counts(self.topology(), rank, self._stages(epoch, None))

    def stream_sizes(self, *, num_workers: int, resume: ResumeState | None = None) -> list[list[int]]:
        """Samples in each [rank][worker] stream of the current epoch (before any skip)."""
        epoch = self.epoch
        return self._planner(epoch).stream_sizes(self.topology(num_workers), self._stages(epoch, resume))

    def num_samples(self) -> int:
        """Samples this rank yields per epoch (raises TypeError when a part filters)."""
        if any(part.select is not None for part in self.datasets):
            raise TypeError("a part uses select=, so the number of samples is unknown until they are read; "
                            "mix.epoch_info().rank_samples is the upper bound")
        return self.epoch_info().rank_samples

    def num_items(self, batching: Batching, *, num_workers: int = 0) -> int:
        """Items this rank yields per epoch under ``batching`` with ``num_workers`` workers."""
        if batching.batch_size is None:
            return self.num_samples()
        self.num_samples()  # raises when unknown
        return sum(batching.items(n) for n in self.epoch_info(num_workers=num_workers).worker_samples)

    def __len__(self) -> int:
        return self.num_items(self.batching)

    # -- iteration -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        return self.iter_items(self.batching, resume=self._resume)

    def iter_items(self, batching: Batching, *, resume: ResumeState | None = None, progress: bool = False,
                   rotation: int = 0) -> Iterator[Any]:
        """This worker's items for the current epoch (see ShardDataset.iter_items)."""
        info = get_worker_info()
        worker, num_workers = (0, 0) if info is None else (info.id, info.num_workers)
        rank, _ = self.rank_and_world()
        epoch = self.epoch
        topo = self.topology(num_workers)
        resume = resume if resume is not None and resume.epoch == epoch else ResumeState(epoch)
        if resume.continues(topo):
            worker = (worker + rotation) % topo.streams
        plan, _ = self._planner(epoch).plan(topo, rank=rank, worker=worker, stages=resume.stages)
        self._worker_state = {"epoch": epoch, "rank": rank, "worker": worker, "topology": topo,
                              "resume": resume, "emitted": plan.skip}
        stats = ReadStats()
        handlers = [make_handler(part.handler) for part in self.datasets]
        streams = [execute(part_plan, part.reader(handler, stats))
                   for part_plan, part, handler in zip(plan.parts, self.datasets, handlers)]
        pipelines = [part.pipeline(handler) for part, handler in zip(self.datasets, handlers)]

        def interleaved() -> Iterator[tuple[int, tuple[int, Any]]]:
            for n, label in enumerate(plan.emission_labels().tolist(), plan.skip + 1):
                sample = next(streams[label])
                if sample is not None:  # lost to a read error; its handler already saw it
                    yield n, (label, sample)

        mapped = map_parts(pipelines, interleaved(), stats.count_skipped, threads=self.threads,
                           on_filter=stats.count_filtered)
        items: Iterator[tuple[int, tuple[int, Any]]]
        if batching.batch_size is None:
            items = ((n, (1, item)) for n, item in mapped)
        else:
            items = batched(mapped, batching.batch_size, drop_last=batching.drop_last,
                            collate_fn=lambda chunk: (len(chunk), batching.collate_fn(chunk)))
        for emitted, (size, item) in items:
            self._worker_state["emitted"] = emitted
            if progress:
                yield item, Progress(worker, emitted, size, epoch, stats.as_dict())
            else:
                yield item

    # -- resume (when no ShardLoader drives the mix) ---------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This worker's progress, for torchdata's StatefulDataLoader (ShardLoader users
        call ``loader.state_dict()``). One count per worker is the whole state: which
        samples of each part were emitted follows from the plan."""
        ws = self._worker_state
        if not ws:
            return ResumeState(self.epoch).to_dict(kind="worker", seed=self.seed)
        topo: Topology = ws["topology"]
        emitted = [[0] * topo.streams for _ in range(topo.world_size)]
        emitted[ws["rank"]][ws["worker"]] = ws["emitted"]
        return ws["resume"].with_progress(topo, emitted).to_dict(kind="worker", seed=self.seed)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume mid-epoch from :meth:`state_dict` (sets the epoch too)."""
        self._resume = ResumeState.from_dict(state, seed=self.seed)
        self.set_epoch(self._resume.epoch)
