"""The dataset base (shardkit.read.base) and the stages (shardkit.read.stages): views made
by with_stages/with_parts share the epoch and the order, hooks observe every stage in
real DataLoader workers, the shared epoch pickles by value outside spawning."""

from __future__ import annotations

import copy
import pickle
from collections import Counter

import pytest
import torch
import torchvision.transforms.v2 as v2

from shardkit.decode.fields import SampleDecoder
from shardkit.decode.fuse import FusedFieldDecoder
from shardkit.errors import ShardkitError
from shardkit.loader import ShardLoader
from shardkit.read.base import SharedEpoch
from shardkit.read.dataset import ShardDataset
from shardkit.read.mix import Mix
from shardkit.read.stages import KEEP, STAGE_NAMES, StageHooks
from tests.helpers import keys_of, make_shards

ALL_KEYS = [f"s{i:06d}" for i in range(64)]


class CountingHooks(StageHooks):
    """Counts what passes each stage (a module-level class: it pickles by name)."""

    def __init__(self) -> None:
        self.counts = Counter()

    def wrap(self, stage, fn):
        def call(*args, **kwargs):
            self.counts[stage] += 1
            return fn(*args, **kwargs)

        return call

    def wrap_iter(self, stage, items):
        for item in items:
            self.counts[stage] += 1
            yield item

    def counters(self):
        return {f"seen_{stage}": self.counts[stage] for stage in STAGE_NAMES}


def not_a_hook() -> object:
    return object()


def _samples(items) -> list[tuple[str, torch.Tensor]]:
    return [(s["__key__"], s["jpg"]) for s in items]


def test_a_view_shares_the_epoch_and_yields_the_same_items(uneven_shards):
    ds = ShardDataset(uneven_shards, shuffle=6, seed=4, decode="torch")
    view = ds.with_stages(hooks=CountingHooks)
    assert view is not ds and ds.hooks is None and view.hooks is CountingHooks
    ds.set_epoch(2)
    assert view.epoch == 2
    view.set_epoch(5)  # one epoch, whichever object is asked
    assert ds.epoch == 5
    plain, observed = _samples(ds), _samples(view)
    assert len(plain) == len(observed) == 64
    for (key_a, a), (key_b, b) in zip(plain, observed):
        assert key_a == key_b and torch.equal(a, b)
    assert sorted(k for k, _ in plain) == ALL_KEYS
    assert view.with_stages(hooks=None).hooks is None and view.hooks is CountingHooks


def test_hooks_observe_every_stage_in_the_workers(uneven_shards):
    aug = v2.RandomHorizontalFlip()
    ds = ShardDataset(uneven_shards, decode="torch", transform={"jpg": aug}, shuffle=5, seed=1)
    loader = ShardLoader(ds.with_stages(hooks=CountingHooks), batch_size=8, num_workers=2)
    batches = list(loader)
    stats = loader.stats()
    assert len(batches) == stats["batches"] == 8 and len(keys_of(batches)) == 64
    # Per worker and epoch, summed over the workers by the loader.
    assert stats["seen_read"] == stats["seen_decode"] == stats["seen_transform"] == 64
    assert stats["seen_collate"] == 8
    # An item's record is made before the item passes the "items" hook: the records of
    # each worker's last item count the items before it.
    assert stats["seen_items"] == 8 - 2
    # A new epoch starts fresh hooks in each worker.
    assert len(keys_of(loader)) == 64 and loader.stats()["seen_read"] == 64


