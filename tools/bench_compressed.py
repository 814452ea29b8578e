"""Raw iteration (no decode) of the same shards plain and compressed, in one run.

Writes ``--count`` photo-like JPEGs (400x300) into shards, compresses each shard with
gzip, zstd, bzip2 and xz (their CLIs, default levels), then reads every variant with
shardkit's tar reader (warm page cache, one process, best of 3) and prints samples/s,
MB/s of tar data and the size on disk.

    python tools/bench_compressed.py --count 2000
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardkit.cli.main import main as shardkit_main  # noqa: E402
from shardkit.cli.synthetic import make_image_folder  # noqa: E402
from shardkit.format.samples import iter_samples  # noqa: E402

TOOLS = {
    "gzip": (".gz", ["gzip", "-c"]),
    "zstd": (".zst", ["zstd", "-q", "-c"]),
    "bzip2": (".bz2", ["bzip2", "-c"]),
    "xz": (".xz", ["xz", "-c"]),
}


def iterate(paths: list[str]) -> int:
    n = 0
    for path in paths:
        with open(path, "rb") as f:
            for _ in iter_samples(f, url=path):
                n += 1
    return n


def best_of(paths: list[str], repeat: int = 3) -> tuple[float, int]:
    best, n = float("inf"), 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = iterate(paths)
        best = min(best, time.perf_counter() - t0)
    return best, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="shardkit-bench-compressed-")
    try:
        make_image_folder(os.path.join(root, "img"), count=args.count, classes=10, size=(400, 300), workers=2)
        shardkit_main(["write", os.path.join(root, "img"), os.path.join(root, "plain"), "--shard-size", "20MB", "-q"])
        plain = sorted(glob.glob(os.path.join(root, "plain", "*.tar")))
        tar_bytes = sum(os.path.getsize(p) for p in plain)
        variants = {"plain tar": plain}
        for name, (suffix, command) in TOOLS.items():
            if shutil.which(command[0]) is None:
                continue
            out = []
            for path in plain:
                with open(path, "rb") as fin, open(path + suffix, "wb") as fout:
                    subprocess.run(command, stdin=fin, stdout=fout, check=True)
                out.append(path + suffix)
            variants[name] = out
        print("| shards | samples/s | tar MB/s | x plain | on disk |")
        print("| --- | --- | --- | --- | --- |")
        base = None
        for name, paths in variants.items():
            seconds, n = best_of(paths)
            rate = n / seconds
            base = base or rate
            size = sum(os.path.getsize(p) for p in paths)
            mb_s = tar_bytes / 1e6 / seconds
            print(f"| {name} | {rate:,.0f} | {mb_s:,.0f} | {rate / base:.2f} | {size / 1e6:.0f} MB |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
