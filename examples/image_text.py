#!/usr/bin/env python3
"""Image-text shards: write them from a CSV or Parquet table of captions, train CLIP-style.

What it shows:

- ``shardkit.write(table, dest)`` (what ``shardkit write meta.csv shards/`` runs) keeping
  every column: the image column becomes ``KEY.jpg``, the caption ``KEY.txt``, every other
  column ``KEY.json`` with its type (``--from parquet``: the images embedded in the table
  as bytes, as LAION/DataComp/Hugging Face tables hold them). ``result.columns`` says
  which column went where.
- ``ShardDataset(..., fields="jpg txt json")``: tuples of (image, caption, metadata); the
  loader batches images into one uint8 tensor, captions into a list of strings and the
  JSON into columns (numbers as tensors, text as lists).
- A CLIP-style step on such a batch: an image encoder and a tokenizer-free text encoder
  (hashed words, ``nn.EmbeddingBag``), a symmetric contrastive loss over the batch.
- ``select=`` on the raw sample: train only on rows whose JSON says ``aesthetic >= 5``,
  without decoding the others.

Run (CPU, a few seconds; generates ~200 small images into a temp dir)::

    python examples/image_text.py
    python examples/image_text.py --from parquet --count 300 --epochs 2

On your own table::

    shardkit write meta.parquet ./shards --caption-column caption
    python examples/image_text.py --data ./shards

The script prints one ``RESULT {...}`` JSON line per epoch (used by tests/test_examples.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import shardkit  # noqa: E402
from shardkit import ShardDataset, ShardLoader  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow"]
THINGS = ["boat", "house", "tree", "dog", "car"]
BUCKETS = 4096  # hashed-word vocabulary of the toy text encoder


def make_table(root: str, *, count: int, fmt: str) -> str:
    """Photo-like JPEGs tinted by a colour the caption names, and a table describing them."""
    import numpy as np

    from shardkit.cli.synthetic import encode, photo_like

    tints = {"red": (90, -40, -40), "green": (-40, 90, -40), "blue": (-40, -40, 90), "yellow": (70, 70, -60)}
    rows = []
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng([11, i])
        colour, thing = COLOURS[i % len(COLOURS)], THINGS[i % len(THINGS)]
        pixels = np.clip(photo_like(rng, 80, 64) * 0.6 + 40 + np.array(tints[colour]), 0, 255).astype(np.uint8)
        data = encode(pixels, quality=90)
        path = f"images/{i:05d}.jpg"
        with open(os.path.join(root, path), "wb") as f:
            f.write(data)
        rows.append(
            {
                "path": path,
                "caption": f"a {colour} {thing}, photo {i}",
                "aesthetic": round(float(rng.uniform(3, 8)), 2),
                "source": f"demo-{i % 3}",
                "jpg": data,
            }
        )
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({k: [r[k] for r in rows] for k in ("jpg", "caption", "aesthetic", "source")})
        path = os.path.join(root, "meta.parquet")
        pq.write_table(table, path, row_group_size=64)
        return path
    path = os.path.join(root, "meta.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption", "aesthetic", "source"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def words(caption: str) -> list[int]:
    """Tokenizer-free text input: each lower-case word hashed into a bucket."""
    return [zlib.crc32(w.encode()) % BUCKETS for w in caption.lower().replace(",", " ").split()]


class TinyCLIP(nn.Module):
    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, dim),
        )
        self.text = nn.EmbeddingBag(BUCKETS, dim, mode="mean")
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        ids = [torch.tensor(words(c)) for c in captions]
        offsets = torch.tensor([0] + [len(t) for t in ids[:-1]]).cumsum(0)
        text = F.normalize(self.text(torch.cat(ids), offsets), dim=-1)
        image = F.normalize(self.image(images), dim=-1)
        logits = image @ text.T * self.scale.exp()
        target = torch.arange(len(captions))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def good_enough(sample: dict) -> bool:
    """select=: sees the raw sample (bytes), so rejected ones are never decoded."""
    return json.loads(sample["json"])["aesthetic"] >= 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="shards to read (default: generate a demo table and write it)")
    parser.add_argument("--from", dest="fmt", choices=("csv", "parquet"), default="csv", help="demo table format")
    parser.add_argument("--count", type=int, default=200, help="demo images")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--size", type=int, default=48, help="training crop size")
    args = parser.parse_args()

    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.mkdtemp(prefix="shardkit-image-text-")
        table = make_table(tmp, count=args.count, fmt=args.fmt)
        data = os.path.join(tmp, "shards")
        result = shardkit.write(table, data, shard_size="200kB")
        print(f"wrote {result.samples} samples in {result.shards} shards; columns: {result.columns}")
    try:
        train(data, args)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def train(data: str, args: argparse.Namespace) -> None:
    dataset = ShardDataset(
        data,
        decode="torch",
        shuffle=200,
        seed=0,
        select=good_enough,
        transform={"jpg": v2.Compose([v2.RandomResizedCrop(args.size, scale=(0.5, 1.0)), v2.RandomHorizontalFlip()])},
        fields="jpg txt json",
    )
    loader = ShardLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, drop_last=True)
    torch.manual_seed(0)
    model = TinyCLIP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        losses, samples = [], 0
        for images, captions, metas in loader:
            # images: (B, 3, S, S) uint8; captions: a list of B str; metas: the JSON columns
            # batched, {"aesthetic": float64 tensor (B,), "source": list of B str, ...}
            assert bool((metas["aesthetic"] >= 5).all())
            loss = model(images.float().div_(255), captions)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            samples += len(captions)
        stats = loader.stats()
        print(
            "RESULT "
            + json.dumps(
                {
                    "epoch": epoch,
                    "samples": samples,
                    "batches": len(losses),
                    "first_loss": round(losses[0], 4) if losses else None,
                    "last_loss": round(losses[-1], 4) if losses else None,
                    "bytes_read": stats.get("bytes_read", 0),
                },
                sort_keys=True,
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
