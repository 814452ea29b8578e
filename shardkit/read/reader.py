"""Read samples of planned pieces (or whole shards) from their sources.

With an index, a piece that starts mid-shard seeks straight to its first sample (a file
seek, or an HTTP/S3 Range request) and stops at its last; without one, the shard is
read from the start and the samples before the piece are parsed but not kept.
Format errors go through the error handler: "raise" re-raises, "warn"/"skip" drop the
rest of the broken piece (reported as lost positions) and go on. When the dataset names
its ``fields``, a sample cut short by the damage is still kept if it has every field
asked for (one alternative of each slot): nothing it would be used for is missing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..errors import ShardkitError
from ..format.index import decode_index, index_url
from ..format.samples import Sample, group_members
from ..format.tar import iter_member_tuples
from ..plan.epoch import Piece
from ..storage.cache import cache_for
from ..storage.dispatch import SourceOptions, local_path, open_stream, prefetch, read_optional
from .pipeline import parse_fields
from .stages import StageHooks

log = logging.getLogger(__name__)

# Called with each error; raising stops the epoch, returning skips the bad sample(s).
ErrorHandler = Callable[[Exception], None]


class ReadStats:
    """Counters kept by one reader (one worker process)."""

    def __init__(self) -> None:
        self.samples_read = 0
        self.bytes_read = 0
        self.skipped = 0  # samples lost to errors (reading, decoding or transforming)
        self.filtered = 0  # samples a ``select`` function rejected
        self.shards_opened = 0

    def count_skipped(self) -> None:
        self.skipped += 1

    def count_filtered(self) -> None:
        self.filtered += 1

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class CacheCounters:
    """What the caches of some sources counted since this object was made, as
    ``cache_<counter>`` keys: one epoch's share of the per-process, cumulative counters.
    Sources sharing a cache count it once; sources without a cache count nothing."""

    def __init__(self, options: list[SourceOptions]) -> None:
        caches = {id(c): c for c in (cache_for(o) for o in options if o.cache_dir)}
        self.caches = list(caches.values())
        self.before = self._now()

    def _now(self) -> dict[str, int]:
        # counters() only, not stats(): this runs per batch and stats() lists the cache folder.
        out: dict[str, int] = {}
        for cache in self.caches:
            for k, v in cache.counters().items():
                out[f"cache_{k}"] = out.get(f"cache_{k}", 0) + v
        return out

    def since(self) -> dict[str, int]:
        """The counters now, less what they were when this object was made."""
        if not self.caches:
            return {}
        return {k: v - self.before.get(k, 0) for k, v in self._now().items()}


class HasFields:
    """Whether a sample has every field a ``fields`` spec asks for (an alternative of each
    slot): what makes a sample at a cut whole enough to keep. Picklable."""

    def __init__(self, fields: str | Sequence[str]) -> None:
        self.slots = parse_fields(fields)

    def __call__(self, sample: Sample) -> bool:
        return all(any(ext in sample for ext in slot) for slot in self.slots)


class ShardReader:
    """Opens shards and yields their samples; caches a few shard indexes.

    ``fields``: the dataset's ``fields=``; a sample in progress where a shard breaks is
    kept when it has them all (see :func:`shardkit.format.samples.group_members`).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        options: SourceOptions,
        handler: ErrorHandler,
        stats: ReadStats | None = None,
        sha256: Sequence[str | None] | None = None,
        hooks: StageHooks | None = None,
        fields: str | Sequence[str] | None = None,
    ) -> None:
        self.urls = urls
        self.complete = HasFields(fields) if fields is not None else None
        self.sha256 = sha256
        self.options = options
        self.handler = handler
        self.stats = stats or ReadStats()
        self.hooks = hooks or StageHooks()  # observe the "read" stage
        self._offsets: OrderedDict[int, np.ndarray | None] = OrderedDict()

    def prefetch(self, urls: list[str]) -> None:
        """Start downloading ``urls`` into the cache (``options.read_ahead``); errors show
        up when they are opened."""
        if urls:
            prefetch(urls, self.options)

    def offsets(self, shard: int) -> np.ndarray | None:
        """The shard's sample offsets from its ``.idx``, or None when it has none."""
        if shard in self._offsets:
            self._offsets.move_to_end(shard)
            return self._offsets[shard]
        url = index_url(self.urls[shard])
        data = read_optional(url, options=self.options)  # None: not found; unreadable raises, naming it
        offsets = decode_index(data, url=url) if data is not None else None
        self._offsets[shard] = offsets
        while len(self._offsets) > 16:
            self._offsets.popitem(last=False)
        return offsets

    def _samples(
        self, url: str, start: int = 0, stop: int | None = None, sha256: str | None = None
    ) -> Iterator[Sample]:
        is_local = local_path(url) is not None
        length = None if is_local or stop is None else stop - start
        stream = open_stream(url, offset=start, length=length, options=self.options, expected_sha256=sha256)
        self.stats.shards_opened += 1
        try:
            members = iter_member_tuples(stream, url=url, start=start, stop=stop)
            for _, end, sample in group_members(members, url=url, complete=self.complete):
                self.stats.bytes_read += end - start
                start = end
                self.stats.samples_read += 1
                yield sample
        finally:
            stream.close()

    def read_piece(self, piece: Piece) -> Iterator[Sample | None]:
        """Samples ``piece.start..piece.stop`` of a shard; ``None`` for each one lost."""
        return self.hooks.wrap_iter("read", self._read_piece(piece))

    def _read_piece(self, piece: Piece) -> Iterator[Sample | None]:
        url = self.urls[piece.shard]
        sha256 = self.sha256[piece.shard] if self.sha256 else None
        wanted = piece.stop - piece.start
        got = 0
        try:
            offsets = self.offsets(piece.shard)
            if offsets is not None:
                if piece.stop >= len(offsets):
                    raise ShardkitError(
                        f"{url}: plan wants sample {piece.stop - 1} but the index has {len(offsets) - 1}"
                    )
                samples = self._samples(url, int(offsets[piece.start]), int(offsets[piece.stop]), sha256)
            else:
                samples = self._skip(self._samples(url, sha256=sha256), piece.start)
            if wanted:
                for sample in samples:
                    got += 1
                    yield sample
                    if got == wanted:
                        break  # pulling once more would parse the next sample: not ours to report on
            if got < wanted:
                raise ShardkitError(
                    f"{url}: expected {piece.stop} samples (from the manifest/index) "
                    f"but the shard has only {piece.start + got}"
                )
        except Exception as e:  # noqa: BLE001 - routed through the user's handler
            lost = wanted - got
            _note_lost(e, lost)
            self.handler(e)
            self.stats.skipped += lost
            for _ in range(lost):
                yield None

    @staticmethod
    def _skip(samples: Iterator[Sample], n: int) -> Iterator[Sample]:
        for i, sample in enumerate(samples):
            if i >= n:
                yield sample

    def read_shard(self, shard: int) -> Iterator[Sample]:
        """All samples of a shard (no counts needed); errors end the shard via the handler."""
        return self.hooks.wrap_iter("read", self._read_shard(shard))

    def _read_shard(self, shard: int) -> Iterator[Sample]:
        url = self.urls[shard]
        try:
            yield from self._samples(url, sha256=self.sha256[shard] if self.sha256 else None)
        except Exception as e:  # noqa: BLE001
            _note_lost(e, 0)  # unknown: the rest of the shard
            self.handler(e)
            self.stats.skipped += 1


def _note_lost(exc: Exception, lost: int) -> None:
    """Tell the handler how many planned samples the error costs (``handler="warn"`` says so)."""
    try:
        exc.lost_samples = lost  # type: ignore[attr-defined]
    except AttributeError:  # an exception type with __slots__
        pass
