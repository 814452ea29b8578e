"""End-to-end loader benchmark: shardkit against the loaders users would pick instead.

One run, one synthetic photo-like JPEG dataset, the same decode and augment for every
peer (decode to a uint8 tensor with shardkit's fastest decoder, RandomResizedCrop(224) +
horizontal flip, uint8 batches of 64, the same worker count):

- the single-core decode+augment rate ("limit" = that x cores), and the same loop run in
  as many processes at once as there are workers ("limit-parallel": what the cores really
  give together, with zero loader overhead);
- ImageFolder + DataLoader (many small files);
- webdataset (WebDataset + WebLoader, batched in workers);
- webdataset with its own default decoding (``.decode("torchrgb8")``, PIL), as users run it;
- shardkit ShardLoader: process workers, thread decode, reduced-size decode, and fused
  crop decode (``decode_size="auto"``: the RandomResizedCrop drawn from the header and
  each crop decoded at the smallest DCT scale that keeps it >= 224; only the crop's
  region with libjpeg-turbo 3, the whole image without it: "shardkit-fused-whole"), and
  the same crop fused at full resolution (``decode_size="exact"``: the values of
  "shardkit", only the region decoded: "shardkit-exact");
- raw iteration without decode, warm and cold page cache;
- time to first batch and peak RSS (each configuration runs in its own process).

    shardkit bench -- --count 2000 --workers 2
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

CONFIGS = (
    "limit",
    "limit-parallel",
    "imagefolder",
    "webdataset",
    "webdataset-pil",
    "shardkit",
    "shardkit-threads",
    "shardkit-reduced",
    "shardkit-fused",
    "shardkit-fused-whole",
    "shardkit-exact",
    "raw-shardkit",
    "raw-webdataset",
    "raw-shardkit-cold",
    "raw-webdataset-cold",
)
#: What ``--rounds`` runs by default: the decode+augment peers (raw iteration is another question).
E2E_CONFIGS = (
    "limit",
    "limit-parallel",
    "webdataset",
    "webdataset-pil",
    "shardkit",
    "shardkit-threads",
    "shardkit-fused",
    "shardkit-fused-whole",
    "shardkit-exact",
)


def augment(size: int = 224) -> Callable[[Any], Any]:
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])


def prepare(work: str, count: int, *, size: tuple[int, int] = (500, 375), quality: int = 90) -> tuple[str, str]:
    """Image folder and shards in ``work``, reused when made by a run with the same settings."""
    import shutil

    from ..writing.driver import write
    from .synthetic import make_image_folder

    folder = os.path.join(work, "images")
    shards = os.path.join(work, "shards")
    # A folder left by a run with other settings would silently change the dataset measured.
    made = os.path.join(work, f".made-{count}-{size[0]}x{size[1]}-q{quality}")
    if not os.path.exists(made):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(shards, ignore_errors=True)
    if not os.path.isdir(folder):
        make_image_folder(folder, count=count, classes=10, size=size, workers=os.cpu_count() or 2, quality=quality)
    if not os.path.exists(os.path.join(shards, "data.manifest.json")):
        write(folder, shards, shard_size="25MB", overwrite=True, progress=False)
    open(made, "w").close()
    return folder, shards


def drop_page_cache(paths: list[str]) -> None:
    """Evict files from the page cache (posix_fadvise works without root)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cpu_now() -> float:
    """CPU seconds of this process, its exited children and its live children (workers)."""
    from .profiling import children_cpu, rusage_cpu

    return rusage_cpu(resource.RUSAGE_SELF) + rusage_cpu(resource.RUSAGE_CHILDREN) + children_cpu()


def measure(batches: Any, count_of: Callable[[Any], int]) -> dict[str, float]:
    """Iterate ``batches`` and measure: samples (``count_of`` each batch), seconds, time to
    the first batch, rate, steady rate (after the first batch) and CPU-ms per sample."""
    cpu = _cpu_now()
    started = time.perf_counter()
    first = None
    n = 0
    for batch in batches:
        if first is None:
            first = time.perf_counter() - started
        n += count_of(batch)
    total = time.perf_counter() - started
    cpu_ms = (_cpu_now() - cpu) * 1e3 / max(1, n)
    steady = n / (total - first) if first is not None and total > first else 0.0
    return {
        "samples": n,
        "seconds": total,
        "first_batch_s": first or 0.0,
        "rate": n / total,
        "steady_rate": steady,
        "cpu_ms": cpu_ms,
    }


