"""What a companion set costs to read, and saves to write.

Reading: one epoch of decode + RandomResizedCrop(224) + flip through ShardLoader with
``--workers`` DataLoader workers, for

- the base alone (``fields="jpg cls"``);
- the base joined with a caption companion (``fields="jpg cls txt"``);
- the base joined with a 512-float32 ``.npy`` embedding companion (``fields="jpg cls npy"``);
- one set holding the images and the same embeddings (what a rewrite would give), to
  tell the join's cost from the cost of decoding and batching one more field,

in interleaved rounds (each round runs every configuration once, in a rotating order).
The table gives samples/s (median over rounds), the median of the in-round wall-time
ratios to the base alone (1.03 = 3 % slower), and the same for CPU time (this process
and its DataLoader workers, which exit at the end of each epoch), which a machine
shared with other work disturbs less than wall time.

Writing: new captions for the set, as a companion (the table form from a CSV, and the
function form with ``--workers`` processes) against rewriting the whole set with them
(one pass reading the base and writing every sample with its caption through a
ShardWriter: the cheapest rewrite, no decode check and no process pool), interleaved
too; ratio = rewrite time / companion time.

    python tools/bench_companion.py --count 2000 --size 500x375 --rounds 5 --workers 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

import shardkit
from shardkit import ShardDataset, ShardLoader
from shardkit.cli.synthetic import make_image_folder
from shardkit.writing.writer import ShardWriter


def caption(sample: dict) -> dict:
    return {"txt": f"a new caption for {sample['__key__']}, written by a better model"}


def embedding(sample: dict) -> dict:
    seed = int.from_bytes(sample["__key__"].encode()[-4:], "little")
    return {"npy": np.random.default_rng(seed).standard_normal(512).astype(np.float32)}


def with_caption(sample: dict) -> dict:
    return {**{k: v for k, v in sample.items() if k != "__url__"}, **caption(sample)}


AUGMENT = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def read_epoch(base: str, join: list[str], fields: str, workers: int, batch: int) -> tuple[float, float, int]:
    ds = ShardDataset(
        base,
        join=join or None,
        decode="torch",
        decode_size="auto",
        transform={"jpg": AUGMENT},
        fields=fields,
        shuffle=1000,
        seed=0,
    )
    loader = ShardLoader(ds, batch_size=batch, num_workers=workers)
    cpu, started = cpu_seconds(), time.perf_counter()
    n = 0
    for batch_items in loader:
        n += len(batch_items[1])
    wall = time.perf_counter() - started
    del batch_items, loader  # the workers exit: their CPU time is counted
    return wall, cpu_seconds() - cpu, n


def timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    return statistics.median(t / r for t, r in zip(times[name], times[reference]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="images in the base set (default 2000)")
    parser.add_argument("--size", default="500x375", help="image size WxH (default 500x375)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers and writer processes (default 2)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shard-size", default="20MB")
    parser.add_argument("--keep", help="work in this folder and keep it")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.keep or tempfile.mkdtemp(prefix="bench-companion-")
    width, height = (int(v) for v in args.size.lower().split("x"))
    try:
        images, base = os.path.join(root, "images"), os.path.join(root, "base")
        make_image_folder(images, count=args.count, classes=10, size=(width, height), workers=2)
        shardkit.write(images, base, shard_size=args.shard_size, workers=args.workers, overwrite=True)
        captions_dir, vectors_dir = os.path.join(root, "captions"), os.path.join(root, "vectors")
        shardkit.write_companion(base, captions_dir, caption, workers=args.workers, overwrite=True)
        shardkit.write_companion(base, vectors_dir, embedding, workers=args.workers, overwrite=True)
        inline = os.path.join(root, "inline")
        with ShardWriter(inline, shard_size=args.shard_size, overwrite=True) as writer:
            for sample in ShardDataset(base, join=[vectors_dir]):
                writer.write({k: v for k, v in sample.items() if k != "__url__"})
        sizes = {
            name: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
            for name, d in (("base", base), ("captions", captions_dir), ("vectors", vectors_dir))
        }
        reads = {
            "base alone": (base, [], "jpg cls"),
            "base + caption companion": (base, [captions_dir], "jpg cls txt"),
            "base + 512-float embedding companion": (base, [vectors_dir], "jpg cls npy"),
            "one set with the embeddings inside": (inline, [], "jpg cls npy"),
        }
        read_epoch(base, [], "jpg cls", args.workers, args.batch)  # warm the page cache
        read_epoch(inline, [], "jpg cls", args.workers, args.batch)
        times: dict[str, list[float]] = {name: [] for name in reads}
        cpu: dict[str, list[float]] = {name: [] for name in reads}
        for r in range(args.rounds):
            names = list(reads)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                where, join, fields = reads[name]
                seconds, used, n = read_epoch(where, join, fields, args.workers, args.batch)
                assert n == args.count, (name, n)
                times[name].append(seconds)
                cpu[name].append(used)

        keys = [s["__key__"] for s in ShardDataset(base)]
        table = os.path.join(root, "captions.csv")
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["key", "caption"])
            writer.writerows([k, caption({"__key__": k})["txt"]] for k in keys)
        out = os.path.join(root, "out")

        def companion_table() -> None:
            shardkit.write_companion(base, out + "-t", table=table, overwrite=True)

        def companion_fn() -> None:
            shardkit.write_companion(base, out + "-f", caption, workers=args.workers, overwrite=True)

        def rewrite() -> None:
            # The cheapest rewrite: one pass, read and write, no check and no process pool
            # (the images were checked when first written).
            with ShardWriter(out + "-r", shard_size=args.shard_size, overwrite=True) as writer:
                for sample in ShardDataset(base):
                    writer.write(with_caption(sample))

        writes = {
            "rewrite the whole set with the captions": rewrite,
            "caption companion from a CSV": companion_table,
            f"caption companion from a function ({args.workers} workers)": companion_fn,
        }
        wtimes: dict[str, list[float]] = {name: [] for name in writes}
        for r in range(args.rounds):
            names = list(writes)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                wtimes[name].append(timed(writes[name]))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    cores = len(os.sched_getaffinity(0))
    print(
        f"{args.count} images {args.size}, {args.workers} workers, {cores} cores, {args.rounds} interleaved rounds; "
        f"base {sizes['base'] / 1e6:.1f} MB, captions {sizes['captions'] / 1e6:.2f} MB, "
        f"embeddings {sizes['vectors'] / 1e6:.2f} MB"
    )
    print(
        "\n| read: decode + RRC224 + flip | samples/s (median) | wall time vs base alone | "
        "CPU ms/sample (median) | CPU time vs base alone |"
    )
    print("|---|---|---|---|---|")
    figures: dict[str, Any] = {"sizes": sizes, "read": {}, "write": {}}
    for name, ts in times.items():
        rate = args.count / statistics.median(ts)
        ratio = median_ratio(times, name, "base alone")
        cpu_ratio = median_ratio(cpu, name, "base alone")
        cpu_ms = statistics.median(cpu[name]) * 1e3 / args.count
        figures["read"][name] = {
            "samples_per_s": round(rate, 1),
            "ratio": round(ratio, 3),
            "cpu_ms_per_sample": round(cpu_ms, 3),
            "cpu_ratio": round(cpu_ratio, 3),
            "seconds": ts,
            "cpu_seconds": cpu[name],
        }
        print(f"| {name} | {rate:,.0f} | {ratio:.3f} | {cpu_ms:.2f} | {cpu_ratio:.3f} |")
    joined, inside = "base + 512-float embedding companion", "one set with the embeddings inside"
    wall_ratio, cpu_ratio = median_ratio(times, joined, inside), median_ratio(cpu, joined, inside)
    print(
        f"\nthe embedding join against the same embeddings inside one set: wall {wall_ratio:.3f}, "
        f"CPU {cpu_ratio:.3f} (median in-round ratios)"
    )
    figures["join_vs_inside"] = {"wall": round(wall_ratio, 3), "cpu": round(cpu_ratio, 3)}
    print("\n| write new captions | seconds (median) | rewrite time / this (median ratio) |")
    print("|---|---|---|")
    reference = next(iter(writes))
    for name, ts in wtimes.items():
        ratio = statistics.median(r / t for r, t in zip(wtimes[reference], ts))
        figures["write"][name] = {"seconds": ts, "ratio": round(ratio, 2)}
        print(f"| {name} | {statistics.median(ts):.2f} | {ratio:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
