"""ShardCache: correctness, bounds and locking, with several processes and threads."""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
import random
import threading
import time

import pytest

from shardkit.errors import SourceError
from shardkit.storage import cache as cache_mod
from shardkit.storage.cache import ShardCache, url_key
from shardkit.storage.dispatch import SourceOptions, open_stream, prefetch
from tests.servers import BUCKET


def _digest(f) -> str:
    h = hashlib.sha256()
    while data := f.read(1 << 20):
        h.update(data)
    return h.hexdigest()


def _dir_bytes(path: str) -> int:
    total = 0
    for name in os.listdir(path):
        try:
            total += os.stat(os.path.join(path, name)).st_size
        except FileNotFoundError:
            pass
    return total


def _reader_process(urls: list[str], want: dict[str, str], cache_dir: str, cache_size: int, seed: int, out) -> None:
    """One 'training process': 2 threads reading every URL twice in random order."""
    opts = SourceOptions(cache_dir=cache_dir, cache_size=cache_size, retries=4, backoff=0.01)
    errors: list[str] = []

    def worker(k: int) -> None:
        rng = random.Random(seed * 10 + k)
        order = urls * 2
        rng.shuffle(order)
        for url in order:
            try:
                with open_stream(url, options=opts) as f:
                    got = _digest(f)
                if got != want[url]:
                    errors.append(f"{url}: wrong bytes")
            except Exception as e:  # reported to the parent
                errors.append(f"{url}: {e!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((errors, cache_mod.cache_for(opts).stats()))


@pytest.mark.timeout(60)
def test_two_processes_two_threads_bounded(nginx_server, shard_files, tmp_path):
    urls = [nginx_server.url + n for n in shard_files.names]
    want = {nginx_server.url + n: shard_files.sha256(n) for n in shard_files.names}
    sizes = [os.path.getsize(shard_files.path(n)) for n in shard_files.names]
    limit = int(sum(sizes) * 0.7)  # smaller than the data: forces evictions
    cache_dir = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("fork")  # like DataLoader workers
    out = ctx.Queue()
    procs = [ctx.Process(target=_reader_process, args=(urls, want, cache_dir, limit, i, out)) for i in range(2)]
    for p in procs:
        p.start()
    peak = 0
    objects = os.path.join(cache_dir, "objects")
    while any(p.is_alive() for p in procs):
        if os.path.isdir(objects):
            peak = max(peak, _dir_bytes(objects))
        time.sleep(0.002)
    results = [out.get(timeout=10) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    errors = [e for errs, _ in results for e in errs]
    assert not errors, errors[:5]
    stats = [s for _, s in results]
    reads = 2 * 2 * 2 * len(urls)
    assert sum(s["hits"] + s["misses"] for s in stats) == reads
    assert sum(s["hits"] for s in stats) > 0
    assert sum(s["misses"] for s in stats) >= len(urls)
    assert sum(s["evictions"] for s in stats) > 0
    assert peak <= limit + max(sizes), (peak, limit)
    assert _dir_bytes(objects) <= limit
    assert os.listdir(os.path.join(cache_dir, "tmp")) == []
    assert os.listdir(os.path.join(cache_dir, "locks")) == []
    assert sum(s["bytes_downloaded"] for s in stats) >= sum(sizes)


@pytest.mark.timeout(30)
def test_single_download_per_url(tmp_path):
    """Eight threads open one URL at once: one fetch, seven hits waiting on the lock."""
    cache = ShardCache(str(tmp_path), "10MB")
    calls = []

    def fetch(path: str) -> None:
        calls.append(path)
        time.sleep(0.2)
        with open(path, "wb") as f:
            f.write(b"x" * 1000)

    results = []

    def reader() -> None:
        with cache.open("http://h/a/data.tar", fetch) as f:
            results.append(f.read())

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [b"x" * 1000] * 8
    st = cache.stats()
    assert (st["misses"], st["hits"], st["bytes_downloaded"]) == (1, 7, 1000)


@pytest.mark.timeout(30)
def test_key_is_full_url_and_readable(tmp_path):
    cache = ShardCache(str(tmp_path))
    a, b = "http://h1/x/data-000000.tar", "http://h2/y/data-000000.tar"
    assert cache.path_for(a) != cache.path_for(b)
    assert os.path.basename(cache.path_for(a)) == f"{url_key(a)}-data-000000.tar"
    for url, payload in ((a, b"A"), (b, b"B")):
        with cache.open(url, lambda p, d=payload: open(p, "wb").write(d)) as f:
            assert f.read() == payload


@pytest.mark.timeout(30)
def test_lru_never_evicts_open_files(tmp_path):
    cache = ShardCache(str(tmp_path), 2500)

    def fetch(path: str) -> None:
        with open(path, "wb") as f:
            f.write(os.urandom(1000))

    held = cache.open("u://0", fetch)  # oldest, but open
    for i in range(1, 6):
        cache.open(f"u://{i}", fetch).close()
        time.sleep(0.01)  # distinct mtimes
    assert cache.contains("u://0")  # pinned by the reader
    assert _dir_bytes(os.path.join(str(tmp_path), "objects")) <= 2500
    cache.open("u://5", fetch).close()  # touch: now most recently used
    held.close()
    cache.open("u://6", fetch).close()
    assert not cache.contains("u://0") and cache.contains("u://5")
    assert cache.stats()["evictions"] >= 4


@pytest.mark.timeout(30)
def test_crashed_temp_files_cleaned(tmp_path):
    cache = ShardCache(str(tmp_path))
    key = url_key("http://h/a.tar")
    stale = os.path.join(str(tmp_path), "tmp", f"{key}.99999.dead.part")
    open(stale, "wb").write(b"half")
    # A download in progress elsewhere: its URL lock is held, so its temp file stays.
    key2 = url_key("http://h/b.tar")
    live = os.path.join(str(tmp_path), "tmp", f"{key2}.99998.live.part")
    open(live, "wb").write(b"going")
    lock_path = os.path.join(str(tmp_path), "locks", key2 + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert cache.clean_temp_files() == 1
        assert not os.path.exists(stale) and os.path.exists(live)
        open(stale, "wb").write(b"half")
        ShardCache(str(tmp_path))  # opening a cache cleans too
        assert not os.path.exists(stale) and os.path.exists(live)
    finally:
        os.close(fd)
    assert cache.clean_temp_files() == 1 and not os.path.exists(live)


@pytest.mark.timeout(30)
def test_failed_fetch_leaves_nothing(tmp_path):
    cache = ShardCache(str(tmp_path))

    def broken(path: str) -> None:
        open(path, "wb").write(b"partial")
        raise SourceError("HTTP 500 after 8 retries", url="http://h/a.tar", status=500)

    with pytest.raises(SourceError):
        cache.open("http://h/a.tar", broken)
    assert os.listdir(os.path.join(str(tmp_path), "tmp")) == []
    assert os.listdir(os.path.join(str(tmp_path), "objects")) == []
    assert os.listdir(os.path.join(str(tmp_path), "locks")) == []


@pytest.mark.timeout(30)
def test_sha256_verified(nginx_server, shard_files, tmp_path):
    name = shard_files.names[0]
    url = nginx_server.url + name
    opts = SourceOptions(cache_dir=str(tmp_path / "c"), cache_size="100MB")
    with pytest.raises(SourceError, match="sha256 mismatch"):
        open_stream(url, options=opts, expected_sha256="0" * 64)
    assert os.listdir(tmp_path / "c" / "objects") == []
    with open_stream(url, options=opts, expected_sha256=shard_files.sha256(name)) as f:
        assert f.read() == shard_files.data(name)
    with open_stream(url, offset=100, length=50, options=opts) as f:  # served from cache
        assert f.read() == shard_files.data(name)[100:150]


@pytest.mark.timeout(30)
def test_prefetch(nginx_server, shard_files, tmp_path):
    urls = [nginx_server.url + n for n in shard_files.names]
    opts = SourceOptions(cache_dir=str(tmp_path), cache_size="100MB", read_ahead=3)
    futures = prefetch(urls, opts)
    assert len(futures) == 3
    for fut in futures:
        fut.result(timeout=10)
    c = cache_mod.cache_for(opts)
    assert [c.contains(u) for u in urls] == [True] * 3 + [False] * 3
    assert c.stats()["prefetched"] == 3
    with open_stream(urls[0], options=opts) as f:
        assert f.read() == shard_files.data(shard_files.names[0])
    assert c.stats()["hits"] >= 1


@pytest.mark.timeout(60)
def test_s3_through_cache(s3_server, shard_files, tmp_path):
    name = shard_files.names[1]
    opts = SourceOptions(cache_dir=str(tmp_path), cache_size="50MB")
    for _ in range(2):
        with open_stream(f"s3://{BUCKET}/{name}", options=opts) as f:
            assert f.read() == shard_files.data(name)


@pytest.mark.timeout(30)
def test_pipe_urls_go_through_the_cache_too(shard_files, tmp_path):
    # Before: pipe: (and fsspec) URLs silently ignored cache_dir.
    name = shard_files.names[2]
    url = f"pipe:cat {shard_files.path(name)}"
    opts = SourceOptions(cache_dir=str(tmp_path), cache_size="50MB", allow_pipe=True)
    for _ in range(2):
        with open_stream(url, offset=1000, length=500, options=opts) as f:
            assert f.read() == shard_files.data(name)[1000:1500]
    stats = cache_mod.cache_for(opts).stats()
    assert stats["misses"] == 1 and stats["hits"] == 1 and stats["bytes_cached"] == len(shard_files.data(name))


@pytest.mark.timeout(60)
def test_dataset_read_ahead_downloads_upcoming_shards(nginx_server, shard_files, tmp_path):
    from shardkit.read.dataset import ShardDataset

    urls = [nginx_server.url + n for n in shard_files.names]
    opts = SourceOptions(cache_dir=str(tmp_path / "c"), cache_size="100MB", read_ahead=2)
    ds = ShardDataset(urls, source_options=opts)
    it = iter(ds)
    first = next(it)  # reading shard 0 queues shards 1 and 2 in the background
    assert first["__url__"] == urls[0]
    cache = cache_mod.cache_for(ds.options)
    for future in list(cache._pending.values()):
        future.result(timeout=20)
    assert [cache.contains(u) for u in urls[:4]] == [True, True, True, False]
    assert cache.stats()["prefetched"] == 2
    rest = [s["__url__"] for s in it]
    assert len(rest) == 8 * len(urls) - 1
