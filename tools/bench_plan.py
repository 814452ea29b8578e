"""Planner benchmark at LAION scale (issue 27): synthetic manifests, no shard data.

Manifests of 10,000 samples per shard (100 M, 1 B and 5.8 B samples) are written to a
temporary folder; every measurement then runs in a fresh Python process, which imports
shardkit, sets up (builds the dataset, or loads the counts), and measures one operation:
its time, the process's peak memory above the import (``ru_maxrss`` after the operation
minus ``ru_maxrss`` after the imports: includes the manifest) and the operation's own
peak (``VmHWM`` reset after the setup, Linux).

- ``len(ds)`` of ``ShardDataset(manifest, shuffle=1000, world_size=W, rank=W-1)``;
- one worker's plan (rank ``W-1``, worker 7 of 8): what a DataLoader worker does before
  its first sample (plan, pieces, first emission);
- a resume after ``1024 -> 768`` ranks mid-epoch (every stream of the 1024-rank stage
  half done): ``len(ds)`` after ``load_state_dict``, and one worker's plan;
- the same for ``Mix`` over three parts of 1 B samples each.

The old planner (``tests/old_planner``, the planner of 0fc6f58) runs on the 100 M case in
the same run: the planner calls ``len(ds)`` and a worker make, on the same counts.

    python tools/bench_plan.py                  # everything (about 10 minutes)
    python tools/bench_plan.py --sizes 1e8 --worlds 64 --no-mix
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PER_SHARD = 10_000
WORKERS = 8
BUFFER = 1000
RESUME_FROM, RESUME_TO = 1024, 768


# -- manifests ------------------------------------------------------------------------
def write_manifest(folder: str, samples: int, name: str) -> str:
    """A shardkit manifest of ``samples // PER_SHARD`` shards (the shards do not exist)."""
    path = os.path.join(folder, f"{name}.manifest.json")
    shards = samples // PER_SHARD
    head = {"format": "shardkit", "version": 1, "name": name, "complete": True}
    with open(path, "w") as f:
        f.write(json.dumps(head)[:-1] + ', "shards": [\n')
        for i in range(shards):
            entry = {"name": f"{name}-{i:07d}.tar", "samples": PER_SHARD, "bytes": 1 << 30}
            f.write(json.dumps(entry) + (",\n" if i < shards - 1 else "\n"))
        f.write("]}\n")
    return path


