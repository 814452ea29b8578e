"""ShardDataset: an IterableDataset over tar shards, planned per epoch, resumable.

Each worker asks the planner (:mod:`shardkit.plan`) what to read and in what order,
reads it with :class:`~shardkit.reader.ShardReader`, then decodes, transforms and
batches with :class:`~shardkit.pipeline.SamplePipeline`. The epoch lives in shared
memory so ``set_epoch`` reaches persistent workers.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import multiprocessing.context
import random
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from .errors import ShardkitError
from .pipeline import SamplePipeline, batched, collate, make_handler
from .plan import EpochInfo, EpochPlanner, Stage, Topology, deal_shards, shuffle_order, shuffled, to_pieces
from .reader import ReadStats, ShardReader
from .source import SourceOptions
from .urls import ShardList, resolve_shards

log = logging.getLogger(__name__)

DEFAULT_BUFFER = 1000
STATE_VERSION = 1


class Progress:
    """Attached to each item when a ShardLoader drives the dataset (never seen by users).

    ``samples`` is how many samples the item holds; ``stats`` the worker's counters.
    """

    __slots__ = ("worker", "emitted", "samples", "epoch", "stats")

    def __init__(self, worker: int, emitted: int, samples: int, epoch: int, stats: dict[str, int]) -> None:
        self.worker, self.emitted, self.samples, self.epoch, self.stats = worker, emitted, samples, epoch, stats


def _topology_to_dict(t: Topology) -> dict[str, Any]:
    return {"world_size": t.world_size, "num_workers": t.num_workers, "even": t.even, "buffer": t.buffer}


def stages_to_state(stages: Sequence[Stage]) -> list[dict[str, Any]]:
    return [{"topology": _topology_to_dict(s.topology), "emitted": [list(e) for e in s.emitted]} for s in stages]


def stages_from_state(items: Sequence[Mapping[str, Any]]) -> list[Stage]:
    return [Stage(Topology(**s["topology"]), tuple(tuple(int(x) for x in e) for e in s["emitted"])) for s in items]


class ShardDataset(IterableDataset):
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
            :func:`shardkit.decode.decode_size_for`: exact, never blurrier).
        transform: a callable on the sample dict (torchvision v2 pipelines accept dicts),
            or ``{"jpg": fn, ...}`` per-field callables.
        fields: turn dicts into tuples, e.g. ``"jpg;png cls"``.
        batch_size: collate inside the worker (a partial last batch unless drop_last).
        handler: "raise", "warn" or "skip" for bad samples, or a callable(exc).
        epoch_length: samples per rank per epoch (repeat or cut the data to fit).
        resampled: draw shards with replacement forever (use with epoch_length).
        cache_dir, cache_size, headers, allow_pipe, source_options: remote sources.
        allow_pickle: decode .pickle/.pyd members (only for data you trust).
        threads: decode/transform threads per worker (0 = inline). JPEG decoders and
            torch ops release the GIL, so threads can stand in for worker processes.
    """

    def __init__(self, urls: str | Sequence[str], *, shuffle: int | bool = 0,
                 shuffle_shards: bool | None = None, seed: int = 0, even: str | None = "pad",
                 rank: int | None = None, world_size: int | None = None,
                 decode: str | Callable[[dict], dict] | None = None, decode_size: int | str | None = None,
                 transform: Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]] | None = None,
                 fields: str | Sequence[str] | None = None, batch_size: int | None = None,
                 drop_last: bool = False, collate_fn: Callable[[list[Any]], Any] | None = None,
                 handler: str | Callable[[Exception], Any] = "raise", epoch_length: int | None = None,
                 resampled: bool = False, cache_dir: str | None = None, cache_size: int | str | None = None,
                 headers: dict[str, dict[str, str]] | None = None, allow_pipe: bool = False,
                 allow_pickle: bool = False, threads: int = 0,
                 source_options: SourceOptions | None = None) -> None:
        super().__init__()
        self.buffer = DEFAULT_BUFFER if shuffle is True else int(shuffle or 0)
        self.shuffle_shards = bool(self.buffer) if shuffle_shards is None else shuffle_shards
        self.seed = seed
        if even not in (None, "pad", "drop"):
            raise ValueError(f"even must be 'pad', 'drop' or None, got {even!r}")
        self.even = even
        self._rank, self._world_size = rank, world_size
        if world_size is not None and rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        options = source_options or SourceOptions()
        if cache_dir is not None:
            options.cache_dir, options.cache_size = cache_dir, cache_size
        if headers:
            options.headers = headers
        options.allow_pipe = options.allow_pipe or allow_pipe
        self.options = options
        self.shards: ShardList = resolve_shards(urls, options=options)
        self.urls = self.shards.urls
        self.counts = self.shards.counts
        if self.counts is None:
            log.info("no index or manifest for these shards: splitting by whole shards "
                     "(run `shardkit index` for sample-level splitting, len() and fast resume)")
        self.decode = decode
        if decode_size == "auto":
            from .decode_size import decode_size_for

            steps = list(transform.values()) if isinstance(transform, Mapping) else [transform]
            decode_size = next((size for t in steps if (size := decode_size_for(t)) is not None), None)
            log.info("decode_size='auto' -> %s", decode_size)
        elif decode_size is not None and not isinstance(decode_size, int):
            raise ValueError(f"decode_size must be an int, 'auto' or None, got {decode_size!r}")
        self.decode_size = decode_size
        self.allow_pickle = allow_pickle
        self.threads = threads
        self.transform = transform
        self.fields = fields
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.collate_fn = collate_fn or collate
        self.handler = handler
        make_handler(handler)  # validate early
        if epoch_length is not None and epoch_length < 1:
            raise ValueError("epoch_length must be >= 1")
        if resampled and epoch_length is None:
            log.info("resampled=True without epoch_length: every epoch is infinite")
        self.epoch_length = epoch_length
        self.resampled = resampled
        self._epoch = multiprocessing.get_context().Value("q", 0, lock=False)
        self._stages: list[Stage] = []
        self._stages_epoch: int | None = None
        self._num_workers_hint = 0
        self._rotation = 0
        self._emit_progress = False
        self._worker_state: dict[str, Any] = {}
        self.stats = ReadStats()

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
        """Select the epoch (shard order and buffer seeds); reaches persistent workers."""
        self._epoch.value = int(epoch)

    def _dist(self) -> tuple[int, int]:
        world = self._world_size
        rank = self._rank
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

    def topology(self, num_workers: int | None = None) -> Topology:
        _, world = self._dist()
        workers = self._num_workers_hint if num_workers is None else num_workers
        return Topology(world_size=world, num_workers=workers, even=self.even, buffer=self.buffer)

    def _planner(self, epoch: int) -> EpochPlanner:
        assert self.counts is not None
        return EpochPlanner(self.counts, epoch=epoch, seed=self.seed, shuffle_shards=self.shuffle_shards)

    def _stages_for(self, epoch: int) -> list[Stage]:
        return self._stages if self._stages_epoch == epoch else []

    def epoch_info(self, epoch: int | None = None, *, num_workers: int | None = None) -> EpochInfo:
        """Counts for this rank's epoch: samples, padded, dropped, per worker."""
        if self.counts is None:
            raise ShardkitError("epoch_info needs sample counts (an index or manifest); "
                                "run `shardkit index` on the shards")
        epoch = self.epoch if epoch is None else epoch
        rank, _ = self._dist()
        topo = self.topology(num_workers)
        _, info = self._planner(epoch).plan(topo, rank=rank, worker=0, stages=self._stages_for(epoch))
        return info

    def num_samples(self) -> int:
        """Samples this rank yields per epoch (raises TypeError when unknown)."""
        if self.epoch_length is not None:
            return self.epoch_length
        if self.resampled:
            raise TypeError("a resampled ShardDataset without epoch_length is infinite: it has no len()")
        if self.counts is None:
            raise TypeError("len() needs sample counts: these shards have no index or manifest "
                            "(run `shardkit index URL...`), or pass epoch_length=")
        return self.epoch_info().rank_samples

    def __len__(self) -> int:
        """Items this rank yields per epoch: samples, or batches when batch_size is set."""
        if self.batch_size is None:
            return self.num_samples()
        per_worker = self._worker_sizes()
        if self.drop_last:
            return sum(n // self.batch_size for n in per_worker)
        return sum(-(-n // self.batch_size) for n in per_worker)

    def _worker_sizes(self) -> list[int]:
        streams = max(1, self._num_workers_hint)
        if self.epoch_length is not None or self.resampled or self.counts is None:
            total = self.num_samples()
            return [(w + 1) * total // streams - w * total // streams for w in range(streams)]
        return self.epoch_info().worker_samples

    # -- iteration -----------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        if info is None:
            return 0, 0
        return info.id, info.num_workers

    def __iter__(self) -> Iterator[Any]:
        worker, num_workers = self._worker()
        rank, world = self._dist()
        epoch = self.epoch
        topo = Topology(world_size=world, num_workers=num_workers, even=self.even, buffer=self.buffer)
        stages = self._stages_for(epoch)
        if stages and stages[-1].topology == topo:
            worker = (worker + self._rotation) % topo.streams  # see ShardLoader.load_state_dict
        handler = make_handler(self.handler)
        stats = ReadStats()
        self.stats = stats
        reader = ShardReader(self.urls, options=self.options, handler=handler, stats=stats,
                             sha256=self.shards.sha256)
        pipeline = SamplePipeline(decoder=self._decoder(), transform=self.transform, fields=self.fields,
                                  handler=handler)
        skip = stages[-1].emitted[rank][worker] if stages and stages[-1].topology == topo else 0
        self._worker_state = {"epoch": epoch, "rank": rank, "worker": worker, "topology": topo,
                              "stages": stages, "emitted": skip}
        positions = self._positions(reader, topo, rank, worker, epoch, stages)
        # Each sample is tagged with its position count in the emission order; the count
        # of the last sample handed out is the progress a resume continues from.
        tagged = ((n, s) for n, s in enumerate(positions, skip + 1) if s is not None)

        def on_skip() -> None:
            stats.skipped += 1

        items = pipeline.map(tagged, on_skip, threads=self.threads)
        cache_before = self._cache_stats()
        if self.batch_size is not None:
            for emitted, (size, batch) in batched(items, self.batch_size, drop_last=self.drop_last,
                                                  collate_fn=self._collate_sized):
                self._worker_state["emitted"] = emitted
                yield self._wrap(batch, size, worker, epoch, stats, cache_before)
        else:
            for emitted, item in items:
                self._worker_state["emitted"] = emitted
                yield self._wrap(item, 1, worker, epoch, stats, cache_before)

    def _collate_sized(self, items: list[Any]) -> tuple[int, Any]:
        return len(items), self.collate_fn(items)

    def _cache_stats(self) -> dict[str, int]:
        if not self.options.cache_dir:
            return {}
        from .cache import cache_for

        return {f"cache_{k}": v for k, v in cache_for(self.options).stats().items() if k != "bytes_cached"}

    def _wrap(self, item: Any, samples: int, worker: int, epoch: int, stats: ReadStats,
              cache_before: dict[str, int]) -> Any:
        if not self._emit_progress:
            return item
        counters = stats.as_dict()
        if cache_before:  # this epoch's share of the (per-process, cumulative) cache counters
            counters.update({k: v - cache_before.get(k, 0) for k, v in self._cache_stats().items()})
        return item, Progress(worker, self._worker_state["emitted"], samples, epoch, counters)

    def _decoder(self) -> Callable[[dict], dict] | None:
        if self.decode is None or callable(self.decode):
            return self.decode  # type: ignore[return-value]
        from .decode import make_decoder

        return make_decoder(self.decode, decode_size=self.decode_size, allow_pickle=self.allow_pickle)

    def _positions(self, reader: ShardReader, topo: Topology, rank: int, worker: int, epoch: int,
                   stages: list[Stage]) -> Iterator[dict | None]:
        """Samples in emission order (None where one was lost), including epoch_length."""
        quota = None
        if self.epoch_length is not None:
            total = self.epoch_length
            quota = (worker + 1) * total // topo.streams - worker * total // topo.streams
        stream: Iterator[dict | None]
        if self.resampled:
            stream = self._resampled(reader, topo, rank, worker, epoch)
        elif quota is None:
            stream = self._one_pass(reader, topo, rank, worker, epoch, stages, 0)
        else:
            stream = self._passes(reader, topo, rank, worker, epoch, stages)
        if quota is not None:
            skip = stages[-1].emitted[rank][worker] if stages and stages[-1].topology == topo else 0
            return itertools.islice(stream, max(0, quota - skip))
        return stream

    def _passes(self, reader: ShardReader, topo: Topology, rank: int, worker: int, epoch: int,
                stages: list[Stage]) -> Iterator[dict | None]:
        """Pass after pass over this worker's data (for epoch_length); derived seeds make
        each pass a new order."""
        for n in itertools.count():
            empty = True
            for sample in self._one_pass(reader, topo, rank, worker, epoch, stages if n == 0 else [], n):
                empty = False
                yield sample
            if empty and n > 0:
                raise ShardkitError(f"epoch_length={self.epoch_length} cannot be filled: rank {rank} "
                                    f"worker {worker} has no data")

    def _one_pass(self, reader: ShardReader, topo: Topology, rank: int, worker: int, epoch: int,
                  stages: list[Stage], pass_no: int) -> Iterator[dict | None]:
        if self.counts is None:
            return self._by_shards(reader, topo, rank, worker, epoch, stages, pass_no)
        return self._by_plan(reader, topo, rank, worker, epoch, stages, pass_no)

    def _by_plan(self, reader: ShardReader, topo: Topology, rank: int, worker: int, epoch: int,
                 stages: list[Stage], pass_no: int) -> Iterator[dict | None]:
        planner = EpochPlanner(self.counts, epoch=epoch, seed=self.seed + 1_000_003 * pass_no,  # type: ignore[arg-type]
                               shuffle_shards=self.shuffle_shards)
        plan, info = planner.plan(topo, rank=rank, worker=worker, stages=stages)
        if worker == 0 and pass_no == 0 and (info.padded or info.dropped):
            log.info("epoch %d: %d samples padded, %d dropped so every rank yields %d",
                     epoch, info.padded, info.dropped, info.rank_samples)
        order = shuffle_order(plan.size, plan.buffer, random.Random(plan.rng_seed))
        consumed = list(itertools.islice(order, plan.skip))  # emitted before a resume
        needed = np.ones(plan.size, dtype=bool)
        needed[np.asarray(consumed, dtype=np.int64)] = False
        positions = np.flatnonzero(needed)
        pieces = to_pieces(plan.ids[needed], planner.shard_starts)
        read = zip(positions.tolist(), itertools.chain.from_iterable(reader.read_piece(p) for p in pieces))
        held: dict[int, dict | None] = {}
        for target in order:
            while target not in held:
                try:
                    pos, sample = next(read)
                except StopIteration:
                    raise ShardkitError(f"internal: stream ended before position {target}") from None
                held[pos] = sample
            yield held.pop(target)

    def _by_shards(self, reader: ShardReader, topo: Topology, rank: int, worker: int, epoch: int,
                   stages: list[Stage], pass_no: int) -> Iterator[dict | None]:
        shards = deal_shards(len(self.urls), epoch=epoch, seed=self.seed + 1_000_003 * pass_no,
                             shuffle_shards=self.shuffle_shards, world_size=topo.world_size, rank=rank,
                             num_workers=topo.num_workers, worker=worker)
        if not shards:
            if topo.world_size > 1 and self.even is not None and worker == 0:
                raise ShardkitError(f"rank {rank} gets no shards: {len(self.urls)} shard(s) for "
                                    f"{topo.world_size} ranks x {topo.streams} workers; with even={self.even!r} "
                                    "that would hang the other ranks. Run `shardkit index` for "
                                    "sample-level splitting, or write more shards")
            if pass_no == 0:
                log.warning("rank %d worker %d has no shards (%d shards < %d ranks x %d workers); "
                            "run `shardkit index` for sample-level splitting", rank, worker,
                            len(self.urls), topo.world_size, topo.streams)
            return iter(())
        rng = random.Random(f"shardkit:{self.seed}:{epoch}:{pass_no}:{rank}:{worker}")
        samples = itertools.chain.from_iterable(reader.read_shard(s) for s in shards)
        out: Iterator[dict | None] = shuffled(samples, topo.buffer, rng)
        skip = stages[-1].emitted[rank][worker] if stages and stages[-1].topology == topo else 0
        if stages and stages[-1].topology != topo:
            raise ShardkitError("resuming with a different number of ranks or workers needs sample "
                                "counts (an index or manifest); run `shardkit index` on the shards")
        return itertools.islice(out, skip, None)

    def _resampled(self, reader: ShardReader, topo: Topology, rank: int, worker: int,
                   epoch: int) -> Iterator[dict | None]:
        rng = random.Random(f"shardkit:resampled:{self.seed}:{epoch}:{rank}:{worker}")

        def forever() -> Iterator[dict]:
            while True:
                yield from reader.read_shard(rng.randrange(len(self.urls)))

        return shuffled(forever(), topo.buffer, rng)

    # -- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This worker's (or the main process's) progress, for torchdata's StatefulDataLoader.

        ShardLoader users should call ``loader.state_dict()`` instead, which knows every worker.
        """
        ws = self._worker_state
        if not ws:
            return {"version": STATE_VERSION, "kind": "worker", "epoch": self.epoch, "stages": []}
        topo: Topology = ws["topology"]
        emitted = [[0] * topo.streams for _ in range(topo.world_size)]
        emitted[ws["rank"]][ws["worker"]] = ws["emitted"]
        return {"version": STATE_VERSION, "kind": "worker", "epoch": ws["epoch"], "seed": self.seed,
                "stages": stages_to_state([s for s in ws["stages"] if s.topology != topo]
                                          + [Stage(topo, tuple(tuple(e) for e in emitted))])}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume mid-epoch from :meth:`state_dict` or ``ShardLoader.state_dict()``."""
        if state.get("version") != STATE_VERSION:
            raise ShardkitError(f"resume state version {state.get('version')!r} is not supported")
        if "seed" in state and state["seed"] != self.seed:
            raise ShardkitError(f"resume state was saved with seed {state['seed']}, this dataset has "
                                f"seed {self.seed}; the remaining samples would not match")
        self.set_epoch(int(state["epoch"]))
        self._stages = stages_from_state(state.get("stages", []))
        self._stages_epoch = int(state["epoch"])
