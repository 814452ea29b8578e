"""One rank of a real ``torchrun`` job over ShardDataset/ShardLoader (driven by test_distributed.py).

Run as::

    python -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 \
        --master_port=PORT tests/dist_worker.py --data SHARD_DIR --out OUT_DIR --tag NAME [jobs...]

Jobs (any combination, done in this order; every rank runs the same jobs):

- ``--configs``: for each configuration in :data:`CONFIGS` (even mode x workers), run
  ``--epochs`` full epochs and record per epoch the keys this rank saw, its batch count,
  ``loader.stats()`` and ``dataset.epoch_info()``. After each epoch the ranks
  ``all_reduce`` their batch count with MAX and MIN: with ``even="pad"``/``"drop"`` the
  two must be equal (a rank with fewer batches would leave the others hanging in
  DDP's next gradient all-reduce), and the script fails if they are not.
- ``--resume-from STATE.json``: load a saved ``loader.state_dict()`` (from any topology)
  and finish that epoch; record the keys.
- ``--save-state STATE.json --steps K``: one full epoch 0, then ``K`` batches of epoch 1,
  then rank 0 writes ``loader.state_dict()`` to JSON; every rank records the keys it saw
  in epoch 1.

Each rank writes ``OUT_DIR/NAME-rank{R}.json``. The backend is gloo on CPU and NCCL when
CUDA is available (counts are all-reduced on the rank's GPU then).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardkit.loader import ShardLoader  # noqa: E402
from shardkit.read.dataset import ShardDataset  # noqa: E402

SEED = 1234
SHUFFLE = 8  # shuffle-buffer size: small, so the data set still gets shuffled
BATCH = 3
RESUME_WORKERS = {1: 3, 2: 2}  # world size -> DataLoader workers in the resume jobs

# name -> (even, num_workers, decode)
CONFIGS = {
    "none-w0": (None, 0, None),
    "none-w2": (None, 2, None),
    "pad-w2": ("pad", 2, "torch"),
    "drop-w0": ("drop", 0, None),
    "drop-w2": ("drop", 2, None),
}


def keys_of(batch) -> list[str]:
    key = batch["__key__"]
    return list(key) if isinstance(key, (list, tuple)) else [key]


def min_max(value: int, device: torch.device) -> tuple[int, int]:
    lo = torch.tensor([value], dtype=torch.int64, device=device)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return int(lo.item()), int(hi.item())


def make_loader(data: str, even, workers: int, decode=None) -> ShardLoader:
    # rank/world_size come from torch.distributed (initialised by the caller).
    dataset = ShardDataset(data, shuffle=SHUFFLE, seed=SEED, even=even, decode=decode)
    return ShardLoader(dataset, batch_size=BATCH, num_workers=workers)


def run_configs(data: str, epochs: int, device: torch.device, only: list[str] | None = None) -> dict:
    out = {}
    for name, (even, workers, decode) in CONFIGS.items():
        if only and name not in only:
            continue
        loader = make_loader(data, even, workers, decode)
        runs = []
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            keys: list[str] = []
            batches = 0
            for batch in loader:
                keys.extend(keys_of(batch))
                if decode == "torch":  # decoded images arrive as a uint8 NCHW batch
                    img = batch["jpg"]
                    assert img.dtype == torch.uint8 and img.ndim == 4 and img.shape[1] == 3, img.shape
                batches += 1
            lo, hi = min_max(batches, device)
            if even is not None and lo != hi:
                raise SystemExit(
                    f"{name} epoch {epoch}: batch counts differ across ranks "
                    f"(min {lo}, max {hi}): a collective would hang"
                )
            info = loader.dataset.epoch_info()
            runs.append(
                {
                    "keys": keys,
                    "batches": batches,
                    "min_batches": lo,
                    "max_batches": hi,
                    "len": len(loader),
                    "stats": loader.stats(),
                    "info": {
                        "total": info.total,
                        "rank_samples": info.rank_samples,
                        "padded": info.padded,
                        "dropped": info.dropped,
                    },
                }
            )
        out[name] = runs
        del loader
    return out


def resume(data: str, path: str, workers: int) -> dict:
    with open(path) as f:
        state = json.load(f)
    loader = make_loader(data, None, workers)
    loader.load_state_dict(state)
    keys: list[str] = []
    for batch in loader:
        keys.extend(keys_of(batch))
    return {"epoch": loader.epoch, "keys": keys, "state": state}


def save_state(data: str, path: str, workers: int, steps: int, rank: int) -> dict:
    loader = make_loader(data, None, workers)
    loader.set_epoch(0)
    for _ in loader:
        pass
    loader.set_epoch(1)
    keys: list[str] = []
    taken = 0
    for batch in loader:
        keys.extend(keys_of(batch))
        taken += 1
        if taken == steps:
            break
    state = loader.state_dict()
    json.dumps(state)  # must be plain JSON
    if rank == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)
    dist.barrier()  # the state file exists before any rank exits
    return {"epoch": 1, "keys": keys, "steps": taken, "state": state}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--configs", action="store_true")
    p.add_argument("--only", help="comma-separated subset of CONFIGS")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--resume-from", action="append", default=[])
    p.add_argument("--save-state")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()

    # torchrun starts each rank in a session of its own (with its DataLoader workers):
    # the test kills that process group by this id if the run fails or hangs.
    with open(os.path.join(args.out, f"{args.tag}-rank{os.environ['RANK']}.pid"), "w") as f:
        f.write(str(os.getpid()))
    cuda = torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert rank == int(os.environ["RANK"]) and world == int(os.environ["WORLD_SIZE"])
    workers = RESUME_WORKERS.get(world, 2)
    result: dict = {"rank": rank, "world_size": world, "backend": dist.get_backend()}
    try:
        if args.configs:
            only = args.only.split(",") if args.only else None
            result["configs"] = run_configs(args.data, args.epochs, device, only)
        result["resumed"] = {os.path.basename(path): resume(args.data, path, workers) for path in args.resume_from}
        if args.save_state:
            result["saved"] = save_state(args.data, args.save_state, workers, args.steps, rank)
        with open(os.path.join(args.out, f"{args.tag}-rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
