#!/usr/bin/env python3
"""Data-parallel training from tar shards under torchrun (DistributedDataParallel).

What it shows:

- The same pipeline as train_classifier.py (shards -> ShardLoader -> v2 augment in the
  workers -> normalise per batch), one process per rank, gloo on CPU / NCCL on GPU.
- No DistributedSampler: ShardDataset asks torch.distributed for rank and world size
  and its planner gives every rank its own contiguous part of each epoch's (shuffled)
  sample sequence, split again across that rank's DataLoader workers.
  ``loader.set_epoch(epoch)`` plays the role of ``sampler.set_epoch``: the same seed and
  epoch give every rank the same global order, so the parts never overlap.
- ``even="pad"``: every rank gets exactly the same number of samples and batches (at
  most world_size - 1 samples are repeated). Without it one rank could finish an epoch
  a batch early and the others would wait forever in DDP's gradient all-reduce.
- Per-rank ``loader.stats()`` every epoch (gathered and printed by rank 0): batches,
  bytes read, skipped samples and how long the loop waited for data, plus the epoch's
  padded/dropped counts from ``dataset.epoch_info()``.
- Checkpoints: rank 0 saves model + optimizer + its ``loader.state_dict()``, which
  describes every rank's progress. ``--resume`` continues the epoch exactly, also with a
  different number of ranks or workers (elastic).

Run (CPU, 2 ranks, < 1 minute; rank 0 generates a demo set into a temp dir)::

    python -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 \\
        --master_port=29500 examples/train_ddp.py --epochs 2

    # preempted after 6 steps, then resumed on 1 rank with 3 workers
    python -m torch.distributed.run --nproc_per_node=2 examples/train_ddp.py \\
        --data ./shards --stop-after 6 --checkpoint /tmp/ddp.pt
    python -m torch.distributed.run --nproc_per_node=1 examples/train_ddp.py \\
        --data ./shards --resume --checkpoint /tmp/ddp.pt --workers 3

Several nodes need ``--data`` on storage every node can read (a shared folder, or an
http(s):// or s3:// URL), since the generated demo set lives on rank 0's machine.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_classifier as tc  # noqa: E402  (model, augmentation, demo data, loader)


def main() -> int:
    args = tc.parse_args(description="DDP training from tar shards (run it with torchrun)")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # identical initial weights everywhere (DDP also broadcasts them)

    tmp = None
    try:
        data = args.data
        if data is None:
            box: list = [None]
            if rank == 0:
                tmp = tempfile.mkdtemp(prefix="shardkit-ddp-")
                box[0] = tc.make_demo_shards(tmp, count=args.count)
                print(f"generated {args.count} images as shards in {box[0]}", flush=True)
            dist.broadcast_object_list(box, src=0)
            data = box[0]
        checkpoint = args.checkpoint
        if checkpoint is None:
            box = [os.path.join(tmp, "checkpoint.pt") if tmp else None]
            dist.broadcast_object_list(box, src=0)
            checkpoint = box[0]
        train(data, checkpoint, args, rank, world, device)
        dist.barrier()  # nobody removes the demo data while another rank still reads it
    finally:
        dist.destroy_process_group()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def train(data: str, checkpoint: str, args, rank: int, world: int, device: torch.device) -> None:
    # No DistributedSampler: the dataset splits by rank itself (see the module docstring).
    loader = tc.build_loader(data, args, even="pad")
    model = tc.build_model(args.model, tc.num_classes_of(loader, args.num_classes)).to(device)
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    normalize = tc.build_normalize()

    start_epoch, total_steps, resumed = 0, 0, False
    if args.resume:
        ck = torch.load(checkpoint, map_location="cpu")
        model.module.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        start_epoch, total_steps = ck["epoch"], ck["steps"]
        if ck["loader"] is not None:
            # Rank 0's state holds every rank's progress; each rank (any world size)
            # re-plans what is left of the epoch from it.
            loader.load_state_dict(ck["loader"])
            resumed = True
        if rank == 0:
            print(
                f"resumed from {checkpoint} at epoch {start_epoch} (saved with "
                f"{ck['world_size']} rank(s), now {world})",
                flush=True,
            )

    for epoch in range(start_epoch, args.epochs):
        if not (resumed and epoch == start_epoch):
            loader.set_epoch(epoch)  # same value on every rank: replaces sampler.set_epoch
        resumed = False
        model.train()
        steps, loss_sum, samples = 0, torch.zeros((), device=device), 0
        t0 = time.perf_counter()
        for batch in loader:
            images = normalize(batch["jpg"].to(device, non_blocking=True))  # uint8 over PCIe, then float
            labels = batch["cls"].to(device, non_blocking=True)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # the gradient all-reduce: every rank must get here equally often
            optimizer.step()
            loss_sum += loss.detach() * len(labels)
            samples += len(labels)
            steps += 1
            total_steps += 1
            if args.stop_after and total_steps >= args.stop_after:
                if rank == 0:
                    tc.save_checkpoint(
                        checkpoint,
                        {
                            "model": model.module.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "loader": loader.state_dict(),
                            "epoch": epoch,
                            "steps": total_steps,
                            "world_size": world,
                        },
                    )
                    print(
                        f"stopped after {total_steps} steps; checkpoint {checkpoint}; "
                        "continue with --resume (any number of ranks)",
                        flush=True,
                    )
                dist.barrier()
                return
            if args.steps and steps >= args.steps:
                break
        elapsed = time.perf_counter() - t0
        report(loader, epoch, rank, steps, samples, loss_sum, elapsed, device)
        if rank == 0:
            tc.save_checkpoint(
                checkpoint,
                {
                    "model": model.module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "loader": None,
                    "epoch": epoch + 1,
                    "steps": total_steps,
                    "world_size": world,
                },
            )


def report(
    loader,
    epoch: int,
    rank: int,
    steps: int,
    samples: int,
    loss_sum: torch.Tensor,
    elapsed: float,
    device: torch.device,
) -> None:
    """Gather every rank's loader.stats() and print them on rank 0."""
    info = loader.dataset.epoch_info()
    mine = {
        **loader.stats(),
        "rank": rank,
        "steps": steps,
        "samples": samples,
        "seconds": round(elapsed, 2),
        "padded": info.padded,
        "dropped": info.dropped,
    }
    total = torch.stack([loss_sum.float(), torch.tensor(float(samples), device=device)])
    dist.all_reduce(total)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        print(
            f"epoch {epoch}: loss {float(total[0] / total[1].clamp(min=1)):.3f}, "
            f"{int(total[1])} samples over {len(gathered)} rank(s)",
            flush=True,
        )
        for s in gathered:
            print(
                f"  rank {s['rank']}: {s['batches']} batches, {s['samples']} samples, "
                f"read {s['samples_read']} samples / {s['bytes_read'] / 1e6:.2f} MB from "
                f"{s['shards_opened']} shard opens, skipped {s['skipped']}, waited {s['wait_s']:.2f} s "
                f"for data, padded {s['padded']}, dropped {s['dropped']}",
                flush=True,
            )
        print("RESULT " + json.dumps({"epoch": epoch, "ranks": gathered}), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
