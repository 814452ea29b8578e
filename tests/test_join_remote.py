"""Joined reads over real servers (nginx, SeaweedFS and moto on 127.0.0.1), with and
without the cache, equal the local read; a companion is written from a remote base."""

from __future__ import annotations

import hashlib
import os

import pytest

from shardkit.loader import ShardLoader
from shardkit.read.dataset import ShardDataset
from shardkit.read.shardmap import ShardMap
from shardkit.writing.companion import write_companion
from tests.helpers import make_shards, pairs
from tests.servers import run_moto, run_nginx, run_seaweedfs, use_s3

pytestmark = pytest.mark.timeout(240)

COUNTS = [9, 0, 14, 5]


def caption(sample: dict) -> dict:
    return {"txt": "caption " + hashlib.sha256(sample["jpg"]).hexdigest()[:12]}


def label(sample: dict) -> dict:
    return {"cls": 7}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    make_shards(str(root / "base"), COUNTS, image=True)
    write_companion(str(root / "base"), str(root / "cap"), caption, workers=1)
    write_companion(str(root / "base"), str(root / "fix"), label, workers=1)
    with run_nginx(str(root)) as nginx, run_seaweedfs() as weed, run_moto() as moto:
        for s3 in (weed, moto):
            client = s3.client()
            for folder in ("base", "cap", "fix"):
                for name in sorted(os.listdir(root / folder)):
                    client.upload_file(str(root / folder / name), s3.bucket, f"{folder}/{name}")
        yield {"root": root, "nginx": nginx, "seaweedfs": weed, "moto": moto}


def _read(base: str, join: list[str], **kw) -> list[tuple[str, str, bytes, bytes]]:
    out = []
    for rank in range(2):
        ds = ShardDataset(
            base, join=join, join_wins={"cls": 2}, shuffle=5, seed=2, world_size=2, rank=rank, even=None, **kw
        )
        out += [(s["__key__"], hashlib.sha256(s["jpg"]).hexdigest(), s["txt"], s["cls"]) for s in ds]
    return out


def test_joined_reads_over_http_and_s3_equal_the_local_read(served, monkeypatch, tmp_path):
    root = served["root"]
    local = _read(str(root / "base"), [str(root / "cap"), str(root / "fix")])
    assert len(local) == 28 and {c for *_, c in local} == {b"7"}
    url = served["nginx"].url
    sources = {"nginx": (url + "base/", [url + "cap/data.manifest.json", url + "fix/"])}
    for name in ("seaweedfs", "moto"):
        bucket = served[name].bucket
        sources[name] = (f"s3://{bucket}/base/", [f"s3://{bucket}/cap/", f"s3://{bucket}/fix/data.manifest.json"])
    for name, (base, join) in sources.items():
        if name != "nginx":
            use_s3(monkeypatch, served[name])
        assert _read(base, join) == local, name
        assert _read(base, join, cache_dir=str(tmp_path / name)) == local, name  # each part through the cache
        cached = [f for _, _, files in os.walk(tmp_path / name) for f in files]
        assert len(cached) >= 3 * 3, cached  # the non-empty shards of all three parts
    # Parts from different places: a remote base, a local companion.
    assert _read(url + "base/", [str(root / "cap"), str(root / "fix")]) == local


def test_loader_and_shard_map_over_http(served):
    root, url = served["root"], served["nginx"].url
    want = [(s["__key__"], s["txt"]) for s in ShardDataset(str(root / "base"), join=[str(root / "cap")])]
    loader = ShardLoader(ShardDataset(url + "base/", join=[url + "cap/"]), batch_size=4, num_workers=2)
    got = [(k, t) for batch in loader for k, t in zip(batch["__key__"], batch["txt"])]
    assert sorted(got) == sorted(want) and len(got) == 28
    m = ShardMap(url + "base/", join=[url + "cap/"])
    for (key, txt), i in pairs(want, range(len(m))):
        assert (m[i]["__key__"], m[i]["txt"]) == (key, txt)


def test_companion_of_a_remote_base_has_the_local_bytes(served, tmp_path):
    root, url = served["root"], served["nginx"].url
    result = write_companion(url + "base/data.manifest.json", str(tmp_path / "cap"), caption, workers=2)
    assert result.samples == 28
    for name in sorted(os.listdir(root / "cap")):
        if name.endswith((".tar", ".idx")):
            assert (tmp_path / "cap" / name).read_bytes() == (root / "cap" / name).read_bytes(), name
    got = [(s["__key__"], s["txt"]) for s in ShardDataset(str(root / "base"), join=[str(tmp_path / "cap")])]
    assert len(got) == 28
