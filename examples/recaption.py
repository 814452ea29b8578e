#!/usr/bin/env python3
"""Re-caption an image set, and fix some of its labels, without rewriting its images.

What it shows:

- The images are written once: ``shardkit.write(folder, "base/")``.
- ``shardkit.write_companion(base, "captions-v1/", caption_v1, workers=N)`` runs a caption
  "model" on every raw base sample in worker processes and writes only what it returns,
  in a companion set aligned with the base: the same shard names, keys and order, its own
  indexes, a manifest recording the sha256 of the base's manifest. It is megabytes where
  the base is gigabytes, and byte-identical for any number of workers.
- ``ShardDataset(base, join=[captions], fields="jpg txt")`` reads both in lockstep, shard
  by shard: a CLIP-style batch of images and a list of captions.
- A better caption model later: another companion, joined with ``join_wins={"txt": 2}``
  (part 2 wins). Without a winner a field two parts hold is refused, never overridden.
- Label fixes from a CSV of only the rows that change, ``missing="empty"`` (every other
  key keeps its place and its base label) and ``columns=[]`` (the label only in ``cls``,
  not in ``json`` too), joined with ``join_wins={"cls": 3}``.
- ``shardkit verify BASE --join COMPANION`` checks a companion against its base: the
  manifest sha256 it recorded, the shards, and every key in order.

Run (CPU, < 1 minute)::

    python examples/recaption.py
    python examples/recaption.py --count 2000 --workers 4 --keep /tmp/recaption

The command line does the same: ``shardkit companion base/ fixes/ --from fixes.csv
--key-column key --missing empty --columns ''``. The script prints ``RESULT {...}`` JSON lines (used
by tests/test_examples.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import shardkit  # noqa: E402
from shardkit import ShardDataset, ShardLoader  # noqa: E402
from shardkit.cli.synthetic import make_image_folder  # noqa: E402

COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "grey": (128, 128, 128)}


def _thumbnail(sample: dict) -> np.ndarray:
    with Image.open(io.BytesIO(sample["jpg"])) as image:
        image.draft("RGB", (32, 32))  # a DCT-scaled decode: the "model" needs little
        return np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.float32)


def caption_v1(sample: dict) -> dict:
    """A first caption model: the colour closest to the image's mean."""
    mean = _thumbnail(sample).mean(axis=(0, 1))
    colour = min(COLOURS, key=lambda c: float(np.sum((mean - COLOURS[c]) ** 2)))
    return {"txt": f"a {colour} photo"}


def caption_v2(sample: dict) -> dict:
    """A better one: colour, brightness and texture; and a small embedding as .npy."""
    pixels = _thumbnail(sample)
    mean = pixels.mean(axis=(0, 1))
    colour = min(COLOURS, key=lambda c: float(np.sum((mean - COLOURS[c]) ** 2)))
    light = "bright" if mean.mean() > 128 else "dark"
    texture = "busy" if pixels.std() > 40 else "smooth"
    embedding = (pixels.reshape(-1, 3).mean(axis=0) / 255).astype(np.float32)
    return {"txt": f"a {light}, {texture} {colour} photo", "npy": embedding}


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def result(**fields) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="images to generate")
    parser.add_argument("--workers", type=int, default=2, help="processes running the caption models")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="recaption-")
    os.makedirs(root, exist_ok=True)
    try:
        run(root, args.count, args.workers)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def run(root: str, count: int, workers: int) -> None:
    images, base = os.path.join(root, "images"), os.path.join(root, "base")
    make_image_folder(images, count=count, classes=4, size=(160, 120), workers=2)

    # 1. The images, written once.
    started = time.perf_counter()
    written = shardkit.write(images, base, shard_size="200kB", workers=workers, overwrite=True)
    result(
        step="base",
        samples=written.samples,
        shards=written.shards,
        bytes=written.bytes,
        seconds=round(time.perf_counter() - started, 2),
    )

    # 2. Captions from a model, in worker processes: a companion set, not a rewrite.
    v1 = os.path.join(root, "captions-v1")
    done = shardkit.write_companion(base, v1, caption_v1, workers=workers, overwrite=True)
    result(
        step="captions",
        samples=done.samples,
        shards=done.shards,
        bytes=folder_bytes(v1),
        seconds=round(done.seconds, 2),
    )

    # 3. Read images and captions together: a CLIP-style batch.
    ds = ShardDataset(base, join=[v1], decode="torch", fields="jpg txt", shuffle=100, seed=0)
    loader = ShardLoader(ds, batch_size=16, num_workers=2, collate_fn=list)  # captions vary: keep a list
    first = next(iter(loader))
    images_in_batch = [tuple(image.shape) for image, _ in first]
    captions = [text for _, text in first]
    result(step="read", batch=len(first), image_shape=list(images_in_batch[0]), captions=captions[:3])

    # 4. A better model: a second companion; part 2 (v2) wins the caption.
    v2 = os.path.join(root, "captions-v2")
    shardkit.write_companion(base, v2, caption_v2, workers=workers, overwrite=True)
    refused = ""
    try:
        ShardDataset(base, join=[v1, v2])
    except shardkit.ShardkitError as e:  # both hold txt: which one?
        refused = str(e)
    better = ShardDataset(base, join=[v1, v2], join_wins={"txt": 2})
    sample = next(iter(better))
    result(
        step="recaption",
        caption=sample["txt"].decode(),
        embedding_bytes=len(sample["npy"]),
        refused_without_winner="join_wins" in refused,
    )

    # 5. Label fixes from a table holding only the rows that change.
    old = {s["__key__"]: int(s["cls"]) for s in ShardDataset(base)}
    wrong = list(old)[::10]  # say a review found every tenth label wrong
    fixes = os.path.join(root, "fixes.csv")
    with open(fixes, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "label"])
        for key in wrong:
            writer.writerow([key, (old[key] + 1) % 4])
    fixed_dir = os.path.join(root, "fixes")
    fixed = shardkit.write_companion(
        base, fixed_dir, table=fixes, key_column="key", columns=[], missing="empty", overwrite=True
    )
    labels = {
        s["__key__"]: int(s["cls"])
        for s in ShardDataset(base, join=[v1, v2, fixed_dir], join_wins={"txt": 2, "cls": 3})
    }
    changed = [k for k in old if labels[k] != old[k]]
    result(
        step="fixes",
        rows=len(wrong),
        kept=len(fixed.missing),
        changed=len(changed),
        as_fixed=changed == wrong,
        total=len(labels),
    )

    # 6. Verify a companion against its base (the CLI: shardkit verify BASE --join COMPANION).
    proc = subprocess.run(
        [sys.executable, "-m", "shardkit.cli", "verify", base, "--join", v2, "--json"],
        capture_output=True,
        text=True,
    )
    report = json.loads(proc.stdout)
    result(step="verify", ok=report["ok"], shards=report["shards"], problems=len(report["problems"]))


if __name__ == "__main__":
    main()
