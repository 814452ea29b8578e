"""The base set of a companion write: its manifest (and that manifest's sha256, which the
companion records), its shard URLs, and its samples or keys, shard by shard, read with
the storage and format layers (the write side does not import the read side).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ShardkitError
from ..format.companion import base_ref, companion_shard_name, manifest_sha256
from ..format.index import MANIFEST_SUFFIX, Manifest, decode_index_keys, index_url
from ..format.samples import Sample, iter_samples
from ..storage.backend import DEFAULT_OPTIONS, SourceOptions, local_path
from ..storage.dispatch import join_url, list_prefix, open_stream, read_bytes


@dataclass(frozen=True)
class BaseSet:
    """The set a companion is written for: its manifest (bytes' sha256) and shard URLs."""

    manifest_url: str
    manifest: Manifest
    sha256: str
    urls: list[str]

    @property
    def ref(self) -> dict[str, str]:
        """What the companion manifest records about this base."""
        return base_ref(self.manifest.name, self.manifest_url, self.sha256)

    @property
    def counts(self) -> list[int]:
        return [s.samples for s in self.manifest.shards]

    @property
    def companion_names(self) -> list[str]:
        return [companion_shard_name(s.name) for s in self.manifest.shards]

    def keys(self, shard: int, options: SourceOptions) -> list[str]:
        """Shard ``shard``'s keys: from its version-2 ``.idx`` (no shard read), else from the shard."""
        url = self.urls[shard]
        try:
            data = read_bytes(index_url(url), options=options)
        except ShardkitError:
            data = None
        keys = decode_index_keys(data, url=index_url(url)) if data is not None else None
        if keys is None:
            keys = [s["__key__"] for s in self.samples(shard, options)]
        self._check_count(shard, len(keys))
        return keys

    def samples(self, shard: int, options: SourceOptions) -> Iterator[Sample]:
        """Shard ``shard``'s samples, in order, raw; its count is checked against the manifest."""
        url = self.urls[shard]
        stream = open_stream(url, options=options, expected_sha256=self.manifest.shards[shard].sha256)
        n = 0
        try:
            for sample in iter_samples(stream, url=url):
                n += 1
                yield sample
        finally:
            stream.close()
        self._check_count(shard, n)

    def _check_count(self, shard: int, n: int) -> None:
        want = self.manifest.shards[shard].samples
        if n != want:
            raise ShardkitError(
                f"{self.urls[shard]}: has {n} samples, the base manifest {self.manifest_url} says {want}"
            )


def open_base(base: str, options: SourceOptions = DEFAULT_OPTIONS) -> BaseSet:
    """The base set named by ``base``: its manifest (``NAME.manifest.json``), or a folder
    (local, or a URL ending in ``/``) holding exactly one manifest."""
    url = _manifest_url(os.fspath(base), options)
    data = read_bytes(url, options=options)
    if data is None:
        raise ShardkitError(f"{url}: no such manifest")
    manifest = Manifest.from_json(data, url=url)
    if not manifest.complete:
        raise ShardkitError(f"{url}: the base's manifest is marked incomplete; finish writing the base first")
    if manifest.base is not None:
        raise ShardkitError(
            f"{url} is itself a companion (of {manifest.base['manifest']}): write companions of the base set"
        )
    path = local_path(url)
    if path is not None:
        url = os.path.abspath(path)
    return BaseSet(url, manifest, manifest_sha256(data), [join_url(url, s.name) for s in manifest.shards])


def _manifest_url(base: str, options: SourceOptions) -> str:
    if base.endswith(MANIFEST_SUFFIX):
        return base
    path = local_path(base)
    if (path is not None and os.path.isdir(path)) or (path is None and base.endswith("/")):
        found = [e for e in list_prefix(base, options=options) if e.endswith(MANIFEST_SUFFIX)]
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(os.path.basename(f) for f in found)
            raise ShardkitError(f"{base}: holds several manifests ({names}); pass the base's")
        raise ShardkitError(f"{base}: no manifest there; a companion needs its base's (run `shardkit index` on it)")
    raise ShardkitError(f"{base}: name the base set by its manifest (NAME.manifest.json) or its folder")
