"""Per-image loader overhead: shardkit against the one-core loop, webdataset and older code.

For each image-size set (photo-like JPEGs from shardkit.cli.synthetic, RandomResizedCrop(224)
+ flip, uint8 batches of 64, 2 workers), interleaved rounds run, each configuration in a
process of its own (``shardkit.cli.bench --one``):

- ``limit``: decode + augment in a plain loop on one core ("2-core limit" = 2x its rate);
- ``limit-parallel``: the same loop in 2 processes at once (what 2 busy processes get);
- ``webdataset-pil``: webdataset's default pipeline (``.decode("torchrgb8")``, PIL);
- ``shardkit``: ShardLoader, the generic transform; ``shardkit-fused``: ``decode_size="auto"``;
  ``shardkit-exact``: ``decode_size="exact"`` (the generic values, only the crop's region decoded);
- with ``--baseline DIR``, ``base:shardkit`` and ``base:shardkit-fused``: the same from
  another checkout of shardkit (e.g. the code before a change), for time to first batch.

Each round also runs ``shardkit doctor`` (``diagnose``) on the three shardkit configurations:
loader CPU per image against the one-core loop, and against the loop in 2 processes at
once. Last, one 10-epoch run per set samples the RSS and PSS of the main process and
its workers after every epoch (persistent workers; PSS counts shared memory once).
Ratios are taken within a round, then the median over rounds is shown.

    python tools/bench_overhead.py --work /tmp/overhead --rounds 3 --baseline /tmp/old-shardkit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

CONFIGS = ("limit", "limit-parallel", "webdataset-pil", "shardkit", "shardkit-fused", "shardkit-exact")
BASE_CONFIGS = ("shardkit", "shardkit-fused")


def make_images(root: str, count: int, spec: str, *, seed: int = 7, quality: int = 90) -> None:
    """``count`` photo-like JPEGs in ``root/class_XX/``: ``spec`` "256-512" draws both sides
    uniformly from that range, "500x375" jitters that size by 0.8-1.2 (ImageNet-like)."""
    import numpy as np

    from shardkit.cli.synthetic import encode, photo_like

    low_high = tuple(int(v) for v in spec.split("-")) if "-" in spec else None
    size = tuple(int(v) for v in spec.lower().split("x")) if low_high is None else None

    def one(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        if low_high is not None:
            w, h = (int(rng.integers(low_high[0], low_high[1] + 1)) for _ in range(2))
        else:
            assert size is not None
            w, h = int(size[0] * rng.uniform(0.8, 1.2)), int(size[1] * rng.uniform(0.8, 1.2))
        folder = os.path.join(root, f"class_{i % 10:02d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"img_{i:06d}.jpg"), "wb") as f:
            f.write(encode(photo_like(rng, w, h), quality=quality))

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(one, range(count)))


def prepare(work: str, count: int, spec: str) -> tuple[str, str]:
    """The image folder and shards of one set, made once per (count, spec)."""
    from shardkit.writing.driver import write

    root = os.path.join(work, f"{spec}-{count}")
    folder, shards = os.path.join(root, "images"), os.path.join(root, "shards")
    if not os.path.exists(os.path.join(root, ".made")):
        make_images(folder, count, spec)
        write(folder, shards, shard_size="25MB", overwrite=True, progress=False)
        open(os.path.join(root, ".made"), "w").close()
    return folder, shards


def run_one(name: str, folder: str, shards: str, *, pythonpath: str | None = None) -> dict[str, Any]:
    """One configuration of ``shardkit.cli.bench`` in a process of its own."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "shardkit.cli.bench", "--one", name, "--folder", folder, "--shards", shards]
    # cwd: ``-m`` puts the working directory first on sys.path, ahead of PYTHONPATH, so a
    # baseline run started from a checkout would import that checkout's shardkit instead
    proc = subprocess.run(
        [*cmd, "--workers", "2", "--batch", "64"], capture_output=True, text=True, env=env, cwd=pythonpath
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_baseline(root: str) -> None:
    """Refuse a baseline whose runs would not import its own shardkit."""
    if not os.path.isdir(os.path.join(root, "shardkit")):
        raise SystemExit(f"--baseline {root}: no shardkit package folder there")
    code = "import shardkit, sys; sys.stdout.write(shardkit.__file__)"
    env = dict(os.environ, PYTHONPATH=root)
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root).stdout
    if not os.path.realpath(found).startswith(os.path.realpath(root) + os.sep):
        raise SystemExit(f"--baseline {root}: its runs import shardkit from {found or '(nothing)'}, not from {root}")


