"""Joined datasets: a base shard set and its companion sets, read in lockstep.

A companion (see :mod:`shardkit.format.companion`, written by
:func:`shardkit.writing.companion.write_companion`) holds new fields for the samples of a
base set, in shards of the same names, counts and key order. :func:`open_join` proves
that when a dataset opens: each companion's manifest must record the sha256 of the
base's manifest, name every base shard read with its sample count, and (for local
parts, whose ``.idx`` key tables are cheap to read) hold the same keys in the same order;
a mismatch is an error naming the shard. A field held by two parts is refused unless
``wins`` names the part whose value is kept (0 is the base, 1 the first companion...).

:class:`JoinedReader` has the ShardReader's contract (``read_piece``/``read_shard``), so
the planner and the worker loop need no change: for each piece it opens one stream per
part on the same shard and sample range and merges the samples one by one, checking
every key. A companion sample that is only the ``__missing__`` marker (written with
``missing="skip"``) drops the joined sample, counted as filtered like a ``select`` reject.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from ..errors import SampleError, ShardkitError
from ..format.companion import (
    MISSING,
    alignment_problems,
    companion_shard_name,
    first_key_mismatch,
    manifest_sha256,
)
from ..format.index import Manifest, decode_index_keys, index_url
from ..format.samples import Sample
from ..plan.epoch import Piece
from ..storage.dispatch import SourceOptions, local_path, read_bytes
from .reader import ErrorHandler, ReadStats, ShardReader
from .stages import StageHooks
from .urls import ShardList, resolve_shards

log = logging.getLogger(__name__)

#: What ``join=`` takes: companions, each given as ``urls`` is (pattern, list, manifest, folder).
JoinSpec = str | Sequence[str]


class MissingInCompanion(SampleError):
    """Random access (``ShardMap``) to a sample a companion holds as missing."""


@dataclass(frozen=True)
class JoinPart:
    """One companion, its shards aligned with the base's (shard i holds base shard i's fields)."""

    label: str  # how messages name it
    urls: list[str]
    sha256: list[str | None] | None
    fields: tuple[str, ...]


@dataclass(frozen=True)
class Join:
    """A base set's companions, checked to line up, and which part wins each shared field."""

    parts: tuple[JoinPart, ...]
    wins: Mapping[str, int]
    base_fields: tuple[str, ...]

    def merge(self, samples: Sequence[Sample], url: str) -> Sample | None:
        """One joined sample from the parts' samples (base first); None when a companion
        holds the ``__missing__`` marker for it. Raises SampleError on a key mismatch or
        on a field two parts hold that ``wins`` does not decide."""
        out = dict(samples[0])
        key = out["__key__"]
        drop = False
        for number, sample in enumerate(samples[1:], 1):
            if sample["__key__"] != key:
                raise SampleError(
                    f"{self.parts[number - 1].label} has key {sample['__key__']!r} where the base has {key!r}: "
                    "the parts are not aligned",
                    url=url,
                    key=key,
                )
            if MISSING in sample:
                drop = True
            for name, value in sample.items():
                if name.startswith("__"):
                    continue
                if name in out and self.wins.get(name, -1) != number:
                    if name not in self.wins:
                        raise SampleError(
                            f"field {name!r} is in two parts (the second: {self.parts[number - 1].label}); "
                            "name the part that wins with join_wins",
                            url=url,
                            key=key,
                        )
                    continue
                out[name] = value
        return None if drop else out


def _label(spec: JoinSpec, number: int) -> str:
    shown = spec if isinstance(spec, str) else (spec[0] + (", ..." if len(spec) > 1 else "") if spec else "[]")
    return f"companion {number} ({shown})"


