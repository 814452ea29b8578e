"""read/join: ShardDataset/ShardMap(base, join=[companion]) yield the base samples with the
companions' fields; alignment is proved at open and checked key by key while reading;
shared fields need a named winner; every dataset feature works on a joined set."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from shardkit.errors import SampleError, ShardkitError
from shardkit.format.index import Manifest, decode_index, encode_index
from shardkit.loader import ShardLoader
from shardkit.read.dataset import ShardDataset
from shardkit.read.join import MissingInCompanion
from shardkit.read.mix import Mix
from shardkit.read.shardmap import ShardMap
from shardkit.read.stages import StageHooks
from shardkit.writing.companion import write_companion
from shardkit.writing.writer import ShardWriter
from tests.helpers import keys_of, make_shards, pairs, resumed_keys, stop_after

COUNTS = [7, 0, 12, 1, 9]
N = sum(COUNTS)


def caption(sample: dict) -> dict:
    digest = hashlib.sha256(sample["jpg"]).digest()
    return {"txt": f"caption {sample['__key__']}", "npy": np.frombuffer(digest[:8], np.uint8).astype(np.float32)}


def fixed_label(sample: dict) -> dict:
    return {"cls": 100 + int(sample["__key__"][1:])}


def odd_only(sample: dict) -> dict | None:
    return {"txt": f"odd {sample['__key__']}"} if int(sample["__key__"][1:]) % 2 else None


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("join")
    base = str(root / "base")
    make_shards(base, COUNTS, image=True)
    out = {"base": base}
    for name, fn, missing in (("cap", caption, "error"), ("fix", fixed_label, "error"), ("odd", odd_only, "skip")):
        out[name] = str(root / name)
        write_companion(base, out[name], fn, workers=1, missing=missing)
    return out


def _raw(url: str, **kw) -> list[dict]:
    return list(ShardDataset(url, **kw))


def test_joined_samples_are_the_base_samples_with_the_new_fields(sets):
    base = _raw(sets["base"])
    joined = _raw(sets["base"], join=[sets["cap"]])
    for b, j in pairs(base, joined):
        assert {k: v for k, v in j.items() if k not in ("txt", "npy")} == b
        assert j["txt"] == f"caption {b['__key__']}".encode()
        assert np.array_equal(np.load(__import__("io").BytesIO(j["npy"])), caption(b)["npy"])
    assert len(joined) == N


def test_every_way_of_naming_the_parts_reads_the_same(sets):
    want = [(s["__key__"], s["txt"]) for s in _raw(sets["base"], join=[sets["cap"]])]
    for base, comp in (
        (os.path.join(sets["base"], "data.manifest.json"), os.path.join(sets["cap"], "data.manifest.json")),
        (os.path.join(sets["base"], "data-{000000..000004}.tar"), sets["cap"] + "/data-<000000..000004>.tar"),
        (sets["base"], [os.path.join(sets["cap"], f"data-{i:06d}.tar") for i in range(5)]),
    ):
        got = [(s["__key__"], s["txt"]) for s in _raw(base, join=[comp])]
        assert got == want
    # A subset of the base: each base shard read meets its companion shard, by name.
    two = os.path.join(sets["base"], "data-00000{2,4}.tar")
    sub = [(s["__key__"], s["txt"]) for s in _raw(two, join=[sets["cap"]])]
    assert sub == want[7:19] + want[20:]


def test_fields_select_decode_and_transform_see_the_joined_sample(sets):
    seen = []

    def select(raw: dict) -> bool:
        seen.append(sorted(raw))
        return raw["txt"].endswith((b"1", b"3"))

    ds = ShardDataset(
        sets["base"],
        join=[sets["cap"]],
        decode="torch",
        transform={"jpg": v2.Resize(16)},
        fields="jpg txt npy cls",
        select=select,
    )
    items = list(ds)
    assert seen[0] == ["__key__", "__url__", "cls", "jpg", "json", "npy", "txt"] and len(seen) == N
    assert [t for _, t, _, _ in items] == [f"caption s{i:06d}" for i in range(N) if i % 10 in (1, 3)]
    image, _, embedding, _ = items[0]
    assert image.shape[0] == 3 and min(image.shape[1:]) == 16 and embedding.shape == (8,)


def test_a_field_in_two_parts_needs_a_winner(sets):
    with pytest.raises(ShardkitError, match=r"field 'cls' is in the base and companion 1 .*join_wins=\{'cls': 1\}"):
        ShardDataset(sets["base"], join=[sets["fix"]])
    fixed = _raw(sets["base"], join=[sets["fix"]], join_wins={"cls": 1})
    assert [s["cls"] for s in fixed] == [str(100 + i).encode() for i in range(N)]
    kept = _raw(sets["base"], join=[sets["fix"]], join_wins={"cls": 0})
    assert [s["cls"] for s in kept] == [s["cls"] for s in _raw(sets["base"])]
    both = _raw(sets["base"], join=[sets["cap"], sets["odd"]], join_wins={"txt": 2})
    assert [s["txt"] for s in both] == [f"odd s{i:06d}".encode() for i in range(1, N, 2)]
    for wins, message in (
        ({"cls": 2}, "must be a part number"),
        ({"cls": True}, "must be a part number"),
        ({"txt": 0}, "the base, which has no field 'txt'"),
        ({"cls": 1, "jpg": 0}, "only the base has field 'jpg'"),
    ):
        with pytest.raises((ShardkitError, ValueError), match=message):
            ShardDataset(sets["base"], join=[sets["fix"]], join_wins=wins)
    with pytest.raises(ValueError, match="there is no join"):
        ShardDataset(sets["base"], join_wins={"cls": 0})
    with pytest.raises(TypeError, match="a list of companions"):
        ShardDataset(sets["base"], join=sets["cap"])


def test_an_empty_marker_keeps_the_sample_as_it_is(sets, tmp_path):
    write_companion(sets["base"], str(tmp_path / "e"), odd_only, workers=1, missing="empty")
    joined = _raw(sets["base"], join=[str(tmp_path / "e")])
    for b, j in pairs(_raw(sets["base"]), joined):
        if int(b["__key__"][1:]) % 2:
            assert j == {**b, "txt": f"odd {b['__key__']}".encode()}
        else:
            assert j == b


def test_a_key_held_as_missing_drops_the_sample_and_counts_as_filtered(sets):
    loader = ShardLoader(ShardDataset(sets["base"], join=[sets["odd"]], shuffle=5), batch_size=4, num_workers=2)
    keys = keys_of(loader)
    assert sorted(keys) == [f"s{i:06d}" for i in range(1, N, 2)]
    stats = loader.stats()
    assert stats["filtered"] == 15 and stats["samples"] == 14


def _forged(sets, dest: str, *, swap_in: int, index_keys: bool = True) -> str:
    """A companion of the base whose shard ``swap_in`` holds its first two keys swapped."""
    shutil.copytree(sets["cap"], dest)
    manifest = Manifest.from_json(open(os.path.join(dest, "data.manifest.json"), "rb").read())
    names = [s.name for s in manifest.shards]
    base_samples = _raw(sets["base"])
    starts = np.cumsum([0, *COUNTS])
    with ShardWriter(dest, shard_names=names, base=manifest.base, overwrite=True, shard_size="1GB") as writer:
        for shard, count in enumerate(COUNTS):
            keys = [s["__key__"] for s in base_samples[starts[shard] : starts[shard] + count]]
            if shard == swap_in:
                keys[0], keys[1] = keys[1], keys[0]
            for key in keys:
                writer.write({"__key__": key, "txt": f"caption {key}"})
            writer.next_shard(allow_empty=True)
    if not index_keys:  # version-1 indexes: no key tables to compare at open
        for name in names:
            path = os.path.join(dest, name + ".idx")
            offsets = decode_index(open(path, "rb").read())
            with open(path, "wb") as f:
                f.write(encode_index(offsets.tolist()))
    return dest


def test_alignment_is_proved_when_the_dataset_opens(sets, tmp_path):
    forged = _forged(sets, str(tmp_path / "forged"), swap_in=2)
    with pytest.raises(ShardkitError, match=r"data-000002\.tar: its companion shard sample 0 has key 's000008'"):
        ShardDataset(sets["base"], join=[forged])
    # Another version of the base: same shard names and counts, other images.
    other = str(tmp_path / "other")
    make_shards(other, COUNTS, image=False)
    with pytest.raises(ShardkitError, match="was written for a base manifest with sha256 .*shard contents changed"):
        ShardDataset(other, join=[sets["cap"]])
    fewer = str(tmp_path / "fewer")
    make_shards(fewer, [7, 0, 11, 1, 9], image=True)
    with pytest.raises(ShardkitError, match=r"shard data-000002\.tar: has 11 samples, its companion shard 12"):
        ShardDataset(fewer, join=[sets["cap"]])
    with pytest.raises(ShardkitError, match="is not a companion set"):
        ShardDataset(sets["base"], join=[sets["base"]])
    subset = [os.path.join(sets["cap"], f"data-{i:06d}.tar") for i in (0, 1)]
    with pytest.raises(ShardkitError, match=r"no shard for base shard data-000002\.tar"):
        ShardDataset(sets["base"], join=[subset])
    bare = str(tmp_path / "bare")
    shutil.copytree(sets["base"], bare)
    os.remove(os.path.join(bare, "data.manifest.json"))
    with pytest.raises(ShardkitError, match="a join needs the base set's manifest"):
        ShardDataset(bare, join=[sets["cap"]])


def test_a_key_mismatch_while_reading_names_the_shard_and_key(sets, tmp_path):
    forged = _forged(sets, str(tmp_path / "forged"), swap_in=3 - 1, index_keys=False)
    ds = ShardDataset(sets["base"], join=[forged])  # v1 indexes: nothing to compare at open
    with pytest.raises(SampleError, match=r"data-000002\.tar, sample 's000007': companion 1 .* has key 's000008'"):
        list(ds)
    with pytest.warns(UserWarning, match="not aligned"):
        got = keys_of(ShardDataset(sets["base"], join=[forged], handler="warn"))
    assert got == [f"s{i:06d}" for i in range(N) if i not in (7, 8)]


def test_resampled_and_epoch_length_read_joined_shards(sets):
    got = _raw(sets["base"], join=[sets["cap"]], resampled=True, epoch_length=40, seed=1)
    assert len(got) == 40 and all(s["txt"] == f"caption {s['__key__']}".encode() for s in got)
    # A dropped sample counts as a position, as a select reject does.
    loop = _raw(sets["base"], join=[sets["odd"]], epoch_length=40, shuffle=3)
    selected = _raw(sets["base"], select=lambda s: int(s["__key__"][1:]) % 2 == 1, epoch_length=40, shuffle=3)
    assert [s["__key__"] for s in loop] == [s["__key__"] for s in selected] and 10 < len(loop) < 40


def test_shard_map_joins_too(sets):
    m = ShardMap(sets["base"], join=[sets["cap"], sets["odd"]], join_wins={"txt": 2})
    assert len(m) == N and m[3]["txt"] == b"odd s000003" and m.raw(2, 0)["npy"] is not None
    with pytest.raises(MissingInCompanion, match="s000004"):
        m[4]
    assert m.get("s000004") is None and m.get("s000005")["txt"] == b"odd s000005"
    plain = ShardMap(sets["base"])
    for i in range(N):
        if i % 2:
            assert {k: v for k, v in m[i].items() if k not in ("txt", "npy")} == plain[i]


def test_mix_of_a_joined_and_a_plain_part(sets):
    def mix():
        joined = ShardDataset(sets["base"], join=[sets["cap"]], shuffle=4, seed=1)
        plain = ShardDataset(sets["base"], shuffle=4, seed=2)
        return Mix([joined, plain], seed=3)

    items = list(mix())
    assert len(items) == 2 * N
    with_txt = [s for s in items if "txt" in s]
    assert sorted(s["__key__"] for s in with_txt) == [f"s{i:06d}" for i in range(N)]
    assert all(s["txt"] == f"caption {s['__key__']}".encode() for s in with_txt)

    def loader() -> ShardLoader:  # the parts' samples differ in fields: batches stay lists
        return ShardLoader(mix(), batch_size=5, num_workers=2, collate_fn=list)

    def keys(batches) -> list[str]:
        return [s["__key__"] + ("+txt" if "txt" in s else "") for batch in batches for s in batch]

    full = keys(loader())
    assert len(full) == 2 * N and sum(k.endswith("+txt") for k in full) == N
    before, state = stop_after(loader(), 3, keys)
    assert before == full[:15] and resumed_keys(loader(), state, keys) == full[15:]


def test_loader_resume_is_exact_on_a_joined_set(sets):
    def loader():
        ds = ShardDataset(sets["base"], join=[sets["cap"], sets["odd"]], join_wins={"txt": 1}, shuffle=6, seed=4)
        return ShardLoader(ds, batch_size=3, num_workers=2)

    full = keys_of(loader())
    assert sorted(full) == [f"s{i:06d}" for i in range(1, N, 2)]
    before, state = stop_after(loader(), 2)
    assert before == full[:6] and resumed_keys(loader(), state) == full[6:]


class Seen(StageHooks):
    fields: list[list[str]] = []

    def wrap_iter(self, stage, items):
        if stage != "read":
            return items
        return (Seen.fields.append(sorted(s)) or s if s is not None else s for s in items)


def test_hooks_observe_the_joined_read_and_stats_count_every_part(sets):
    Seen.fields = []
    ds = ShardDataset(sets["base"], join=[sets["cap"]]).with_stages(hooks=Seen)
    loader = ShardLoader(ds, batch_size=29, num_workers=0)
    assert len(list(loader)) == 1
    assert len(Seen.fields) == N and all("txt" in f and "jpg" in f for f in Seen.fields)
    plain = ShardLoader(ShardDataset(sets["base"]), batch_size=29, num_workers=0)
    list(plain)
    stats, base_stats = loader.stats(), plain.stats()
    assert stats["shards_opened"] == 2 * base_stats["shards_opened"] > 0
    assert stats["bytes_read"] > base_stats["bytes_read"]


def test_gpu_path_ships_joined_samples(sets):
    aug = v2.Compose([v2.RandomResizedCrop(16), v2.RandomHorizontalFlip()])

    def run(**kw):
        ds = ShardDataset(
            sets["base"], join=[sets["cap"]], decode="torch", transform={"jpg": aug}, shuffle=5, fields="jpg txt"
        )
        torch.manual_seed(0)
        return list(ShardLoader(ds, batch_size=4, num_workers=2, generator=torch.Generator().manual_seed(0), **kw))

    for (want_x, want_t), (got_x, got_t) in pairs(run(), run(decode_device="cpu")):
        assert got_t == want_t and got_x.shape == want_x.shape
        assert (got_x.int() - want_x.int()).abs().max().item() <= 1
