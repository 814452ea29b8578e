"""Write a dataset as ``--part I/N`` tasks on a Dask cluster, then merge them.

Dask ``distributed`` was chosen over Ray after measuring both (BENCHMARKS.md, "The
engine: Dask over Ray"): a smaller install and a faster start. Both run plain Python
functions on remote processes, which is all this needs.

Every Dask worker needs shardkit installed and DEST on a filesystem it shares with the
others (NFS, Lustre, a mounted bucket); SRC must be readable at the same path everywhere.
Each task is one part, so the output depends only on the input and ``parts``. A part
that fails is retried (``retries``) and resumes from its last complete shard.

    from dask.distributed import Client
    from shardkit.writing.dask_engine import write_with_dask

    client = Client("tcp://scheduler:8786")
    manifest = write_with_dask("/data/train", "/shared/shards", parts=64, client=client,
                               shard_size="1GB")
"""

from __future__ import annotations

import logging
from typing import Any

from ..format.index import Manifest
from .merge import merge_parts

log = logging.getLogger(__name__)


def write_part(src: str, dest: str, index: int, count: int, **options: Any) -> dict[str, Any]:
    """One task: ``shardkit write SRC DEST --part index/count`` (keyword options as in
    :func:`shardkit.write`) in the Dask worker's own process; returns a small summary."""
    from .driver import write

    result = write(src, dest, part=(index, count), workers=1, progress=False, **options)
    return {
        "part": index,
        "parts": count,
        "shards": result.shards,
        "samples": result.samples,
        "bytes": result.bytes,
        "skipped": result.skipped,
        "seconds": round(result.seconds, 3),
    }


def write_with_dask(
    src: str,
    dest: str,
    *,
    parts: int,
    client: Any = None,
    address: str | None = None,
    name: str = "data",
    retries: int = 1,
    **options: Any,
) -> tuple[Manifest, list[dict[str, Any]]]:
    """Submit parts ``0..parts-1`` of ``src`` to a Dask cluster, wait, merge; returns the
    merged manifest and the per-part summaries.

    Pass a ``client`` (``dask.distributed.Client``) or a scheduler ``address``. ``options``
    go to :func:`shardkit.write` (``shard_size``, ``max_count``, ``validate``, ``shuffle``,
    ``seed``, ``options=IngestOptions(...)``...). Each part runs in one process (Dask's
    worker processes cannot start their own): scale with ``parts`` and Dask workers.
    """
    for refused in ("workers", "part", "progress"):
        if refused in options:
            raise ValueError(
                f"{refused}= is set by the Dask engine (one process per part, part i of {parts}); "
                "scale with parts= and the number of Dask workers"
            )
    try:
        from dask.distributed import Client
    except ImportError:
        from ..errors import ShardkitError

        raise ShardkitError("the Dask engine needs dask.distributed: pip install 'shardkit[dask]'") from None
    if parts < 1:
        raise ValueError("parts must be at least 1")
    own = client is None
    if own:
        if address is None:
            raise ValueError("pass a dask.distributed Client or a scheduler address")
        client = Client(address)
    try:
        futures = [
            client.submit(
                write_part,
                src,
                dest,
                i,
                parts,
                name=name,
                key=f"shardkit-{name}-part-{i}-of-{parts}",
                retries=retries,
                **options,
            )
            for i in range(parts)
        ]
        summaries = client.gather(futures)
    finally:
        if own:
            client.close()
    manifest = merge_parts(dest, name=name)
    log.info("wrote %d parts on Dask: %d shards, %d samples", parts, len(manifest.shards), manifest.total_samples)
    return manifest, list(summaries)
