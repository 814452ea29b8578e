"""ShardMap: a map-style Dataset over indexed shards, by position or by sample key.

Position ``i`` is the i-th sample in shard order (the order ``ShardDataset`` reads with
shuffling off). ``m[i]`` finds the shard by binary search over cumulative sample counts,
takes the sample's bytes ``[off[j], off[j+1])`` from the shard's ``.idx``, reads exactly
those bytes with one read (``pread`` on a kept-open local file, one HTTP Range / S3 ranged
GET, or a slice of the cached copy when ``cache_dir`` is set), parses them with the tar
parser, groups them into a sample dict and runs decode -> transform -> fields.

``m.get(key)`` looks the key up in a key -> position map built once per ShardMap (and per
process), on first use: from the key tables of version-2 indexes (no shard reads), else
by reading each sample's first member name from the shard (version-1 indexes; logged,
with a hint to rerun ``shardkit index``).

Resources stay bounded: at most ``max_open_files`` local shard files are open (LRU), at
most ``max_indexes`` decoded indexes are kept (LRU), remote reads hold nothing between
calls. Open files belong to the process that opened them: a forked DataLoader worker
notices the new pid and opens its own, and pickles (spawned workers) carry no handles.
"""

from __future__ import annotations

import io
import logging
import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..errors import SampleError, ShardFormatError, ShardkitError, SourceError
from ..format.index import decode_index, decode_index_keys, index_url
from ..format.samples import Sample, group_members, split_name
from ..format.tar import iter_member_tuples
from ..storage.backend import SourceOptions, merge_source_options
from ..storage.dispatch import local_path, open_stream, read_bytes, scheme_of
from .join import Join, JoinSpec, MissingInCompanion, open_join
from .pipeline import SamplePipeline, make_handler
from .stages import Decoding
from .urls import resolve_shards

log = logging.getLogger(__name__)

DEFAULT_MAX_OPEN_FILES = 16
DEFAULT_MAX_INDEXES = 64


