"""Does the GPU wait? A ResNet-50 train-step loop fed by each loader, and the GPU decoders alone, on one CUDA GPU.

Run through ``tools/gpu_check.sh`` (which installs carried wheels first; see its header;
``python tools/gpu_check.py --prepare-wheels .whl`` downloads and trims them on a machine
with pip and network). Generates photo-like JPEGs (~500x375) and shards on the box, then
runs each configuration in its own process and reports img/s, the GPU idle fraction (the
seconds the loop waited for the next batch over the loop's total; each step ends with a
synchronisation of the compute stream, so a wait is time the GPU had nothing to do) and
the CPU cores the process and its workers used (CPU seconds / wall seconds).

Configurations:

- ``ceiling``: one batch already on the GPU, reused (no loader): the model's own rate.
- ``shardkit-cpu``: ShardLoader, decode + RandomResizedCrop(224) + flip in the workers,
  uint8 batches copied to the GPU by ``device="cuda"``; normalised on the GPU.
- ``webdataset``: WebDataset + WebLoader with the same decoder and augmentation, batched
  in the workers, pinned, copied in the loop.
- ``shardkit-gpu-torchcodec``, ``shardkit-gpu-nvimgcodec[-VER]``: ``decode_device="cuda"``:
  workers ship encoded bytes and crop/flip parameters, the main process decodes and
  augments on the GPU and yields normalised bf16 channels-last batches.
- ``decode-only-torchcodec``, ``decode-only-nvimgcodec[-VER]``: the same GPU-decode
  loader with ``--decode-workers`` (4) workers and no model: the decode rate alone.
- ``regions-nvimgcodec[-VER]``: shardkit's nvImageCodec backend forced to decode crop
  regions in batches (whatever :func:`shardkit.gpu.nvimgcodec.region_refusal` says), the
  crops checked against the CPU decoder: whether that version's region decoding works on
  this card (0.9.0 is reported to crash there: NVIDIA/nvImageCodec issue 55). It runs in
  its own process, so a crash ends only that configuration.

Each nvImageCodec version lives in its own folder (``--nvimgcodec 0.8=DIR``), put in front
of that configuration's PYTHONPATH; without such folders the installed one is used.

``--smoke`` runs everything tiny (and on the CPU without CUDA, where the GPU-decode
configurations become ``decode_device="cpu"`` with the same backend, and nvImageCodec's,
which needs CUDA, are skipped) to check the script itself.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing shardkit
    sys.path.insert(0, ROOT)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# ------------------------------------------------------------------------ wheels

#: What the box (no network, PyTorch + torchvision preinstalled) needs, by CUDA major version
#: of its PyTorch. One version of each: two of one package stop the whole install.
COMMON_WHEELS = {
    "13": ["torchcodec==0.17.0", "nvidia-nvjpeg==13.3.2.43"],
    "12": ["nvidia-nvjpeg-cu12==12.4.0.76"],  # torchcodec for CUDA 12: PyTorch's cu12x index, not PyPI
}
SHARED_WHEELS = ["webdataset==1.0.2", "braceexpand==0.1.7", "simplejpeg==1.9.0", "google-crc32c==1.9.0"]
#: nvImageCodec versions to compare: 0.8 (region decoding works) and 0.9 (issue 55).
NVIMGCODEC_WHEELS = {"0.8": "0.8.0.22", "0.9": "0.9.0.20"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
# Not needed to decode JPEGs on the GPU; dropping them (and the other Pythons' builds) keeps
# the carried wheels under the device tool's 64 MiB.
_TRIM = re.compile(r"(extensions/lib(nvjpeg2k|nvtiff|tiff|opencv)_ext\.|/include/|/tools/dicom/)")


def trim_wheel(path: str, python: str) -> None:
    """Rewrite an nvImageCodec wheel without the parts a JPEG-only ``python`` run never loads."""
    tag = "cpython-" + python.replace(".", "")
    keep_impl = re.compile(rf"nvimgcodec_impl\.{tag}-")
    trimmed = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = set()
        for item in src.infolist():
            name = item.filename
            if _TRIM.search(name) or ("nvimgcodec_impl.cpython-" in name and not keep_impl.search(name)):
                dropped.add(name)
                continue
            data = src.read(item)
            if name.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",", 1)[0] not in dropped).encode()
                dropped.add("")  # RECORD comes last in a wheel; nothing after it is dropped
            dst.writestr(item, data)
    os.replace(trimmed, path)


def prepare_wheels(dest: str, cuda: str, python: str) -> None:
    """Download (and trim) every wheel the box needs into ``dest``: shared ones in ``dest``,
    each nvImageCodec version in ``dest/nvimgcodec-VER``. Runs where pip reaches PyPI."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python]
    pip += ["--implementation", "cp"] + [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([*pip, "-d", dest, *SHARED_WHEELS, *COMMON_WHEELS[cuda]], check=True)
    for short, version in NVIMGCODEC_WHEELS.items():
        folder = os.path.join(dest, f"nvimgcodec-{short}")
        subprocess.run([*pip, "-d", folder, f"nvidia-nvimgcodec-cu{cuda}=={version}"], check=True)
        for wheel in glob.glob(os.path.join(folder, "*.whl")):
            trim_wheel(wheel, python)
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(dest, "**", "*.whl"), recursive=True))
    print(f"wheels in {dest}: {total / 2**20:.1f} MiB")


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
    if os.path.exists(manifest):
        with open(manifest) as f:
            if json.load(f).get("complete"):
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


