"""shardkit.plan.seeds: the seed strings are part of the resume contract, so their format
is pinned here (a changed string would silently change every order that uses it)."""

from __future__ import annotations

import hashlib
import random

from shardkit.plan.epoch import shuffled
from shardkit.plan.seeds import int_seed, rng_seed
from shardkit.read.dataset import ShardDataset
from tests.helpers import keys_of


def test_formats():
    assert rng_seed(7, 2, 0, 1, 3) == "shardkit:7:2:0:1:3"
    assert rng_seed("resampled", 7, 2, 1, 3) == "shardkit:resampled:7:2:1:3"
    assert rng_seed(7, 2, 0, 1, 3, "part1", domain="shardkit-mix") == "shardkit-mix:7:2:0:1:3:part1"
    assert rng_seed(4, 1, 9, domain="mix") == "mix:4:1:9"
    text = "mix:4:1:9"
    assert int_seed(text) == int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    assert 0 <= int_seed(text) < 2**64 and int_seed(text) != int_seed("mix:4:1:8")


def test_the_unindexed_order_still_follows_the_seed_string(tmp_path, uneven_shards):
    """Shards without counts are dealt whole and shuffled by the worker's stream named
    ``shardkit:{seed}:{epoch}:{pass}:{rank}:{worker}``: the order is that RNG's."""
    import shutil

    for url in uneven_shards:  # the tars alone: no index, no manifest
        shutil.copy(url, tmp_path)
    ds = ShardDataset(sorted(str(p) for p in tmp_path.glob("*.tar")), shuffle=8, shuffle_shards=False, seed=3)
    ds.set_epoch(2)
    got = keys_of(ds)
    in_order = [f"s{i:06d}" for i in range(64)]
    want = list(shuffled(in_order, 8, random.Random(rng_seed(3, 2, 0, 0, 0))))
    assert len(got) == len(want) == 64 and got == want