class ShardMap(Dataset):
    """Random access to the samples of indexed tar shards (a map-style torch Dataset).

    Args:
        urls: as for ``ShardDataset``: a brace/``<a..b>`` pattern, a list of URLs, a
            ``NAME.manifest.json`` or a folder (local, http(s)://, s3://). Every shard needs
            its ``.idx`` (``ShardWriter`` writes them; ``shardkit index`` adds them).
        decode: None (raw bytes), "pil", "numpy" or "torch"; or a callable on the sample.
        decode_size: DCT-scaled JPEG decoding (an int, or "auto" from ``transform``, which
            also fuses a leading RandomResizedCrop into decoding; "exact" fuses it at full
            resolution), as for ``ShardDataset``; refused with ``decode=None`` or a callable.
        transform: a callable on the sample dict, or ``{"jpg": fn, ...}`` per field.
        fields: turn dicts into tuples, e.g. ``"jpg;png cls"``.
        handler: only "raise": ``m[i]`` must return sample i or fail, it cannot skip.
        cache_dir, cache_size, headers, allow_pipe, source_options: remote sources, as for
            ``ShardDataset``. With a cache the first read of a shard downloads it whole;
            without one each sample is one ranged request. ``pipe:`` URLs need a cache.
        allow_pickle: decode .pickle/.pyd members (only for data you trust).
        exif_orientation: with ``decode``, turn images upright by their EXIF orientation
            (default True, as for ``ShardDataset``).
        max_open_files: local shard files kept open per process (LRU).
        max_indexes: decoded shard indexes kept in memory per process (LRU).
        join, join_wins: companion sets whose fields every sample gains, as for
            ``ShardDataset`` (checked to line up when the map opens); ``m[i]`` reads
            sample i of every part. A sample a companion holds as missing
            (``missing="skip"``) is absent: ``m[i]`` raises
            :class:`~shardkit.read.join.MissingInCompanion`, ``get`` returns None.

    If several samples share a key, ``get`` returns the first in shard order.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        decode: str | Callable[[dict], dict] | None = None,
        decode_size: int | str | None = None,
        transform: Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]] | None = None,
        fields: str | Sequence[str] | None = None,
        handler: str = "raise",
        cache_dir: str | None = None,
        cache_size: int | str | None = None,
        headers: dict[str, dict[str, str]] | None = None,
        allow_pipe: bool = False,
        allow_pickle: bool = False,
        source_options: SourceOptions | None = None,
        max_open_files: int = DEFAULT_MAX_OPEN_FILES,
        max_indexes: int = DEFAULT_MAX_INDEXES,
        exif_orientation: bool = True,
        join: Sequence[JoinSpec] | None = None,
        join_wins: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        if handler != "raise":
            raise ValueError(
                f"ShardMap supports only handler='raise' (got {handler!r}): m[i] must return "
                "sample i or raise; skip bad samples in your sampler or collate_fn instead"
            )
        if max_open_files < 1 or max_indexes < 1:
            raise ValueError("max_open_files and max_indexes must be >= 1")
        self.decoding = Decoding.resolve(
            decode, decode_size, transform, allow_pickle=allow_pickle, exif_orientation=exif_orientation
        )
        self.max_open_files = max_open_files
        self.max_indexes = max_indexes
        self.options = merge_source_options(
            source_options, cache_dir=cache_dir, cache_size=cache_size, headers=headers, allow_pipe=allow_pipe
        )
        shards = resolve_shards(urls, options=self.options)
        self.urls: Sequence[str] = shards.urls
        self.sha256 = shards.sha256
        if join_wins is not None and not join:
            raise ValueError("join_wins decides between the parts of a join; there is no join=")
        self.join: Join | None = None
        self.companions: list[ShardMap] = []  # one raw reader per companion, shards aligned with ours
        if join is not None:
            self.join = open_join(shards, join, wins=join_wins, options=self.options)
            self.companions = [
                ShardMap(part.urls, source_options=self.options, max_open_files=max_open_files, max_indexes=max_indexes)
                for part in self.join.parts
            ]
        pipes = [u for u in self.urls if scheme_of(u) == "pipe"]
        if pipes and not self.options.cache_dir:
            raise ShardkitError(
                f"{pipes[0]}: ShardMap reads pipe: URLs only through cache_dir "
                "(without it every sample would rerun the command)"
            )
        self._reset_process_state()
        self._offsets_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._positions: dict[str, int] | None = None
        self.counts: list[int] | None = None
        local_missing = [u for u in self.urls if (p := local_path(u)) is not None and not os.path.isfile(index_url(p))]
        if local_missing:
            raise _missing_index(local_missing[0], len(local_missing))
        if shards.counts is not None:
            counts = list(shards.counts)
        else:  # no manifest: each shard's .idx gives its count (one small read each, once)
            counts = [len(self._offsets(s)) - 1 for s in range(len(self.urls))]
        self.counts = counts
        self._starts = np.cumsum([0, *counts], dtype=np.int64)
        decoder, transform = self.decoding.stages(transform)
        self._pipeline = SamplePipeline(
            decoder=decoder, transform=transform, fields=fields, handler=make_handler("raise")
        )

    # -- per-process state: open files and the lock guarding them ----------------------
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._files: OrderedDict[int, int] = OrderedDict()  # shard -> fd, LRU

    def _own_process(self) -> None:
        """After a fork, drop (close) the parent's descriptors and lock: the child opens
        its own, so no file position or lock is ever shared between processes."""
        if self._pid != os.getpid():
            for fd in self._files.values():
                try:
                    os.close(fd)  # the child's copy; the parent's stays open
                except OSError:
                    pass
            self._reset_process_state()

    def close(self) -> None:
        """Close this process's open shard files (reading again reopens them)."""
        if self._pid != os.getpid():
            return
        with self._lock:
            while self._files:
                os.close(self._files.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_pid", "_lock", "_files"):
            state.pop(name, None)  # handles never travel in a pickle
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    # -- size and lookup -----------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, sample within the shard) of global position ``i`` (negative counts
        from the end); IndexError outside ``-len(self) <= i < len(self)``."""
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"ShardMap index {i if i >= 0 else i - n} out of range ({n} samples)")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1  # skips empty shards
        return shard, i - int(self._starts[shard])

    def __getitem__(self, i: int) -> Any:
        """Sample ``i`` (global position in shard order), decoded/transformed as configured."""
        shard, j = self.locate(i)
        return self._process(self.raw(shard, j))

    def get(self, key: str) -> Any | None:
        """The sample with ``__key__ == key`` (decoded/transformed), or None when absent
        (with ``join``: also when a companion holds it as missing)."""
        position = self.position(key)
        if position is None:
            return None
        try:
            return self[position]
        except MissingInCompanion:
            return None

    def position(self, key: str) -> int | None:
        """Global position of the sample with this key (the first, if repeated), or None."""
        return self._key_positions().get(key)

    def _process(self, sample: Sample) -> Any:
        try:
            return self._pipeline(sample)
        except ShardkitError:
            raise
        except Exception as e:  # noqa: BLE001 - named like ShardDataset names them
            raise SampleError(f"{type(e).__name__}: {e}", url=sample.get("__url__"), key=sample.get("__key__")) from e

    # -- reading ---------------------------------------------------------------------------
    def raw(self, shard: int, j: int) -> Sample:
        """Sample ``j`` of shard ``shard`` as raw bytes (``__key__``, ``__url__``, fields),
        with the fields of every companion when joined."""
        sample = self._raw(shard, j)
        if self.join is None:
            return sample
        joined = self.join.merge([sample, *(c.raw(shard, j) for c in self.companions)], self.urls[shard])
        if joined is None:
            raise MissingInCompanion(
                "a companion holds this sample as missing (written with missing='skip')",
                url=self.urls[shard],
                key=sample["__key__"],
            )
        return joined

    def _raw(self, shard: int, j: int) -> Sample:
        self._own_process()
        offsets = self._offsets(shard)
        start, stop = int(offsets[j]), int(offsets[j + 1])
        url = self.urls[shard]
        path = local_path(url)
        if path is not None:
            samples = _parse(io.BytesIO(self._pread(shard, path, start, stop)), url, start, stop)
        else:  # one ranged request (or a slice of the cached shard)
            stream = open_stream(
                url,
                offset=start,
                length=stop - start,
                options=self.options,
                expected_sha256=self.sha256[shard] if self.sha256 else None,
            )
            try:
                samples = _parse(stream, url, start, stop)
            finally:
                stream.close()
        if len(samples) != 1:
            raise ShardFormatError(
                f"the index puts sample {j} at bytes [{start}, {stop}) but they hold "
                f"{len(samples)} samples (stale index? rerun `shardkit index`)",
                url=url,
                offset=start,
            )
        return samples[0]

    def _pread(self, shard: int, path: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of a local shard, through a descriptor kept open (LRU,
        at most ``max_open_files``). ``pread`` uses no shared file position."""
        # The lock spans the read: another thread must not close (and the OS reuse) the
        # descriptor while it is in use.
        with self._lock:
            fd = self._files.get(shard)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as e:
                    raise SourceError(f"cannot open: {e.strerror}", url=path) from None
                self._files[shard] = fd
                while len(self._files) > self.max_open_files:
                    os.close(self._files.popitem(last=False)[1])
            else:
                self._files.move_to_end(shard)
            parts = []
            here = start
            while here < stop:
                part = os.pread(fd, stop - here, here)
                if not part:
                    raise ShardFormatError(
                        f"truncated archive: the index says a sample ends at byte {stop} but the file ends at {here}",
                        url=path,
                        offset=here,
                    )
                parts.append(part)
                here += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- indexes ---------------------------------------------------------------------------
    def _index_bytes(self, shard: int) -> bytes:
        url = self.urls[shard]
        data = read_bytes(index_url(url), options=self.options)
        if data is None:
            raise _missing_index(url, 1)
        return data

    def _remember(self, shard: int, offsets: np.ndarray) -> np.ndarray:
        if self.counts is not None and len(offsets) - 1 != self.counts[shard]:
            raise ShardFormatError(
                f"index lists {len(offsets) - 1} samples but the manifest says {self.counts[shard]}",
                url=index_url(self.urls[shard]),
            )
        with self._lock:
            self._offsets_cache[shard] = offsets
            while len(self._offsets_cache) > self.max_indexes:
                self._offsets_cache.popitem(last=False)
        return offsets

    def _offsets(self, shard: int) -> np.ndarray:
        """The shard's sample offsets (N+1), from the LRU or its ``.idx``."""
        self._own_process()  # a lock copied by fork may be held forever
        with self._lock:
            offsets = self._offsets_cache.get(shard)
            if offsets is not None:
                self._offsets_cache.move_to_end(shard)
                return offsets
        url = index_url(self.urls[shard])
        return self._remember(shard, decode_index(self._index_bytes(shard), url=url))

    def _key_positions(self) -> dict[str, int]:
        """key -> first global position, built once: from version-2 key tables, else by
        reading each sample's first member name."""
        if self._positions is not None:
            return self._positions
        assert self.counts is not None
        positions: dict[str, int] = {}
        scanned = 0
        for shard, url in enumerate(self.urls):
            if not self.counts[shard]:
                continue
            data = self._index_bytes(shard)
            offsets = self._remember(shard, decode_index(data, url=index_url(url)))
            keys = decode_index_keys(data, url=index_url(url))
            if keys is None:
                if not scanned:
                    log.warning(
                        "%s has a version-1 index without sample keys: reading the keys from the "
                        "shards once (rerun `shardkit index` on them to skip this)",
                        index_url(url),
                    )
                scanned += 1
                keys = self._scan_keys(shard, offsets)
            base = int(self._starts[shard])
            for j, key in enumerate(keys):
                positions.setdefault(key, base + j)
        if scanned:
            log.info("read the sample keys of %d shard(s) without keys in their index", scanned)
        self._positions = positions
        return positions

    def _scan_keys(self, shard: int, offsets: np.ndarray) -> list[str]:
        """Sample keys of a shard whose index has none."""
        url = self.urls[shard]
        path = local_path(url)
        if path is None:
            return self._stream_keys(shard, offsets)
        # Local: parse only each sample's first member, at its indexed offset (the parser
        # memory-maps the file, so the rest of the sample is never read).
        keys = []
        with open(path, "rb") as f:
            for j in range(len(offsets) - 1):
                start, stop = int(offsets[j]), int(offsets[j + 1])
                members = iter_member_tuples(f, url=url, start=start, stop=stop)
                try:
                    key = next((parts[0] for name, _, _, _ in members if (parts := split_name(name))), None)
                finally:
                    members.close()  # type: ignore[attr-defined] # a generator: unmap the file now
                if key is None:
                    raise ShardFormatError(f"no sample at index offset {start}", url=url, offset=start)
                keys.append(key)
        return keys

    def _stream_keys(self, shard: int, offsets: np.ndarray) -> list[str]:
        # Remote: one sequential read of the shard beats one request per sample.
        url = self.urls[shard]
        stop = int(offsets[-1])
        stream = open_stream(url, options=self.options, expected_sha256=self.sha256[shard] if self.sha256 else None)
        try:
            found = [
                (start, s["__key__"])
                for start, _, s in group_members(iter_member_tuples(stream, url=url, stop=stop), url=url)
            ]
        finally:
            stream.close()
        if [start for start, _ in found] != [int(o) for o in offsets[:-1]]:
            raise ShardFormatError(
                "the index offsets do not match the shard's samples (rerun `shardkit index`)", url=index_url(url)
            )
        return [key for _, key in found]


def _parse(stream: Any, url: str, start: int, stop: int) -> list[Sample]:
    """The samples in bytes ``[start, stop)`` of a shard, read from ``stream``."""
    return [s for _, _, s in group_members(iter_member_tuples(stream, url=url, start=start, stop=stop), url=url)]


def _missing_index(url: str, missing: int) -> ShardkitError:
    more = f" (and {missing - 1} more shard(s))" if missing > 1 else ""
    return ShardkitError(
        f"{url}: no index {index_url(url)}{more}; ShardMap needs each shard's sample offsets: "
        "run `shardkit index` on the shards (and copy the .idx files beside remote ones)"
    )