def open_join(
    base: ShardList,
    join: Sequence[JoinSpec],
    *,
    wins: Mapping[str, int] | None = None,
    options: SourceOptions,
) -> Join:
    """Resolve the companions in ``join`` against ``base`` and prove they line up (see the
    module docstring); raises ShardkitError naming the shard or field that does not."""
    if isinstance(join, str):
        raise TypeError(f"join takes a list of companions, e.g. join=[{join!r}]")
    if not join:
        raise ValueError("join=[] names no companion")
    if base.manifest is None or base.manifest_url is None:
        raise ShardkitError(
            f"{base.urls[0] if base.urls else 'the base'}: a join needs the base set's manifest "
            "(NAME.manifest.json beside its shards), which its companions record"
        )
    data = read_bytes(base.manifest_url, options=options)
    if data is None:
        raise ShardkitError(f"{base.manifest_url}: the base manifest is gone")
    sha256 = manifest_sha256(data)
    names = [_name(u) for u in base.urls]
    parts = []
    for number, spec in enumerate(join, 1):
        label = _label(spec, number)
        shards = resolve_shards(spec, options=options)
        if shards.manifest is None:
            raise ShardkitError(f"{label}: no manifest found; a companion set has one recording its base")
        problems = alignment_problems(base.manifest, sha256, shards.manifest, shards=names)
        if problems:
            shard, message = problems[0]
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            where = f"shard {shard}" if shard else f"base {base.manifest_url}"
            raise ShardkitError(f"{label} does not line up with {where}: {message}{more}")
        by_name = {_name(u): i for i, u in enumerate(shards.urls)}
        picked = []
        for name in names:
            i = by_name.get(companion_shard_name(name))
            if i is None:  # listed in its manifest, but not among the URLs given
                raise ShardkitError(f"{label}: has no shard for base shard {name} among the URLs given")
            picked.append(i)
        urls = [shards.urls[i] for i in picked]
        sha = [shards.sha256[i] for i in picked] if shards.sha256 is not None else None
        parts.append(JoinPart(label, urls, sha, _fields(shards.manifest, [_name(u) for u in urls])))
        _check_key_tables(base.urls, urls, label, options)
    base_fields = _fields(base.manifest, names)
    return Join(tuple(parts), _check_wins(wins or {}, base_fields, parts), base_fields)


def _name(url: str) -> str:
    """A shard's file name, as its manifest lists it."""
    path = local_path(url)
    return os.path.basename(path) if path is not None else url.rsplit("/", 1)[-1]


def _fields(manifest: Manifest, names: list[str]) -> tuple[str, ...]:
    """The fields the manifest lists for the shards ``names``."""
    wanted = set(names)
    return tuple(sorted({f for s in manifest.shards if s.name in wanted for f in s.fields}))


def _check_wins(wins: Mapping[str, int], base_fields: tuple[str, ...], parts: list[JoinPart]) -> dict[str, int]:
    holders: dict[str, list[int]] = {}
    for number, fields in enumerate([base_fields, *(p.fields for p in parts)]):
        for name in {f.lower() for f in fields}:  # readers lower-case extensions
            holders.setdefault(name, []).append(number)
    labels = ["the base", *(p.label for p in parts)]
    out = {}
    for name, number in wins.items():
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= len(parts):
            raise ValueError(f"join_wins[{name!r}] must be a part number, 0 (the base) to {len(parts)}, got {number!r}")
        held = holders.get(name.lower(), [])
        if number not in held:
            raise ShardkitError(f"join_wins[{name!r}] names {labels[number]}, which has no field {name!r}")
        if len(held) < 2:
            raise ShardkitError(
                f"join_wins[{name!r}]: only {labels[number]} has field {name!r}; there is nothing to decide"
            )
        out[name.lower()] = number
    clashes = {name: held for name, held in holders.items() if len(held) > 1 and name not in out}
    if clashes:
        name, held = sorted(clashes.items())[0]
        also = f" (also: {', '.join(sorted(clashes)[1:])})" if len(clashes) > 1 else ""
        raise ShardkitError(
            f"field {name!r} is in {' and '.join(labels[n] for n in held)}; name the part whose value is kept, "
            f"e.g. join_wins={{{name!r}: {held[-1]}}} (--join-wins {name}={held[-1]}){also}"
        )
    return out


def _check_key_tables(base_urls: Sequence[str], urls: Sequence[str], label: str, options: SourceOptions) -> None:
    """Compare the ``.idx`` key tables of local parts shard by shard (remote ones are
    checked key by key while reading: a request per shard at open would cost more)."""
    for base_url, url in zip(base_urls, urls):
        if local_path(base_url) is None or local_path(url) is None:
            continue
        keys = [_index_keys(u, options) for u in (base_url, url)]
        if keys[0] is None or keys[1] is None:
            continue
        problem = first_key_mismatch(keys[0], keys[1])
        if problem:
            raise ShardkitError(f"{label} does not line up with shard {base_url}: its companion shard {problem}")


def _index_keys(url: str, options: SourceOptions) -> list[str] | None:
    data = read_bytes(index_url(url), options=options)
    return None if data is None else decode_index_keys(data, url=index_url(url))


