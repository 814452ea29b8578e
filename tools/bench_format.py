"""Format benchmarks (issue: shard format): raw iteration and writing, against peers.

In one run, on the same data:
- raw iteration (no decode) of the same shards by shardkit and by webdataset, warm
  page cache, one process: samples/s and the ratio;
- `shardkit write` from an image folder vs `tar cf` of the same folder (warm cache);
- time to the first sample of a range that starts deep in a shard, with 10 MB and
  1 GB shards (it must not grow with shard size).

    python tools/bench_format.py --count 3000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardkit.cli.synthetic import make_image_folder  # noqa: E402


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def iterate_shardkit(urls: list[str]) -> int:
    from shardkit.format.samples import iter_samples

    n = 0
    for url in urls:
        with open(url, "rb") as f:
            for _ in iter_samples(f, url=url):
                n += 1
    return n


def iterate_webdataset(urls: list[str]) -> int:
    import webdataset as wds

    return sum(1 for _ in wds.WebDataset(urls, shardshuffle=False))


def bench_raw(shards: list[str], repeat: int) -> list[tuple[str, float, str]]:
    n = iterate_shardkit(shards)
    assert n == iterate_webdataset(shards)
    t_sk = best_of(lambda: iterate_shardkit(shards), repeat)
    t_wds = best_of(lambda: iterate_webdataset(shards), repeat)
    mb = sum(os.path.getsize(s) for s in shards) / 1e6
    return [
        ("raw iteration: webdataset", n / t_wds, f"{mb / t_wds:,.0f} MB/s"),
        ("raw iteration: shardkit", n / t_sk, f"{mb / t_sk:,.0f} MB/s  ratio {t_wds / t_sk:.1f}x webdataset"),
    ]


def bench_write(folder: str, work: str, count: int, repeat: int) -> list[tuple[str, float, str]]:
    tar_out = os.path.join(work, "folder.tar")
    t_tar = best_of(lambda: subprocess.run(["tar", "cf", tar_out, "-C", folder, "."], check=True), repeat)

    def write() -> None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "shardkit.cli",
                "write",
                folder,
                os.path.join(work, "w"),
                "--overwrite",
                "-q",
                "--shard-size",
                "100MB",
            ],
            check=True,
        )

    t_sk = best_of(write, repeat)
    # Library call without interpreter start-up, for the per-sample cost.
    import shardkit

    def write_lib() -> None:
        shardkit.write(folder, os.path.join(work, "w2"), shard_size="100MB", overwrite=True, progress=False)

    t_lib = best_of(write_lib, repeat)
    return [
        ("tar cf (image folder)", count / t_tar, ""),
        ("shardkit write (CLI, incl. start-up)", count / t_sk, f"ratio {t_tar / t_sk:.2f}x tar cf"),
        ("shardkit write (library)", count / t_lib, f"ratio {t_tar / t_lib:.2f}x tar cf"),
    ]


def bench_first_sample(work: str) -> list[tuple[str, float, str]]:
    """Time to the first sample and first batch of a rank whose range starts in the middle of
    a 10 MB and of a 1 GB shard (the index lets it seek; no bytes before are read)."""
    from shardkit.read.dataset import ShardDataset
    from shardkit.writing.writer import ShardWriter

    rows = []
    payload = os.urandom(100_000)
    for label, size in (("10 MB", 10_000_000), ("1 GB", 1_000_000_000)):
        dest = os.path.join(work, f"ttfs-{label.replace(' ', '')}")
        n = size // 101_000
        with ShardWriter(dest, shard_size=size * 2) as w:
            for i in range(n):
                w.write({"__key__": f"k{i:07d}", "bin": payload})
        t0 = time.perf_counter()
        ds = ShardDataset(dest, world_size=2, rank=1, even=None)
        first = next(iter(ds))
        dt = time.perf_counter() - t0
        assert first["__key__"] == f"k{n // 2:07d}"
        rows.append((f"first sample, mid {label} shard", 1 / dt, f"{dt * 1000:.1f} ms (incl. opening the dataset)"))
        from shardkit.loader import ShardLoader

        t0 = time.perf_counter()
        batch = next(
            iter(ShardLoader(ShardDataset(dest, world_size=2, rank=1, even=None), batch_size=8, num_workers=2))
        )
        dt = time.perf_counter() - t0
        assert len(batch["__key__"]) == 8
        rows.append((f"first batch (2 workers), mid {label} shard", 1 / dt, f"{dt * 1000:.1f} ms"))
        shutil.rmtree(dest)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000, help="images (default 3000, ~57 KB each)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", help="work folder (default: a temp dir, removed)")
    parser.add_argument("--skip-1gb", action="store_true", help="skip the 1 GB time-to-first-sample case")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="shardkit-bench-")
    try:
        folder = os.path.join(work, "images")
        if not os.path.isdir(folder):
            make_image_folder(folder, count=args.count, classes=10, size=(460, 345), workers=2)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "shardkit.cli",
                "write",
                folder,
                os.path.join(work, "shards"),
                "--shard-size",
                "200MB",
                "--overwrite",
                "-q",
            ],
            check=True,
        )
        shards = sorted(
            os.path.join(work, "shards", f) for f in os.listdir(os.path.join(work, "shards")) if f.endswith(".tar")
        )
        avg = sum(os.path.getsize(s) for s in shards) / args.count / 1e3
        rows = bench_raw(shards, args.repeat)
        rows += bench_write(folder, work, args.count, args.repeat)
        if not args.skip_1gb:
            rows += bench_first_sample(work)
        print(f"{args.count} photo-like JPEGs, {avg:.0f} KB per sample, {os.cpu_count()} cores, warm page cache")
        print(f"{'case':48s} {'per second':>14s}  notes")
        for name, rate, note in rows:
            print(f"{name:48s} {rate:14,.0f}  {note}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
