"""writing/companion: a companion set has its base's shards, keys and order, its own
indexes and a manifest recording the base; byte-identical for any workers; resumable;
missing keys follow the policy; webdataset reads it on its own. Real files, real processes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from functools import partial

import numpy as np
import pytest

from shardkit.errors import ShardkitError
from shardkit.format.companion import EMPTY, MISSING, manifest_sha256
from shardkit.format.index import Manifest, decode_index_keys
from shardkit.writing.companion import write_companion
from tests.helpers import digests, make_shards, pairs, shardkit_cli

shardkit = partial(shardkit_cli, text=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = [7, 0, 12, 1, 9]


def caption(sample: dict) -> dict:
    """The test's "caption model": a caption and an embedding from the image bytes."""
    digest = hashlib.sha256(sample["jpg"]).digest()
    return {"txt": f"a photo {digest[:4].hex()} of {sample['__key__']}", "npy": np.frombuffer(digest, np.uint8) / 255}


def slow_caption(sample: dict) -> dict:
    time.sleep(0.02)
    return caption(sample)


def odd_only(sample: dict) -> dict | None:
    return caption(sample) if int(sample["__key__"][1:]) % 2 else None


def renamed(sample: dict) -> dict:
    return {"__key__": sample["__key__"] + "x", "txt": "?"}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    dest = str(tmp_path_factory.mktemp("base"))
    make_shards(dest, COUNTS, image=True)
    return dest


def test_companion_mirrors_the_base_shards_keys_and_order(base, tmp_path):
    result = write_companion(base, str(tmp_path / "c"), caption, workers=1)
    assert (result.shards, result.samples, result.missing, result.unmatched) == (5, 29, [], [])
    base_manifest = Manifest.from_json(open(os.path.join(base, "data.manifest.json"), "rb").read())
    manifest = Manifest.from_json((tmp_path / "c" / "data.manifest.json").read_bytes())
    assert [s.name for s in manifest.shards] == [s.name for s in base_manifest.shards]
    assert [s.samples for s in manifest.shards] == COUNTS
    assert manifest.fields == ["npy", "txt"] and manifest.complete
    assert manifest.base == {
        "name": "data",
        "manifest": os.path.join(base, "data.manifest.json"),
        "sha256": manifest_sha256(open(os.path.join(base, "data.manifest.json"), "rb").read()),
    }
    for info in manifest.shards:
        base_keys = decode_index_keys(open(os.path.join(base, info.name + ".idx"), "rb").read())
        keys = decode_index_keys((tmp_path / "c" / (info.name + ".idx")).read_bytes())
        assert keys == base_keys and len(keys) == info.samples
        with tarfile.open(tmp_path / "c" / info.name) as tar:  # the tarfile oracle: two members per key, in order
            names = tar.getnames()
        assert names == [f"{k}.{ext}" for k in base_keys for ext in ("npy", "txt")]
    with tarfile.open(tmp_path / "c" / "data-000000.tar") as tar:
        first = np.load(io.BytesIO(tar.extractfile("s000000.npy").read()))
        text = tar.extractfile("s000000.txt").read().decode()
    with tarfile.open(os.path.join(base, "data-000000.tar")) as tar:
        want = caption({"__key__": "s000000", "jpg": tar.extractfile("s000000.jpg").read()})
    assert text == want["txt"] and np.array_equal(first, want["npy"])


def test_same_bytes_for_any_number_of_workers(base, tmp_path):
    write_companion(base, str(tmp_path / "w1"), caption, workers=1)
    write_companion(os.path.join(base, "data.manifest.json"), str(tmp_path / "w3"), caption, workers=3)
    one, three = digests(tmp_path / "w1"), digests(tmp_path / "w3")
    assert len(one) == 11 and one == three


def test_missing_keys_error_skip_and_empty(base, tmp_path):
    with pytest.raises(ShardkitError, match=r"data-000000\.tar sample 's000000': NoNewFields: fn returned None for it"):
        write_companion(base, str(tmp_path / "e"), odd_only, workers=1)
    result = write_companion(base, str(tmp_path / "s"), odd_only, workers=2, missing="skip")
    assert result.samples == 29 and len(result.missing) == 15
    assert result.missing[0] == ("data-000000.tar", "s000000")
    with tarfile.open(tmp_path / "s" / "data-000000.tar") as tar:
        members = {m.name: m.size for m in tar.getmembers()}
    assert members["s000000." + MISSING] == 0 and "s000001.txt" in members and "s000000.txt" not in members
    manifest = Manifest.from_json((tmp_path / "s" / "data.manifest.json").read_bytes())
    assert manifest.fields == ["npy", "txt"]  # the marker is not a field
    empty = write_companion(base, str(tmp_path / "m"), odd_only, workers=1, missing="empty")
    assert empty.samples == 29 and len(empty.missing) == 15
    with tarfile.open(tmp_path / "m" / "data-000000.tar") as tar:
        members = {m.name: m.size for m in tar.getmembers()}
    assert members["s000000." + EMPTY] == 0 and "s000001.txt" in members
    with pytest.raises(ShardkitError, match="sample 's000000': ValueError: fn returned __key__ 's000000x'"):
        write_companion(base, str(tmp_path / "k"), renamed, workers=1)


