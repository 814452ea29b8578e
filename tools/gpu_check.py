"""Does the GPU wait? A ResNet-50 train-step loop fed by each loader, on one CUDA GPU.

Run through ``tools/gpu_check.sh`` (which installs carried wheels first; see its header).
Generates photo-like JPEGs (~500x375) and shards on the box, then for each configuration
runs a fixed number of bf16, channels-last ResNet-50 (random init) train steps of batch
256 after a few warm-up steps, and prints img/s and the GPU idle fraction: the seconds
the loop spent waiting for the next batch over the loop's total. Each step ends with a
synchronisation of the compute stream, so a wait is time the GPU had nothing to do.

Configurations (each in its own process):

- ``ceiling``: one batch already on the GPU, reused (no loader): the model's own rate.
- ``shardkit-cpu``: ShardLoader, decode + RandomResizedCrop(224) + flip in the workers,
  uint8 batches copied to the GPU by ``device="cuda"``; normalised on the GPU.
- ``webdataset``: WebDataset + WebLoader with the same decoder and augmentation, batched
  in the workers, pinned, copied in the loop.
- ``shardkit-gpu-nvimgcodec`` / ``shardkit-gpu-nvjpeg``: ``decode_device="cuda"``:
  workers ship encoded bytes and crop/flip parameters, the main process decodes and
  augments on the GPU and yields normalised bf16 channels-last batches.

``--smoke`` runs everything tiny (and on the CPU without CUDA, where the GPU-decode
configuration becomes ``decode_device="cpu"``) to check the script itself.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing shardkit
    sys.path.insert(0, ROOT)

CONFIGS = ("ceiling", "shardkit-cpu", "webdataset", "shardkit-gpu-nvimgcodec", "shardkit-gpu-nvjpeg")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------- data


class PhotoSample:
    """``shardkit.write``'s fn: input ``i`` -> sample ``i`` with a photo-like JPEG of about
    ``width`` x ``height`` (runs in the writer's worker processes)."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height

    def __call__(self, i: int) -> dict[str, Any]:
        import numpy as np

        from shardkit.cli.synthetic import encode, photo_like

        rng = np.random.default_rng([7, i])
        w, h = int(self.width * rng.uniform(0.8, 1.2)), int(self.height * rng.uniform(0.8, 1.2))
        return {"__key__": f"{i:08d}", "jpg": encode(photo_like(rng, w, h), quality=90), "cls": i % 1000}


def prepare(work: str, count: int, size: tuple[int, int], processes: int) -> str:
    """Shards of ``count`` photo-like JPEGs in ``work/shards`` (reused when complete)."""
    import shardkit

    shards = os.path.join(work, "shards")
    manifest = os.path.join(shards, "train.manifest.json")
    if os.path.exists(manifest) and json.load(open(manifest)).get("complete"):
        return shards
    # Many shards, so webdataset can give each of 15 workers its own (it splits by shard).
    result = shardkit.write(
        range(count),
        shards,
        fn=PhotoSample(*size),
        name="train",
        shard_size="40MB",
        workers=processes,
        overwrite=True,
        progress=False,
    )
    print(f"generated {result.samples} JPEGs into {result.shards} shards in {result.seconds:.1f}s", flush=True)
    return shards


# ------------------------------------------------------------------------ the loop


def _augment(size: int, normalise: bool) -> Any:
    import torch
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    if normalise:
        steps += [v2.ToDtype(torch.bfloat16, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


def batches(name: str, shards: str, args: argparse.Namespace, device: Any) -> tuple[Iterator[Any], Any]:
    """(iterator of (images, labels), the loader or None) for one configuration."""
    import torch

    from shardkit import ShardDataset, ShardLoader
    from shardkit.decode.fields import decode_image

    if name == "shardkit-cpu" or name.startswith("shardkit-gpu"):
        gpu_decode = name != "shardkit-cpu"
        ds = ShardDataset(
            shards,
            decode="torch",
            transform={"jpg": _augment(args.image_size, gpu_decode)},
            fields="jpg cls",
            shuffle=1000,
            seed=0,
        )
        if gpu_decode:
            backend = name.rsplit("-", 1)[1] if device.type == "cuda" else "cpu"
            placement: dict[str, Any] = {"decode_device": device, "decode_backend": backend}
        else:
            placement = {"device": device if device.type == "cuda" else None}
        loader = ShardLoader(ds, batch_size=args.batch, num_workers=args.workers, drop_last=True, **placement)
        return endless(loader), loader
    if name == "webdataset":
        import webdataset as wds

        aug = _augment(args.image_size, False)

        def prep(sample: dict) -> tuple:
            return aug(decode_image(sample["jpg"], "torch")), int(sample["cls"])

        urls = sorted(glob.glob(os.path.join(shards, "*.tar")))
        # resampled: each worker draws shards forever, so no worker runs dry mid-measurement.
        dataset = (
            wds.WebDataset(urls, resampled=True, shardshuffle=True, nodesplitter=wds.split_by_node)
            .shuffle(1000)
            .map(prep)
            .batched(args.batch, partial=False)
        )
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=args.workers, pin_memory=device.type == "cuda")
        return iter(loader), None
    if name == "ceiling":
        images = torch.randint(
            0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device
        )
        labels = torch.randint(0, 1000, (args.batch,), device=device)

        def forever() -> Iterator[Any]:
            while True:
                yield images, labels

        return forever(), None
    raise ValueError(f"unknown configuration {name!r}")


def endless(loader: Any) -> Iterator[Any]:
    """Batches across epochs (a new pass when one ends; its start-up counts as waiting)."""
    while True:
        yield from loader


def run_config(name: str, shards: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if name == "shardkit-gpu-nvimgcodec" and cuda:
        try:
            from nvidia import nvimgcodec  # noqa: F401
        except ImportError:
            return {"skipped": "nvidia-nvimgcodec is not installed (no wheel in .whl?)"}
    torch.backends.cudnn.benchmark = True
    model = getattr(torchvision.models, args.model)(num_classes=1000).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    compute = torch.cuda.current_stream() if cuda else None

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if images.dtype == torch.uint8:  # the CPU paths ship uint8: normalise on the GPU
            images = ((images.float() - mean) / std).to(torch.bfloat16)
        images = images.contiguous(memory_format=torch.channels_last)
        if not cuda:
            images = images.float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):  # --smoke on a CPU: float32
            loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if compute is not None:
            compute.synchronize()  # the host never runs ahead: a wait below is GPU idle time

    it, loader = batches(name, shards, args, device)
    started_first = time.perf_counter()
    wait = 0.0
    samples = 0
    begin = 0.0
    for n in range(args.warmup + args.steps):
        if n == args.warmup:  # warm-up excluded: worker start, cudnn autotuning, first batches
            wait, samples, begin = 0.0, 0, time.perf_counter()
        t0 = time.perf_counter()
        images, labels = next(it)
        wait += time.perf_counter() - t0
        step(images, labels)
        samples += len(labels)
    total = time.perf_counter() - begin
    result: dict[str, Any] = {
        "img_s": samples / total,
        "idle_fraction": wait / total,
        "wait_s": wait,
        "seconds": total,
        "samples": samples,
        "steps": args.steps,
        "warmup_s": begin - started_first,
    }
    if loader is not None:
        stats = loader.stats()
        result["loader"] = {
            k: stats[k]
            for k in ("wait_s", "stage_s", "decode_backend", "decode_skipped", "cpu_decoded", "device")
            if k in stats
        }
    del it
    return result


def _isolated(name: str, shards: str, argv: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--one", name, "--shards", shards]
    try:  # a hung configuration must not eat the others' time on a leased box
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:] or [f"exit {proc.returncode}"]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment() -> dict[str, Any]:
    import torch
    import torchvision

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        from nvidia import nvimgcodec

        info["nvimgcodec"] = getattr(nvimgcodec, "__version__", "installed")
    except ImportError:
        info["nvimgcodec"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20000, help="JPEGs to generate (default 20000)")
    parser.add_argument("--work", default="/tmp/shardkit-gpu-check", help="folder for the shards (kept, reused)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=15, help="DataLoader workers (default 15)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per configuration (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--only", help="comma-separated configurations: " + ",".join(CONFIGS))
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--config-timeout", type=float, default=150, help="seconds per configuration (150)")
    parser.add_argument("--smoke", action="store_true", help="tiny everything, to test this script (CPU ok)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.count, args.batch, args.workers, args.steps, args.warmup = 96, 8, 2, 3, 1
        args.image_size, args.model = 32, "resnet18"
    if args.one:
        sys.stdout.write(json.dumps(run_config(args.one, args.shards, args)) + "\n")
        return 0
    started = time.perf_counter()
    env = environment()
    print("environment:", json.dumps(env), flush=True)
    size = (120, 90) if args.smoke else (500, 375)
    shards = prepare(args.work, args.count, size, os.cpu_count() or 2)
    needed = (args.warmup + args.steps) * args.batch
    if needed > args.count:
        print(
            f"note: {needed} samples per configuration > {args.count} generated: the loaders start a 2nd epoch",
            flush=True,
        )
    names = args.only.split(",") if args.only else list(CONFIGS)
    forward = [
        f"--{key.replace('_', '-')}={getattr(args, key)}"
        for key in ("count", "batch", "workers", "steps", "warmup", "image_size", "model")
    ]
    results: dict[str, Any] = {}
    print(f"{'configuration':26s} {'img/s':>9s} {'GPU idle':>9s}  notes", flush=True)
    for name in names:
        result = _isolated(name, shards, forward, args.config_timeout)
        results[name] = result
        if "img_s" in result:
            ceiling = results.get("ceiling", {}).get("img_s")
            notes = [f"{result['img_s'] / ceiling:.2f}x ceiling"] if ceiling and name != "ceiling" else []
            stage = result.get("loader", {})
            if "stage_s" in stage:
                notes.append(
                    f"batch stage {stage['stage_s']:.1f}s ({stage['decode_backend']}, "
                    f"{stage['cpu_decoded']} on the CPU)"
                )
            print(f"{name:26s} {result['img_s']:9,.0f} {result['idle_fraction']:9.1%}  {', '.join(notes)}", flush=True)
        else:
            print(
                f"{name:26s} {'-':>9s} {'-':>9s}  {result.get('skipped') or 'failed: ' + result['error']}", flush=True
            )
    report = {
        "environment": env,
        "settings": {
            k: getattr(args, k) for k in ("count", "batch", "workers", "steps", "warmup", "image_size", "model")
        },
        "results": results,
        "seconds": time.perf_counter() - started,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"results written to {args.json}")
    print(f"total {report['seconds']:.0f}s")
    return 0 if all("img_s" in r or "skipped" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
