"""Fused crop decode on one core: CPU per image against decode-in-full + augment.

For each image size, the same photo-like JPEGs go through, in interleaved rounds:

- limit: simplejpeg full decode (shardkit's decoder) + v2 RandomResizedCrop(224) + flip,
  the loop the end-to-end benchmark calls the limit;
- fused, whole image: RandomResizedCropDecode with region decoding off (the whole JPEG
  decoded at the crop's DCT scale, as without libjpeg-turbo 3) + flip;
- fused, region: RandomResizedCropDecode decoding only the crop's region + flip.

Prints CPU ms per image (median over rounds) and the median in-round ratio to the limit
(above 1 = cheaper per image than decoding in full).

    python tools/bench_fused_crop.py --count 60 --rounds 5 --size 500x375 1500x1125
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from shardkit.cli.synthetic import encode, photo_like
from shardkit.decode.crop import RandomResizedCropDecode
from shardkit.decode.fields import decode_image
from shardkit.decode.jpeg_region import region_support


def candidates(size: int) -> dict[str, Callable[[bytes], Any]]:
    augment = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    flip = v2.RandomHorizontalFlip()
    whole = RandomResizedCropDecode(size, region=False)
    region = RandomResizedCropDecode(size)
    return {
        "limit (decode in full + RRC + flip)": lambda data: augment(decode_image(data, "torch")),
        "fused, whole image at DCT scale": lambda data: flip(whole(data)),
        "fused, crop region only": lambda data: flip(region(data)),
    }


def cpu_ms_per_image(fn: Callable[[bytes], Any], jpegs: list[bytes]) -> float:
    started = time.process_time()
    for data in jpegs:
        fn(data)
    return (time.process_time() - started) * 1e3 / len(jpegs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=60, help="JPEGs per size (default 60)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--crop", type=int, default=224, help="RandomResizedCrop output size (default 224)")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--size", nargs="+", default=["500x375", "1500x1125"], help="WxH sizes")
    args = parser.parse_args()

    torch.set_num_threads(1)
    available, found = region_support()
    print(f"one thread, CPU time, {args.rounds} interleaved rounds; region decoding: {found}")
    if not available:
        print("(region decoding unavailable: the 'region' row decodes whole images too)")
    for size in args.size:
        width, height = (int(v) for v in size.lower().split("x"))
        rng = np.random.default_rng(width)
        jpegs = [encode(photo_like(rng, width, height), quality=args.quality) for _ in range(args.count)]
        fns = candidates(args.crop)
        for fn in fns.values():  # warm up
            fn(jpegs[0])
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                torch.manual_seed(0)
                times[name].append(cpu_ms_per_image(fn, jpegs))
        limit = times[next(iter(fns))]
        kb = sum(map(len, jpegs)) / len(jpegs) / 1e3
        print(f"\n{size} ({kb:.0f} KB per JPEG, {args.count} JPEGs)")
        for name, values in times.items():
            ratio = statistics.median(base / mine for base, mine in zip(limit, values))
            print(f"  {name:38s} {statistics.median(values):7.2f} ms/img  {ratio:5.2f}x limit")


if __name__ == "__main__":
    main()