def jpegs(shards: str, count: int) -> list[bytes]:
    """The first ``count`` JPEGs of the shards, read with tarfile."""
    out: list[bytes] = []
    for path in sorted(glob.glob(os.path.join(shards, "*.tar"))):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    out.append(tar.extractfile(member).read())  # type: ignore[union-attr]
                    if len(out) == count:
                        return out
    return out


# ------------------------------------------------------------------- measuring


def cpu_seconds() -> float | None:
    """CPU seconds used so far by this process and its live descendants (DataLoader
    workers), from /proc; None where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    parents, used = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = int(fields[11]) + int(fields[12])  # utime + stime, clock ticks
    mine, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, parent in parents.items() if parent in mine} - mine
        mine |= new
        grew = bool(new)
    return sum(used.get(pid, 0) for pid in mine) / os.sysconf("SC_CLK_TCK")


class Window:
    """Wall and CPU seconds of the timed part of a configuration."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def result(self, samples: int) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall
        cpu = cpu_seconds()
        cores = (cpu - self.cpu) / wall if cpu is not None and self.cpu is not None else None
        return {"img_s": samples / wall, "seconds": wall, "samples": samples, "cpu_cores": cores}


# ------------------------------------------------------------------ the configurations


def _augment(size: int, normalise: bool) -> Any:
    import torch
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    if normalise:
        steps += [v2.ToDtype(torch.bfloat16, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


def decoder_of(name: str) -> tuple[str, str | None]:
    """("torchcodec" | "nvimgcodec", nvImageCodec version folder or None) of a GPU configuration."""
    backend = "nvimgcodec" if "nvimgcodec" in name else "torchcodec"
    version = name.rsplit("nvimgcodec-", 1)[1] if "nvimgcodec-" in name else None
    return backend, version


def gpu_loader(shards: str, args: argparse.Namespace, device: Any, backend: str, workers: int) -> Any:
    from shardkit import ShardDataset, ShardLoader

    ds = ShardDataset(
        shards, decode="torch", transform={"jpg": _augment(args.image_size, True)}, fields="jpg cls", shuffle=1000
    )
    return ShardLoader(
        ds, batch_size=args.batch, num_workers=workers, drop_last=True, decode_device=device, decode_backend=backend
    )


def batches(name: str, shards: str, args: argparse.Namespace, device: Any) -> tuple[Iterator[Any], Any]:
    """(iterator of (images, labels), the loader or None) for one train configuration."""
    import torch

    from shardkit import ShardDataset, ShardLoader
    from shardkit.decode.fields import decode_image

    if name == "shardkit-cpu":
        ds = ShardDataset(
            shards, decode="torch", transform={"jpg": _augment(args.image_size, False)}, fields="jpg cls", shuffle=1000
        )
        loader = ShardLoader(
            ds,
            batch_size=args.batch,
            num_workers=args.workers,
            drop_last=True,
            device=device if device.type == "cuda" else None,
        )
        return endless(loader), loader
    if name.startswith("shardkit-gpu-"):
        loader = gpu_loader(shards, args, device, decoder_of(name)[0], args.workers)
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


def loader_stats(loader: Any) -> dict[str, Any]:
    keys = ("wait_s", "stage_s", "decode_backend", "decode_regions", "decode_skipped", "cpu_decoded")
    stats = loader.stats()
    return {k: stats[k] for k in (*keys, "decode_batch_failures", "device") if k in stats}


def run_train(name: str, shards: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
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

    started = time.perf_counter()
    it, loader = batches(name, shards, args, device)
    wait, samples = 0.0, 0
    window = Window()
    for n in range(args.warmup + args.steps):
        if n == args.warmup:  # warm-up excluded: worker start, cudnn autotuning, first batches
            wait, samples, window = 0.0, 0, Window()
            warmup = time.perf_counter() - started
        t0 = time.perf_counter()
        images, labels = next(it)
        wait += time.perf_counter() - t0
        step(images, labels)
        samples += len(labels)
    result = window.result(samples)
    result.update(idle_fraction=wait / result["seconds"], wait_s=wait, steps=args.steps, warmup_s=warmup)
    if loader is not None:
        result["loader"] = loader_stats(loader)
    return result


def run_decode_only(name: str, shards: str, args: argparse.Namespace) -> dict[str, Any]:
    """The GPU-decode loader with ``--decode-workers`` workers and no model."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    loader = gpu_loader(shards, args, device, decoder_of(name)[0], args.decode_workers)
    it = endless(loader)
    samples, window = 0, Window()
    for n in range(args.warmup + args.steps):
        if n == args.warmup:
            samples, window = 0, Window()
        images, labels = next(it)
        if cuda:
            torch.cuda.synchronize()  # the batch is decoded, not only queued
        samples += len(labels)
    result = window.result(samples)
    result.update(workers=args.decode_workers, loader=loader_stats(loader))
    return result


def run_regions(name: str, shards: str, args: argparse.Namespace) -> dict[str, Any]:
    """Batched region decoding with shardkit's nvImageCodec backend, checked against the CPU."""
    import torch
    from nvidia import nvimgcodec

    from shardkit.decode.fields import decode_image
    from shardkit.gpu.nvimgcodec import NvimgcodecBackend, region_refusal
    from shardkit.gpu.recipe import parse_recipe
    from shardkit.gpu.ship import encode_for_batch

    device = torch.device("cuda", torch.cuda.current_device())
    recipe = parse_recipe(_augment(args.image_size, False))
    backend = NvimgcodecBackend(device, None)
    backend.regions = True  # the probe: decode regions whatever region_refusal says (this process only)
    shipped = [encode_for_batch(data, recipe, 0, max_pixels=None) for data in jpegs(shards, args.batch * 8)]
    cropped = checked = mismatched = 0
    worst = 0.0
    started = time.perf_counter()
    for start in range(0, len(shipped), args.batch):
        chunk = shipped[start : start + args.batch]
        results = backend.decode(chunk, [recipe] * len(chunk))
        backend.finish()
        torch.cuda.synchronize()
        for n, (image, result) in enumerate(zip(chunk, results)):
            cropped += result.cropped
            if not result.cropped or n % 16:
                continue
            top, left, height, width = image.params[0]
            want = decode_image(image.data, "torch", exif_orientation=False)[:, top : top + height, left : left + width]
            checked += 1
            assert result.tensor is not None
            if tuple(result.tensor.shape) != tuple(want.shape):
                mismatched += 1
            else:
                worst = max(worst, (result.tensor.cpu().float() - want.float()).abs().mean().item())
    return {
        "nvimgcodec": nvimgcodec.__version__,
        "policy": region_refusal(nvimgcodec.__version__) or "regions allowed",
        "images": len(shipped),
        "gpu_regions": cropped,
        "batch_failures": backend.batch_failures,
        "checked": checked,
        "shape_mismatches": mismatched,
        "worst_mean_diff": worst,
        "seconds": time.perf_counter() - started,
        "ok": cropped == len(shipped) and backend.batch_failures == 0 and mismatched == 0 and worst < 3.0,
    }


def run_config(name: str, shards: str, args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util

    import torch

    if name.startswith(("shardkit-gpu-", "decode-only-", "regions-")):
        backend, _ = decoder_of(name)
        module = "nvidia.nvimgcodec" if backend == "nvimgcodec" else "torchcodec"
        if importlib.util.find_spec(module) is None:
            return {"skipped": f"{module} is not installed (no wheel in .whl?)"}
        if backend == "nvimgcodec" and not torch.cuda.is_available():
            return {"skipped": "nvImageCodec decodes on CUDA only"}
    if name.startswith("regions-"):
        return run_regions(name, shards, args)
    if name.startswith("decode-only-"):
        return run_decode_only(name, shards, args)
    return run_train(name, shards, args)


# --------------------------------------------------------------------------- running


def config_names(versions: list[str]) -> list[str]:
    """Every configuration, the ones that matter most first (a late one may run out of time)."""
    nv = [f"nvimgcodec-{v}" for v in versions] or ["nvimgcodec"]
    names = ["ceiling", "shardkit-cpu", "webdataset", "shardkit-gpu-torchcodec", f"shardkit-gpu-{nv[0]}"]
    names += ["decode-only-torchcodec", f"decode-only-{nv[0]}"]
    for extra in nv[1:]:
        names += [f"shardkit-gpu-{extra}", f"decode-only-{extra}"]
    return names + [f"regions-{v}" for v in nv]


def _isolated(name: str, shards: str, argv: list[str], timeout: float, site: str | None) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--one", name, "--shards", shards]
    env = dict(os.environ)
    if site:  # this configuration's nvImageCodec version goes first on the path
        env["PYTHONPATH"] = site + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:  # a hung configuration must not eat the others' time on a leased box
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-4:]
        if proc.returncode < 0:
            tail.append(f"killed by signal {-proc.returncode} ({signal.Signals(-proc.returncode).name})")
        return {"error": " | ".join(tail or [f"exit {proc.returncode}"])}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _version(name: str, path: list[str] | None = None) -> str | None:
    try:
        if path is None:
            return importlib.metadata.version(name)
        for dist in importlib.metadata.distributions(path=path):
            if dist.metadata["Name"].lower().startswith(name):
                return dist.version
    except importlib.metadata.PackageNotFoundError:
        pass
    return None


def environment(sites: dict[str, str]) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "cuda": torch.version.cuda,
    }
    for package in ("torch", "torchvision", "torchcodec", "simplejpeg", "webdataset", "pillow", "numpy"):
        info[package] = _version(package)
    info["nvimgcodec"] = {v: _version("nvidia-nvimgcodec", [site]) for v, site in sites.items()} or next(
        (_version(p) for p in ("nvidia-nvimgcodec-cu13", "nvidia-nvimgcodec-cu12") if _version(p)), None
    )
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        query = "--query-gpu=name,driver_version,memory.total"
        smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    try:
        rev = ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]
        info["shardkit"] = subprocess.run(rev, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["shardkit"] = None
    return info


def _notes(name: str, result: dict[str, Any], ceiling: float | None) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    if "error" in result:
        return f"failed: {result['error']}"
    if name.startswith("regions-"):
        return (
            f"{'OK' if result['ok'] else 'NOT OK'}: nvImageCodec {result['nvimgcodec']}, {result['gpu_regions']}/"
            f"{result['images']} regions on the GPU, {result['batch_failures']} failed batches, worst mean diff "
            f"{result['worst_mean_diff']:.2f} ({result['policy']})"
        )
    train = not name.startswith(("ceiling", "decode-only-"))
    notes = [f"{result['img_s'] / ceiling:.2f}x ceiling"] if ceiling and train else []
    stage = result.get("loader", {})
    if "stage_s" in stage:
        notes.append(
            f"batch stage {stage['stage_s']:.1f}s ({stage['decode_backend']}, regions {stage['decode_regions']}, "
            f"{stage['cpu_decoded']} on the CPU, {stage['decode_batch_failures']} failed batches)"
        )
    if "workers" in result:
        notes.append(f"no model, {result['workers']} workers")
    return ", ".join(notes)


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(report: dict[str, Any]) -> str:
    env, settings = report["environment"], report["settings"]
    lines = [
        "# tools/gpu_check.sh",
        "",
        f"GPU: {env.get('nvidia_smi') or env.get('gpu') or 'none'}; CUDA {env['cuda']}; {env['cpus']} CPUs; "
        f"Python {env['python']}; torch {env['torch']}, torchvision {env['torchvision']}, "
        f"torchcodec {env['torchcodec']}, nvImageCodec {env['nvimgcodec']}, simplejpeg {env['simplejpeg']}, "
        f"webdataset {env['webdataset']}; shardkit {env['shardkit']}.",
        "",
        f"{settings['model']}, batch {settings['batch']}, {settings['image_size']}px, {settings['workers']} workers "
        f"(decode-only: {settings['decode_workers']}), {settings['steps']} timed steps after {settings['warmup']}, "
        f"{settings['count']} generated JPEGs.",
        "",
        "| configuration | img/s | GPU idle | CPU cores | notes |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    ceiling = report["results"].get("ceiling", {}).get("img_s")
    for name, result in report["results"].items():
        lines.append(
            f"| {name} | {_cell(result.get('img_s'), ',.0f')} | {_cell(result.get('idle_fraction'), '.1%')} | "
            f"{_cell(result.get('cpu_cores'), '.1f')} | {_notes(name, result, ceiling)} |"
        )
    return "\n".join(lines) + f"\n\nTotal {report['seconds']:.0f} s.\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20000, help="JPEGs to generate (default 20000)")
    parser.add_argument("--work", default="/tmp/shardkit-gpu-check", help="folder for the shards (kept, reused)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=15, help="DataLoader workers (default 15)")
    parser.add_argument("--decode-workers", type=int, default=4, help="workers of the decode-only runs (4)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per configuration (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--only", help="comma-separated configurations (default: all; see the docstring)")
    parser.add_argument("--nvimgcodec", action="append", default=[], metavar="VER=DIR", help="an nvImageCodec install")
    parser.add_argument("--json", help="write the results here too (after every configuration)")
    parser.add_argument("--markdown", help="write the results as a markdown table here too")
    parser.add_argument("--config-timeout", type=float, default=150, help="seconds per configuration (150)")
    parser.add_argument("--deadline", type=float, default=420, help="seconds for everything; later ones skip (420)")
    parser.add_argument("--smoke", action="store_true", help="tiny everything, to test this script (CPU ok)")
    parser.add_argument("--prepare-wheels", metavar="DIR", help="download and trim the box's wheels into DIR, exit")
    parser.add_argument("--wheel-cuda", default="13", choices=sorted(COMMON_WHEELS), help="the box's CUDA major")
    parser.add_argument("--wheel-python", default="3.12", help="the box's Python (default 3.12)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare_wheels:
        prepare_wheels(args.prepare_wheels, args.wheel_cuda, args.wheel_python)
        return 0
    if args.smoke:
        args.count, args.batch, args.workers, args.decode_workers, args.steps, args.warmup = 96, 8, 2, 2, 3, 1
        args.image_size, args.model = 32, "resnet18"
        args.work = args.work + "-smoke"
    if args.one:
        sys.stdout.write(json.dumps(run_config(args.one, args.shards, args)) + "\n")
        return 0
    started = time.perf_counter()
    sites = dict(item.split("=", 1) for item in args.nvimgcodec)
    env = environment(sites)
    print("environment:", json.dumps(env), flush=True)
    size = (120, 90) if args.smoke else (500, 375)
    shards = prepare(args.work, args.count, size, os.cpu_count() or 2)
    if (args.warmup + args.steps) * args.batch > args.count:
        print("note: a configuration needs more samples than were generated: the loaders start a 2nd epoch")
    names = args.only.split(",") if args.only else config_names(sorted(sites))
    forward = [
        f"--{key.replace('_', '-')}={getattr(args, key)}"
        for key in ("count", "batch", "workers", "decode_workers", "steps", "warmup", "image_size", "model")
    ]
    settings = {
        k: getattr(args, k)
        for k in ("count", "batch", "workers", "decode_workers", "steps", "warmup", "image_size", "model", "smoke")
    }
    report: dict[str, Any] = {"environment": env, "settings": settings, "results": {}, "seconds": 0.0}
    print(f"{'configuration':30s} {'img/s':>9s} {'GPU idle':>9s} {'cores':>6s}  notes", flush=True)
    for name in names:
        left = args.deadline - (time.perf_counter() - started)
        if left < 20:
            result: dict[str, Any] = {"skipped": f"out of time (--deadline {args.deadline:.0f}s)"}
        else:
            version = decoder_of(name)[1] if "nvimgcodec" in name else None
            result = _isolated(name, shards, forward, min(args.config_timeout, left - 10), sites.get(version or ""))
        report["results"][name] = result
        ceiling = report["results"].get("ceiling", {}).get("img_s")
        print(
            f"{name:30s} {_cell(result.get('img_s'), '9,.0f'):>9s} {_cell(result.get('idle_fraction'), '9.1%'):>9s} "
            f"{_cell(result.get('cpu_cores'), '6.1f'):>6s}  {_notes(name, result, ceiling)}",
            flush=True,
        )
        report["seconds"] = time.perf_counter() - started
        if args.json:  # after every configuration: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(markdown(report))
    print(f"total {report['seconds']:.0f}s" + (f"; results in {args.json}" if args.json else ""))
    # A region probe reports whether a version works (a crash included): a finding, not a failure of the script.
    measured = [r for n, r in report["results"].items() if not n.startswith("regions-")]
    return 0 if all("img_s" in r or "skipped" in r for r in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
