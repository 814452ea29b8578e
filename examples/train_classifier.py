#!/usr/bin/env python3
"""Train an image classifier from tar shards, with exact mid-epoch resume.

What it shows:

- ``ShardDataset`` -> ``ShardLoader``: shuffled shards, decoding to uint8 CHW tensors and
  torchvision.transforms.v2 augmentation (RandomResizedCrop + horizontal flip) run in the
  DataLoader workers on uint8 (4x less to move between processes than float);
  conversion to float and normalisation happen once per *batch* in the main process.
- A small torchvision model (``resnet18(num_classes=N)`` at 64x64 by default; ``--model
  tiny`` for a few-layer CNN).
- Epochs with ``loader.set_epoch(epoch)`` (a new shard order and shuffle every epoch).
- Checkpoints holding model + optimizer + ``loader.state_dict()``: ``--stop-after N``
  simulates a preemption after N steps, ``--resume`` continues from the checkpoint with
  exactly the samples that epoch had not yet delivered (also with another
  ``--workers`` count).
- ``loader.stats()`` per epoch: batches, bytes read, time the loop waited for data.

Run (CPU, < 1 minute; generates ~400 small images into a temp dir)::

    python examples/train_classifier.py
    python examples/train_classifier.py --epochs 2 --stop-after 10 --checkpoint /tmp/ck.pt
    python examples/train_classifier.py --epochs 2 --resume --checkpoint /tmp/ck.pt

On your own shards (made with ``shardkit write ./imagefolder ./shards``)::

    python examples/train_classifier.py --data ./shards --size 128 --epochs 10

The script prints one ``RESULT {...}`` JSON line per epoch (used by tests/test_examples.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import shardkit  # noqa: E402
from shardkit.loader import ShardLoader  # noqa: E402
from shardkit.read.dataset import ShardDataset  # noqa: E402

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def make_demo_images(root: str, *, count: int, classes: int, size: tuple[int, int] = (96, 72)) -> None:
    """An ImageFolder of photo-like JPEGs whose class shows as a colour cast (so it is learnable)."""
    import numpy as np

    from shardkit.cli.synthetic import encode, photo_like

    casts = np.random.default_rng(123).uniform(-70, 70, (classes, 3)).astype(np.float32)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class_{c:02d}"), exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng([7, i])
        c = i % classes
        w, h = int(size[0] * rng.uniform(0.8, 1.2)), int(size[1] * rng.uniform(0.8, 1.2))
        pixels = np.clip(photo_like(rng, w, h) * 0.6 + 50 + casts[c], 0, 255).astype(np.uint8)
        with open(os.path.join(root, f"class_{c:02d}", f"img_{i:06d}.jpg"), "wb") as f:
            f.write(encode(pixels, quality=90))


def make_demo_shards(dest: str, *, count: int = 400, classes: int = 4, shard_size: str = "150k") -> str:
    """Generate a small ImageFolder and write it as shards (as ``shardkit write`` does);
    returns the shard folder."""
    images = os.path.join(dest, "images")
    make_demo_images(images, count=count, classes=classes)
    shards = os.path.join(dest, "shards")
    # shuffled at write time, too; class names (from the folders) go into the manifest
    shardkit.write(images, shards, shard_size=shard_size, shuffle=True, seed=0, progress=False)
    return shards


def build_augment(size: int) -> v2.Compose:
    """Per-sample augmentation on uint8 CHW tensors, run inside the DataLoader workers."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )


