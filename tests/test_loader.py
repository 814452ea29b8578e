"""ShardLoader's contract with its dataset: one owner for batching, the dataset untouched."""

from __future__ import annotations

import dataclasses

import pytest
from torch.utils.data import DataLoader

from shardkit.errors import ShardkitError
from shardkit.loader import ShardLoader
from shardkit.read.dataset import ShardDataset
from shardkit.storage.dispatch import SourceOptions
from tests.helpers import keys_of, make_shards

ALL_KEYS = [f"s{i:06d}" for i in range(40)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    dest = str(tmp_path_factory.mktemp("loader"))
    make_shards(dest, [17, 23])
    return dest


def _sizes(loader) -> list[int]:
    return [len(batch["__key__"]) for batch in loader]


def test_loader_batches_when_the_dataset_does_not(shards):
    assert _sizes(ShardLoader(ShardDataset(shards), batch_size=8, num_workers=0)) == [8] * 5
    assert _sizes(ShardLoader(ShardDataset(shards), num_workers=0)) == [40]  # the default, 64
    singles = list(ShardLoader(ShardDataset(shards), batch_size=None, num_workers=0))
    assert [s["__key__"] for s in singles] == ALL_KEYS


def test_dataset_batch_size_is_honoured_not_overridden(shards):
    # Before: ShardLoader silently re-batched by its own default of 64.
    ds = ShardDataset(shards, batch_size=16)
    assert _sizes(ShardLoader(ds, num_workers=0)) == [16, 16, 8]
    # The webdataset idiom: batch_size=None on the loader when the dataset batches.
    assert _sizes(ShardLoader(ds, batch_size=None, num_workers=0)) == [16, 16, 8]
    assert _sizes(ShardLoader(ds, batch_size=16, num_workers=0)) == [16, 16, 8]
    assert _sizes(ShardLoader(ShardDataset(shards, batch_size=16, drop_last=True), num_workers=0)) == [16, 16]


def test_conflicting_batching_is_refused_with_a_message(shards):
    ds = ShardDataset(shards, batch_size=32)
    with pytest.raises(ShardkitError, match=r"already batches by 32.*batch_size=64"):
        ShardLoader(ds, batch_size=64)
    with pytest.raises(ShardkitError, match="drop_last"):
        ShardLoader(ds, drop_last=True)
    with pytest.raises(ShardkitError, match="collate_fn"):
        ShardLoader(ds, collate_fn=list)


def test_loader_never_modifies_the_dataset(shards):
    ds = ShardDataset(shards, shuffle=5, seed=1)
    before = {k: v for k, v in vars(ds).items() if k != "_epoch"}
    loader = ShardLoader(ds, batch_size=4, num_workers=2, drop_last=True, collate_fn=list)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    del it
    again = ShardLoader(ds, batch_size=4, num_workers=2)
    again.load_state_dict(state)
    next(iter(again))
    after = {k: v for k, v in vars(ds).items() if k != "_epoch"}
    assert after.keys() == before.keys()
    for key in ("batching", "_resume", "options", "urls", "counts"):
        assert after[key] == before[key], key
    assert ds.batch_size is None and loader.shard_dataset is ds
    # A plain DataLoader over the same dataset still yields single samples, all of them.
    assert sorted(keys_of(DataLoader(ds, batch_size=None))) == ALL_KEYS


def test_loader_dataset_attribute_reaches_the_dataset(shards):
    ds = ShardDataset(shards)
    loader = ShardLoader(ds, batch_size=5, num_workers=0)
    loader.dataset.set_epoch(3)  # the common `loader.dataset.set_epoch` idiom
    assert ds.epoch == 3 and loader.epoch == 3
    assert loader.dataset.urls == ds.urls
    assert len(loader) == 8 and len(loader.dataset) == 8


def test_source_options_are_never_mutated(shards):
    opts = SourceOptions(retries=3)
    snapshot = dataclasses.replace(opts, headers=dict(opts.headers))
    ds = ShardDataset(shards, source_options=opts)
    assert opts == snapshot
    assert ds.options == opts and ds.options is not opts
    with pytest.raises(ValueError, match="cache_dir inside source_options"):
        ShardDataset(shards, source_options=opts, cache_dir="/tmp/x")
    assert opts == snapshot
    headers = {"https://h/": {"A": "b"}}
    ds = ShardDataset(shards, headers=headers)
    ds.options.headers["https://other/"] = {}
    assert headers == {"https://h/": {"A": "b"}}


def test_read_ahead_needs_a_cache():
    with pytest.raises(ValueError, match="needs cache_dir"):
        SourceOptions(read_ahead=2)


def test_batched_dataset_in_a_plain_dataloader_len(shards):
    ds = ShardDataset(shards, batch_size=16)
    assert len(ds) == 3
    batches = list(DataLoader(ds, batch_size=None))
    assert [len(b["__key__"]) for b in batches] == [16, 16, 8]
    assert batches[0]["cls"][:3] == [b"0", b"1", b"2"]  # undecoded bytes stay lists


def test_a_state_loads_before_persistent_workers_start_or_without_them(shards):
    def make(**kw) -> ShardLoader:
        return ShardLoader(ShardDataset(shards, shuffle=5, seed=3), batch_size=4, num_workers=2, **kw)

    full = keys_of(make())
    loader = make()
    it = iter(loader)
    before = keys_of(next(it) for _ in range(3))
    state = loader.state_dict()
    del it
    # Its persistent workers keep the plan they started with: loading into it is refused...
    with pytest.raises(ShardkitError, match="persistent workers.*new ShardLoader"):
        loader.load_state_dict(state)
    # ...a new loader takes it, and so does one without persistent workers after a pass.
    again = make()
    again.load_state_dict(state)
    rest = keys_of(again)
    assert len(before) == 12 and before + rest == full
    plain = make(persistent_workers=False)
    assert sorted(keys_of(plain)) == ALL_KEYS
    plain.load_state_dict(state)
    assert keys_of(plain) == rest


def test_opencv_is_imported_before_workers_only_where_they_fork():
    import multiprocessing

    from shardkit.loader import _forks

    assert _forks("fork") and not _forks("spawn") and not _forks("forkserver")
    assert _forks(multiprocessing.get_context("fork")) and not _forks(multiprocessing.get_context("spawn"))
    default = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    assert _forks(None) is (default == "fork")
