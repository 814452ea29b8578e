"""ShardDataset over real servers: nginx, SeaweedFS and moto on 127.0.0.1, a fault proxy,
the shared cache, and writing shards to remote destinations."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import threading
import time

import pytest

from shardkit.loader import ShardLoader
from shardkit.read.dataset import ShardDataset
from shardkit.storage.dispatch import SourceOptions
from shardkit.writing.writer import ShardWriter
from tests.helpers import make_shards
from tests.servers import FaultProxy, run_moto, run_nginx, run_seaweedfs, use_s3

pytestmark = pytest.mark.timeout(240)


def _big_shards(dest: str) -> list[str]:
    """4 shards of 100 kB random payloads (~4.5 MB), so proxy cuts land mid-shard."""
    rng = __import__("numpy").random.default_rng(5)
    with ShardWriter(dest, shard_size="1.3MB") as w:
        for i in range(44):
            w.write({"__key__": f"b{i:04d}", "bin": rng.bytes(100_000 + i), "cls": i % 5})
    return [os.path.join(dest, s.name) for s in w.shards]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    make_shards(str(root / "ds"), [9, 0, 14, 5], image=True)
    _big_shards(str(root / "big"))
    (root / "upload").mkdir()
    with run_nginx(str(root)) as nginx, run_seaweedfs() as weed, run_moto() as moto:
        for s3 in (weed, moto):
            client = s3.client()
            for folder in ("ds", "big"):
                for name in sorted(os.listdir(root / folder)):
                    client.upload_file(str(root / folder / name), s3.bucket, f"{folder}/{name}")
        yield {"root": root, "nginx": nginx, "seaweedfs": weed, "moto": moto}


def _read(url: str, **kw) -> list[tuple[str, str]]:
    out = []
    for rank in range(2):
        ds = ShardDataset(url, shuffle=5, seed=2, world_size=2, rank=rank, even=None, **kw)
        out += [(s["__key__"], hashlib.sha256(s.get("jpg", s.get("bin"))).hexdigest()) for s in ds]
    return out


def test_same_samples_in_same_order_from_every_source(served, monkeypatch):
    root = served["root"]
    local = _read(str(root / "ds"))
    assert len(local) == 28
    base = served["nginx"].url
    assert _read(base + "ds/data.manifest.json") == local
    assert _read(base + "ds/data-{000000..000003}.tar") == local  # manifest found beside
    assert _read(base + "ds/") == local  # autoindex listing
    for name in ("seaweedfs", "moto"):
        server = served[name]
        use_s3(monkeypatch, server)
        assert _read(f"s3://{server.bucket}/ds/") == local, name
        assert _read(f"s3://{server.bucket}/ds/data-<000000..000003>.tar") == local, name
    ds = ShardDataset(base + "ds/")
    assert ds.counts == [9, 0, 14, 5] and len(ds) == 28


CUTS: dict[int, int] = {}


@pytest.mark.parametrize("run", range(20))
def test_every_sample_exactly_once_through_connection_cuts(served, run):
    root = served["root"]
    expected = sorted(_read(str(root / "big")))
    with FaultProxy(served["nginx"].port, seed=run, cut=(100_000, 5_000_000)) as proxy:
        got = _read(proxy.url("big/"), source_options=SourceOptions(retries=20, backoff=0.001))
        CUTS[run] = proxy.cuts
    assert sorted(got) == expected
    if len(CUTS) == 20:  # a cut beyond the bytes a connection carries never fires
        assert sum(1 for c in CUTS.values() if c) >= 15, CUTS


def _cached_reader(url: str, cache: str, queue) -> None:
    ds = ShardDataset(url, cache_dir=cache, cache_size="2.7MB", shuffle=4, seed=1)
    loader = ShardLoader(ds, batch_size=4, num_workers=2)
    digests = []
    for batch in loader:
        digests += [(k, hashlib.sha256(b).hexdigest()) for k, b in zip(batch["__key__"], batch["bin"])]
    queue.put((digests, loader.stats()))


def test_cache_shared_by_two_processes_stays_bounded(served, tmp_path):
    root = served["root"]
    expected = sorted(_read(str(root / "big")))
    cache = str(tmp_path / "cache")
    shard_bytes = max(os.path.getsize(root / "big" / n) for n in os.listdir(root / "big") if n.endswith(".tar"))
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            total = 0
            for dirpath, _, files in os.walk(os.path.join(cache, "objects")):
                for f in files:
                    try:
                        total += os.path.getsize(os.path.join(dirpath, f))
                    except OSError:
                        pass
            peak[0] = max(peak[0], total)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_cached_reader, args=(served["nginx"].url + "big/", cache, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    stop.set()
    watcher.join()
    for digests, stats in results:
        assert sorted(digests) == expected
        assert stats["cache_misses"] + stats["cache_hits"] >= 4
    assert peak[0] <= 2_700_000 + shard_bytes
    leftovers = [f for _, _, files in os.walk(cache) for f in files if f.endswith((".part", ".tmp"))]
    assert leftovers == []


def test_write_shards_to_s3_and_http(served, monkeypatch, tmp_path):
    samples = [{"__key__": f"w{i:03d}", "bin": os.urandom(3000), "cls": i} for i in range(30)]
    targets = [served["nginx"].url + "upload/run1"]
    server = served["seaweedfs"]
    use_s3(monkeypatch, server)
    targets.append(f"s3://{server.bucket}/upload/run1")
    for dest in targets:
        with ShardWriter(dest, shard_size="20kB") as w:
            for s in samples:
                w.write(s)
        assert len(w.shards) > 2 and not os.path.exists(w.dest)  # staging folder removed
        back = list(ShardDataset(dest + "/data.manifest.json"))
        assert [(s["__key__"], s["bin"]) for s in back] == [(s["__key__"], s["bin"]) for s in samples]
