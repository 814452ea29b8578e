"""One rank of the torchrun Mix test (tests/test_mix.py): a weighted Mix with even="pad"
through ShardLoader with 2 workers; each rank writes its batch count and keys to
``OUT/mix-rank{R}.json``. Rank and world size come from torch.distributed (gloo)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardkit.loader import ShardLoader  # noqa: E402
from shardkit.read.dataset import ShardDataset  # noqa: E402
from shardkit.read.mix import Mix  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", required=True)
    parser.add_argument("--b", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    with open(os.path.join(args.out, f"mix-rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    mix = Mix([ShardDataset(args.a, shuffle=4), ShardDataset(args.b)], weights=[1, 2], epoch_length=35, seed=3)
    loader = ShardLoader(mix, batch_size=4, num_workers=2)
    batches, keys = 0, []
    for batch in loader:
        batches += 1
        keys += [f"{u.rsplit('/', 2)[-2]}/{k}" for u, k in zip(batch["__url__"], batch["__key__"])]
        dist.barrier()  # lockstep, as DDP would be: a rank with fewer batches would hang here
    with open(os.path.join(args.out, f"mix-rank{rank}.json"), "w") as f:
        json.dump({"batches": batches, "keys": keys, "len": len(loader)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
