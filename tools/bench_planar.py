"""Splitting images into NCHW planes: OpenCV against numpy (shardkit.decode.planar).

Two measurements, each configuration in a process of its own, rounds interleaved,
medians and the median in-round ratio:

- ``copy``: the copy alone, one 224x224x3 uint8 image (cache-warm, as a transform leaves
  it) into a row of a 64-image batch, without and with a left-right flip;
- ``loader``: ShardDataset over JPEGs already stored at 224x224 (pre-resized shards, no
  CPU augmentation), ``decode="torch"``, batches of 64 collated in this process, one core:
  CPU ms per image of decode + collate, where the split is the only copy.

The ``numpy`` runs block ``import cv2`` (``sys.modules["cv2"] = None``) before shardkit
is imported; the ``opencv`` runs need opencv-python-headless installed.

    python tools/bench_planar.py --work /tmp/planar --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

MODES = ("numpy", "opencv")


def make_shards(root: str, count: int) -> str:
    """``count`` photo-like 224x224 JPEGs in shards under ``root`` (reused when present)."""
    import numpy as np

    from shardkit import ShardWriter
    from shardkit.cli.synthetic import encode, photo_like

    shards = os.path.join(root, f"pre224-{count}")
    if not os.path.isdir(shards):
        os.makedirs(shards + ".tmp", exist_ok=True)
        rng = np.random.default_rng(0)
        with ShardWriter(shards + ".tmp", shard_size="1GB") as writer:
            for i in range(count):
                jpeg = encode(photo_like(rng, 224, 224), quality=90)
                writer.write({"__key__": f"{i:06d}", "jpg": jpeg, "cls": i % 10})
        os.rename(shards + ".tmp", shards)
    return shards


def child(mode: str, shards: str) -> dict[str, float]:
    if mode == "numpy":
        sys.modules["cv2"] = None  # type: ignore[assignment]  # makes `import cv2` raise ImportError
    import glob

    import numpy as np
    import torch

    from shardkit import ShardDataset
    from shardkit.decode.planar import opencv_available, to_planar

    if opencv_available() != (mode == "opencv"):
        raise SystemExit(f"{mode}: OpenCV is {'' if opencv_available() else 'not '}available")
    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    batch = np.empty((64, 3, 224, 224), dtype=np.uint8)
    ds = ShardDataset(sorted(glob.glob(os.path.join(shards, "*.tar"))), decode="torch", fields="jpg cls", batch_size=64)
    for _ in ds:  # warm up: imports, first allocations, the page cache
        pass
    gc.collect()
    time.sleep(1.0)  # OpenCV's start-up threads settle
    out: dict[str, float] = {}
    for flip in (False, True):
        started = time.process_time()
        for i in range(2000):
            to_planar(batch[i % 64], image, flip=flip)
        out[f"copy{'_flip' if flip else ''}_us"] = (time.process_time() - started) / 2000 * 1e6
    started, images = time.process_time(), 0
    for _ in range(2):
        for _, labels in ds:
            images += len(labels)
    out["loader_ms_per_image"] = (time.process_time() - started) * 1e3 / images
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/planar", help="folder for the generated shards (kept and reused)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(child(args.child, args.shards)) + "\n")
        return 0
    shards = make_shards(args.work, args.count)
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.rounds):
        result = {}
        for mode in MODES[r % 2 :] + MODES[: r % 2]:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--shards", shards]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{mode}: {(proc.stderr.strip().splitlines() or ['exit'])[-1]}")
            result[mode] = json.loads(proc.stdout)
        rounds.append(result)
    keys = ("copy_us", "copy_flip_us", "loader_ms_per_image")
    print(f"{args.count} JPEGs at 224x224, {args.rounds} interleaved rounds, one core; medians")
    print("| planar copy by | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for mode in MODES:
        print(f"| {mode} | " + " | ".join(f"{statistics.median(r[mode][k] for r in rounds):.3f}" for k in keys) + " |")
    ratios = {k: statistics.median(r["numpy"][k] / r["opencv"][k] for r in rounds) for k in keys}
    print("numpy / opencv (median in-round): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