def test_hooks_observe_a_mix_and_parts_cannot_carry_their_own(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_shards(a, [5, 4], name="a")
    make_shards(b, [3], name="b")
    mix = Mix([ShardDataset(a), ShardDataset(b)], seed=2)
    loader = ShardLoader(mix.with_stages(hooks=CountingHooks), batch_size=4, num_workers=0)
    assert len(keys_of(loader)) == 12
    stats = loader.stats()
    assert stats["seen_read"] == 12 and stats["seen_collate"] == 3 and stats["seen_items"] == 3 - 1
    assert stats["seen_decode"] == 0  # no decoder: the stage does not run
    with pytest.raises(ShardkitError, match="stage hooks"):
        Mix([ShardDataset(a).with_stages(hooks=CountingHooks), ShardDataset(b)])


def test_with_stages_replaces_the_decoder_and_the_transform(uneven_shards):
    ds = ShardDataset(uneven_shards, decode="torch", transform={"jpg": lambda t: t.shape}, fields="jpg cls")
    assert ds.replaced_stages == ()
    assert {shape for shape, _ in ds} == {(3, 32, 48)}
    raw = ds.with_stages(decoder=None, transform=None)
    assert raw.replaced_stages == ("decoder", "transform")
    got = list(raw)
    assert len(got) == 64 and all(isinstance(jpg, bytes) and isinstance(cls, bytes) for jpg, cls in got)
    sizes = ds.with_stages(transform={"jpg": len}, decoder=lambda s: {**s, "jpg": bytes(s["jpg"])})
    assert [n for n, _ in sizes] == [len(jpg) for jpg, _ in got]
    assert ds.with_stages(decoder=KEEP).replaced_stages == ()  # KEEP: as configured
    with pytest.raises(TypeError, match="decoder must be"):
        ds.with_stages(decoder=5)
    with pytest.raises(TypeError, match="hooks must be"):
        ds.with_stages(hooks=5)
    with pytest.raises(TypeError, match="must return a StageHooks"):
        next(iter(ds.with_stages(hooks=not_a_hook)))


def test_replacing_a_stage_drops_the_fused_crop(uneven_shards):
    ds = ShardDataset(uneven_shards, decode="torch", decode_size="auto", transform={"jpg": v2.RandomResizedCrop(8)})
    decoder, transform = ds.stages()
    assert isinstance(decoder, FusedFieldDecoder) and transform == {}
    flip = {"jpg": v2.RandomHorizontalFlip()}
    decoder, transform = ds.with_stages(transform=flip).stages()
    assert isinstance(decoder, SampleDecoder) and transform is flip


def test_mix_with_parts_keeps_the_plan_or_refuses(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_shards(a, [6, 5], name="a")
    make_shards(b, [4], name="b")
    mix = Mix([ShardDataset(a, shuffle=3), ShardDataset(b)], seed=9)
    mix.set_epoch(1)
    raw = list(mix)
    view = mix.with_parts([part.with_stages(decoder=lambda s: {**s, "seen": True}) for part in mix.datasets])
    assert view.epoch == 1 and mix.datasets[0].replaced_stages == ()
    seen = list(view)
    assert len(seen) == len(raw) == 15
    assert [s["__key__"] for s in seen] == [s["__key__"] for s in raw] and all(s["seen"] for s in seen)
    view.set_epoch(2)
    assert mix.epoch == 2
    with pytest.raises(ShardkitError, match="change the plan"):
        mix.with_parts([ShardDataset(a, shuffle=4), ShardDataset(b)])
    with pytest.raises(ValueError, match="1 parts for a Mix of 2"):
        mix.with_parts([ShardDataset(a)])


def test_the_shared_epoch_pickles_by_value_outside_spawning(uneven_shards):
    epoch = SharedEpoch(3)
    again = pickle.loads(pickle.dumps(epoch))
    again.value = 7
    assert (epoch.value, again.value) == (3, 7)
    ds = ShardDataset(uneven_shards, shuffle=4)
    ds.set_epoch(6)
    for clone in (pickle.loads(pickle.dumps(ds)), copy.deepcopy(ds)):
        assert clone.epoch == 6
        clone.set_epoch(8)  # a copy's own epoch: the original stays
        assert (ds.epoch, clone.epoch) == (6, 8)
    copied = pickle.loads(pickle.dumps(ds))
    assert len(keys_of(copied)) == 64 and keys_of(copied) == keys_of(ds)