def _note_lost(exc: Exception, lost: int) -> None:
    """Tell the handler how many planned samples the error costs, as the ShardReader does."""
    try:
        exc.lost_samples = lost  # type: ignore[attr-defined]
    except AttributeError:  # an exception type with __slots__
        pass


class JoinedReader(ShardReader):
    """A ShardReader of the base shards that joins its companions' samples in lockstep:
    same ``read_piece``/``read_shard`` contract, so the worker loop runs it unchanged.

    Its own stream is the base's (into ``stats``); ``parts`` (one ShardReader per
    companion, aligned with ``join.parts``) keep their own stats, whose bytes and opened
    streams are added to ``stats``. ``hooks`` observe the joined "read" stream.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        parts: Sequence[ShardReader],
        join: Join,
        options: SourceOptions,
        handler: ErrorHandler,
        stats: ReadStats | None = None,
        sha256: Sequence[str | None] | None = None,
        hooks: StageHooks | None = None,
        fields: str | Sequence[str] | None = None,
    ) -> None:
        if len(parts) != len(join.parts):
            raise ValueError(f"{len(parts)} readers for {len(join.parts)} companions")
        # No hooks for the base's own stream: read_hooks observe the joined one.
        super().__init__(urls, options=options, handler=handler, stats=stats, sha256=sha256, fields=fields)
        self.parts = list(parts)
        self.join = join
        self.read_hooks = hooks or StageHooks()
        self._positions: dict[str, int] | None = None
        self._counted = [(0, 0)] * len(self.parts)  # the parts' (bytes, streams) already in stats

    def prefetch(self, urls: list[str]) -> None:
        """Start downloading the shards of ``urls`` (base URLs) of every part into the cache."""
        if not urls:
            return
        if self._positions is None:
            self._positions = {u: i for i, u in enumerate(self.urls)}
        shards = [self._positions[u] for u in urls]
        super().prefetch(urls)
        for part in self.parts:
            part.prefetch([part.urls[s] for s in shards])

    def read_piece(self, piece: Piece) -> Iterator[Sample | None]:
        """Samples ``piece.start..piece.stop`` of a shard, joined; ``None`` for each one lost
        (to a read error in any part) or dropped (a ``__missing__`` marker)."""
        streams = [super().read_piece(piece), *(part.read_piece(piece) for part in self.parts)]
        return self.read_hooks.wrap_iter("read", self._joined(piece.shard, zip(*streams), planned=True))

    def read_shard(self, shard: int) -> Iterator[Sample]:
        """All joined samples of a shard; a part that ends early ends it through the handler."""
        streams = [super().read_shard(shard), *(part.read_shard(shard) for part in self.parts)]
        rows = itertools.zip_longest(*streams)
        joined = (s for s in self._joined(shard, rows, planned=False) if s is not None)
        return self.read_hooks.wrap_iter("read", joined)

    def _joined(
        self, shard: int, rows: Iterator[tuple[Sample | None, ...]], *, planned: bool
    ) -> Iterator[Sample | None]:
        url = self.urls[shard]
        for row in rows:
            self._count_parts()
            if any(s is None for s in row):
                if planned:  # a part lost it to a read error (its handler saw it)
                    if row[0] is not None:
                        self.stats.skipped += 1
                    yield None
                    continue
                self._uneven(shard, row)
                return
            try:
                merged = self.join.merge(row, url)  # type: ignore[arg-type]
            except ShardkitError as e:
                _note_lost(e, 1)
                self.handler(e)
                self.stats.skipped += 1
                yield None
                continue
            if merged is None:
                self.stats.filtered += 1
            yield merged
        self._count_parts()

    def _count_parts(self) -> None:
        """Add what the companions read since the last call to ``stats`` (bytes, streams
        opened), so each item's progress record counts every part."""
        for number, part in enumerate(self.parts):
            now = (part.stats.bytes_read, part.stats.shards_opened)
            before = self._counted[number]
            self.stats.bytes_read += now[0] - before[0]
            self.stats.shards_opened += now[1] - before[1]
            self._counted[number] = now

    def _uneven(self, shard: int, row: tuple[Sample | None, ...]) -> None:
        """Unplanned reading: one part's shard ended before another's."""
        labels = ["the base", *(p.label for p in self.join.parts)]
        ended = [labels[i] for i, s in enumerate(row) if s is None]
        e = ShardkitError(
            f"{self.urls[shard]}: {', '.join(ended)} ended before the other parts: the parts are not aligned"
        )
        _note_lost(e, 0)
        self.handler(e)
        self.stats.skipped += 1
