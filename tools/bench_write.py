"""Writing benchmark: `shardkit write` with 1 and 2 worker processes (decode check on and off)
against GNU `tar cf`, webdataset's ShardWriter and LitData's optimize() with the same worker
count, warm and cold page cache, and the Dask engine on a local 2-worker cluster.

Every case is the command a user would run, timed wall-clock as a subprocess (start-up
included). Cases run interleaved, round after round, and each ratio is the median of the
per-round ratios: this machine is shared and its speed drifts.

    python tools/bench_write.py --count 3000 --rounds 3

"cold" evicts the source images from the page cache first (posix_fadvise DONTNEED, no root
needed). LitData is used when importable (e.g. ``PYTHONPATH=/path/to/litdata-target``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from shardkit.cli.bench import drop_page_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WDS = r"""
import multiprocessing as mp, os, sys, time
import webdataset as wds
started = time.perf_counter()
src, out, workers, maxsize = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
entries = [(os.path.join(src, c, n), i) for i, c in enumerate(classes)
           for n in sorted(os.listdir(os.path.join(src, c)))]
def load(path):
    with open(path, "rb") as f:
        return f.read()
os.makedirs(out, exist_ok=True)
with mp.get_context("fork").Pool(workers) as pool, \
        wds.ShardWriter(os.path.join(out, "data-%06d.tar"), maxsize=maxsize, verbose=0) as sink:
    for i, (data, (path, label)) in enumerate(zip(pool.imap(load, [p for p, _ in entries], chunksize=8), entries)):
        sink.write({"__key__": "%06d" % i, "jpg": data, "cls": label})
print(f"work={time.perf_counter() - started:.3f}")
"""

LITDATA = r"""
import os, sys, time
from litdata import optimize
started = time.perf_counter()
src, out, workers, maxsize = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
entries = [(os.path.join(src, c, n), i) for i, c in enumerate(classes)
           for n in sorted(os.listdir(os.path.join(src, c)))]
def load(entry):
    with open(entry[0], "rb") as f:
        return {"jpg": f.read(), "cls": entry[1]}
if __name__ == "__main__":
    optimize(fn=load, inputs=entries, output_dir=out, chunk_bytes=maxsize, num_workers=workers, mode="overwrite",
             verbose=False, start_method="fork")
    print(f"work={time.perf_counter() - started:.3f}")
"""

# Control: the same pure-Python CPU work in 1 process, then split over 2. Its ratio is what
# this machine gives a second process right now (other users' load included).
BURN = r"""
import multiprocessing as mp, sys, time
def burn(n):
    s = 0
    for i in range(n):
        s += i * i
    return s
