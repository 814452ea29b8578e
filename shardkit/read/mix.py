"""Mix: several ShardDatasets as one, weighted, exact and resumable.

The order is :class:`~shardkit.plan.mix.MixPlanner`'s (pure, property-tested); each
worker runs one planned stream per part through that part's own reader and
select/decode/transform/fields pipeline and interleaves them by the planned labels.
The Mix offers the same driver surface as ShardDataset, so ShardLoader, a plain
DataLoader and torchdata's StatefulDataLoader drive it the same way.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ShardkitError
from ..plan.epoch import EpochInfo, Topology
from ..plan.mix import MixPart, MixPlanner
from ..plan.state import PlanIdentity, ResumeState
from .base import Batching, PlannedDataset
from .dataset import ShardDataset
from .pipeline import make_handler, map_parts
from .reader import CacheCounters, ReadStats
from .worker import execute

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)


class Mix(PlannedDataset):
    """Samples from several :class:`ShardDataset` s, interleaved, split across ranks and workers.

    Args:
        datasets: the parts; each keeps its own decode, decode_size, transform, fields,
            select, handler, shuffle buffer and shard shuffling. Each needs sample
            counts (an index or manifest) and must not batch, resample or set
            epoch_length (the Mix decides the epoch), nor carry stage hooks (set them on
            the Mix: ``mix.with_stages(hooks=...)``).
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
        threads: decode/transform threads per worker, one pool for all parts (their
            samples are interleaved). None: the parts' own setting, which must then be
            the same for every part that sets one; a part set to another value than 0
            (the default) or the Mix's is refused.
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
        threads: int | None = None,
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
        if threads is None:
            set_by_parts = sorted({part.threads for part in self.datasets if isinstance(part, ShardDataset)} - {0})
            if len(set_by_parts) > 1:
                raise ShardkitError(
                    f"Mix parts set different threads ({', '.join(map(str, set_by_parts))}); the Mix runs one "
                    "pool for the interleaved samples of all parts: set threads= on the Mix"
                )
            threads = set_by_parts[0] if set_by_parts else 0
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.threads = threads
        for i, part in enumerate(self.datasets):
            self._check_part(i, part)
        self.parts = [self._mix_part(part) for part in self.datasets]
        MixPlanner(self.parts, epoch=0, seed=seed, weights=self.weights, epoch_length=epoch_length)  # validate
        self.batching = Batching()

    @staticmethod
    def _mix_part(part: ShardDataset) -> MixPart:
        return MixPart(tuple(part.counts or ()), part.buffer, part.shuffle_shards, part.seed)

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
        if part.threads not in (0, self.threads):  # 0 is ShardDataset's default
            raise ShardkitError(
                f"{what} has threads={part.threads} but the Mix runs threads={self.threads} for all "
                "parts (one pool decodes their interleaved samples); set threads= on the Mix"
            )
        if part.hooks is not None:
            raise ShardkitError(f"{what} has stage hooks; set them on the Mix: mix.with_stages(hooks=...)")

    def with_parts(self, datasets: Sequence[ShardDataset]) -> Self:
        """This Mix over other versions of its parts (e.g. ``part.with_stages(...)``), with
        the same epoch (shared), seed, weights and plan; this Mix is not modified.

        Each new part must plan as the one it replaces (same sample counts, shuffle buffer,
        shard shuffling and seed) and pass the checks every part passes.
        """
        datasets = list(datasets)
        if len(datasets) != len(self.datasets):
            raise ValueError(f"{len(datasets)} parts for a Mix of {len(self.datasets)}")
        for i, part in enumerate(datasets):
            self._check_part(i, part)
            if self._mix_part(part) != self.parts[i]:
                raise ShardkitError(
                    f"Mix part {i}: the new part would change the plan (its sample counts, shuffle "
                    "buffer, shard shuffling or seed differ from the part it replaces)"
                )
        view = copy.copy(self)  # shallow: the SharedEpoch object is shared, not copied
        view.datasets = datasets
        return view

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
            self.topology(num_workers), rank=rank, worker=0, stages=self._resume_stages(epoch, resume)
        )
        return info

    def part_samples(self, epoch: int | None = None) -> list[int]:
        """Samples of each part this rank yields in the epoch (before any select)."""
        epoch = self.epoch if epoch is None else epoch
        rank, _ = self.rank_and_world()
        return self._planner(epoch).rank_part_counts(self.topology(), rank, self._resume_stages(epoch, None))

    def stream_sizes(self, *, num_workers: int, resume: ResumeState | None = None) -> list[list[int]]:
        """Samples in each [rank][worker] stream of the current epoch (before any skip)."""
        epoch = self.epoch
        return self._planner(epoch).stream_sizes(self.topology(num_workers), self._resume_stages(epoch, resume))

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
        self,
        batching: Batching,
        *,
        resume: ResumeState | None = None,
        progress: bool = False,
        rotation: int = 0,
        epoch: int | None = None,
    ) -> Iterator[Any]:
        rank, worker, epoch, topo, resume = self._worker_context(resume, rotation, epoch)
        plan, _ = self._planner(epoch).plan(topo, rank=rank, worker=worker, stages=resume.stages)
        hooks = self._start_hooks()
        stats = ReadStats()
        handlers = [make_handler(part.handler) for part in self.datasets]
        streams = [
            execute(part_plan, part.reader(handler, stats, hooks=hooks))
            for part_plan, part, handler in zip(plan.parts, self.datasets, handlers)
        ]
        pipelines = [part.pipeline(handler, hooks=hooks) for part, handler in zip(self.datasets, handlers)]

        def interleaved() -> Iterator[tuple[int, tuple[int, Any]]]:
            for n, label in enumerate(plan.emission_labels(), plan.skip + 1):
                sample = next(streams[label])
                if sample is not None:  # lost to a read error; its handler already saw it
                    yield n, (label, sample)

        mapped = map_parts(
            pipelines, interleaved(), stats.count_skipped, threads=self.threads, on_filter=stats.count_filtered
        )
        cache = CacheCounters([part.options for part in self.datasets])
        yield from self._emit(
            mapped, batching, progress=progress, counters=lambda: {**stats.as_dict(), **cache.since()}, hooks=hooks
        )