def _limit_loop(files: list[str], aug: Callable[[Any], Any], barrier: Any = None) -> tuple[float, float, float]:
    """Decode + augment ``files`` from memory: (start, end) on the monotonic clock, CPU seconds."""
    import torch

    from ..decode.fields import decode_image

    torch.set_num_threads(1)
    data = [open(f, "rb").read() for f in files]
    for d in data[:20]:
        aug(decode_image(d, "torch"))
    if barrier is not None:
        barrier.wait()
    # No garbage collection in the timed loop: a full collection walks all of torch's
    # objects, unrelated to the work, and one falling in this short loop made it much
    # slower in some runs (the loaders' workers freeze those objects instead).
    gc.disable()
    try:
        started, cpu = time.perf_counter(), time.process_time()
        for d in data:
            aug(decode_image(d, "torch"))
        return started, time.perf_counter(), time.process_time() - cpu
    finally:
        gc.enable()


def run_config(name: str, folder: str, shards: str, workers: int, batch: int) -> dict[str, Any]:
    import torch

    from ..decode.fields import decode_image
    from ..loader import ShardLoader
    from ..read.dataset import ShardDataset

    urls = sorted(glob.glob(os.path.join(shards, "*.tar")))
    aug = augment()
    torch.set_num_threads(1)

    if name == "limit":
        files = sorted(glob.glob(os.path.join(folder, "*", "*.jpg")))[:300]
        started, ended, cpu = _limit_loop(files, aug)
        dt = ended - started
        return {
            "samples": len(files),
            "seconds": dt,
            "rate": len(files) / dt,
            "steady_rate": len(files) / dt,
            "first_batch_s": 0.0,
            "cpu_ms": cpu * 1e3 / len(files),
        }
    if name == "limit-parallel":
        import multiprocessing

        files = sorted(glob.glob(os.path.join(folder, "*", "*.jpg")))
        streams = max(1, workers)
        slices = [files[i * 300 : (i + 1) * 300] for i in range(streams)]
        context = multiprocessing.get_context("fork")  # the barrier and queue are inherited
        barrier, results = context.Barrier(streams), context.SimpleQueue()
        procs = [
            context.Process(target=lambda s=s: results.put(_limit_loop(s, aug, barrier)), daemon=True) for s in slices
        ]
        for proc in procs:
            proc.start()
        spans = [results.get() for _ in procs]
        for proc in procs:
            proc.join()
        dt = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
        n = sum(len(s) for s in slices)
        return {
            "samples": n,
            "seconds": dt,
            "rate": n / dt,
            "steady_rate": n / dt,
            "first_batch_s": 0.0,
            "cpu_ms": sum(cpu for _, _, cpu in spans) * 1e3 / n,
        }
    if name == "imagefolder":
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder

        def load(path: str) -> Any:
            with open(path, "rb") as f:
                return decode_image(f.read(), "torch")

        ds = ImageFolder(folder, loader=load, transform=aug)
        loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=False)
        return measure(loader, lambda b: len(b[1]))
    if name.startswith("webdataset"):
        import webdataset as wds

        def prep(sample: dict) -> tuple:
            return aug(decode_image(sample["jpg"], "torch")), int(sample["cls"])

        if name == "webdataset-pil":  # webdataset's own decoding, as its users run it
            ds = (
                wds.WebDataset(urls, shardshuffle=False)
                .shuffle(0)
                .decode("torchrgb8")
                .map(lambda s: (aug(s["jpg"]), int(s["cls"])))
                .batched(batch)
            )
        else:
            ds = wds.WebDataset(urls, shardshuffle=False).shuffle(0).map(prep).batched(batch)
        loader = wds.WebLoader(ds, batch_size=None, num_workers=workers)
        return measure(loader, lambda b: len(b[1]))
    if name.startswith("shardkit"):
        threads = 2 if name == "shardkit-threads" else 0
        decode_size: int | str | None = None
        if name == "shardkit-reduced":
            decode_size = 224
        elif name == "shardkit-fused":
            decode_size = "auto"
        elif name == "shardkit-exact":
            decode_size = "exact"
        ds = ShardDataset(
            shards, decode="torch", decode_size=decode_size, transform={"jpg": aug}, fields="jpg cls", threads=threads
        )
        if name == "shardkit-fused-whole":  # the fused crop as on a machine without libjpeg-turbo 3
            from ..decode.fields import make_decoder
            from ..decode.fuse import fuse_crop

            decoder, transform = fuse_crop(make_decoder("torch"), {"jpg": aug}, region=False)
            ds = ds.with_stages(decoder=decoder, transform=transform)
        loader = ShardLoader(ds, batch_size=batch, num_workers=0 if threads else workers)
        return measure(loader, lambda b: len(b[1]))
    if name.startswith("raw-"):
        if name.endswith("-cold"):
            drop_page_cache(urls)
        if "webdataset" in name:
            import webdataset as wds

            return measure(wds.WebDataset(urls, shardshuffle=False), lambda s: 1)
        return measure(ShardDataset(shards), lambda s: 1)
    raise ValueError(f"unknown configuration {name!r}")


