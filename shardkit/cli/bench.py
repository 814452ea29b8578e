"""End-to-end loader benchmark: shardkit against the loaders users would pick instead.

One run, one synthetic photo-like JPEG dataset, the same decode and augment for every
peer (decode to a uint8 tensor with shardkit's fastest decoder, RandomResizedCrop(224) +
horizontal flip, uint8 batches of 64, the same worker count):

- the single-core decode+augment rate ("limit" = that x cores);
- ImageFolder + DataLoader (many small files);
- webdataset (WebDataset + WebLoader, batched in workers);
- shardkit ShardLoader: process workers, thread decode, reduced-size decode;
- raw iteration without decode, warm and cold page cache;
- time to first batch and peak RSS (each configuration runs in its own process).

    shardkit bench -- --count 2000 --workers 2
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

CONFIGS = ("limit", "imagefolder", "webdataset", "shardkit", "shardkit-threads", "shardkit-reduced",
           "raw-shardkit", "raw-webdataset", "raw-shardkit-cold", "raw-webdataset-cold")


def augment(size: int = 224) -> Callable[[Any], Any]:
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])


def prepare(work: str, count: int, *, size: tuple[int, int] = (500, 375)) -> tuple[str, str]:
    """Image folder and shards in ``work`` (reused when already there)."""
    from .convert import write_shards
    from ..ingest import IngestOptions, open_source
    from .synthetic import make_image_folder

    folder = os.path.join(work, "images")
    shards = os.path.join(work, "shards")
    if not os.path.isdir(folder):
        make_image_folder(folder, count=count, classes=10, size=size, workers=os.cpu_count() or 2)
    if not os.path.exists(os.path.join(shards, "data.manifest.json")):
        write_shards(open_source(folder, options=IngestOptions(workers=4)), shards, shard_size="100MB",
                     overwrite=True, progress=False)
    return folder, shards


def drop_page_cache(paths: list[str]) -> None:
    """Evict files from the page cache (posix_fadvise works without root)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _loop(batches, count_of: Callable[[Any], int]) -> dict[str, float]:
    started = time.perf_counter()
    first = None
    n = 0
    for batch in batches:
        if first is None:
            first = time.perf_counter() - started
        n += count_of(batch)
    total = time.perf_counter() - started
    steady = n / (total - first) if first is not None and total > first else 0.0
    return {"samples": n, "seconds": total, "first_batch_s": first or 0.0, "rate": n / total, "steady_rate": steady}


def run_config(name: str, folder: str, shards: str, workers: int, batch: int) -> dict[str, Any]:
    import torch

    from ..dataset import ShardDataset
    from ..decode import decode_image
    from ..loader import ShardLoader

    urls = sorted(glob.glob(os.path.join(shards, "*.tar")))
    aug = augment()
    torch.set_num_threads(1)

    if name == "limit":
        files = sorted(glob.glob(os.path.join(folder, "*", "*.jpg")))[:300]
        data = [open(f, "rb").read() for f in files]
        for d in data[:20]:
            aug(decode_image(d, "torch"))
        t0 = time.perf_counter()
        for d in data:
            aug(decode_image(d, "torch"))
        dt = time.perf_counter() - t0
        return {"samples": len(data), "seconds": dt, "rate": len(data) / dt, "steady_rate": len(data) / dt,
                "first_batch_s": 0.0}
    if name == "imagefolder":
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder

        def load(path: str) -> Any:
            with open(path, "rb") as f:
                return decode_image(f.read(), "torch")

        ds = ImageFolder(folder, loader=load, transform=aug)
        loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=False)
        return _loop(loader, lambda b: len(b[1]))
    if name == "webdataset":
        import webdataset as wds

        def prep(sample: dict) -> tuple:
            return aug(decode_image(sample["jpg"], "torch")), int(sample["cls"])

        ds = wds.WebDataset(urls, shardshuffle=False).shuffle(0).map(prep).batched(batch)
        loader = wds.WebLoader(ds, batch_size=None, num_workers=workers)
        return _loop(loader, lambda b: len(b[1]))
    if name.startswith("shardkit"):
        threads = 2 if name == "shardkit-threads" else 0
        ds = ShardDataset(shards, decode="torch", decode_size=224 if name == "shardkit-reduced" else None,
                          transform={"jpg": aug}, fields="jpg cls", threads=threads)
        loader = ShardLoader(ds, batch_size=batch, num_workers=0 if threads else workers)
        return _loop(loader, lambda b: len(b[1]))
    if name.startswith("raw-"):
        if name.endswith("-cold"):
            drop_page_cache(urls)
        if "webdataset" in name:
            import webdataset as wds

            return _loop(wds.WebDataset(urls, shardshuffle=False), lambda s: 1)
        return _loop(ShardDataset(shards), lambda s: 1)
    raise ValueError(f"unknown configuration {name!r}")


