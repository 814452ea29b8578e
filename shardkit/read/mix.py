"""Mix: several ShardDatasets as one, weighted, exact and resumable.

The order is :class:`~shardkit.plan.mix.MixPlanner`'s (pure, property-tested); each
worker runs one planned stream per part through that part's own reader and
select/decode/transform/fields pipeline and interleaves them by the planned labels.
The Mix offers the same driver surface as ShardDataset, so ShardLoader, a plain
DataLoader and torchdata's StatefulDataLoader drive it the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import ShardkitError
from ..plan.epoch import EpochInfo, Topology
from ..plan.mix import MixPart, MixPlanner
from ..plan.state import PlanIdentity, ResumeState
from .base import Batching, PlannedDataset
from .dataset import ShardDataset
from .pipeline import make_handler, map_parts
from .reader import ReadStats
from .worker import execute

log = logging.getLogger(__name__)


class Mix(PlannedDataset):
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

    def __init__(
        self,
        datasets: Sequence[ShardDataset],
        *,
        weights: Sequence[float] | None = None,
        epoch_length: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        even: str | None = "pad",
    ) -> None:
        super().__init__(rank=rank, world_size=world_size, even=even)
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("Mix needs at least one dataset")
        if weights is not None and len(weights) != len(self.datasets):
            raise ValueError(f"{len(weights)} weights for {len(self.datasets)} datasets")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError("epoch_length must be >= 1")
        self.weights = None if weights is None else [float(w) for w in weights]
        self.epoch_length = epoch_length
        self.seed = seed
        for i, part in enumerate(self.datasets):
            self._check_part(i, part)
        self.parts = [
            MixPart(tuple(part.counts or ()), part.buffer, part.shuffle_shards, part.seed) for part in self.datasets
        ]
        MixPlanner(self.parts, epoch=0, seed=seed, weights=self.weights, epoch_length=epoch_length)  # validate
        self.batching = Batching()
        self.threads = max(part.threads for part in self.datasets)

    def _check_part(self, i: int, part: ShardDataset) -> None:
        what = f"Mix part {i} ({part.urls[0] if part.urls else '?'}...)"
        if not isinstance(part, ShardDataset):
            raise TypeError(f"Mix parts must be ShardDatasets, part {i} is a {type(part).__name__}")
        if part.counts is None:
            raise ShardkitError(f"{what} has no sample counts: run `shardkit index` on its shards")
        if part.batch_size is not None:
            raise ShardkitError(
                f"{what} batches by itself (batch_size={part.batch_size}); batch the Mix "
                "instead, e.g. ShardLoader(mix, batch_size=...)"
            )
        if part.resampled or part.epoch_length is not None:
            raise ShardkitError(
                f"{what} sets resampled/epoch_length; the Mix decides the epoch "
                "(use weights= and epoch_length= on the Mix)"
            )
        if part.even not in ("pad", self.even):  # "pad" is ShardDataset's default: the Mix's even rules
            raise ShardkitError(
                f"{what} has even={part.even!r} but the Mix has even={self.even!r}; "
                "the Mix splits all parts, set it there"
            )
        if part.explicit_rank_and_world != (None, None):
            raise ShardkitError(f"{what} sets rank/world_size; the Mix splits all parts, set them on the Mix")

    # -- epochs and topology ------------------------------------------------------------
    def topology(self, num_workers: int = 0) -> Topology:
        # buffer=0: each part applies its own shuffle buffer (MixPart.buffer).
        _, world = self.rank_and_world()
        return Topology(world_size=world, num_workers=num_workers, even=self.even, buffer=0)

    @property
    def planned(self) -> bool:
        return True  # exact counts always: every part has them

    def plan_identity(self) -> PlanIdentity:
        return PlanIdentity.of_parts(
            [part.plan_identity() for part in self.datasets],
            weights=self.weights,
            epoch_length=self.epoch_length,
            buffers=[part.buffer for part in self.datasets],
        )

    def _planner(self, epoch: int) -> MixPlanner:
        return MixPlanner(self.parts, epoch=epoch, seed=self.seed, weights=self.weights, epoch_length=self.epoch_length)

    def epoch_info(
        self, epoch: int | None = None, *, num_workers: int = 0, resume: ResumeState | None = None
    ) -> EpochInfo:
        """Counts for this rank's epoch: samples, padded, dropped, per worker."""
        epoch = self.epoch if epoch is None else epoch
        rank, _ = self.rank_and_world()
        _, info = self._planner(epoch).plan(
            self.topology(num_workers), rank=rank, worker=0, stages=self._stages(epoch, resume)
        )
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
            raise TypeError(
                "a part uses select=, so the number of samples is unknown until they are read; "
                "mix.epoch_info().rank_samples is the upper bound"
            )
        return self.epoch_info().rank_samples

    def num_items(self, batching: Batching, *, num_workers: int = 0) -> int:
        """Items this rank yields per epoch under ``batching`` with ``num_workers`` workers."""
        if batching.batch_size is None:
            return self.num_samples()
        self.num_samples()  # raises when unknown
        return sum(batching.items(n) for n in self.epoch_info(num_workers=num_workers).worker_samples)

    # -- iteration -----------------------------------------------------------------------
    def iter_items(
        self, batching: Batching, *, resume: ResumeState | None = None, progress: bool = False, rotation: int = 0
    ) -> Iterator[Any]:
        rank, worker, epoch, topo, resume = self._worker_context(resume, rotation)
        plan, _ = self._planner(epoch).plan(topo, rank=rank, worker=worker, stages=resume.stages)
        stats = ReadStats()
        handlers = [make_handler(part.handler) for part in self.datasets]
        streams = [
            execute(part_plan, part.reader(handler, stats))
            for part_plan, part, handler in zip(plan.parts, self.datasets, handlers)
        ]
        pipelines = [part.pipeline(handler) for part, handler in zip(self.datasets, handlers)]

        def interleaved() -> Iterator[tuple[int, tuple[int, Any]]]:
            for n, label in enumerate(plan.emission_labels().tolist(), plan.skip + 1):
                sample = next(streams[label])
                if sample is not None:  # lost to a read error; its handler already saw it
                    yield n, (label, sample)

        mapped = map_parts(
            pipelines, interleaved(), stats.count_skipped, threads=self.threads, on_filter=stats.count_filtered
        )
        yield from self._emit(mapped, batching, progress=progress, counters=stats.as_dict)
