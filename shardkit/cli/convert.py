"""``shardkit write``: stream a sample source into shards, with progress and a summary."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

from ..format.index import Manifest
from ..writing.parallel import WriteResult, shard_pattern
from ..writing.writer import ShardWriter

log = logging.getLogger(__name__)


def write_shards(
    samples: Iterable[dict[str, Any]],
    dest: str,
    *,
    name: str = "data",
    shard_size: int | str = "1GB",
    max_count: int | None = None,
    classes: list[str] | None = None,
    total: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> WriteResult:
    """Write every sample of ``samples`` to shards in ``dest``; returns a summary.

    On Ctrl-C or an error the shards written so far are kept and listed in a manifest
    marked incomplete, then the exception propagates.
    """
    started = time.perf_counter()
    with ShardWriter(
        dest, name=name, shard_size=shard_size, max_count=max_count, classes=classes, overwrite=overwrite
    ) as writer:
        bar = tqdm(total=total, unit="sample", disable=not progress, smoothing=0.1, dynamic_ncols=True)
        try:
            for sample in samples:
                writer.write(sample)
                bar.update(1)
                if bar.n % 256 == 0:
                    done = writer.bytes_written + writer._size
                    bar.set_postfix_str(f"{done / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.0f} MB/s", refresh=False)
        finally:
            bar.close()
    manifest: Manifest = writer.manifest()
    return WriteResult(
        shards=len(manifest.shards),
        samples=manifest.total_samples,
        bytes=manifest.total_bytes,
        seconds=time.perf_counter() - started,
        pattern=shard_pattern(dest, name, len(manifest.shards)),
        manifest=os.path.join(dest, f"{name}.manifest.json"),
    )