def _run_isolated(name: str, folder: str, shards: str, workers: int, batch: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "shardkit.cli.bench", "--one", name, "--folder", folder, "--shards", shards,
           "--workers", str(workers), "--batch", str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(results: dict[str, dict[str, Any]], workers: int) -> str:
    cores = os.cpu_count() or 1
    limit = results.get("limit", {}).get("rate")
    # img/s counts the whole epoch from iter() (worker start-up included, as a training
    # loop sees it); steady excludes the wait for the first batch. Ratios use img/s.
    base = {k: results.get(k, {}).get("rate") for k in ("imagefolder", "webdataset", "raw-webdataset")}
    lines = [f"{'configuration':24s} {'img/s':>9s} {'steady':>9s} {'1st batch':>10s} {'peak RSS':>9s}  ratios"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:24s} failed: {r['error']}")
            continue
        notes = []
        if name == "limit":
            notes.append(f"1 core; {cores}-core limit {r['rate'] * cores:,.0f}")
        elif name.startswith("raw-"):
            peer = base["raw-webdataset"] if not name.endswith("cold") else results.get("raw-webdataset-cold", {}).get("rate")
            if peer and "shardkit" in name:
                notes.append(f"{r['rate'] / peer:.1f}x webdataset")
        else:
            if base["imagefolder"] and name != "imagefolder":
                notes.append(f"{r['rate'] / base['imagefolder']:.2f}x imagefolder")
            if base["webdataset"] and name.startswith("shardkit"):
                notes.append(f"{r['rate'] / base['webdataset']:.2f}x webdataset")
            if limit:
                notes.append(f"{r['rate'] / (limit * min(cores, max(workers, 1))):.2f}x limit")
        rss = f"{r.get('peak_rss_mb', 0):.0f} MB"
        lines.append(f"{name:24s} {r['rate']:9,.0f} {r['steady_rate']:9,.0f} {r['first_batch_s']:9.3f}s {rss:>9s}  "
                     f"{', '.join(notes)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardkit bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="images to generate (default 2000)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--work", help="folder for the dataset (default: a temp dir, removed after)")
    parser.add_argument("--only", help="comma-separated configurations: " + ",".join(CONFIGS))
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args([a for a in (argv or sys.argv[1:]) if a != "--"])
    if args.one:
        result = run_config(args.one, args.folder, args.shards, args.workers, args.batch)
        usage = [resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        result["peak_rss_mb"] = sum(usage) / 1024
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    import shutil

    work = args.work or tempfile.mkdtemp(prefix="shardkit-bench-")
    try:
        folder, shards = prepare(work, args.count)
        names = args.only.split(",") if args.only else list(CONFIGS)
        results = {n: _run_isolated(n, folder, shards, args.workers, args.batch) for n in names}
        if args.json:
            sys.stdout.write(json.dumps(results, indent=1) + "\n")
        else:
            sys.stdout.write(f"{args.count} photo-like JPEGs (~500x375), RandomResizedCrop(224)+flip, "
                             f"batches of {args.batch}, {args.workers} workers, {os.cpu_count()} cores\n")
            sys.stdout.write(format_table(results, args.workers) + "\n")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
