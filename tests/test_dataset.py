"""ShardDataset and ShardLoader through real DataLoaders: splitting, epochs, resume."""

from __future__ import annotations

import multiprocessing as mp
import os
import warnings

import pytest
import torch

from shardkit.errors import ShardkitError
from shardkit.loader import ShardLoader
from shardkit.read.dataset import ShardDataset
from tests.helpers import keys_of, make_shards, resumed_keys, stop_after

warnings.filterwarnings("ignore", message=".*worker processes in total.*")
ALL_KEYS = [f"s{i:06d}" for i in range(64)]


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory) -> str:
    dest = str(tmp_path_factory.mktemp("three"))
    make_shards(dest, [23, 4, 14])
    return dest


def _rank_run(folder: str, rank: int, workers: int, even, queue) -> None:
    ds = ShardDataset(folder, shuffle=5, seed=3, rank=rank, world_size=4, even=even)
    loader = ShardLoader(ds, batch_size=3, num_workers=workers)
    batches = list(loader)
    queue.put((rank, keys_of(batches), len(batches), len(loader)))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [0, 1, 3, 5])
def test_four_ranks_in_separate_processes(three_shards, workers):
    ctx = mp.get_context("fork")
    for even in (None, "pad", "drop"):
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank_run, args=(three_shards, r, workers, even, queue)) for r in range(4)]
        for p in procs:
            p.start()
        results = sorted(queue.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        keys = [k for _, ks, _, _ in results for k in ks]
        batch_counts = {n for _, _, n, _ in results}
        assert all(n == length for _, _, n, length in results)  # len(loader) is right
        if even is None:
            assert sorted(keys) == sorted(f"s{i:06d}" for i in range(41))
        else:
            assert len(batch_counts) == 1
            assert len({len(ks) for _, ks, _, _ in results}) == 1
            assert set(keys) <= {f"s{i:06d}" for i in range(41)}
            assert abs(len(keys) - 41) <= 3


def test_len_and_epoch_info(uneven_shards):
    ds = ShardDataset(uneven_shards, rank=1, world_size=3, even="pad")
    info = ds.epoch_info()
    assert len(ds) == info.rank_samples == 22 and info.padded == 2 and info.dropped == 0
    assert len(list(ds)) == 22
    drop = ShardDataset(uneven_shards, rank=0, world_size=3, even="drop")
    assert len(drop) == 21 and drop.epoch_info().dropped == 1


def test_set_epoch_reaches_persistent_workers(uneven_shards):
    ds = ShardDataset(uneven_shards, shuffle=10, seed=1)
    loader = ShardLoader(ds, batch_size=8, num_workers=2, persistent_workers=True)
    first = keys_of(loader)
    loader.set_epoch(5)
    fifth = keys_of(loader)
    fresh = ShardLoader(ShardDataset(uneven_shards, shuffle=10, seed=1), batch_size=8, num_workers=2)
    fresh.set_epoch(5)
    assert fifth == keys_of(fresh)
    assert first != fifth and sorted(first) == sorted(fifth) == ALL_KEYS
    # without set_epoch the next pass still gets a new order
    sixth = keys_of(loader)
    assert loader.epoch == 6 and sixth != fifth


@pytest.mark.timeout(240)
@pytest.mark.parametrize("k", [0, 1, 3, 6, 9])
def test_resume_mid_epoch(uneven_shards, k):
    def make(workers):
        return ShardLoader(ShardDataset(uneven_shards, shuffle=7, seed=11), batch_size=4, num_workers=workers)

    full = keys_of(make(2))
    before, state = stop_after(make(2), k)
    for workers in (2, 0, 3):
        again = make(workers)
        after = resumed_keys(again, state)
        assert sorted(before + after) == sorted(full)
        if workers == 2:
            assert before + after == full
        # the epoch after a resumed one is a normal full epoch
        assert sorted(keys_of(again)) == ALL_KEYS


def test_resume_from_a_resumed_run_with_yet_another_topology(uneven_shards):
    def make(workers, world=1, rank=0):
        ds = ShardDataset(uneven_shards, shuffle=3, seed=2, world_size=world, rank=rank, even=None)
        return ShardLoader(ds, batch_size=2, num_workers=workers)

    seen, state = stop_after(make(3), 4)
    second = make(2)
    second.load_state_dict(state)
    more, state = stop_after(second, 5)
    seen += more
    rest = []
    for rank in range(2):  # finish on two ranks
        third = make(0, world=2, rank=rank)
        third.load_state_dict(state)
        rest += keys_of(third)
    assert sorted(seen + rest) == ALL_KEYS


def test_stateful_dataloader_protocol(uneven_shards):
    tdl = pytest.importorskip("torchdata.stateful_dataloader")

    def make():
        ds = ShardDataset(uneven_shards, shuffle=5, seed=4, batch_size=4)
        return tdl.StatefulDataLoader(ds, batch_size=None, num_workers=2)

    full = keys_of(make())
    before, state = stop_after(make(), 5)
    after = resumed_keys(make(), state)
    assert sorted(before + after) == sorted(full) == ALL_KEYS


def test_fields_transform_batches_and_drop_last(uneven_shards):
    ds = ShardDataset(uneven_shards, fields="jpg;png cls", transform={"cls": lambda b: int(b) * 10})
    items = list(ds)
    assert len(items) == 64 and isinstance(items[0], tuple) and items[0][1] in (0, 10, 20)
    loader = ShardLoader(
        ShardDataset(uneven_shards, transform=lambda s: {**s, "n": len(s["jpg"])}),
        batch_size=10,
        num_workers=2,
        drop_last=True,
    )
    batches = list(loader)
    assert len(batches) == len(loader) == 6  # 32 per worker -> 3 full batches each
    assert isinstance(batches[0]["n"], torch.Tensor) and batches[0]["n"].shape == (10,)


def test_epoch_length_and_resampled(uneven_shards):
    ds = ShardDataset(uneven_shards, epoch_length=100, shuffle=4)
    keys = keys_of(ShardLoader(ds, batch_size=7, num_workers=2))
    assert len(keys) == 100 and set(keys) == set(ALL_KEYS)
    res = ShardDataset(uneven_shards, resampled=True, epoch_length=30)
    assert len(keys_of(res)) == len(res) == 30


def test_foreign_shards_without_counts(tmp_path, uneven_shards):
    for path in uneven_shards:  # copy tars without sidecars
        (tmp_path / os.path.basename(path)).write_bytes(open(path, "rb").read())
    pattern = str(tmp_path / "data-<000000..000004>.tar")
    ds = ShardDataset(pattern)
    assert ds.counts is None
    with pytest.raises(TypeError, match="shardkit index"):
        len(ds)
    assert sorted(keys_of(ShardLoader(ds, batch_size=5, num_workers=2))) == ALL_KEYS
    with pytest.raises(ShardkitError, match="gets no shards"):
        list(ShardDataset(pattern, rank=5, world_size=8, even="pad"))


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(ShardkitError, match=r"2 of 2 shard\(s\) do not exist: .*x-1.tar"):
        ShardDataset(str(tmp_path / "x-{0..1}.tar"))


def test_thread_decode_keeps_order_and_resume_exact(uneven_shards):
    def make(threads):
        return ShardLoader(
            ShardDataset(
                uneven_shards, shuffle=6, seed=8, threads=threads, transform=lambda s: {**s, "n": len(s["jpg"])}
            ),
            batch_size=5,
            num_workers=1,
        )

    full = keys_of(make(0))
    assert keys_of(make(3)) == full
    before, state = stop_after(make(3), 4)
    assert before + resumed_keys(make(3), state) == full


def test_decode_size_auto_from_the_transform(uneven_shards):
    from torchvision.transforms import v2

    ds = ShardDataset(
        uneven_shards,
        decode="torch",
        decode_size="auto",
        transform={"jpg": v2.Compose([v2.Resize(16), v2.RandomHorizontalFlip()])},
    )
    assert ds.decode_size == 16
    images = [s["jpg"] for s in ds]
    assert len(images) == 64 and min(min(i.shape[1:]) for i in images) == 16
    with pytest.raises(ValueError, match="decode_size"):
        ShardDataset(uneven_shards, decode_size="big")