def _run_isolated(name: str, folder: str, shards: str, workers: int, batch: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "shardkit.cli.bench",
        "--one",
        name,
        "--folder",
        folder,
        "--shards",
        shards,
        "--workers",
        str(workers),
        "--batch",
        str(batch),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else float("nan")


def format_table(rounds: list[dict[str, dict[str, Any]]], workers: int) -> str:
    """Median over rounds of each rate, CPU-ms per image and ratio; ratios are taken within a
    round (peers measured side by side), then the median of those is shown."""
    cores = os.cpu_count() or 1
    streams = min(cores, max(workers, 1))
    names = list(rounds[0])
    lines = [
        f"{'configuration':18s} {'img/s':>8s} {'steady':>8s} {'CPU ms/img':>10s} {'1st batch':>10s} "
        f"{'peak RSS':>9s}  median ratios over {len(rounds)} round(s)"
    ]
    for name in names:
        runs = [r[name] for r in rounds if "error" not in r.get(name, {"error": 1})]
        if not runs:
            lines.append(f"{name:18s} failed: {rounds[0][name].get('error')}")
            continue

        def ratio(peer: str, scale: float = 1.0, key: str = "rate", invert: bool = False, name: str = name) -> float:
            values = []
            for r in rounds:
                mine, theirs = r.get(name, {}), r.get(peer, {})
                if key in mine and key in theirs and theirs[key]:
                    values.append(theirs[key] / mine[key] if invert else mine[key] / (theirs[key] * scale))
            return _median(values)

        notes = []
        if name == "limit":
            notes.append(f"1 core; {streams}-core limit {_median([r['rate'] for r in runs]) * streams:,.0f} img/s")
        elif name == "limit-parallel":
            notes.append(f"{streams} processes at once; {ratio('limit', streams):.2f}x the {streams}-core limit")
        elif name.startswith("raw-"):
            peer = "raw-webdataset-cold" if name.endswith("cold") else "raw-webdataset"
            if "shardkit" in name and peer in rounds[0]:
                notes.append(f"{ratio(peer):.1f}x webdataset")
        else:
            if "limit" in rounds[0]:
                notes.append(f"{ratio('limit', streams):.2f}x limit")
            if "limit-parallel" in rounds[0]:
                notes.append(f"{ratio('limit-parallel'):.2f}x limit-parallel")
                notes.append(f"CPU/img {ratio('limit', key='cpu_ms', invert=True):.2f}x limit's")
            for peer in ("webdataset", "webdataset-pil", "imagefolder"):
                if peer in rounds[0] and name != peer and name.startswith("shardkit"):
                    notes.append(f"{ratio(peer):.2f}x {peer}")
        rss = f"{_median([r.get('peak_rss_mb', 0) for r in runs]):.0f} MB"
        lines.append(
            f"{name:18s} {_median([r['rate'] for r in runs]):8,.0f} "
            f"{_median([r['steady_rate'] for r in runs]):8,.0f} "
            f"{_median([r.get('cpu_ms', float('nan')) for r in runs]):10.2f} "
            f"{_median([r['first_batch_s'] for r in runs]):9.3f}s {rss:>9s}  {', '.join(notes)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shardkit bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=2000, help="images to generate (default 2000)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--work", help="folder for the dataset (default: a temp dir, removed after)")
    parser.add_argument("--only", help="comma-separated configurations: " + ",".join(CONFIGS))
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="interleaved rounds (each runs every configuration once; default 1). With more "
        "than one, only the decode+augment peers run unless --only says otherwise",
    )
    parser.add_argument("--size", default="500x375", help="mean image size WxH (default 500x375)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated images (default 90)")
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
        try:
            size = tuple(int(v) for v in args.size.lower().split("x"))
            assert len(size) == 2 and min(size) > 0
        except (ValueError, AssertionError):
            parser.error(f"--size must be WIDTHxHEIGHT, e.g. 500x375, got {args.size!r}")
        if args.rounds < 1:
            parser.error("--rounds must be >= 1")
        folder, shards = prepare(work, args.count, size=size, quality=args.quality)  # type: ignore[arg-type]
        names = args.only.split(",") if args.only else list(CONFIGS if args.rounds == 1 else E2E_CONFIGS)
        unknown = sorted(set(names) - set(CONFIGS))
        if unknown:
            parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
        rounds = [
            {n: _run_isolated(n, folder, shards, args.workers, args.batch) for n in names} for _ in range(args.rounds)
        ]
        if args.json:
            sys.stdout.write(json.dumps(rounds if args.rounds > 1 else rounds[0], indent=1) + "\n")
        else:
            kb = sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*", "*.jpg"))) / 1e3 / args.count
            sys.stdout.write(
                f"{args.count} photo-like JPEGs (~{args.size}, {kb:.0f} KB), RandomResizedCrop(224)+flip, "
                f"batches of {args.batch}, {args.workers} workers, {os.cpu_count()} cores\n"
            )
            sys.stdout.write(format_table(rounds, args.workers) + "\n")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
