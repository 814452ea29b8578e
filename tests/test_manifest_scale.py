"""Manifests at LAION scale: no Python object per shard, from the JSON to the dataset.

A 5.8 B-sample dataset (580k shards of 10k samples, LAION-5B) is read within a bound
that only compact columns can meet (tracemalloc sees numpy's buffers): what is kept is
the columns' own bytes (32 for the sha256, 8 + 8 for the counts and sizes, 4 for the
field set of each shard), and a DataLoader worker receives no more than that."""

from __future__ import annotations

import os
import pickle
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from shardkit.format.columns import Digests, FieldSets, IntColumn, PatternNames
from shardkit.format.manifest import Manifest, ShardInfo, ShardTable
from shardkit.read.dataset import ShardDataset
from shardkit.read.urls import ShardUrls

MB = 1 << 20
LAION_5B = 580_000  # shards of 10k samples
COLUMN_BYTES = 32 + 8 + 8 + 4  # per shard: sha256, samples, bytes, field-set id


def traced(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """fn's result, the memory it allocated at its peak and what it still holds (bytes)."""
    tracemalloc.start()
    try:
        result = fn()
        held, peak = tracemalloc.get_traced_memory()
        return result, peak, held
    finally:
        tracemalloc.stop()


def laion_like(shards: int) -> Manifest:
    rng = np.random.default_rng(0)
    table = ShardTable(
        PatternNames("laion-", ".tar", digits=6, count=shards),
        IntColumn(np.full(shards, 10_000)),
        IntColumn(rng.integers(1 << 29, 1 << 30, shards)),
        Digests(rng.bytes(32 * shards)),
        FieldSets([["jpg", "json", "txt"]], np.zeros(shards, dtype=np.int64)),
    )
    return Manifest(table, name="laion")


def test_laion_5b_manifest_is_read_into_columns_only():
    text = laion_like(LAION_5B).to_json()
    manifest, peak, held = traced(lambda: Manifest.from_json(text, url="laion.manifest.json"))
    assert held < LAION_5B * COLUMN_BYTES * 1.05
    assert peak < held + 16 * MB  # numbers parsed by numpy, digests decoded in slices
    assert manifest.total_samples == 5_800_000_000 and len(manifest.shards) == LAION_5B
    assert manifest.shards[LAION_5B - 1].name == "laion-579999.tar"


def test_laion_5b_dataset_holds_columns_and_ships_them_to_workers(tmp_path):
    path = tmp_path / "laion.manifest.json"
    source = laion_like(LAION_5B)
    path.write_text(source.to_json())
    ds, peak, held = traced(lambda: ShardDataset(str(path), shuffle=1000, world_size=1024, rank=1023))
    assert held < LAION_5B * COLUMN_BYTES * 1.05
    # the file's bytes and their text (about 35 MB each: that is the floor), then the columns
    assert peak < 2 * os.path.getsize(path) + held + 8 * MB
    assert isinstance(ds.urls, ShardUrls) and len(ds.urls) == LAION_5B
    assert ds.urls[-1] == os.path.join(str(tmp_path), "laion-579999.tar")
    assert ds.counts is not None and ds.counts.total == 5_800_000_000
    assert ds.shards.sha256 is not None and ds.shards.sha256[7] == source.table.sha256[7]
    assert len(ds) == -(-5_800_000_000 // 1024)
    shipped = pickle.dumps(ds)
    assert len(shipped) < LAION_5B * COLUMN_BYTES * 1.05
    again = pickle.loads(shipped)
    assert again.counts == ds.counts and again.urls[123_456] == ds.urls[123_456]


def test_version_1_of_laion_400m_keeps_columns_only():
    shards = 40_000  # LAION-400M: 400 M samples
    source = [
        ShardInfo(f"laion-{i:06d}.tar", 10_000, (1 << 30) + i, f"{i:064x}", ["jpg", "json", "txt"])
        for i in range(shards)
    ]
    text = Manifest(source, name="laion", version=1).to_json()
    manifest, peak, held = traced(lambda: Manifest.from_json(text))
    assert held < shards * COLUMN_BYTES * 1.1
    assert peak < held + 16 * MB  # a batch of shard objects at a time, never all of them
    assert manifest.version == 1 and isinstance(manifest.shards.names, PatternNames)
    assert manifest.shards[shards - 1] == source[-1] and manifest.shards[0] == source[0]
    assert manifest.total_samples == 400_000_000