if __name__ == "__main__":
    procs, n = int(sys.argv[1]), 12_000_000
    started = time.perf_counter()
    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(burn, [n // procs] * procs)
    print(f"work={time.perf_counter() - started:.3f}")
"""

DASK = r"""
import sys, time
from dask.distributed import Client, LocalCluster
from shardkit.writing.dask_engine import write_with_dask
src, out, shard_size = sys.argv[1], sys.argv[2], sys.argv[3]
if __name__ == "__main__":
    started = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        ready = time.perf_counter()
        manifest, _ = write_with_dask(src, out, parts=2, client=client, shard_size=shard_size)
        done = time.perf_counter()
    print(f"cluster_start={ready - started:.3f} work={done - ready:.3f}")
"""


def make_source(folder: str, count: int) -> list[str]:
    marker = os.path.join(folder, f".complete-{count}")
    if not os.path.exists(marker):
        from shardkit.cli.synthetic import make_image_folder

        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating {count} JPEGs ~500x375 in {folder} ...", file=sys.stderr)
        make_image_folder(folder, count=count, classes=10, size=(500, 375), quality=95, workers=2)
        open(marker, "w").close()
    return sorted(os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs if f.endswith(".jpg"))


def litdata_available() -> bool:
    return subprocess.run([sys.executable, "-c", "import litdata"], capture_output=True).returncode == 0


def dask_available() -> bool:
    return subprocess.run([sys.executable, "-c", "import distributed"], capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "shardkit-bench-write"))
    parser.add_argument("--json", help="also write the raw timings here")
    parser.add_argument("--only", help="run only the cases whose name matches this regular expression")
    args = parser.parse_args(argv)

    from shardkit.sizes import parse_size

    src = os.path.join(args.dir, "src")
    files = make_source(src, args.count)
    total_bytes = sum(os.path.getsize(f) for f in files)
    out = os.path.join(args.dir, "out")
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    maxsize = str(parse_size(args.shard_size))

    def sk(*extra: str) -> list[str]:
        return [py, "-m", "shardkit.cli", "write", src, out, "--shard-size", args.shard_size, "--json", *extra]

    cases: dict[str, tuple[list[str], bool]] = {
        "control: CPU burn, 1 process": ([py, "-c", BURN, "1"], False),
        "control: CPU burn, 2 processes": ([py, "-c", BURN, "2"], False),
        "tar cf": (["tar", "cf", os.path.join(out, "all.tar"), "-C", src, "."], False),
        "tar cf, cold": (["tar", "cf", os.path.join(out, "all.tar"), "-C", src, "."], True),
        # shardkit fsyncs each shard before renaming it: the same durability for tar
        "tar cf + fsync": (
            [
                "sh",
                "-c",
                f'tar cf "$1/all.tar" -C "$2" . && {py} -c "import os, sys; '
                f'os.fsync(os.open(sys.argv[1], os.O_RDONLY))" "$1/all.tar"',
                "sh",
                out,
                src,
            ],
            False,
        ),
        "shardkit --workers 1": (sk("--workers", "1"), False),
        "shardkit --workers 2": (sk("--workers", "2"), False),
        "shardkit --workers 2, cold": (sk("--workers", "2"), True),
        "shardkit --workers 1 --no-validate": (sk("--workers", "1", "--no-validate"), False),
        "shardkit --workers 2 --no-validate": (sk("--workers", "2", "--no-validate"), False),
        "shardkit --workers 2 --no-validate, cold": (sk("--workers", "2", "--no-validate"), True),
        "webdataset ShardWriter, 2 readers": ([py, "-c", WDS, src, out, "2", maxsize], False),
    }
    if litdata_available():
        cases["litdata optimize, 2 workers"] = ([py, "-c", LITDATA, src, out, "2", maxsize], False)
    else:
        print("litdata is not importable: skipped", file=sys.stderr)
    if dask_available():
        cases["dask engine, 2 parts, local 2-worker cluster"] = ([py, "-c", DASK, src, out, args.shard_size], False)
    if args.only:
        import re

        cases = {k: v for k, v in cases.items() if re.search(args.only, k)}
    times: dict[str, list[float]] = {name: [] for name in cases}  # work: after start-up and imports
    walls: dict[str, list[float]] = {name: [] for name in cases}  # the whole command
    cpus: dict[str, list[float]] = {name: [] for name in cases}  # CPU seconds of the command and its children
    extra: dict[str, list[dict[str, float]]] = {}
    for round_ in range(args.rounds):
        digests = {}
        for name, (cmd, cold) in cases.items():
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            if cold:
                drop_page_cache(files)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            elapsed = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
            walls[name].append(elapsed)
            if name.startswith("shardkit"):
                work = json.loads(proc.stdout)["seconds"]
            elif name.startswith("tar"):
                work = elapsed
            else:
                fields = dict(kv.split("=") for kv in proc.stdout.split() if "=" in kv)
                work = float(fields["work"])
                if "cluster_start" in fields:
                    extra.setdefault(name, []).append({"cluster_start": float(fields["cluster_start"])})
            times[name].append(work)
            if name.startswith("shardkit --workers") and "validate" not in name:
                digests[name] = {
                    f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest()
                    for f in sorted(os.listdir(out))
                }
            print(
                f"round {round_ + 1}: {name:52s} {elapsed:7.2f} s, work {work:7.2f} s {args.count / work:7,.0f} img/s",
                file=sys.stderr,
            )
        values = list(digests.values())
        assert all(v == values[0] for v in values), "--workers changed the output bytes"
        if len(values) > 1:
            print(f"round {round_ + 1}: output identical for {', '.join(digests)}", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)

    def ratio(a: str, b: str, table: dict[str, list[float]]) -> float:
        """Median over rounds of rate(a) / rate(b) = time(b) / time(a)."""
        return statistics.median(tb / ta for ta, tb in zip(table[a], table[b]))

    print(
        f"\n{args.count} JPEGs, {total_bytes / args.count / 1e3:.0f} KB each ({total_bytes / 1e6:.0f} MB), "
        f"shard size {args.shard_size}, {args.rounds} interleaved rounds, median times; load average "
        f"{os.getloadavg()[0]:.1f} at the end\n"
    )
    print("work = after interpreter start-up and imports; command = the whole command, wall clock\n")
    print(f"{'case':52s} {'work s':>7s} {'img/s':>7s} {'MB/s':>5s} {'command s':>9s} {'img/s':>7s} {'CPU ms/img':>10s}")
    for name, values in times.items():
        t, w = statistics.median(values), statistics.median(walls[name])
        print(
            f"{name:52s} {t:7.2f} {args.count / t:7,.0f} {total_bytes / 1e6 / t:5.0f} {w:9.2f} "
            f"{args.count / w:7,.0f} {statistics.median(cpus[name]) / args.count * 1e3:10.2f}"
        )
    print("\nratios of rates (median of per-round ratios), work and whole command:")
    pairs = [
        ("control: CPU burn, 2 processes", "control: CPU burn, 1 process"),
        ("shardkit --workers 2", "shardkit --workers 1"),
        ("shardkit --workers 2 --no-validate", "shardkit --workers 1 --no-validate"),
        ("shardkit --workers 2", "shardkit --workers 2 --no-validate"),
        ("shardkit --workers 2", "tar cf"),
        ("shardkit --workers 2 --no-validate", "tar cf"),
        ("shardkit --workers 2 --no-validate", "tar cf + fsync"),
        ("shardkit --workers 2, cold", "tar cf, cold"),
        ("shardkit --workers 2 --no-validate, cold", "tar cf, cold"),
        ("shardkit --workers 2 --no-validate", "webdataset ShardWriter, 2 readers"),
        ("shardkit --workers 2", "webdataset ShardWriter, 2 readers"),
        ("shardkit --workers 2 --no-validate", "litdata optimize, 2 workers"),
        ("dask engine, 2 parts, local 2-worker cluster", "shardkit --workers 2"),
    ]
    for a, b in pairs:
        if a in times and b in times and times[a] and times[b]:
            print(f"  {a:41s} vs {b:41s} {ratio(a, b, times):5.2f}x {ratio(a, b, walls):5.2f}x")
    for name, rows in extra.items():
        if rows:
            print(f"  {name}: cluster start {statistics.median(r['cluster_start'] for r in rows):.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "work": times,
                    "command": walls,
                    "cpu": cpus,
                    "extra": extra,
                    "count": args.count,
                    "bytes": total_bytes,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