def test_refuses_what_it_cannot_honour(base, tmp_path):
    with pytest.raises(ValueError, match="either as fn"):
        write_companion(base, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="missing must be"):
        write_companion(base, str(tmp_path / "a"), caption, missing="drop")
    with pytest.raises(ValueError, match="key_column"):
        write_companion(base, str(tmp_path / "a"), caption, key_column="key")
    with pytest.raises(ShardkitError, match="name the base set by its manifest"):
        write_companion(os.path.join(base, "data-000000.tar"), str(tmp_path / "a"), caption)
    write_companion(base, str(tmp_path / "c"), caption, workers=1)
    with pytest.raises(ShardkitError, match="is itself a companion"):
        write_companion(str(tmp_path / "c"), str(tmp_path / "cc"), caption)
    with pytest.raises(ShardkitError, match="already holds 5 shard"):
        write_companion(base, str(tmp_path / "c"), caption, workers=1)
    write_companion(base, str(tmp_path / "c"), caption, workers=1, overwrite=True)
    with pytest.raises(ShardkitError, match="lambda"):
        write_companion(base, str(tmp_path / "l"), lambda s: {"txt": "x"}, workers=2, start_method="spawn")


def test_resume_reads_only_the_shards_left(base, tmp_path):
    write_companion(base, str(tmp_path / "ref"), caption, workers=1)
    reference = digests(tmp_path / "ref")
    out = tmp_path / "out"
    seen: list[str] = []
    crash = [True]

    def model(sample: dict) -> dict:  # runs in this process (workers=1)
        seen.append(sample["__key__"])
        if crash[0] and sample["__key__"] == "s000010":  # in shard 2
            raise RuntimeError("the caption model ran out of memory")
        return caption(sample)

    with pytest.raises(ShardkitError, match="s000010.*out of memory"):
        write_companion(base, str(out), model, workers=1)
    assert "data.resume.json" in os.listdir(out) and len(seen) == 11
    left = digests(out)
    for name in ("data-000000.tar", "data-000001.tar", "data-000000.tar.idx"):
        assert left[name] == reference[name]
    assert "data-000002.tar" not in left
    with pytest.raises(ShardkitError, match="other options"):  # another model is refused, not mixed in
        write_companion(base, str(out), caption, workers=1, resume=True)
    seen.clear()
    crash[0] = False
    result = write_companion(base, str(out), model, workers=1, resume=True)
    assert result.resumed_shards == 2 and result.written == 22
    assert seen[0] == "s000007" and len(seen) == 22  # shards 0 and 1 were not read again
    assert digests(out) == reference
    assert write_companion(base, str(out), model, workers=1, resume=True).written == 0  # complete: nothing to do


def test_killed_companion_write_resumes_to_the_same_bytes(base, tmp_path):
    shardkit("companion", base, str(tmp_path / "ref"), "--fn", "tests.test_companion:slow_caption", "-q")
    reference = digests(tmp_path / "ref")
    out = tmp_path / "out"
    args = ["companion", base, str(out), "--fn", "tests.test_companion:slow_caption", "--workers", "2", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "shardkit.cli", *args], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (out / "data-000002.tar").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, "the write finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    left = digests(out)
    assert "data.resume.json" in left and "data-000004.tar" not in left
    for name, digest in left.items():
        if name.endswith((".tar", ".tar.idx")):
            assert digest == reference[name], name
    summary = json.loads(shardkit(*args[:-1], "--resume", "--json").stdout)
    assert summary["resumed_shards"] >= 2 and summary["samples"] == 29  # shard 2 may lack its record yet
    assert digests(out) == reference


def test_webdataset_reads_a_companion_on_its_own(base, tmp_path):
    import webdataset as wds

    write_companion(base, str(tmp_path / "c"), odd_only, workers=1, missing="skip")
    urls = [str(tmp_path / "c" / f"data-{i:06d}.tar") for i in range(5)]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    keys = [f"s{i:06d}" for i in range(29)]
    for sample, key in pairs(got, keys):
        assert sample["__key__"] == key
        fields = sorted(k for k in sample if not k.startswith("__"))
        assert fields == (["npy", "txt"] if int(key[1:]) % 2 else []), sample.keys()


def test_cli_companion_from_a_function(base, tmp_path):
    args = ["companion", base, str(tmp_path / "c"), "--fn", "tests.test_companion:odd_only"]
    proc = shardkit(*args, check=False)
    assert proc.returncode == 1
    assert re.search(r"data-00000\d\.tar sample 's\d+': NoNewFields: fn returned None", proc.stderr)
    summary = json.loads(shardkit(*args, "--missing", "skip", "--json").stdout)
    assert summary["samples"] == 29 and summary["missing"] == 15 and summary["shards"] == 5
    for bad in (["--fn", "nope"], ["--fn", "tests.test_companion:nothing"], ["--fn", "os:sep"]):
        proc = shardkit("companion", base, str(tmp_path / "d"), *bad, check=False)
        assert proc.returncode == 1 and "--fn" in proc.stderr, proc.stderr
    proc = shardkit("companion", base, str(tmp_path / "d"), check=False)
    assert proc.returncode == 2 and "--from" in proc.stderr


@pytest.mark.parametrize("version", [1, 2])
def test_the_base_entry_round_trips_in_both_manifest_layouts(version):
    from shardkit.errors import ShardFormatError
    from shardkit.format.index import ShardInfo

    ref = {"name": "train", "manifest": "s3://b/train.manifest.json", "sha256": "ab" * 32}
    shards = [ShardInfo("train-000000.tar", 3, 4096, None, ["txt"])]
    manifest = Manifest(shards, name="train", version=version, base=ref)
    back = Manifest.from_json(manifest.to_json())
    assert back.base == ref and back.version == version and list(back.shards) == list(manifest.shards)
    plain = Manifest(list(manifest.shards), name="train", version=version)
    assert '"base"' not in plain.to_json() and Manifest.from_json(plain.to_json()).base is None
    broken = manifest.to_json().replace('"sha256": "' + "ab" * 32 + '"', '"sha256": 5')
    with pytest.raises(ShardFormatError, match="base"):
        Manifest.from_json(broken)
