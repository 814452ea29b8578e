"""Fused crop decode on one core: CPU per image against decode-in-full + augment.

For each image size, the same photo-like JPEGs go through, in interleaved rounds:

- limit: simplejpeg full decode (shardkit's decoder) + v2 RandomResizedCrop(224) + flip,
  the loop the end-to-end benchmark calls the limit;
- fused, whole image: RandomResizedCropDecode with region decoding off (the whole JPEG
  decoded at the crop's DCT scale, as without libjpeg-turbo 3) + flip;
- fused, region: RandomResizedCropDecode decoding only the crop's region + flip;
- fused, region, flip fused: the flip done inside it (``hflip=0.5``, what
  ``decode_size="auto"`` makes of RandomResizedCrop + RandomHorizontalFlip);
- fused, region, numpy: the region crop as an HWC numpy handler (``mode="numpy"``), no flip;
- exact: the region crop at full resolution, flip fused (``decode_size="exact"``: the
  limit's values, value for value).

Prints CPU ms per image (median over rounds) and the median in-round ratio to the limit
(above 1 = cheaper per image than decoding in full). With ``--baseline DIR`` (another
checkout's root, e.g. ``git archive REV shardkit | tar -x -C DIR``) each round also runs
the fused rows with that code, in a process of its own, and the ratio of its CPU to this
code's is shown. Every round's measurements run in child processes, this code's and the
baseline's alternating, on the same JPEG files.

    python tools/bench_fused_crop.py --count 60 --rounds 5 --size 500x375 1500x1125
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FUSED = (
    "fused, whole image at DCT scale",
    "fused, crop region only",
    "fused, crop region, flip fused",
    "fused, crop region only, numpy mode",
    "exact: crop region at full resolution, flip fused",
)


def candidates(size: int) -> dict[str, Callable[[bytes], Any]]:
    from torchvision.transforms import v2

    from shardkit.decode.crop import RandomResizedCropDecode
    from shardkit.decode.fields import decode_image

    augment = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    flip = v2.RandomHorizontalFlip()
    whole = RandomResizedCropDecode(size, region=False)
    region = RandomResizedCropDecode(size)
    region_numpy = RandomResizedCropDecode(size, mode="numpy")
    rows = {
        "limit (decode in full + RRC + flip)": lambda data: augment(decode_image(data, "torch")),
        FUSED[0]: lambda data: flip(whole(data)),
        FUSED[1]: lambda data: flip(region(data)),
    }
    try:
        rows[FUSED[2]] = RandomResizedCropDecode(size, hflip=0.5)  # type: ignore[call-arg]  # older code: no hflip
    except TypeError:
        pass
    rows[FUSED[3]] = region_numpy
    try:
        rows[FUSED[4]] = RandomResizedCropDecode(size, hflip=0.5, reduce=False)  # type: ignore[call-arg]
    except TypeError:  # older code: no reduce
        pass
    return rows


def cpu_ms_per_image(fn: Callable[[bytes], Any], jpegs: list[bytes]) -> float:
    started = time.process_time()
    for data in jpegs:
        fn(data)
    return (time.process_time() - started) * 1e3 / len(jpegs)


def child(folder: str, crop: int, only_fused: bool) -> None:
    """One round in this process: CPU ms per image of each candidate, as JSON on stdout."""
    import torch

    import shardkit

    torch.set_num_threads(1)
    jpegs = [path.read_bytes() for path in sorted(Path(folder).glob("*.jpg"))]
    fns = {name: fn for name, fn in candidates(crop).items() if not only_fused or name in FUSED}
    for fn in fns.values():  # warm up
        fn(jpegs[0])
    # One-off start-up work would land in the first rows timed: OpenCV (imported by the
    # first planar copy) burns ~0.1 s in threads of its own after its import, and the
    # objects imports leave make Python's next full collection (~0.1 s) come sooner.
    gc.collect()
    time.sleep(1.0)
    times = {}
    for name, fn in fns.items():
        torch.manual_seed(0)
        times[name] = cpu_ms_per_image(fn, jpegs)
    json.dump({"shardkit": os.path.dirname(shardkit.__file__), "times": times}, sys.stdout)


def run_child(folder: str, crop: int, code_root: Path, *, only_fused: bool) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", folder, "--crop", str(crop)] + (["--only-fused"] if only_fused else [])
    env = dict(os.environ, PYTHONPATH=str(code_root))
    out = subprocess.run(cmd, env=env, cwd=code_root, check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    if not Path(result["shardkit"]).resolve().is_relative_to(code_root.resolve()):
        raise SystemExit(f"a run meant for {code_root} imported shardkit from {result['shardkit']}")
    return dict(result["times"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=60, help="JPEGs per size (default 60)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--crop", type=int, default=224, help="RandomResizedCrop output size (default 224)")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--size", nargs="+", default=["500x375", "1500x1125"], help="WxH sizes")
    parser.add_argument("--baseline", type=Path, help="another shardkit checkout's root to compare the fused rows with")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--only-fused", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.crop, args.only_fused)
        return

    import numpy as np

    from shardkit.cli.synthetic import encode, photo_like
    from shardkit.decode.jpeg_region import region_support

    available, found = region_support()
    print(f"one thread, CPU time, {args.rounds} interleaved rounds; region decoding: {found}")
    if not available:
        print("(region decoding unavailable: the 'region' rows decode whole images too)")
    for size in args.size:
        width, height = (int(v) for v in size.lower().split("x"))
        rng = np.random.default_rng(width)
        with tempfile.TemporaryDirectory() as folder:
            for i in range(args.count):
                Path(folder, f"{i:05d}.jpg").write_bytes(encode(photo_like(rng, width, height), quality=args.quality))
            kb = sum(p.stat().st_size for p in Path(folder).glob("*.jpg")) / args.count / 1e3
            rounds, base_rounds = [], []
            for _ in range(args.rounds):
                rounds.append(run_child(folder, args.crop, ROOT, only_fused=False))
                if args.baseline:
                    base_rounds.append(run_child(folder, args.crop, args.baseline, only_fused=True))
        limit = [r[next(iter(r))] for r in rounds]
        print(f"\n{size} ({kb:.0f} KB per JPEG, {args.count} JPEGs)")
        for name in rounds[0]:  # rows the baseline lacks are shown without its figures
            values = [r[name] for r in rounds]
            ratio = statistics.median(base / mine for base, mine in zip(limit, values))
            line = f"  {name:38s} {statistics.median(values):7.2f} ms/img  {ratio:5.2f}x limit"
            if base_rounds and name in base_rounds[0]:
                old = statistics.median(b[name] / r[name] for b, r in zip(base_rounds, rounds))
                line += f"  baseline {statistics.median(b[name] for b in base_rounds):6.2f} ms/img, {old:4.2f}x this"
            print(line)


if __name__ == "__main__":
    main()
