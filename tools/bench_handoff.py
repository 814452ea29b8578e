"""What handing batches to a training loop costs the main process, when the loop reads them.

A training loop reads every batch it gets (a copy to the GPU, or the first op on the CPU);
``tools/bench_overhead.py``'s consumer only counts them. Here each full batch is copied into
one preallocated tensor, as a copy from pageable memory to the GPU reads it. Per
configuration, in a process of its own: photo-like JPEGs (a set of ``bench_overhead``),
RandomResizedCrop(224) + flip, batches of 64, 2 workers, one warm-up epoch, then
``--epochs`` measured epochs:

- ``shardkit``: ShardLoader (reused batch memory); ``base:shardkit``: the same from
  ``--baseline DIR`` (another checkout, e.g. the code before a change);
- ``shardkit-fresh``: ShardLoader with ``reuse_memory=False`` (fresh shared memory per
  batch, as a DataLoader collates);
- ``webdataset``: webdataset's WebLoader over the same shards, the same decode and augment;
- ``shardkit-fs`` (only with ``--step-ms``): ShardLoader under torch's ``file_system``
  sharing strategy, which passes shared memory by name instead of by file descriptor.

With ``--step-ms N`` the loop also sleeps N ms per batch, as a training step would, so the
workers get ahead and the time the loop waits in ``next()`` is the hand-off alone (the
median is reported as ``wait_ms_per_batch``).

Reported: the main process's CPU ms and minor page faults per batch, the copy's ms per
batch, total CPU ms per image (main process and workers) and images/s. Rounds interleave
the configurations; ratios are taken within a round, and the median over rounds is shown.

    python tools/bench_handoff.py --work /tmp/ovh/bench --baseline /tmp/old-shardkit --rounds 5
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

CONFIGS = ("shardkit", "shardkit-fresh", "webdataset")


def child(config: str, shards: str, epochs: int, step_ms: float = 0.0) -> dict[str, float]:
    """Run one configuration in this process; its figures per measured epoch, averaged."""
    import torch
    import torch.multiprocessing

    if config.endswith("-fs"):
        torch.multiprocessing.set_sharing_strategy("file_system")

    from shardkit.cli.bench import augment
    from shardkit.cli.profiling import children_cpu, rusage_cpu
    from shardkit.decode.fields import decode_image

    torch.set_num_threads(1)
    aug = augment()
    urls = sorted(glob.glob(os.path.join(shards, "*.tar")))
    if config.startswith("webdataset"):
        import webdataset as wds

        def prep(sample: dict) -> tuple:
            return aug(decode_image(sample["jpg"], "torch")), int(sample["cls"])

        ds = wds.WebDataset(urls, shardshuffle=False).map(prep).batched(64)
        loader: Any = wds.WebLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    else:
        from shardkit.loader import ShardLoader
        from shardkit.read.dataset import ShardDataset

        sds = ShardDataset(shards, decode="torch", transform={"jpg": aug}, fields="jpg cls")
        reuse = False if config.endswith("fresh") else None
        loader = ShardLoader(sds, batch_size=64, num_workers=2, reuse_memory=reuse, pin_memory=False)
    into = torch.zeros(64, 3, 224, 224, dtype=torch.uint8)
    totals = {"main_cpu_ms": 0.0, "faults": 0.0, "copy_ms": 0.0, "batches": 0.0, "images": 0.0, "cpu_s": 0.0}
    seconds = 0.0
    waits: list[float] = []
    for epoch in range(epochs + 1):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = rusage_cpu(resource.RUSAGE_SELF) + children_cpu()
        started = time.perf_counter()
        copy = batches = images = 0.0
        iterator = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                break
            waits.append(time.perf_counter() - t0)
            images += len(batch[1])
            if len(batch[0]) == 64:
                t0 = time.perf_counter()
                into.copy_(batch[0])
                copy += time.perf_counter() - t0
            batches += 1
            del batch
            if step_ms:
                time.sleep(step_ms / 1e3)
        if epoch == 0:
            waits.clear()
            continue  # warm-up: workers start, rings fill
        seconds += time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        totals["main_cpu_ms"] += (after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime) * 1e3
        totals["faults"] += after.ru_minflt - usage.ru_minflt
        totals["copy_ms"] += copy * 1e3
        totals["batches"] += batches
        totals["images"] += images
        totals["cpu_s"] += rusage_cpu(resource.RUSAGE_SELF) + children_cpu() - cpu
    n = totals["batches"]
    return {
        "main_cpu_ms_per_batch": totals["main_cpu_ms"] / n,
        "faults_per_batch": totals["faults"] / n,
        "copy_ms_per_batch": totals["copy_ms"] / n,
        "cpu_ms_per_image": totals["cpu_s"] * 1e3 / totals["images"],
        "images_per_s": totals["images"] / seconds,
        "wait_ms_per_batch": statistics.median(waits) * 1e3,
    }


def run(config: str, shards: str, epochs: int, baseline: str | None, step_ms: float) -> dict[str, float]:
    """One configuration in a process of its own (``base:`` ones import ``baseline``'s shardkit)."""
    env, cwd = dict(os.environ), None
    name = config
    if config.startswith("base:"):
        assert baseline is not None
        env["PYTHONPATH"], cwd, name = baseline, baseline, config[len("base:") :]
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--shards", shards, "--epochs", str(epochs)]
    cmd += ["--step-ms", str(step_ms)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{config}: {(proc.stderr.strip().splitlines() or ['exit'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/ovh/bench", help="bench_overhead's work folder (sets made there)")
    parser.add_argument("--sets", default="256-512-3000,500x375-3000")
    parser.add_argument("--baseline", help="a checkout of shardkit to compare with (base:shardkit)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=0.0, help="sleep per batch (a training step's time)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(child(args.child, args.shards, args.epochs, args.step_ms)) + "\n")
        return 0
    configs = [*CONFIGS, *(["shardkit-fs"] if args.step_ms else []), *(["base:shardkit"] if args.baseline else [])]
    for name in args.sets.split(","):
        shards = os.path.join(args.work, name, "shards")
        if not os.path.isdir(shards):
            raise SystemExit(f"{shards}: no shards (make the set with tools/bench_overhead.py first)")
        rounds: list[dict[str, dict[str, float]]] = []
        for r in range(args.rounds):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            rounds.append({config: run(config, shards, args.epochs, args.baseline, args.step_ms) for config in order})
        print(f"\n## {name}: median of {args.rounds} rounds ({args.epochs} epochs each, after a warm-up)")
        keys: tuple[str, ...] = ("main_cpu_ms_per_batch", "faults_per_batch", "copy_ms_per_batch")
        keys += ("cpu_ms_per_image", "images_per_s")
        keys += ("wait_ms_per_batch",) if args.step_ms else ()
        print("| configuration | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for config in configs:
            cells = [f"{statistics.median(r[config][k] for r in rounds):.3f}" for k in keys]
            print(f"| {config} | " + " | ".join(cells) + " |")
        for peer in [c for c in configs if c != "shardkit"]:
            ratios = {
                k: statistics.median(r["shardkit"][k] / r[peer][k] for r in rounds)
                for k in keys
                if k != "faults_per_batch"
            }
            print(f"shardkit / {peer}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
