"""Raw read throughput of shards: local disk vs nginx (HTTP backend) vs S3 (SeaweedFS).

    python tools/bench_remote.py [--size-mb 200] [--repeat 3] [--dir .bench/remote]

Writes ~200 MB of tar shards (members of ~50 KB random payload) once, serves them with
nginx on loopback and uploads them to a ``weed mini`` S3 gateway, then reads every shard
end to end with 1 MiB ``read()`` calls through :func:`shardkit.storage.dispatch.open_stream` and
prints MB/s and the ratio to local disk. "warm" runs read from the page cache; "cold"
runs drop the shards from the page cache first (``posix_fadvise(DONTNEED)``), so local
and nginx both read the disk. Best of ``--repeat`` runs. Needs nginx and the ``weed``
binary (a missing one is reported as n/a).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardkit.cli.bench import drop_page_cache  # noqa: E402
from shardkit.storage.backend import CHUNK  # noqa: E402
from shardkit.storage.dispatch import SourceOptions, open_stream  # noqa: E402


def make_shards(folder: str, total_mb: int, shard_mb: int = 25, payload: int = 50_000) -> list[str]:
    """Tar shards of random ~``payload``-byte members; reused if already there."""
    os.makedirs(folder, exist_ok=True)
    n_shards = max(1, total_mb // shard_mb)
    names = [f"bench-{i:06d}.tar" for i in range(n_shards)]
    for name in names:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            continue
        with tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tar:
            written, i = 0, 0
            while written < shard_mb * 1_000_000:
                data = os.urandom(payload)
                info = tarfile.TarInfo(f"{i:08d}.bin")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, fileobj=io.BytesIO(data))
                written += len(data) + 512
                i += 1
        os.rename(path + ".tmp", path)
    return names


def read_through(urls: list[str], options: SourceOptions, mode: str = "read") -> int:
    """Read every URL to the end with 1 MiB ``read()`` or ``readinto()`` calls."""
    total = 0
    buf = bytearray(CHUNK)
    for url in urls:
        with open_stream(url, options=options) as f:
            if mode == "readinto":
                while n := f.readinto(buf):
                    total += n
            else:
                while data := f.read(CHUNK):
                    total += len(data)
    return total


def curl_through(urls: list[str], size: int) -> int:
    """Reference client: one curl process (kept-alive connection) writing to /dev/null."""
    args = ["curl", "-sSf"]
    for url in urls:
        args += ["-o", os.devnull, url]
    subprocess.run(args, check=True)
    return size


def best_rate(fn: Callable[[], int], repeat: int, before: Callable[[], None] | None = None) -> float:
    best = 0.0
    for _ in range(repeat):
        if before:
            before()
        start = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - start) / 1e6)
    return best


def loader_rate(urls: list[str], workers: int) -> float:
    """Raw samples/s (no decode) through ShardDataset + ShardLoader, end to end."""
    from shardkit.loader import ShardLoader
    from shardkit.read.dataset import ShardDataset

    loader = ShardLoader(ShardDataset(urls), batch_size=64, num_workers=workers)
    started = time.perf_counter()
    n = sum(len(batch["__key__"]) for batch in loader)
    return n / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join(".bench", "remote"))
    args = ap.parse_args(argv)

    import pytest  # tests.servers uses pytest.skip for a missing binary

    from tests import servers

    folder = os.path.abspath(args.dir)
    names = make_shards(folder, args.size_mb)
    paths = [os.path.join(folder, n) for n in names]
    opts = SourceOptions(retries=3, backoff=0.1)
    size = sum(os.path.getsize(p) for p in paths)
    # rows: (label, read() MB/s, readinto() MB/s, reference row for the ratio)
    rows: list[tuple[str, float | None, float | None, str]] = []
    loader_rows: list[tuple[int, float, float]] = []  # (workers, local samples/s, nginx samples/s)

    def both(urls: list[str], before: Callable[[], None] | None = None) -> tuple[float, float]:
        return (
            best_rate(lambda: read_through(urls, opts, "read"), args.repeat, before),
            best_rate(lambda: read_through(urls, opts, "readinto"), args.repeat, before),
        )

    def cold() -> None:
        drop_page_cache(paths)

    def warm() -> None:
        for p in paths:  # make sure everything is in the page cache
            with open(p, "rb", buffering=0) as f:
                while f.read(CHUNK * 8):
                    pass

    warm()
    rows.append(("local disk, warm", *both(paths), "local disk, warm"))
    try:
        with servers.run_nginx(folder) as nginx:
            urls = [nginx.url + n for n in names]
            read_through(urls[:1], opts)  # connect, warm the pool
            warm()
            rows.append(("nginx http, warm", *both(urls), "local disk, warm"))
            if shutil.which("curl"):
                rate = best_rate(lambda: curl_through(urls, size), args.repeat)
                rows.append(("nginx curl, warm", rate, None, "local disk, warm"))
            rows.append(("local disk, cold", *both(paths, cold), "local disk, cold"))
            rows.append(("nginx http, cold", *both(urls, cold), "local disk, cold"))
            warm()
            for workers in (0, 2):
                local = max(loader_rate(paths, workers) for _ in range(args.repeat))
                remote = max(loader_rate(urls, workers) for _ in range(args.repeat))
                loader_rows.append((workers, local, remote))
    except pytest.skip.Exception as e:
        rows.append((f"nginx: n/a ({e})", None, None, ""))

    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    try:
        with servers.run_seaweedfs() as s3:
            os.environ.update(s3.env())
            client = s3.client()
            for n, p in zip(names, paths):
                client.upload_file(p, s3.bucket, "bench/" + n)
            s3_urls = [f"s3://{s3.bucket}/bench/{n}" for n in names]
            read_through(s3_urls[:1], opts)
            rows.append(("S3 SeaweedFS", *both(s3_urls), "local disk, warm"))
    except pytest.skip.Exception as e:
        rows.append((f"S3: n/a ({e})", None, None, ""))
    finally:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[k]
        os.environ.update(saved)

    ref = {label: (r, ri) for label, r, ri, _ in rows}

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f}"

    def ratio(value: float | None, base: float | None) -> str:
        return f"{value / base:.2f}" if value and base else ""

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{len(names)} shards, {size / 1e6:.0f} MB, 1 MiB reads, best of {args.repeat}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f}"
    )
    print(f"| {'source':<18} | {'read() MB/s':>11} | {'x local':>7} | {'readinto() MB/s':>15} | {'x local':>7} |")
    print(f"|{'-' * 20}|{'-' * 13}|{'-' * 9}|{'-' * 17}|{'-' * 9}|")
    for label, r, ri, base in rows:
        b = ref.get(base, (None, None))
        print(f"| {label:<18} | {cell(r):>11} | {ratio(r, b[0]):>7} | {cell(ri):>15} | {ratio(ri, b[1]):>7} |")
    for workers, local, remote in loader_rows:
        print(
            f"ShardLoader raw samples/s, {workers} workers: local {local:,.0f}, nginx {remote:,.0f} "
            f"({remote / local:.2f}x local)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
