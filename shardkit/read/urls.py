"""Turn what the user wrote into an ordered shard list (with counts when known).

Accepted: a brace pattern ``train-{000..099}.tar`` (several patterns joined by ``::``
or given as a list), the same range written ``train-<000..099>.tar``, a list of URLs,
a manifest (``NAME.manifest.json``), or a folder/prefix holding shards. Zero padding is
kept as written. Sample counts come from a manifest (given, or found beside the shards)
or from per-shard ``.idx`` files; without them splitting falls back to whole shards.
Only a sidecar that is not found counts as absent: one that exists but cannot be read
is an error naming its URL, never a quiet change of plan.

A manifest's shards stay as compact as the manifest holds them: counts in one array
(:class:`~shardkit.format.columns.IntColumn`), sha256 in one block, URLs made on access
from the manifest's URL and the shard names (:class:`ShardUrls`), so resolving a manifest
of 580k shards builds no per-shard Python objects.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import braceexpand
import numpy as np

from ..errors import ShardkitError, SourceError
from ..format.columns import Digests, IntColumn
from ..format.compression import is_shard_name
from ..format.index import (
    MANIFEST_SUFFIX,
    Manifest,
    dataset_name_for,
    decode_index,
    index_url,
    manifest_name,
    manifest_text,
)
from ..storage.dispatch import (
    DEFAULT_OPTIONS,
    SourceOptions,
    join_url,
    list_prefix,
    local_path,
    read_bytes,
    read_optional,
    scheme_of,
)

log = logging.getLogger(__name__)

_ANGLE_RANGE = re.compile(r"<(\d+)\.\.(\d+)>")


class ShardUrls(Sequence[str]):
    """The URLs of a manifest's shards, each made on access from the manifest's URL and
    the shard's name (``join_url``); compares equal to the list of the same URLs."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, manifest_url: str, names: Sequence[str]) -> None:
        self.manifest_url = manifest_url
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return join_url(self.manifest_url, self.names[index])

    def __iter__(self) -> Iterator[str]:
        return (join_url(self.manifest_url, name) for name in self.names)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return False
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        first = f"{self[0]!r}, ..." if len(self) else ""
        return f"ShardUrls([{first}] {len(self)} shards of {self.manifest_url})"


@dataclass
class ShardList:
    """Shard URLs in order; ``counts``/``sha256`` aligned with them when known.

    ``urls`` is a list, or :class:`ShardUrls` for a manifest's shards; ``counts`` an
    :class:`~shardkit.format.columns.IntColumn` and ``sha256`` a
    :class:`~shardkit.format.columns.Digests` (both compare equal to lists)."""

    urls: Sequence[str]
    counts: IntColumn | None = None
    sha256: Digests | None = None
    manifest: Manifest | None = None
    manifest_url: str | None = None

    @property
    def total(self) -> int | None:
        return self.counts.total if self.counts is not None else None


def expand_pattern(pattern: str) -> list[str]:
    """Expand ``{a..b}``/``<a..b>`` ranges and ``{x,y}`` alternatives, keeping zero padding."""
    return list(braceexpand.braceexpand(_ANGLE_RANGE.sub(r"{\1..\2}", pattern)))


def _is_manifest(url: str) -> bool:
    return url.endswith(MANIFEST_SUFFIX)


def _is_folder(url: str) -> bool:
    path = local_path(url)
    if path is not None:
        return os.path.isdir(path)
    return url.endswith("/")


def load_manifest(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> Manifest:
    data = read_bytes(url, options=options)
    if data is None:
        raise SourceError("manifest not found", url=url)
    text = manifest_text(data, url=url)
    del data  # parse with one copy of the text in memory (tens of MB at 580k shards)
    return Manifest.from_json(text, url=url)


def _from_manifest(url: str, options: SourceOptions) -> ShardList:
    manifest = load_manifest(url, options)
    if not manifest.complete:
        log.warning(
            "%s: manifest marked incomplete (the write was interrupted); reading the %d shards it lists",
            url,
            len(manifest.shards),
        )
    table = manifest.table
    return ShardList(ShardUrls(url, table.names), table.samples, table.sha256, manifest, url)


def _from_folder(url: str, options: SourceOptions) -> ShardList:
    entries = list_prefix(url, options=options)
    manifests = [e for e in entries if _is_manifest(e)]
    if len(manifests) == 1:
        return _from_manifest(manifests[0], options)
    if len(manifests) > 1:
        raise ShardkitError(
            f"{url}: holds several manifests ({', '.join(os.path.basename(m) for m in manifests)}); "
            "pass the one you mean"
        )
    shards = sorted(e for e in entries if is_shard_name(e))
    if not shards:
        raise ShardkitError(
            f"{url}: no .tar shards or manifest found there (also looked for .tar.gz, .tgz, "
            ".tar.zst, .tar.bz2, .tar.xz)"
        )
    return _counts_beside(shards, options)  # a folder of indexed shards plans by sample, like a pattern


def _check_local_exist(urls: list[str]) -> None:
    missing = [u for u in urls if (p := local_path(u)) is not None and not os.path.isfile(p)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ShardkitError(f"{len(missing)} of {len(urls)} shard(s) do not exist: {', '.join(missing[:3])}{more}")


def _counts_beside(urls: list[str], options: SourceOptions) -> ShardList:
    """Counts for a plain URL list: a manifest beside the shards, else .idx files."""
    candidate = join_url(urls[0], manifest_name(dataset_name_for(urls)))
    data = read_optional(candidate, options=options)
    if data is not None:
        manifest = Manifest.from_json(data, url=candidate)  # unreadable: an error naming it
        table = manifest.table
        by_url = {u: i for i, u in enumerate(ShardUrls(candidate, table.names))}
        if all(u in by_url for u in urls):
            rows = np.array([by_url[u] for u in urls], dtype=np.int64)
            return ShardList(urls, IntColumn(table.samples.array[rows]), table.sha256.take(rows), manifest, candidate)
    counts: list[int] = []
    for u in urls:
        if scheme_of(u) not in ("", "file"):
            return ShardList(urls)  # one request per shard is too costly just for counts
        data = read_optional(index_url(u), options=options)
        if data is None:
            return ShardList(urls)
        counts.append(len(decode_index(data, url=index_url(u))) - 1)
    return ShardList(urls, IntColumn(counts))


def resolve_shards(urls: str | Sequence[str], *, options: SourceOptions = DEFAULT_OPTIONS) -> ShardList:
    """Resolve patterns, lists, manifests and folders into a :class:`ShardList`."""
    if isinstance(urls, (str, os.PathLike)):
        items = [p for p in str(urls).split("::") if p]
    else:
        items = [str(u) for u in urls]
    if not items:
        raise ShardkitError("no shard URLs given")
    if len(items) == 1 and _is_manifest(items[0]):
        return _from_manifest(items[0], options)
    if len(items) == 1 and _is_folder(items[0]):
        return _from_folder(items[0], options)
    expanded: list[str] = []
    for item in items:
        found = expand_pattern(item)
        if not found:
            raise ShardkitError(f"pattern {item!r} expands to no URLs")
        expanded.extend(found)
    if len(set(expanded)) != len(expanded):
        dup = next(u for u in expanded if expanded.count(u) > 1)
        raise ShardkitError(f"shard {dup} is listed more than once")
    _check_local_exist(expanded)
    return _counts_beside(expanded, options)