# -- one measurement, in its own process ------------------------------------------------
def status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def resume_state(stream_sizes: list[list[int]], topology: Any) -> dict[str, Any]:
    """A state after every stream of ``topology`` emitted half its samples."""
    from shardkit.plan.epoch import Stage
    from shardkit.plan.state import ResumeState

    emitted = tuple(tuple(n // 2 for n in row) for row in stream_sizes)
    return ResumeState(0, [Stage(topology, emitted)]).to_dict(kind="worker", seed=0)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np  # noqa: F401  (imported before the baseline, as the library does)

    from shardkit import Mix, ShardDataset
    from shardkit.plan import epoch as new
    from shardkit.plan.epoch import EpochPlanner, Topology
    from shardkit.plan.mix import MixPlanner
    from shardkit.plan.state import ResumeState
    from shardkit.read.urls import resolve_shards
    from tests.old_planner import epoch as old

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    case, world, impl = spec["case"], spec["world"], spec.get("impl", "new")
    rank = world - 1
    t0 = time.perf_counter()
    op: Any
    if case == "construct":
        manifest = spec["manifests"][0]

        def op() -> Any:
            return ShardDataset(manifest, shuffle=BUFFER, world_size=world, rank=rank)

    elif case.startswith("ds"):  # ShardDataset: len, len after a resume
        ds = ShardDataset(spec["manifests"][0], shuffle=BUFFER, world_size=world, rank=rank)
        if case == "ds-resume-len":
            counts = ds.counts
            topo = Topology(RESUME_FROM, WORKERS, "pad", BUFFER)
            ds.load_state_dict(resume_state(EpochPlanner(counts, epoch=0).stream_sizes(topo), topo))

        def op() -> Any:
            return len(ds)

    elif case.startswith("mix"):
        parts = [ShardDataset(m, shuffle=BUFFER) for m in spec["manifests"]]
        mix = Mix(parts, world_size=world, rank=rank)
        stages: list = []
        if case.startswith("mix-resume"):
            old_topo = Topology(RESUME_FROM, WORKERS, "pad", 0)
            state = resume_state(MixPlanner(mix.parts, epoch=0, seed=mix.seed).stream_sizes(old_topo), old_topo)
            mix.load_state_dict(state)
            stages = ResumeState.from_dict(state, seed=0).stages
        if case in ("mix-len", "mix-resume-len"):

            def op() -> Any:
                return len(mix)

        else:

            def op() -> Any:
                plan, _ = MixPlanner(mix.parts, epoch=0, seed=mix.seed).plan(
                    Topology(world, WORKERS, "pad", 0), rank=rank, worker=WORKERS - 1, stages=stages
                )
                labels = plan.emission_labels()
                first = next(labels, None)
                return [len(p.pieces) for p in plan.parts], first

    else:  # the planner calls behind len(ds) and a worker, for the old planner and the new
        counts = resolve_shards(spec["manifests"][0]).counts
        assert counts is not None
        api = old if impl == "old" else new
        stages = []
        if case == "plan-resume":
            topo = Topology(RESUME_FROM, WORKERS, "pad", BUFFER)
            emitted = tuple(tuple(n // 2 for n in row) for row in EpochPlanner(counts, epoch=0).stream_sizes(topo))
            stages = [api.Stage(api.Topology(RESUME_FROM, WORKERS, "pad", BUFFER), emitted)]
        if case == "plan-len":

            def op() -> Any:
                planner = api.EpochPlanner(counts, epoch=0, seed=0)
                return planner.plan(api.Topology(world, 0, "pad", BUFFER), rank=rank, worker=0)[1].rank_samples

        else:

            def op() -> Any:
                planner = api.EpochPlanner(counts, epoch=0, seed=0)
                plan, _ = planner.plan(
                    api.Topology(world, WORKERS, "pad", BUFFER), rank=rank, worker=WORKERS - 1, stages=stages
                )
                first = next(iter(plan.emission_order()), None)
                return len(plan.pieces), first

    setup_s = time.perf_counter() - t0
    rss_setup = status_kb("VmRSS")
    can_reset = reset_peak()
    t0 = time.perf_counter()
    result = op()
    seconds = time.perf_counter() - t0
    hwm = status_kb("VmHWM")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        **{k: v for k, v in spec.items() if k != "manifests"},
        "setup_s": setup_s,
        "seconds": seconds,
        "peak_above_import_mb": (peak - base) / 1024,
        "op_peak_mb": (hwm - rss_setup) / 1024 if can_reset and hwm and rss_setup else None,
        "result": repr(result)[:80],
    }


def run_child(spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {**{k: v for k, v in spec.items() if k != "manifests"}, "error": f"timeout after {timeout} s"}
    if out.returncode != 0:
        return {**{k: v for k, v in spec.items() if k != "manifests"}, "error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the driver -----------------------------------------------------------------------
def label(samples: float) -> str:
    return f"{samples / 1e9:g} B" if samples >= 1e9 else f"{samples / 1e6:g} M"


def plan_cases(sizes: list[float], worlds: list[int], old_sizes: list[float], mix: bool) -> list[dict[str, Any]]:
    cases = []
    for size in sizes:
        for world in worlds:
            cases += [
                {"size": size, "world": world, "case": "construct"},
                {"size": size, "world": world, "case": "ds-len"},
                {"size": size, "world": world, "case": "plan-len"},
                {"size": size, "world": world, "case": "plan-worker"},
            ]
        cases += [
            {"size": size, "world": RESUME_TO, "case": "ds-resume-len"},
            {"size": size, "world": RESUME_TO, "case": "plan-resume"},
        ]
    for size in old_sizes:
        for world in worlds:
            cases += [
                {"size": size, "world": world, "case": "plan-len", "impl": "old"},
                {"size": size, "world": world, "case": "plan-worker", "impl": "old"},
            ]
        cases.append({"size": size, "world": RESUME_TO, "case": "plan-resume", "impl": "old"})
    if mix:
        for world in worlds:
            cases += [
                {"size": 3e9, "world": world, "case": "mix-len"},
                {"size": 3e9, "world": world, "case": "mix-worker"},
            ]
        cases += [
            {"size": 3e9, "world": RESUME_TO, "case": "mix-resume-len"},
            {"size": 3e9, "world": RESUME_TO, "case": "mix-resume-worker"},
        ]
    return cases


def row(r: dict[str, Any]) -> str:
    what = {
        "construct": "ShardDataset(manifest) construction",
        "ds-len": "len(ds)",
        "ds-resume-len": f"len(ds) after resume {RESUME_FROM}->{RESUME_TO}",
        "plan-len": "planner: len",
        "plan-worker": "planner: one worker's plan",
        "plan-resume": f"planner: one worker's plan after resume {RESUME_FROM}->{RESUME_TO}",
        "mix-len": "len(Mix)",
        "mix-worker": "Mix: one worker's plan",
        "mix-resume-len": f"len(Mix) after resume {RESUME_FROM}->{RESUME_TO}",
        "mix-resume-worker": f"Mix: one worker's plan after resume {RESUME_FROM}->{RESUME_TO}",
    }[r["case"]]
    size = "3 x 1 B" if r["case"].startswith("mix") else label(r["size"])
    impl = r.get("impl", "new")
    if "error" in r:
        return f"| {what} | {impl} | {size} | {r['world']} | error: {r['error'][:60]} | | |"
    op_peak = "" if r["op_peak_mb"] is None else f"{r['op_peak_mb']:.0f}"
    return (
        f"| {what} | {impl} | {size} | {r['world']} | {r['seconds'] * 1000:.1f} ms | "
        f"{r['peak_above_import_mb']:.0f} MB | {op_peak} MB |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e8,1e9,5.8e9", help="dataset sizes in samples")
    parser.add_argument("--worlds", default="1,64,1024", help="world sizes")
    parser.add_argument("--old", default="1e8", help="sizes to run the old planner on too ('' for none)")
    parser.add_argument("--no-mix", action="store_true", help="skip the Mix of three 1 B parts")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per measurement")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    sizes = [float(s) for s in args.sizes.split(",") if s]
    old_sizes = [float(s) for s in args.old.split(",") if s]
    worlds = [int(w) for w in args.worlds.split(",") if w]
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp:
        manifests = {s: write_manifest(tmp, int(s), f"d{int(s)}") for s in sorted(set(sizes) | set(old_sizes))}
        if not args.no_mix:
            mix_parts = [write_manifest(tmp, int(1e9), f"part{i}") for i in range(3)]
        print("| operation | planner | samples | world | time | peak above import | op's own peak |")
        print("|---|---|---|---|---|---|---|")
        results = []
        for spec in plan_cases(sizes, worlds, old_sizes, not args.no_mix):
            spec["manifests"] = mix_parts if spec["case"].startswith("mix") else [manifests[spec["size"]]]
            result = run_child(spec, args.timeout)
            results.append(result)
            print(row(result), flush=True)
    print(ratios(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def ratios(results: list[dict[str, Any]]) -> str:
    """Old / new for the cases both ran."""
    lines = ["", "old / new (same run):"]
    new = {(r["case"], r["size"], r["world"]): r for r in results if r.get("impl", "new") == "new" and "error" not in r}
    for r in results:
        key = (r["case"], r["size"], r["world"])
        if r.get("impl") != "old" or "error" in r or key not in new:
            continue
        n = new[key]
        lines.append(
            f"  {r['case']} {label(r['size'])} world {r['world']}: time x{r['seconds'] / max(n['seconds'], 1e-9):.0f}, "
            f"peak above import {r['peak_above_import_mb']:.0f} MB vs {n['peak_above_import_mb']:.0f} MB"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
