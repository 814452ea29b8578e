"""Benchmark JPEG decoders and decode+augment pipelines on one CPU core.

Generates photo-like JPEGs (smooth gradients, soft blobs, texture noise) at the given
long-side sizes, then measures images/second for each available decoder, with and
without reduced-size (DCT-scaled) decoding, and for decode + RandomResizedCrop + flip
pipelines. Ratios are against PIL (the first row of each section).

    python tools/bench_decoders.py                      # 100 images at 400 px and 1500 px
    python tools/bench_decoders.py --count 50 --size 500 2000 --crop 224
"""

from __future__ import annotations

import argparse
import io
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from shardkit.decode.crop import RandomResizedCropDecode
from shardkit.decode.fields import decode_image
from shardkit.decode.pixels import dct_scale_for
from shardkit.decode.size import decode_size_for

try:
    import simplejpeg
except ImportError:
    simplejpeg = None


def photo_like(height: int, width: int, rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    """HWC uint8: gradients and soft blobs drawn at 1/8 size, upscaled, plus texture noise.

    Drawing small and upscaling keeps generation fast; the noise tile (sliced at a random
    offset) gives the high-frequency detail that makes the JPEG cost like a photo.
    """
    small_h, small_w = max(8, height // 8), max(8, width // 8)
    y, x = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    image = np.empty((small_h, small_w, 3), np.float32)
    for channel in range(3):
        angle = rng.uniform(0, 2 * np.pi)
        image[..., channel] = (np.cos(angle) * x / small_w + np.sin(angle) * y / small_h) * 120 + 60
    for _ in range(6):
        cy, cx = rng.uniform(0, small_h), rng.uniform(0, small_w)
        radius2 = (rng.uniform(0.03, 0.3) * min(small_h, small_w)) ** 2
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / radius2)
        image += blob[..., None] * rng.uniform(-80, 80, size=3)
    small = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    smooth = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    top = rng.integers(0, noise.shape[0] - height + 1)
    left = rng.integers(0, noise.shape[1] - width + 1)
    return np.clip(smooth + noise[top : top + height, left : left + width], 0, 255).astype(np.uint8)


def make_jpegs(long_side: int, count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs (quality 90) with long side ``long_side``, 70% landscape."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 6, (long_side + 64, long_side + 64, 3)).astype(np.int16)
    jpegs = []
    for _ in range(count):
        short_side = int(long_side * rng.uniform(0.66, 0.8))
        height, width = (short_side, long_side) if rng.random() < 0.7 else (long_side, short_side)
        buffer = io.BytesIO()
        Image.fromarray(photo_like(height, width, rng, noise)).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def images_per_second(fn: Callable[[bytes], Any], jpegs: list[bytes], repeat: int) -> float:
    """Best of ``repeat`` passes after a short warm-up, in this thread's CPU time.

    CPU time rather than wall time: the rows measure one core's throughput, and other
    processes on a shared machine would otherwise add noise. Seeded so every pipeline
    draws the same crops.
    """
    for data in jpegs[:3]:
        fn(data)
    best = float("inf")
    for _ in range(repeat):
        torch.manual_seed(0)
        start = time.thread_time()
        for data in jpegs:
            fn(data)
        best = min(best, time.thread_time() - start)
    return len(jpegs) / best


def decoder_candidates(crop: int) -> dict[str, Callable[[bytes], Any]]:
    """Plain decoders; '@S' rows decode JPEGs at shorter side >= S via DCT scaling."""
    import torchvision.io as tvio

    def pil(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data)).convert("RGB")

    def pil_draft(data: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(data))
        scale = dct_scale_for(image.height, image.width, crop)
        image.draft("RGB", (image.width // scale, image.height // scale))
        return image.convert("RGB")

    def tv_decode_jpeg(data: bytes) -> torch.Tensor:
        return tvio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB)

    def tv_decode_image(data: bytes) -> torch.Tensor:
        return tvio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB)

    candidates: dict[str, Callable[[bytes], Any]] = {
        "PIL (libjpeg-turbo)": pil,
        f"PIL draft @{crop}": pil_draft,
        "torchvision.io.decode_jpeg": tv_decode_jpeg,
        "torchvision.io.decode_image": tv_decode_image,
    }
    if simplejpeg is not None:

        def sj_scaled(data: bytes) -> np.ndarray:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            scale = dct_scale_for(height, width, crop)
            return simplejpeg.decode_jpeg(data, min_height=-(-height // scale), min_width=-(-width // scale))

        def sj_any_scale(data: bytes) -> np.ndarray:  # lets libjpeg-turbo pick M/8 scales
            return simplejpeg.decode_jpeg(data, min_height=crop, min_width=crop)

        candidates["simplejpeg"] = simplejpeg.decode_jpeg
        candidates[f"simplejpeg @{crop} (1/2,1/4,1/8)"] = sj_scaled
        candidates[f"simplejpeg @{crop} (any M/8)"] = sj_any_scale
    candidates["shardkit torch"] = lambda data: decode_image(data, "torch")
    candidates[f"shardkit torch @{crop}"] = lambda data: decode_image(data, "torch", decode_size=crop)
    return candidates


def pipeline_candidates(crop: int) -> dict[str, Callable[[bytes], Any]]:
    """Decode + RandomResizedCrop(crop) + horizontal flip, all producing CHW uint8 tensors."""
    import torchvision.transforms.v2 as v2
    from torchvision.transforms.v2 import functional as tvf

    augment = v2.Compose([v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip()])
    flip = v2.RandomHorizontalFlip()
    safe_size = decode_size_for(augment)
    fused = RandomResizedCropDecode(crop)
    return {
        "PIL -> tensor -> RRC+flip": lambda data: augment(
            tvf.pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
        ),
        "shardkit torch -> RRC+flip": lambda data: augment(decode_image(data, "torch")),
        f"shardkit @{safe_size} (safe) -> RRC+flip": lambda data: augment(
            decode_image(data, "torch", decode_size=safe_size)
        ),
        f"shardkit @{crop} (approx) -> RRC+flip": lambda data: augment(decode_image(data, "torch", decode_size=crop)),
        "RandomResizedCropDecode + flip": lambda data: flip(fused(data)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100, help="JPEGs per size (default 100)")
    parser.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=[400, 1500],
        help="long side(s) of the generated JPEGs in pixels (default 400 1500)",
    )
    parser.add_argument(
        "--crop", type=int, default=224, help="decode_size / RandomResizedCrop output size (default 224)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="timed passes, best kept (default 1)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*deprecated.*")  # torchvision.io decoders
    print(
        f"torch {torch.__version__}, one thread, CPU time; simplejpeg "
        f"{getattr(simplejpeg, '__version__', 'not installed')}; {args.count} JPEGs per size\n"
    )
    print(f"{'size':>5}  {'method':<38} {'img/s':>8}  {'vs PIL':>6}")
    for long_side in args.size:
        jpegs = make_jpegs(long_side, args.count, seed=long_side)
        mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1000
        sections = {
            f"decode only (mean {mean_kb:.0f} kB/JPEG)": decoder_candidates(args.crop),
            f"decode + RandomResizedCrop({args.crop}) + flip": pipeline_candidates(args.crop),
        }
        for title, candidates in sections.items():
            print(f"{long_side:>5}  -- {title} --")
            baseline = None
            for name, fn in candidates.items():
                rate = images_per_second(fn, jpegs, args.repeat)
                baseline = baseline or rate
                print(f"{long_side:>5}  {name:<38} {rate:8.0f}  {rate / baseline:5.2f}x")
        print()


if __name__ == "__main__":
    main()
