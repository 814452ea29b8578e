"""One worker's epoch: execute the planner's :class:`~shardkit.plan.WorkerPlan`.

:class:`WorkerEpoch` is created inside each DataLoader worker (or the main process)
for one (rank, worker, epoch); it asks the planner what to read and in what order and
runs exactly that -- ``plan.pieces`` through the reader, ``plan.emission_order()``
through a small executor that holds samples read ahead until their turn -- so the
planner's property tests cover the real read order. Without sample counts it falls
back to webdataset-style shard dealing.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import ShardkitError
from ..format.samples import Sample
from ..plan.epoch import EpochPlanner, Topology, WorkerPlan, deal_shards, shuffled
from ..plan.seeds import rng_seed
from ..plan.state import ResumeState
from .reader import ShardReader

log = logging.getLogger(__name__)

# Each further pass over the data (epoch_length beyond one pass) gets its own order.
PASS_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class EpochSpec:
    """The dataset settings that decide which samples an epoch holds, and their order."""

    n_shards: int
    counts: Sequence[int] | None
    seed: int
    shuffle_shards: bool
    epoch_length: int | None
    resampled: bool


class WorkerEpoch:
    """Samples of one worker of one rank in one epoch, in emission order.

    :meth:`samples` yields ``None`` in place of a sample lost to a read error (the
    handler already saw it), so positions still count.
    """

    def __init__(
        self,
        spec: EpochSpec,
        reader: ShardReader,
        *,
        topology: Topology,
        rank: int,
        worker: int,
        epoch: int,
        resume: ResumeState | None = None,
    ) -> None:
        self.spec = spec
        self.reader = reader
        self.topology = topology
        self.rank = rank
        self.worker = worker
        self.epoch = epoch
        self.resume = resume if resume is not None and resume.epoch == epoch else ResumeState(epoch)
        self.skip = self.resume.skip(topology, rank, worker)

    def samples(self) -> Iterator[Sample | None]:
        """This worker's samples, after the ``skip`` already emitted, including epoch_length."""
        spec = self.spec
        if spec.resampled:
            stream = self._resampled()
        elif spec.epoch_length is None:
            return self._one_pass(0)
        else:
            stream = self._passes()
        if spec.epoch_length is None:
            return stream
        streams = self.topology.streams
        quota = (self.worker + 1) * spec.epoch_length // streams - self.worker * spec.epoch_length // streams
        return itertools.islice(stream, max(0, quota - self.skip))

    def _passes(self) -> Iterator[Sample | None]:
        """Pass after pass over this worker's data (for epoch_length)."""
        for n in itertools.count():
            empty = True
            for sample in self._one_pass(n):
                empty = False
                yield sample
            if empty and n > 0:
                raise ShardkitError(
                    f"epoch_length={self.spec.epoch_length} cannot be filled: rank {self.rank} "
                    f"worker {self.worker} has no data"
                )

    def _one_pass(self, pass_no: int) -> Iterator[Sample | None]:
        if self.spec.counts is None:
            return self._by_shards(pass_no)
        return self._by_plan(pass_no)

    def _by_plan(self, pass_no: int) -> Iterator[Sample | None]:
        spec = self.spec
        assert spec.counts is not None
        stages = self.resume.stages if pass_no == 0 else []
        planner = EpochPlanner(
            spec.counts,
            epoch=self.epoch,
            seed=spec.seed + PASS_SEED_STRIDE * pass_no,
            shuffle_shards=spec.shuffle_shards,
        )
        plan, info = planner.plan(self.topology, rank=self.rank, worker=self.worker, stages=stages)
        if self.worker == 0 and pass_no == 0 and (info.padded or info.dropped):
            log.info(
                "epoch %d: %d samples padded, %d dropped so every rank yields %d",
                self.epoch,
                info.padded,
                info.dropped,
                info.rank_samples,
            )
        return execute(plan, self.reader)

    def _read_shards(self, shards: list[int]) -> Iterator[Sample]:
        for i, shard in enumerate(shards):
            read_ahead(self.reader, itertools.islice(shards, i + 1, None), shard)
            yield from self.reader.read_shard(shard)

    def _by_shards(self, pass_no: int) -> Iterator[Sample | None]:
        spec, topo = self.spec, self.topology
        if self.resume.stages and not self.resume.continues(topo):
            raise ShardkitError(
                "resuming with a different number of ranks or workers needs sample "
                "counts (an index or manifest); run `shardkit index` on the shards"
            )
        shards = deal_shards(
            spec.n_shards,
            epoch=self.epoch,
            seed=spec.seed + PASS_SEED_STRIDE * pass_no,
            shuffle_shards=spec.shuffle_shards,
            world_size=topo.world_size,
            rank=self.rank,
            num_workers=topo.num_workers,
            worker=self.worker,
        )
        if not shards:
            if topo.world_size > 1 and topo.even is not None and self.worker == 0:
                raise ShardkitError(
                    f"rank {self.rank} gets no shards: {spec.n_shards} shard(s) for "
                    f"{topo.world_size} ranks x {topo.streams} workers; with even={topo.even!r} "
                    "that would hang the other ranks. Run `shardkit index` for "
                    "sample-level splitting, or write more shards"
                )
            if pass_no == 0:
                log.warning(
                    "rank %d worker %d has no shards (%d shards < %d ranks x %d workers); "
                    "run `shardkit index` for sample-level splitting",
                    self.rank,
                    self.worker,
                    spec.n_shards,
                    topo.world_size,
                    topo.streams,
                )
            return iter(())
        rng = random.Random(rng_seed(spec.seed, self.epoch, pass_no, self.rank, self.worker))
        samples = self._read_shards(shards)
        out: Iterator[Sample | None] = shuffled(samples, topo.buffer, rng)
        return itertools.islice(out, self.skip if pass_no == 0 else 0, None)

    def _resampled(self) -> Iterator[Sample | None]:
        rng = random.Random(rng_seed("resampled", self.spec.seed, self.epoch, self.rank, self.worker))

        def forever() -> Iterator[Sample]:
            while True:
                yield from self.reader.read_shard(rng.randrange(self.spec.n_shards))

        return shuffled(forever(), self.topology.buffer, rng)


def execute(plan: WorkerPlan, reader: ShardReader) -> Iterator[Sample | None]:
    """Run a planned stream: read ``plan.pieces`` in order and emit in
    ``plan.emission_order()``, holding samples read ahead of their turn (at most the
    shuffle buffer's worth). ``None`` stands for a sample lost to a read error."""
    pieces = plan.pieces

    def read() -> Iterator[Sample | None]:
        for i, piece in enumerate(pieces):
            read_ahead(reader, (p.shard for p in itertools.islice(pieces, i + 1, None)), piece.shard)
            yield from reader.read_piece(piece)

    stream = zip(plan.read_positions(), read())
    held: dict[int, Sample | None] = {}
    for target in plan.emission_order():
        while target not in held:
            try:
                pos, sample = next(stream)
            except StopIteration:
                raise ShardkitError(f"internal: stream ended before position {target}") from None
            held[pos] = sample
        yield held.pop(target)


def read_ahead(reader: ShardReader, upcoming: Iterable[int], current: int) -> None:
    """With a cache and ``read_ahead``, download the next shards while this one is read.
    ``upcoming`` is lazy: without read-ahead it is never walked (no copy per piece)."""
    ahead = reader.options.read_ahead
    if not ahead:
        return
    urls: list[str] = []
    for shard in upcoming:
        url = reader.urls[shard]
        if shard != current and url not in urls:
            urls.append(url)
            if len(urls) == ahead:
                break
    reader.prefetch(urls)
