"""format/index: the .idx sidecar and the one-pass shard scan (the manifest: test_manifest.py).

Oracles: Python's ``tarfile`` for member offsets, GNU tar for shards shardkit did not write.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardkit.errors import ShardFormatError
from shardkit.format.index import (
    decode_index,
    decode_index_keys,
    encode_index,
    scan_shard,
)
from tests.helpers import make_shards, pairs


@given(st.sets(st.integers(0, 2**40), min_size=1, max_size=50).map(sorted), st.booleans())
def test_index_round_trips_offsets_and_keys(offsets, with_keys):
    keys = [f"k{i}/x" for i in range(len(offsets) - 1)] if with_keys else None  # one per sample
    data = encode_index(offsets, keys)
    assert decode_index(data).tolist() == offsets
    assert decode_index_keys(data) == keys


def test_index_needs_the_end_offset_and_one_key_per_sample():
    with pytest.raises(ValueError, match="end offset"):
        encode_index([])
    with pytest.raises(ValueError, match="2 keys for 1 samples"):
        encode_index([0, 512], ["a", "b"])


def test_offsets_that_do_not_increase_are_a_format_error():
    with pytest.raises(ShardFormatError, match="x.idx.*not increasing"):
        decode_index(encode_index([0, 512, 512]), url="x.idx")


def test_bad_index_names_its_url():
    with pytest.raises(ShardFormatError, match=r"http://h/a\.tar\.idx"):
        decode_index(b"NOTANIDX" + bytes(16), url="http://h/a.tar.idx")


def test_scan_matches_tarfile_and_the_file(tmp_path):
    (shard,) = make_shards(str(tmp_path), [7], image=True)
    with open(shard, "rb") as f:
        scan = scan_shard(f, url=shard)
    data = open(shard, "rb").read()
    assert scan.sha256 == hashlib.sha256(data).hexdigest() and scan.bytes == len(data)
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    # A sample starts at the header of its first member; members come in samples of 3.
    firsts = [m.offset for m in members if m.name.endswith(".cls")]
    assert len(scan.offsets) == 7 + 1 and scan.offsets[:-1] == firsts
    assert scan.offsets[-1] == members[-1].offset_data + -(-members[-1].size // 512) * 512
    assert scan.keys == [f"s{i:06d}" for i in range(7)] and scan.fields == ["cls", "jpg", "json"]
    assert scan.compression is None


def test_scan_of_a_gnu_tar_shard_counts_its_samples(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i:03d}.txt").write_text(str(i))
        (src / f"{i:03d}.bin").write_bytes(os.urandom(700))
    shard = tmp_path / "gnu.tar"
    subprocess.run(["tar", "--format=gnu", "-cf", str(shard), "-C", str(src), *sorted(os.listdir(src))], check=True)
    with open(shard, "rb") as f:
        scan = scan_shard(f)
    assert scan.keys == ["000", "001", "002", "003"] and scan.fields == ["bin", "txt"]
    with tarfile.open(shard) as tf:
        starts = [m.offset for m in tf.getmembers() if m.name.endswith(".bin")]
    for got, want in pairs(scan.offsets[:-1], starts):
        assert got == want


def test_scan_of_a_gzip_shard_hashes_the_file_not_the_tar(tmp_path):
    (shard,) = make_shards(str(tmp_path), [5])
    gz = tmp_path / "d.tar.gz"
    subprocess.run(["gzip", "-k", "-c", shard], check=True, stdout=open(gz, "wb"))
    with open(gz, "rb") as f:
        scan = scan_shard(f, url=str(gz))
    assert scan.compression == "gzip" and len(scan.offsets) == 6
    assert scan.sha256 == hashlib.sha256(gz.read_bytes()).hexdigest()


def test_empty_tar_scans_to_no_samples():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    buf.seek(0)
    scan = scan_shard(buf)
    assert scan.offsets == [0] and scan.keys == [] and np.asarray(scan.offsets).dtype.kind == "i"
