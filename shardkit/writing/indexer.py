"""Sidecars for existing tar shards (what ``shardkit index`` does): a ``.idx`` beside each
shard and one manifest for the set, so shards written by other tools (webdataset, GNU tar)
get exact counts, ``len()`` and sample-level splits.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence

from ..errors import ShardkitError
from ..format.index import Manifest, ShardInfo, dataset_name_for, encode_index, manifest_name, scan_shard
from ..storage.backend import local_path
from ..storage.localfile import atomic_write

log = logging.getLogger(__name__)


def build_index(urls: Sequence[str], *, name: str | None = None, progress: bool = False) -> Manifest:
    """Write ``.idx`` sidecars and a manifest for the local tar shards ``urls`` (paths or
    ``file://`` URLs, all in one folder), one pass over each; returns the manifest.

    The manifest is named ``name`` (default: from the shard names) and written beside the
    shards. A compressed shard gets no index (offsets cannot seek into it): its counts go
    to the manifest only, and a stale index beside it is removed.
    """
    from tqdm import tqdm

    if not urls:
        raise ShardkitError("no shards to index")
    infos = []
    folder = None
    for url in tqdm(urls, unit="shard", disable=not progress):
        path = local_path(url)
        if path is None:
            raise ShardkitError(f"{url}: `shardkit index` writes sidecars next to local shards only")
        with open(path, "rb") as f:
            scan = scan_shard(io.BufferedReader(f, 1 << 20), url=url)  # type: ignore[arg-type]
        if scan.compression is None:
            atomic_write(path + ".idx", encode_index(scan.offsets, scan.keys))
        elif os.path.exists(path + ".idx"):
            log.warning(
                "%s is %s-compressed: removing its stale .idx (counts go to the manifest)", url, scan.compression
            )
            os.remove(path + ".idx")
        infos.append(ShardInfo(os.path.basename(path), len(scan.offsets) - 1, scan.bytes, scan.sha256, scan.fields))
        folder = folder or os.path.dirname(path)
        if os.path.dirname(path) != folder:
            raise ShardkitError("`shardkit index` needs all shards in one folder (the manifest sits beside them)")
    manifest = Manifest(infos, name=name or dataset_name_for(list(urls)))
    atomic_write(os.path.join(folder or ".", manifest_name(manifest.name)), manifest.to_json().encode())
    return manifest