def build_normalize() -> v2.Compose:
    """Per-batch: uint8 -> float in [0, 1] -> normalised (once per batch, in the main process)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(name: str, num_classes: int) -> nn.Module:
    if name == "tiny":
        return TinyCNN(num_classes)
    return getattr(torchvision.models, name)(num_classes=num_classes)


def build_loader(data: str, args: argparse.Namespace, *, even: str | None = "pad") -> ShardLoader:
    """The data pipeline. In a torchrun job ShardDataset reads rank/world size itself."""
    dataset = ShardDataset(
        data,
        shuffle=args.shuffle,  # shuffle-buffer size (samples); shards are shuffled too
        seed=args.seed,  # the order is a pure function of (seed, epoch, topology)
        even=even,
        decode="torch",  # images -> uint8 CHW tensors, .cls -> int
        transform={"jpg": build_augment(args.size)},
        handler="warn",  # a corrupt image is logged and skipped, not fatal
    )
    return ShardLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)


def num_classes_of(loader: ShardLoader, default: int | None) -> int:
    manifest = loader.dataset.shards.manifest  # type: ignore[attr-defined]
    if manifest is not None and manifest.classes:
        return len(manifest.classes)
    if default is None:
        raise SystemExit("these shards have no class list in their manifest: pass --num-classes")
    return default


def save_checkpoint(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint


def parse_args(argv: list[str] | None = None, *, description: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    p.add_argument("--data", help="shards: folder, pattern or manifest (default: generate a demo set)")
    p.add_argument("--count", type=int, default=400, help="images in the generated demo set")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=0, help="at most this many steps per epoch (0 = all)")
    p.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="save a checkpoint and exit after this many steps in all (simulated preemption)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="training resolution")
    p.add_argument(
        "--model", default="tiny", help="'tiny' (a 3-layer CNN, fast on CPU) or a torchvision model name, e.g. resnet18"
    )
    p.add_argument("--num-classes", type=int, help="when the manifest has no class list")
    p.add_argument("--shuffle", type=int, default=1000, help="shuffle-buffer size")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="checkpoint file (default: in the temp dir)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tmp = None
    if args.data is None or args.checkpoint is None:
        tmp = tempfile.mkdtemp(prefix="shardkit-example-")
    try:
        data = args.data
        if data is None:
            t0 = time.perf_counter()
            data = make_demo_shards(tmp, count=args.count)
            print(f"generated {args.count} images as shards in {data} ({time.perf_counter() - t0:.1f} s)")
        checkpoint = args.checkpoint or os.path.join(tmp, "checkpoint.pt")
        return train(data, checkpoint, args)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def train(data: str, checkpoint: str, args: argparse.Namespace) -> int:
    loader = build_loader(data, args, even=None)  # one process: nothing to balance
    model = build_model(args.model, num_classes_of(loader, args.num_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    normalize = build_normalize()

    start_epoch, done_in_epoch, total_steps = 0, 0, 0
    resumed = False
    if args.resume:
        ck = torch.load(checkpoint, map_location="cpu")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        start_epoch, done_in_epoch, total_steps = ck["epoch"], ck["samples_in_epoch"], ck["steps"]
        if ck["loader"] is not None:  # saved mid-epoch: continue that epoch exactly
            loader.load_state_dict(ck["loader"])
            resumed = True
        print(f"resumed from {checkpoint}: epoch {start_epoch}, {done_in_epoch} samples of it done")

    for epoch in range(start_epoch, args.epochs):
        if not (resumed and epoch == start_epoch):
            loader.set_epoch(epoch)  # every epoch: new shard order and shuffle
            done_in_epoch = 0
        model.train()
        seen, loss_sum, correct, steps = done_in_epoch, 0.0, 0, 0
        t0 = time.perf_counter()
        for batch in loader:
            images = normalize(batch["jpg"])  # uint8 NCHW -> normalised float
            labels = batch["cls"]
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            steps += 1
            total_steps += 1
            if args.stop_after and total_steps >= args.stop_after:
                save_checkpoint(
                    checkpoint,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "loader": loader.state_dict(),
                        "epoch": epoch,
                        "samples_in_epoch": seen,
                        "steps": total_steps,
                    },
                )
                print(
                    f"stopped after {total_steps} steps (epoch {epoch}, {seen} samples of it done); "
                    f"checkpoint: {checkpoint}; continue with --resume"
                )
                print("RESULT " + json.dumps({"epoch": epoch, "samples": seen, "stopped": True, "steps": total_steps}))
                return 0
            if args.steps and steps >= args.steps:
                break
        elapsed = time.perf_counter() - t0
        stats = loader.stats()
        new = seen - done_in_epoch
        print(
            f"epoch {epoch}: {steps} steps, {seen} samples in the epoch, loss {loss_sum / max(new, 1):.3f}, "
            f"train acc {correct / max(new, 1):.2f}, {new / elapsed:.0f} samples/s, "
            f"waited {stats['wait_s']:.2f} s for data, read {stats['bytes_read'] / 1e6:.1f} MB"
        )
        # Epoch finished (or cut by --steps): the next run starts at the next epoch.
        save_checkpoint(
            checkpoint,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "loader": None,
                "epoch": epoch + 1,
                "samples_in_epoch": 0,
                "steps": total_steps,
            },
        )
        print(
            "RESULT "
            + json.dumps(
                {"epoch": epoch, "samples": seen, "steps": total_steps, "loss": loss_sum / max(new, 1), "stats": stats}
            )
        )
        resumed = False
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