def run_doctor(shards: str, decode_size: str | None) -> dict[str, Any]:
    """``shardkit doctor`` (2 workers, rrc224+flip) in a process of its own, as JSON."""
    cmd = [sys.executable, "-m", "shardkit.cli", "doctor", shards, "--workers", "2", "--seconds", "8", "--json"]
    cmd += ["--decode-size", decode_size or "none", "--transform", "rrc224+flip"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout)


def memory_run(shards: str, epochs: int, *, pythonpath: str | None = None) -> list[dict[str, float]]:
    """RSS and PSS (MB) of the main process and its workers after each of ``epochs`` epochs."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child", shards, "--epochs", str(epochs)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_of(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process in MB, from /proc."""
    rss = pss = 0.0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1024
    return rss, pss


def _memory_child(shards: str, epochs: int) -> None:
    import torch

    from shardkit.cli.bench import augment
    from shardkit.cli.profiling import children_cpu_by_pid
    from shardkit.loader import ShardLoader
    from shardkit.read.dataset import ShardDataset

    torch.set_num_threads(1)
    ds = ShardDataset(shards, decode="torch", transform={"jpg": augment()}, fields="jpg cls", shuffle=1000)
    loader = ShardLoader(ds, batch_size=64, num_workers=2, persistent_workers=True)
    out = []
    for epoch in range(epochs):
        for _ in loader:
            pass
        pids = [os.getpid(), *children_cpu_by_pid()]
        sizes = [_memory_of(pid) for pid in pids]
        stats = loader.stats()
        out.append(
            {
                "epoch": epoch,
                "rss_mb": sum(r for r, _ in sizes),
                "pss_mb": sum(p for _, p in sizes),
                "main_rss_mb": sizes[0][0],
                "memory_reused": stats.get("memory_reused", 0),
                "memory_fresh": stats.get("memory_fresh", 0),
            }
        )
    sys.stdout.write(json.dumps(out) + "\n")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _cpu_model() -> str:
    """The CPU's model name (hosts differ between runs: their figures are not comparable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU model unknown"


def _planar_copier() -> str:
    """Who de-interleaves images into NCHW batches in this environment (shardkit.decode.planar)."""
    try:
        import cv2
    except ImportError:
        return "numpy"
    return f"OpenCV {cv2.__version__}"


def report(spec: str, kb: float, count: int, rounds: list[dict[str, dict[str, Any]]], loads: list[float]) -> str:
    names = [n for n in rounds[0] if not n.startswith("doctor")]

    def ratio(a: str, b: str, key: str = "steady_rate", scale: float = 1.0) -> float:
        values = []
        for r in rounds:
            if key in r.get(a, {}) and r.get(b, {}).get(key):
                values.append(r[a][key] / (r[b][key] * scale))
        return _median(values)

    lines = [
        f"{count} photo-like JPEGs ({spec}, {kb:.0f} KB), RandomResizedCrop(224)+flip, batches of 64, 2 workers, "
        f"{os.cpu_count()} cores; {len(rounds)} interleaved rounds, load average {min(loads):.1f}-{max(loads):.1f}; "
        f"{_cpu_model()}; planar copies by {_planar_copier()}",
        f"{'configuration':20s} {'steady':>7s} {'CPU ms/img':>10s} {'1st batch':>9s}  median in-round ratios",
    ]
    for name in names:
        runs = [r[name] for r in rounds if "error" not in r.get(name, {"error": 1})]
        if not runs:
            lines.append(f"{name:20s} failed: {rounds[0][name].get('error')}")
            continue
        notes = []
        if name == "limit":
            notes.append(f"1 core; 2-core limit {2 * _median([r['steady_rate'] for r in runs]):,.0f} img/s")
        elif name == "limit-parallel":
            notes.append(f"{ratio(name, 'limit', scale=2):.2f}x the 2-core limit")
        else:
            notes.append(f"{ratio(name, 'limit', scale=2):.2f}x 2-core limit")
            notes.append(f"{ratio(name, 'limit-parallel'):.2f}x limit-parallel")
            if name != "webdataset-pil":
                notes.append(f"{ratio(name, 'webdataset-pil'):.2f}x webdataset-pil")
            base = f"base:{name}"
            if base in rounds[0]:
                notes.append(f"1st batch {ratio(name, base, key='first_batch_s'):.2f}x base's")
        rate, cpu = _median([r["steady_rate"] for r in runs]), _median([r["cpu_ms"] for r in runs])
        first = _median([r["first_batch_s"] for r in runs])
        lines.append(f"{name:20s} {rate:7,.0f} {cpu:10.2f} {first:8.3f}s  {', '.join(notes)}")
    for key in [n for n in rounds[0] if n.startswith("doctor")]:
        runs = [r[key] for r in rounds if "error" not in r[key]]
        if not runs:
            lines.append(f"{key}: failed: {rounds[0][key].get('error')}")
            continue
        one = [d["cpu_ms_per_image"] / d["reference_ms"] for d in runs]
        two = [d["cpu_ms_per_image"] / d["parallel_reference_ms"] for d in runs if d.get("parallel_reference_ms")]
        workers, main = _median([d["worker_cpu_ms"] for d in runs]), _median([d["main_cpu_ms"] for d in runs])
        lines.append(
            f"{key}: loader CPU {_median([d['cpu_ms_per_image'] for d in runs]):.2f} ms/img "
            f"(workers {workers:.2f} + main {main:.2f}); "
            f"one-core loop {_median([d['reference_ms'] for d in runs]):.2f}: {_median(one):.2f}x "
            f"(rounds {', '.join(f'{v:.2f}' for v in one)}); the loop in 2 processes at once "
            f"{_median([d.get('parallel_reference_ms', 0.0) for d in runs]):.2f}: {_median(two):.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", help="folder for the generated sets (kept and reused)")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--sizes", nargs="+", default=["256-512", "500x375"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="another shardkit checkout to compare with (its root folder)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the memory run (0: none)")
    parser.add_argument("--no-doctor", action="store_true", help="skip the doctor runs")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child, args.epochs)
        return
    if not args.work:
        parser.error("--work is required")
    if args.baseline:
        check_baseline(args.baseline)
    for spec in args.sizes:
        folder, shards = prepare(args.work, args.count, spec)
        kb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs) / 1e3 / args.count
        rounds, loads = [], []
        for n in range(args.rounds):
            result: dict[str, dict[str, Any]] = {}
            for name in CONFIGS:
                result[name] = run_one(name, folder, shards)
                loads.append(os.getloadavg()[0])
            for name in BASE_CONFIGS if args.baseline else ():
                result[f"base:{name}"] = run_one(name, folder, shards, pythonpath=args.baseline)
            if not args.no_doctor:
                for decode_size in (None, "auto", "exact"):
                    result[f"doctor decode_size={decode_size}"] = run_doctor(shards, decode_size)
            rounds.append(result)
            print(f"[{spec}] round {n + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
        print(report(spec, kb, args.count, rounds, loads), flush=True)
        for label, path in (("", None), ("base ", args.baseline)) if args.epochs else ():
            if label and not path:
                continue
            started = time.perf_counter()
            epochs = memory_run(shards, args.epochs, pythonpath=path)
            print(
                f"{label}memory over {args.epochs} epochs ({time.perf_counter() - started:.0f} s, persistent "
                "workers; MB summed over the main process and workers):"
            )
            for e in epochs:
                print(
                    f"  epoch {e['epoch']}: RSS {e['rss_mb']:.0f} (main {e['main_rss_mb']:.0f}), "
                    f"PSS {e['pss_mb']:.0f}, batches in reused memory {e['memory_reused']}, "
                    f"in new memory {e['memory_fresh']}"
                )
        print(flush=True)


if __name__ == "__main__":
    main()
