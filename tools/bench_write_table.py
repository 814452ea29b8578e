"""Image-text writing benchmark: `shardkit write` converting a Parquet table of captions and
metadata (images as paths, or embedded as bytes) with 1 and 2 worker processes, against
img2dataset's writer on the same local files (``file://`` URLs, no resizing, the original
bytes kept), for ImageNet-like 500x375 photos and large 1500x1125 ones.

Every case is the command a user would run, timed wall-clock as a subprocess (start-up
included). Each tool's fixed cost (start-up, pools, its last shard) is measured on a
10-row table too, and a second table of ratios compares the time beyond it: the
throughput on a long table. Cases run interleaved,
round after round, and each ratio is the median of the per-round ratios: this machine is
shared and its speed drifts. Pairs:

- checked: shardkit (every image fully entropy-decoded by the write check) against
  img2dataset ``--resize_mode no --skip_reencode True`` (every image decoded by OpenCV to
  read its size, the original bytes written);
- trusted: shardkit ``--no-validate`` against img2dataset ``--disable_all_reencoding True``
  (neither decodes).

img2dataset is run from its own virtual environment (``--img2dataset-python``; it pins
packages this one should not get): ``python -m venv /tmp/i2dvenv && /tmp/i2dvenv/bin/pip
install img2dataset``.

    python tools/bench_write_table.py --img2dataset-python /tmp/i2dvenv/bin/python --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (size, distinct photos, rows: each photo listed rows/photos times, so the table is
# long enough for throughput to show through each tool's fixed cost without generating more)
SIZES = {"imagenet": ((500, 375), 1000, 8000), "large": ((1500, 1125), 250, 1000)}
PER_SHARD = 500  # samples per shard, both tools


def make_tables(folder: str, size: tuple[int, int], count: int, rows: int) -> dict[str, str]:
    """Photos (shardkit.cli.synthetic) and three Parquet tables of ``rows`` rows describing
    them: local paths (shardkit), file:// URLs (img2dataset), and the same rows with the
    bytes embedded; plus 10-row tables (the fixed cost)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = {name: os.path.join(folder, f"{name}.parquet") for name in ("paths", "urls", "bytes", "paths10", "urls10")}
    marker = os.path.join(folder, f".complete-{count}-{rows}")
    if os.path.exists(marker):
        return tables
    from shardkit.cli.synthetic import make_image_folder

    images = os.path.join(folder, "images")
    done = os.path.join(folder, f".images-{count}")
    if not os.path.exists(done):
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating {count} JPEGs ~{size[0]}x{size[1]} in {folder} ...", file=sys.stderr)
        make_image_folder(images, count=count, classes=1, size=size, quality=90)
        open(done, "w").close()
    photos = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(images) for f in fs if f.endswith(".jpg"))
    files = [photos[i % len(photos)] for i in range(rows)]
    rng = np.random.default_rng(0)
    columns = {
        "caption": [f"a synthetic photo number {i}, with a caption like LAION's" for i in range(rows)],
        "aesthetic": [round(float(x), 3) for x in rng.uniform(3, 8, rows)],
        "source": [f"site-{i % 17}.example" for i in range(rows)],
    }
    paths = [os.path.relpath(f, folder) for f in files]
    pq.write_table(pa.table({"path": paths, **columns}), tables["paths"])
    urls = pa.table({"url": ["file://" + os.path.abspath(f) for f in files], **columns})
    pq.write_table(urls, tables["urls"])
    pq.write_table(urls.slice(0, 10), tables["urls10"])  # the fixed cost: a table of 10 rows
    pq.write_table(pa.table({"path": paths, **columns}).slice(0, 10), tables["paths10"])
    blobs = []
    for f in files:
        with open(f, "rb") as handle:
            blobs.append(handle.read())
    pq.write_table(pa.table({"jpg": blobs, **columns}), tables["bytes"], row_group_size=100)
    open(marker, "w").close()
    return tables


def count_images(out: str) -> int:
    n = 0
    for name in os.listdir(out):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(out, name)) as tf:
                n += sum(1 for m in tf.getmembers() if m.name.endswith(".jpg"))
    return n


