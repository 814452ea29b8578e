"""ShardDataset: an IterableDataset over tar shards, planned per epoch, resumable.

The dataset is configuration plus a small public surface for whoever drives it. Each
worker builds a :class:`~shardkit.read.worker.WorkerEpoch` (what the planner says to read,
in the planner's order), reads through :class:`~shardkit.read.reader.ShardReader`, then
decodes, transforms and batches with :class:`~shardkit.read.pipeline.SamplePipeline`. The
epoch lives in shared memory so ``set_epoch`` reaches persistent workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ShardkitError
from ..plan.epoch import EpochInfo, EpochPlanner, Topology
from ..plan.state import PlanIdentity, ResumeState
from ..storage.backend import SourceOptions, merge_source_options
from .base import Batching, PlannedDataset
from .join import Join, JoinedReader, JoinSpec, open_join
from .pipeline import SamplePipeline, collate, make_handler
from .reader import CacheCounters, ReadStats, ShardReader
from .stages import KEEP, Decoding, HooksFactory, Keep, StageHooks
from .urls import ShardList, resolve_shards
from .worker import EpochSpec, WorkerEpoch

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

DEFAULT_BUFFER = 1000


class ShardDataset(PlannedDataset):
    """Samples from tar shards, split across ranks and DataLoader workers.

    Args:
        urls: ``"train-{000..099}.tar"``, ``"train-<000..099>.tar"``, a list of URLs,
            a ``NAME.manifest.json``, or a folder holding shards (local, http(s)://, s3://).
        shuffle: shuffle-buffer size in samples (``True`` = 1000, 0/False = off).
        shuffle_shards: new shard order every epoch (default: on when shuffle is on).
        seed: base seed; the order is a pure function of (seed, epoch, topology).
        even: distributed balance: "pad" (repeat a few samples so every rank yields the
            same count), "drop" (drop at most world_size-1), or None (each sample once,
            rank counts may differ by one).
        rank, world_size: override what torch.distributed says.
        decode: None (raw bytes), "pil", "numpy" or "torch"; or a callable on the sample.
        decode_size: decode JPEGs at the smallest DCT scale that keeps this short side;
            "auto" derives it from a Resize/RandomResizedCrop in ``transform`` (see
            :func:`shardkit.decode.size.decode_size_for`: exact, never blurrier) and fuses a
            leading RandomResizedCrop into decoding (:func:`shardkit.decode.fuse.fuse_crop`:
            crop drawn from the header with the same random draws, each crop decoded at the
            smallest DCT scale that keeps it >= the output size). "exact" fuses the crop the
            same way but decodes it at full resolution: only the region is skipped, and the
            values equal those of ``None`` (a warning says when there is no crop to fuse).
            Only with a built-in ``decode`` mode: refused with ``decode=None`` or a callable.
        transform: a callable on the sample dict (torchvision v2 pipelines accept dicts),
            or ``{"jpg": fn, ...}`` per-field callables.
        fields: turn dicts into tuples, e.g. ``"jpg;png cls"``.
        select: ``fn(raw_sample) -> bool`` on the undecoded sample (bytes), before decode
            and transform: rejected samples cost no decode. Resume stays exact (the plan
            counts positions, not survivors); ``len()`` is then unknown (``epoch_info()``
            gives the upper bound) and ``loader.stats()["filtered"]`` counts the rejects.
        batch_size: collate inside the worker. The dataset then yields batches: use it
            with ``DataLoader(ds, batch_size=None)`` or ``ShardLoader(ds)``; a ShardLoader
            given a different batch size refuses rather than override it.
        drop_last: with ``batch_size``, drop each worker's partial last batch.
        collate_fn: with ``batch_size``, turns a list of samples into a batch (default:
            stack tensors and numbers, keep lists of what cannot be stacked).
        handler: "raise", "warn" or "skip" for bad samples, or a callable(exc).
        epoch_length: samples per rank per epoch (repeat or cut the data to fit).
        resampled: draw shards with replacement forever (use with epoch_length).
        cache_dir, cache_size, headers, allow_pipe: remote sources (see SourceOptions);
            ``source_options`` gives all of them at once: pass one or the other, not
            both. The caller's SourceOptions object is never modified.
        allow_pickle: decode .pickle/.pyd members (only for data you trust).
        exif_orientation: with ``decode``, turn images upright by their EXIF orientation
            (default True; False gives the stored pixels, as webdataset does).
        threads: decode/transform threads per worker (0 = inline). JPEG decoders and
            torch ops release the GIL, so threads can stand in for worker processes.
        join: companion sets of these shards (each given as ``urls`` is), whose fields
            every sample gains: the parts are read in lockstep, shard by shard, and
            checked to line up when the dataset opens (see :mod:`shardkit.read.join`).
            Plan, shuffle, resume, ``select`` (on the joined raw sample) and ``fields``
            work as on one shard set. A companion sample written as missing
            (``missing="skip"``) drops the sample, counted as filtered.
        join_wins: ``{field: part}`` for a field two parts hold: which one's value is
            kept (0 the base, 1 the first companion, ...). Without it such a field is
            refused: nothing is silently overridden.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        shuffle: int | bool = 0,
        shuffle_shards: bool | None = None,
        seed: int = 0,
        even: str | None = "pad",
        rank: int | None = None,
        world_size: int | None = None,
        decode: str | Callable[[dict], dict] | None = None,
        decode_size: int | str | None = None,
        transform: Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]] | None = None,
        fields: str | Sequence[str] | None = None,
        batch_size: int | None = None,
        drop_last: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        handler: str | Callable[[Exception], Any] = "raise",
        select: Callable[[dict], bool] | None = None,
        epoch_length: int | None = None,
        resampled: bool = False,
        cache_dir: str | None = None,
        cache_size: int | str | None = None,
        headers: dict[str, dict[str, str]] | None = None,
        allow_pipe: bool = False,
        allow_pickle: bool = False,
        threads: int = 0,
        source_options: SourceOptions | None = None,
        exif_orientation: bool = True,
        join: Sequence[JoinSpec] | None = None,
        join_wins: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(rank=rank, world_size=world_size, even=even)
        self.buffer = DEFAULT_BUFFER if shuffle is True else int(shuffle or 0)
        self.shuffle_shards = bool(self.buffer) if shuffle_shards is None else shuffle_shards
        self.seed = seed
        self.options = merge_source_options(
            source_options, cache_dir=cache_dir, cache_size=cache_size, headers=headers, allow_pipe=allow_pipe
        )
        self.shards: ShardList = resolve_shards(urls, options=self.options)
        self.urls = self.shards.urls
        self.counts = self.shards.counts
        if join_wins is not None and not join:
            raise ValueError("join_wins decides between the parts of a join; there is no join=")
        self.join: Join | None = (
            open_join(self.shards, join, wins=join_wins, options=self.options) if join is not None else None
        )
        if self.counts is None:
            log.info(
                "no index or manifest for these shards: splitting by whole shards "
                "(run `shardkit index` for sample-level splitting, len() and fast resume)"
            )
        self.decoding = Decoding.resolve(
            decode, decode_size, transform, allow_pickle=allow_pickle, exif_orientation=exif_orientation
        )
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.threads = threads
        # Stages replaced by with_stages (KEEP: as configured).
        self._stage_decoder: Callable[[dict], dict] | None | Keep = KEEP
        self._stage_transform: Any = KEEP
        self.transform = transform
        self.fields = fields
        if select is not None and not callable(select):
            raise TypeError(f"select must be a function of the raw sample returning a bool, got {select!r}")
        self.select = select
        self.batching = Batching(batch_size, drop_last, collate_fn or collate)
        self.handler = handler
        make_handler(handler)  # validate early
        if epoch_length is not None and epoch_length < 1:
            raise ValueError("epoch_length must be >= 1")
        if resampled and epoch_length is None:
            log.info("resampled=True without epoch_length: every epoch is infinite")
        self.epoch_length = epoch_length
        self.resampled = resampled

    @property
    def decode(self) -> str | Callable[[dict], dict] | None:
        return self.decoding.decode

    @property
    def decode_size(self) -> int | None:
        """The DCT decode size in force ("auto" resolved)."""
        return self.decoding.decode_size

    @property
    def fuse_crop(self) -> bool:
        """True with ``decode_size="auto"`` or ``"exact"``: a leading RandomResizedCrop is fused into decoding."""
        return self.decoding.fuse

    @property
    def allow_pickle(self) -> bool:
        return self.decoding.allow_pickle

    @property
    def exif_orientation(self) -> bool:
        return self.decoding.exif_orientation

    @property
    def batch_size(self) -> int | None:
        return self.batching.batch_size

    @property
    def drop_last(self) -> bool:
        return self.batching.drop_last

    @property
    def collate_fn(self) -> Callable[[list[Any]], Any]:
        return self.batching.collate_fn

    # -- epochs and topology ------------------------------------------------------------
    def topology(self, num_workers: int = 0) -> Topology:
        """The topology this rank runs with ``num_workers`` DataLoader workers."""
        _, world = self.rank_and_world()
        return Topology(world_size=world, num_workers=num_workers, even=self.even, buffer=self.buffer)

    @property
    def planned(self) -> bool:
        """True when epochs follow the sample-level planner (counts known, one pass, no
        epoch_length); then every count below is exact."""
        return self.counts is not None and not self.resampled and self.epoch_length is None

    def plan_identity(self) -> PlanIdentity:
        """By sample (counts known) or by whole shard, and the counts: what a saved state needs."""
        return PlanIdentity.of(
            self.counts,
            shards=len(self.urls),
            shuffle_shards=self.shuffle_shards,
            epoch_length=self.epoch_length,
            resampled=self.resampled,
        )

    def _planner(self, epoch: int) -> EpochPlanner:
        assert self.counts is not None
        return EpochPlanner(self.counts, epoch=epoch, seed=self.seed, shuffle_shards=self.shuffle_shards)

    def epoch_info(
        self, epoch: int | None = None, *, num_workers: int = 0, resume: ResumeState | None = None
    ) -> EpochInfo:
        """Counts for this rank's epoch: samples, padded, dropped, per worker (after the
        dataset's own resume state, or ``resume`` when given)."""
        if self.counts is None:
            raise ShardkitError(
                "epoch_info needs sample counts (an index or manifest); run `shardkit index` on the shards"
            )
        epoch = self.epoch if epoch is None else epoch
        rank, _ = self.rank_and_world()
        _, info = self._planner(epoch).plan(
            self.topology(num_workers), rank=rank, worker=0, stages=self._resume_stages(epoch, resume)
        )
        return info

    def stream_sizes(self, *, num_workers: int, resume: ResumeState | None = None) -> list[list[int]] | None:
        """Samples in each [rank][worker] stream of the current epoch (before any skip),
        or None when not :attr:`planned`."""
        if not self.planned:
            return None
        epoch = self.epoch
        return self._planner(epoch).stream_sizes(self.topology(num_workers), self._resume_stages(epoch, resume))

    def num_samples(self) -> int:
        """Samples this rank yields per epoch (raises TypeError when unknown)."""
        if self.select is not None:
            raise TypeError(
                "with select= the number of samples is unknown until they are read; "
                "ds.epoch_info().rank_samples is the upper bound (samples before filtering)"
            )
        if self.epoch_length is not None:
            return self.epoch_length
        if self.resampled:
            raise TypeError("a resampled ShardDataset without epoch_length is infinite: it has no len()")
        if self.counts is None:
            raise TypeError(
                "len() needs sample counts: these shards have no index or manifest "
                "(run `shardkit index URL...`), or pass epoch_length="
            )
        return self.epoch_info().rank_samples

    def num_items(self, batching: Batching, *, num_workers: int = 0) -> int:
        """Items this rank yields per epoch under ``batching`` with ``num_workers``
        workers (each worker's last batch may be partial)."""
        if batching.batch_size is None:
            return self.num_samples()
        streams = max(1, num_workers)
        if self.planned:
            per_worker = self.epoch_info(num_workers=num_workers).worker_samples
        else:
            total = self.num_samples()
            per_worker = [(w + 1) * total // streams - w * total // streams for w in range(streams)]
        return sum(batching.items(n) for n in per_worker)

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
        hooks = self._start_hooks()
        handler = make_handler(self.handler)
        stats = ReadStats()
        run = WorkerEpoch(
            self.epoch_spec(),
            self.reader(handler, stats, hooks=hooks),
            topology=topo,
            rank=rank,
            worker=worker,
            epoch=epoch,
            resume=resume,
        )
        # Each sample is tagged with its position count in the emission order; the count
        # of the last sample handed out is the progress a resume continues from.
        tagged = ((n, s) for n, s in enumerate(run.samples(), run.skip + 1) if s is not None)
        mapped = self.pipeline(handler, hooks=hooks).map(
            tagged, stats.count_skipped, threads=self.threads, on_filter=stats.count_filtered
        )
        cache = CacheCounters([self.options])
        yield from self._emit(
            mapped, batching, progress=progress, counters=lambda: {**stats.as_dict(), **cache.since()}, hooks=hooks
        )

    # -- the worker's stages -------------------------------------------------------------
    def with_stages(
        self,
        *,
        decoder: Callable[[dict], dict] | None | Keep = KEEP,
        transform: Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]] | None | Keep = KEEP,
        hooks: HooksFactory | None | Keep = KEEP,
    ) -> Self:
        """This dataset with other worker stages: same epoch, plan, order and resume state.

        ``decoder`` and ``transform`` replace the decode and transform stages (None: no
        such stage; :data:`~shardkit.read.stages.KEEP`: as configured); select, fields,
        handler and batching stay. Replacing either one also drops a crop that
        ``decode_size="auto"`` or ``"exact"`` fused into decoding, since it spans both. ``hooks``: see
        :meth:`PlannedDataset.with_stages`. The view shares this dataset's epoch; this
        dataset is not modified.
        """
        for name, fn in (("decoder", decoder), ("transform", transform)):
            if not (fn is None or isinstance(fn, (Keep, Mapping)) or callable(fn)):
                raise TypeError(f"{name} must be a callable, None or KEEP, got {fn!r}")
        view = super().with_stages(hooks=hooks)
        if not isinstance(decoder, Keep):
            view._stage_decoder = decoder
        if not isinstance(transform, Keep):
            view._stage_transform = transform
        return view

    @property
    def replaced_stages(self) -> tuple[str, ...]:
        """The stages :meth:`with_stages` replaced: "decoder" and/or "transform"."""
        return tuple(
            name
            for name, stage in (("decoder", self._stage_decoder), ("transform", self._stage_transform))
            if not isinstance(stage, Keep)
        )

    def stages(self) -> tuple[Callable[[dict], dict] | None, Any]:
        """(decoder, transform) the workers run: as configured (a fused crop included), or
        as given to :meth:`with_stages`."""
        if not self.replaced_stages:
            return self.decoding.stages(self.transform)
        decoder = self.decoding.decoder() if isinstance(self._stage_decoder, Keep) else self._stage_decoder
        transform = self.transform if isinstance(self._stage_transform, Keep) else self._stage_transform
        return decoder, transform

    # -- the parts a driver (this dataset's own iteration, or a Mix) runs in a worker ------
    def epoch_spec(self) -> EpochSpec:
        """What decides which samples an epoch holds and their order."""
        return EpochSpec(len(self.urls), self.counts, self.seed, self.shuffle_shards, self.epoch_length, self.resampled)

    def reader(
        self, handler: Callable[[Exception], None], stats: ReadStats, *, hooks: StageHooks | None = None
    ) -> ShardReader:
        """A reader of this dataset's shards (one per worker), observed by ``hooks``; with
        ``join``, a JoinedReader of all parts in lockstep (``fields`` goes to the base's
        reader: a field a companion holds is missing from the base sample, so at a break
        a cut sample is kept only when the base alone proves it whole)."""
        if self.join is None:
            return ShardReader(
                self.urls,
                options=self.options,
                handler=handler,
                stats=stats,
                sha256=self.shards.sha256,
                hooks=hooks,
                fields=self.fields,
            )
        parts = [
            ShardReader(part.urls, options=self.options, handler=handler, stats=ReadStats(), sha256=part.sha256)
            for part in self.join.parts
        ]
        return JoinedReader(
            self.urls,
            parts=parts,
            join=self.join,
            options=self.options,
            handler=handler,
            stats=stats,
            sha256=self.shards.sha256,
            hooks=hooks,
            fields=self.fields,
        )

    def pipeline(self, handler: Callable[[Exception], None], *, hooks: StageHooks | None = None) -> SamplePipeline:
        """select -> decode -> transform -> fields as :meth:`stages` says (one per worker),
        observed by ``hooks``."""
        decoder, transform = self.stages()
        return SamplePipeline(
            decoder=decoder, transform=transform, fields=self.fields, handler=handler, select=self.select, hooks=hooks
        )
