"""ShardWriter: size bounds, determinism, atomic shards, key rules, compatibility."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import tarfile

import numpy as np
import pytest

from shardkit.errors import ShardkitError
from shardkit.format.index import Manifest, decode_index
from shardkit.format.samples import iter_samples
from shardkit.sizes import parse_size
from shardkit.writing.writer import ShardWriter, validate_key
from tests.helpers import pairs, sample


def write(dest, samples, **kw):
    with ShardWriter(str(dest), **kw) as w:
        for s in samples:
            w.write(s)
    return w


def test_sizes_parse_both_unit_families():
    assert parse_size("1GB") == 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("100k") == 100_000
    assert parse_size(4096) == 4096 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("12 parsecs")


def test_shards_never_exceed_size_and_read_back_everywhere(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(0)
    samples = [
        {"__key__": f"k{i:04d}", "jpg": rng.bytes(int(rng.integers(0, 30_000))), "cls": i % 7, "json": {"i": i}}
        for i in range(120)
    ]
    w = write(tmp_path, samples, shard_size="200kB")
    paths = [str(tmp_path / s.name) for s in w.shards]
    assert len(paths) > 5
    assert all(os.path.getsize(p) <= 200_000 for p in paths)
    ours = [s for p in paths for s in iter_samples(open(p, "rb"), url=p)]
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in samples]
    assert all(o["jpg"] == s["jpg"] and int(o["cls"]) == s["cls"] for o, s in pairs(ours, samples))
    listed = []
    for p in paths:
        with tarfile.open(p) as tf:
            assert all(tf.extractfile(m).read() is not None for m in tf.getmembers())
        listed += subprocess.run(["tar", "tf", p], capture_output=True, text=True, check=True).stdout.split()
    assert listed == [f"{s['__key__']}.{ext}" for s in samples for ext in ("cls", "jpg", "json")]
    theirs = list(wds.WebDataset(paths, shardshuffle=False))
    assert [t["__key__"] for t in theirs] == [s["__key__"] for s in samples]
    assert all(t["jpg"] == s["jpg"] for t, s in pairs(theirs, samples))


def test_index_and_manifest_describe_the_shards(tmp_path):
    w = write(tmp_path, [sample(i, image=False) for i in range(50)], shard_size="20kB", classes=["a", "b", "c"])
    manifest = Manifest.from_json((tmp_path / "data.manifest.json").read_text())
    assert manifest.classes == ["a", "b", "c"] and manifest.complete
    assert manifest.total_samples == 50 and manifest.fields == ["cls", "jpg", "json"]
    for info in manifest.shards:
        data = (tmp_path / info.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.sha256 and len(data) == info.bytes
        offsets = decode_index((tmp_path / (info.name + ".idx")).read_bytes())
        assert len(offsets) == info.samples + 1
        for i in range(info.samples):  # each offset starts exactly one sample
            part = list(
                iter_samples(
                    io.BytesIO(data[offsets[i] : offsets[i + 1]]),
                    url="x",
                    start=0,
                    stop=int(offsets[i + 1] - offsets[i]),
                )
            )
            assert len(part) == 1
    assert len(w.shards) == len(manifest.shards)


def test_output_is_byte_identical(tmp_path):
    samples = [sample(i) for i in range(30)]
    write(tmp_path / "a", samples, shard_size="20kB")
    write(tmp_path / "b", samples, shard_size="20kB")
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()


def test_oversized_sample_gets_its_own_shard(tmp_path, caplog):
    samples = [
        {"__key__": "small1", "bin": b"x" * 100},
        {"__key__": "big", "bin": b"y" * 50_000},
        {"__key__": "small2", "bin": b"z" * 100},
    ]
    with caplog.at_level(logging.WARNING):
        w = write(tmp_path, samples, shard_size="10kB")
    assert [s.samples for s in w.shards] == [1, 1, 1]
    assert "big" in caplog.text and "shard of its own" in caplog.text


def test_max_count(tmp_path):
    w = write(tmp_path, [sample(i, image=False) for i in range(10)], max_count=4)
    assert [s.samples for s in w.shards] == [4, 4, 2]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a.b", "dir/x.y", "a//b", "nul\0"])
def test_bad_keys_are_refused(key):
    with pytest.raises(ShardkitError):
        validate_key(key)


def test_long_and_unicode_names_round_trip(tmp_path):
    keys = ["d" * 90 + "/" + "e" * 90, "ü/名前", "x" * 200]
    w = write(tmp_path, [{"__key__": k, "txt": k} for k in keys])
    path = str(tmp_path / w.shards[0].name)
    assert [s["__key__"] for s in iter_samples(open(path, "rb"), url=path)] == keys
    with tarfile.open(path) as tf:
        assert [m.name for m in tf.getmembers()] == [k + ".txt" for k in keys]


def test_crash_leaves_only_complete_shards(tmp_path):
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with ShardWriter(str(tmp_path), shard_size="20kB") as w:
            for i in range(25):
                w.write(sample(i, image=False))
            raise Boom()
    manifest = json.loads((tmp_path / "data.manifest.json").read_text())
    assert manifest["complete"] is False and manifest["total_samples"] == 25
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    with pytest.raises(ShardkitError, match="overwrite"):
        ShardWriter(str(tmp_path))


def test_stale_temp_files_are_removed_and_overwrite_replaces(tmp_path):
    write(tmp_path, [sample(i, image=False) for i in range(40)], shard_size="10kB")
    before = len([n for n in os.listdir(tmp_path) if n.endswith(".tar")])
    (tmp_path / "data-000099.tar.tmp").write_bytes(b"half a shard")
    write(tmp_path, [sample(i, image=False) for i in range(2)], shard_size="10kB", overwrite=True)
    names = sorted(os.listdir(tmp_path))
    assert before > 1
    assert names == ["data-000000.tar", "data-000000.tar.idx", "data.manifest.json"]


def test_extensions_are_written_lower_case(tmp_path):
    """Hugging Face, DALI and Ray match ``jpg``, not ``JPG``: the writer lower-cases fields."""
    from shardkit.format import samples

    assert validate_key is samples.validate_key  # encoding lives beside the grouping
    w = write(tmp_path, [{"__key__": "a", "JPG": b"\xff\xd8x", "Txt": "hi", "0.PNG": b"p"}])
    path = str(tmp_path / w.shards[0].name)
    with tarfile.open(path) as tf:
        assert tf.getnames() == ["a.0.png", "a.jpg", "a.txt"]
    assert w.shards[0].fields == ["0.png", "jpg", "txt"]
    with pytest.raises(ShardkitError, match="differ only in case"):
        write(tmp_path / "b", [{"__key__": "a", "jpg": b"1", "JPG": b"2"}])