def measured_pairs(sizes: list[str], times: dict[str, list[float]]) -> Iterator[tuple[str, str, int, str]]:
    """(size, check, workers, img2dataset's case) for every img2dataset case that ran."""
    for size_name in sizes:
        for check in ("checked", "trusted"):
            for workers in (1, 2):
                peer = f"{size_name} {check} img2dataset urls --processes_count {workers}"
                if peer in times:
                    yield size_name, check, workers, peer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="imagenet,large", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the photo and row counts")
    parser.add_argument("--img2dataset-python", help="a python with img2dataset installed (default: skip it)")
    parser.add_argument("--threads", type=int, default=8, help="img2dataset --thread_count per process")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "shardkit-bench-table"))
    parser.add_argument("--json", help="also write the raw timings here")
    args = parser.parse_args(argv)

    py = sys.executable
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    i2d_env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    out = os.path.join(args.dir, "out")
    cases: dict[str, tuple[list[str], dict[str, str], int]] = {}  # name -> (command, env, expected images)
    for size_name in args.sizes.split(","):
        size, photos, count = SIZES[size_name]
        photos, count = max(10, int(photos * args.scale)), max(10, int(count * args.scale))
        tables = make_tables(os.path.join(args.dir, size_name), size, photos, count)
        for workers in (1, 2):
            fixed = [py, "-m", "shardkit.cli", "write", tables["paths10"], out, "--workers", str(workers), "--json"]
            cases[f"{size_name} fixed shardkit 10 rows --workers {workers}"] = (fixed, env, 10)
            for table in ("paths", "bytes"):
                for check in ("checked", "trusted"):
                    cmd = [py, "-m", "shardkit.cli", "write", tables[table], out, "--workers", str(workers)]
                    cmd += ["--max-count", str(PER_SHARD), "--json"] + (["--no-validate"] if check == "trusted" else [])
                    cases[f"{size_name} {check} shardkit {table} --workers {workers}"] = (cmd, env, count)
            if args.img2dataset_python:
                for check, flags in (
                    ("checked", ["--resize_mode", "no", "--skip_reencode", "True"]),
                    ("trusted", ["--disable_all_reencoding", "True"]),
                ):
                    # its console script, beside its python
                    cmd = [os.path.join(os.path.dirname(args.img2dataset_python), "img2dataset")]
                    cmd += ["--url_list", tables["urls"], "--input_format", "parquet", "--url_col", "url"]
                    cmd += ["--caption_col", "caption", "--save_additional_columns", '["aesthetic","source"]']
                    cmd += ["--output_format", "webdataset", "--output_folder", out, "--enable_wandb", "False"]
                    cmd += ["--processes_count", str(workers), "--thread_count", str(args.threads)]
                    cmd += ["--number_sample_per_shard", str(PER_SHARD), "--distributor", "multiprocessing"]
                    if check == "checked":
                        ten = list(cmd)
                        ten[ten.index("--url_list") + 1] = tables["urls10"]
                        cases[f"{size_name} fixed img2dataset 10 rows --processes_count {workers}"] = (
                            ten + flags,
                            i2d_env,
                            10,
                        )
                    cases[f"{size_name} {check} img2dataset urls --processes_count {workers}"] = (
                        cmd + flags,
                        i2d_env,
                        count,
                    )
    if args.img2dataset_python:
        cases["img2dataset start-up (import only)"] = (
            [args.img2dataset_python, "-c", "import img2dataset.main"],
            i2d_env,
            0,
        )
        cases["shardkit start-up (shardkit write --help)"] = ([py, "-m", "shardkit.cli", "write", "--help"], env, 0)
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpus: dict[str, list[float]] = {name: [] for name in cases}  # CPU s of the command and its children
    for round_ in range(args.rounds):
        for name, (cmd, case_env, expected) in cases.items():
            shutil.rmtree(out, ignore_errors=True)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            proc = subprocess.run(cmd, env=case_env, capture_output=True, text=True, cwd=ROOT)
            elapsed = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed ({proc.returncode}): {proc.stderr[-3000:]}")
            if expected:
                got = count_images(out)
                if got != expected:
                    raise SystemExit(f"{name}: wrote {got} images, expected {expected}: {proc.stderr[-2000:]}")
            times[name].append(elapsed)
            print(f"round {round_}: {name}: {elapsed:.2f} s", file=sys.stderr, flush=True)
    shutil.rmtree(out, ignore_errors=True)

    print(f"| case | median wall s | images/s | CPU s (median) | wall s, rounds: {args.rounds} |")
    print("|---|---:|---:|---:|---|")
    for name, values in times.items():
        expected = cases[name][2]
        median = statistics.median(values)
        rate = f"{expected / median:,.0f}" if expected else ""
        cpu = statistics.median(cpus[name])
        print(f"| {name} | {median:.2f} | {rate} | {cpu:.2f} | {' '.join(f'{v:.2f}' for v in values)} |")
    print()
    print("| size | pair | workers | shardkit / img2dataset wall time | CPU time (medians of per-round ratios) |")
    print("|---|---|---:|---:|---:|")
    for size_name, check, workers, peer in measured_pairs(args.sizes.split(","), times):
        for table in ("paths", "bytes"):
            ours = f"{size_name} {check} shardkit {table} --workers {workers}"
            ratios = [a / b for a, b in zip(times[ours], times[peer])]
            cpu = [a / b for a, b in zip(cpus[ours], cpus[peer])]
            print(
                f"| {size_name} | {check}, shardkit {table} | {workers} | {statistics.median(ratios):.2f} "
                f"| {statistics.median(cpu):.2f} |"
            )
    print()
    print("| size | pair | workers | the same, beyond each tool's fixed cost (10-row table) |")
    print("|---|---|---:|---:|")
    for size_name, check, workers, peer in measured_pairs(args.sizes.split(","), times):
        peer_fixed = times[f"{size_name} fixed img2dataset 10 rows --processes_count {workers}"]
        ours_fixed = times[f"{size_name} fixed shardkit 10 rows --workers {workers}"]
        for table in ("paths", "bytes"):
            ours = f"{size_name} {check} shardkit {table} --workers {workers}"
            ratios = [(a - fa) / (b - fb) for a, fa, b, fb in zip(times[ours], ours_fixed, times[peer], peer_fixed)]
            print(f"| {size_name} | {check}, shardkit {table} | {workers} | {statistics.median(ratios):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "times": times, "cpu": cpus}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
