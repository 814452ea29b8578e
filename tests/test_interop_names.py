"""Member names every client reads: long and non-ASCII keys written by ShardWriter come
back whole from tarfile, GNU tar, webdataset and DALI's own tar reader (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from shardkit.format.samples import iter_samples
from shardkit.format.tar import member_header
from shardkit.writing.writer import ShardWriter

KEYS = ["short", "ü/名前", "x" * 150, "d" * 90 + "/" + "e" * 90, "é" * 60]  # the last: 120 bytes of UTF-8


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    dest = str(tmp_path_factory.mktemp("names"))
    with ShardWriter(dest, shard_size="1GB") as w:
        for i, key in enumerate(KEYS):
            w.write({"__key__": key, "txt": f"caption {i}", "cls": i})
    return os.path.join(dest, w.shards[0].name)


def _names() -> list[str]:
    return [f"{k}.{ext}" for k in KEYS for ext in ("cls", "txt")]


def test_long_names_use_gnu_long_name_records_not_pax():
    header = member_header("y" * 150 + ".jpg", 10)
    assert header[156:157] == b"L" and header[257:265] == b"ustar  \0" and b"PaxHeader" not in header
    assert len(member_header("short.jpg", 10)) == 512


def test_tarfile_and_shardkit_read_every_name(shard):
    with tarfile.open(shard) as tf:
        assert sorted(m.name for m in tf.getmembers()) == sorted(_names())
    assert [s["__key__"] for s in iter_samples(open(shard, "rb"), url=shard)] == KEYS


def test_gnu_tar_lists_every_name(shard):
    out = subprocess.run(
        ["tar", "-tf", shard], capture_output=True, check=True, env={**os.environ, "LC_ALL": "C.UTF-8"}
    )
    assert sorted(out.stdout.decode().splitlines()) == sorted(_names())


def test_webdataset_reads_every_sample(shard):
    wds = pytest.importorskip("webdataset")
    samples = list(wds.WebDataset(shard, shardshuffle=False))
    assert [s["__key__"] for s in samples] == KEYS
    assert [s["txt"].decode() for s in samples] == [f"caption {i}" for i in range(len(KEYS))]


DALI_SCRIPT = """
import json, sys
from nvidia.dali import fn, pipeline_def

@pipeline_def(batch_size=%d, num_threads=1, device_id=None)
def pipe():
    txt, cls = fn.readers.webdataset(paths=[sys.argv[1]], ext=["txt", "cls"], missing_component_behavior="error")
    return txt, cls

p = pipe()
p.build()
txt, cls = p.run()
print(json.dumps([bytes(txt.at(i)).decode() for i in range(len(txt))]))
"""


def test_dali_reads_every_sample(shard):
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        pytest.skip("nvidia-dali is not installed (Linux x86-64 only)")
    # In a child: DALI's native libraries stay out of the test process.
    proc = subprocess.run(
        [sys.executable, "-c", DALI_SCRIPT % len(KEYS), shard], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [f"caption {i}" for i in range(len(KEYS))]
