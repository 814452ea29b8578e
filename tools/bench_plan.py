"""Planner benchmark at LAION scale (issue 27): synthetic manifests, no shard data.

Manifests of 10,000 samples per shard (100 M, 1 B and 5.8 B samples) are written to a
temporary folder; every measurement then runs in a fresh Python process, which imports
shardkit, sets up (builds the dataset, or loads the counts), and measures one operation:
its time, the process's peak memory above the import (``ru_maxrss`` after the operation
minus ``ru_maxrss`` after the imports: includes the manifest) and the operation's own
peak (``VmHWM`` reset after the setup, Linux).

- constructing ``ShardDataset(manifest, shuffle=1000, world_size=W, rank=W-1)`` (all of
  it is loading the manifest), for the manifest loader of ``--old-ref`` (run from a
  ``git archive`` of that commit) and this one, on the same version-1 manifests, and for
  this one on version-2 manifests (what shardkit writes now). Manifests are "bare"
  (name, samples, bytes: the synthetic ones of issue 27) or "full" (also sha256 and
  fields, as ``ShardWriter`` writes them); "kept" is the RSS the dataset holds after
  construction;
- ``len(ds)`` of that dataset;
- one worker's plan (rank ``W-1``, worker 7 of 8): what a DataLoader worker does before
  its first sample (plan, pieces, first emission);
- a resume after ``1024 -> 768`` ranks mid-epoch (every stream of the 1024-rank stage
  half done): ``len(ds)`` after ``load_state_dict``, and one worker's plan;
- the same for ``Mix`` over three parts of 1 B samples each.

The old planner (``tests/old_planner``, the planner of 0fc6f58) runs on the 100 M case in
the same run: the planner calls ``len(ds)`` and a worker make, on the same counts.

    python tools/bench_plan.py                  # everything (about 15 minutes)
    python tools/bench_plan.py --sizes 1e8 --worlds 64 --no-mix
    python tools/bench_plan.py --cases construct --old-ref f6c472a
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PER_SHARD = 10_000
WORKERS = 8
BUFFER = 1000
RESUME_FROM, RESUME_TO = 1024, 768
FIELDS = ["jpg", "json", "txt"]
OLD_REF = "f6c472a"  # the last commit with the per-shard-object manifest loader


# -- manifests ------------------------------------------------------------------------
def write_manifest(folder: str, samples: int, name: str, *, version: int = 2, full: bool = True) -> str:
    """A shardkit manifest of ``samples // PER_SHARD`` shards (the shards do not exist):
    names ``NAME-000000.tar``..., byte sizes that differ per shard and, when ``full``, a
    sha256 and the fields of each shard, as ``ShardWriter`` writes them."""
    shards = samples // PER_SHARD
    path = os.path.join(folder, f"{name}-v{version}{'' if full else '-bare'}.manifest.json")
    sizes = (1 << 30) + np.arange(shards, dtype=np.int64) * 512
    digests = [hashlib.sha256(i.to_bytes(8, "little")).hexdigest() for i in range(shards)] if full else None
    if version == 2:
        from shardkit.format.columns import Digests, FieldSets, IntColumn, PatternNames
        from shardkit.format.manifest import Manifest, ShardTable

        table = ShardTable(
            PatternNames(f"{name}-", ".tar", digits=6, count=shards),
            IntColumn(np.full(shards, PER_SHARD)),
            IntColumn(sizes),
            Digests.from_hex(digests) if digests else Digests.unknown(shards),
            FieldSets([FIELDS if full else []], np.zeros(shards, dtype=np.int64)),
        )
        with open(path, "w") as f:
            f.write(Manifest(table, name=name).to_json())
        return path
    head = {"format": "shardkit", "version": 1, "name": name, "complete": True}
    with open(path, "w") as f:  # version 1: one object per shard, as shardkit wrote them before
        f.write(json.dumps(head)[:-1] + ', "shards": [\n')
        for i in range(shards):
            entry: dict[str, Any] = {"name": f"{name}-{i:06d}.tar", "samples": PER_SHARD, "bytes": int(sizes[i])}
            if digests:
                entry.update(sha256=digests[i], fields=FIELDS)
            f.write(json.dumps(entry) + (",\n" if i < shards - 1 else "\n"))
        f.write("]}\n")
    return path


def old_tree(ref: str, folder: str) -> str:
    """The ``shardkit`` package of commit ``ref``, unpacked under ``folder``."""
    os.makedirs(folder)
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "shardkit"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    return folder


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
    if spec.get("root"):  # another commit's shardkit (the old manifest loader)
        sys.path.insert(0, spec["root"])
    from shardkit import Mix, ShardDataset
    from shardkit.plan import epoch as new
    from shardkit.plan.epoch import EpochPlanner, Topology
    from shardkit.plan.mix import MixPlanner
    from shardkit.plan.state import ResumeState
    from shardkit.read.urls import resolve_shards
    from tests.old_planner import epoch as old

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_import = status_kb("VmRSS")
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
    rss_after = status_kb("VmRSS")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        **{k: v for k, v in spec.items() if k not in ("manifests", "root")},
        "setup_s": setup_s,
        "seconds": seconds,
        "peak_above_import_mb": (peak - base) / 1024,
        "op_peak_mb": (hwm - rss_setup) / 1024 if can_reset and hwm and rss_setup else None,
        "kept_mb": (rss_after - rss_import) / 1024 if rss_after and rss_import else None,
        "result": repr(result)[:80],
    }


def run_child(spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    shown = {k: v for k, v in spec.items() if k not in ("manifests", "root")}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {**shown, "error": f"timeout after {timeout} s"}
    if out.returncode != 0:
        return {**shown, "error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the driver -----------------------------------------------------------------------
def label(samples: float) -> str:
    return f"{samples / 1e9:g} B" if samples >= 1e9 else f"{samples / 1e6:g} M"


MANIFEST_KINDS = {"v1-bare": (1, False), "v1": (1, True), "v2-bare": (2, False), "v2": (2, True)}


def plan_cases(sizes: list[float], worlds: list[int], old_sizes: list[float], mix: bool) -> list[dict[str, Any]]:
    cases = []
    for size in sizes:
        for world in worlds:
            for full in ("-bare", ""):  # the old loader and the new on version 1, the new on version 2
                cases += [
                    {"size": size, "world": world, "case": "construct", "impl": "old", "manifest": f"v1{full}"},
                    {"size": size, "world": world, "case": "construct", "manifest": f"v1{full}"},
                    {"size": size, "world": world, "case": "construct", "manifest": f"v2{full}"},
                ]
            cases += [
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
    manifest = r.get("manifest", "v2")
    if "error" in r:
        return f"| {what} | {impl} | {manifest} | {size} | {r['world']} | error: {r['error'][:60]} | | | |"
    op_peak = "" if r["op_peak_mb"] is None else f"{r['op_peak_mb']:.0f} MB"
    kept = f"{r['kept_mb']:.0f} MB" if r["case"] == "construct" and r.get("kept_mb") is not None else ""
    return (
        f"| {what} | {impl} | {manifest} | {size} | {r['world']} | {r['seconds'] * 1000:.1f} ms | "
        f"{r['peak_above_import_mb']:.0f} MB | {op_peak} | {kept} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e8,1e9,5.8e9", help="dataset sizes in samples")
    parser.add_argument("--worlds", default="1,64,1024", help="world sizes")
    parser.add_argument("--old", default="1e8", help="sizes to run the old planner on too ('' for none)")
    parser.add_argument("--no-mix", action="store_true", help="skip the Mix of three 1 B parts")
    parser.add_argument("--cases", default="", help="only these cases (comma-separated, e.g. construct,ds-len)")
    parser.add_argument("--old-ref", default=OLD_REF, help="commit whose manifest loader is 'old' for construct")
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
    only = {c for c in args.cases.split(",") if c}
    cases = [c for c in plan_cases(sizes, worlds, old_sizes, not args.no_mix) if not only or c["case"] in only]
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp:
        wanted = {(c["size"], c.get("manifest", "v2")) for c in cases if not c["case"].startswith("mix")}
        manifests = {
            (size, kind): write_manifest(tmp, int(size), f"d{int(size)}", version=v, full=full)
            for size, kind in sorted(wanted)
            for v, full in [MANIFEST_KINDS[kind]]
        }
        if any(c["case"].startswith("mix") for c in cases):
            mix_parts = [write_manifest(tmp, int(1e9), f"part{i}") for i in range(3)]
        old_root = None
        if any(c["case"] == "construct" and c.get("impl") == "old" for c in cases):
            old_root = old_tree(args.old_ref, os.path.join(tmp, "old"))
        print("| operation | code | manifest | samples | world | time | peak above import | op's own peak | kept |")
        print("|---|---|---|---|---|---|---|---|---|")
        results = []
        for spec in cases:
            if spec["case"].startswith("mix"):
                spec["manifests"] = mix_parts
            else:
                spec["manifests"] = [manifests[(spec["size"], spec.get("manifest", "v2"))]]
            if spec["case"] == "construct" and spec.get("impl") == "old":
                spec["root"] = old_root
            result = run_child(spec, args.timeout)
            results.append(result)
            print(row(result), flush=True)
    print(ratios(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def ratios(results: list[dict[str, Any]]) -> str:
    """Old / new for the cases both ran (construction: the old loader on version 1 against
    the new one on the same file and on the same dataset written as version 2)."""
    lines = ["", "old / new (same run):"]
    new = {
        (r["case"], r["size"], r["world"], r.get("manifest")): r
        for r in results
        if r.get("impl", "new") == "new" and "error" not in r
    }
    for r in results:
        if r.get("impl") != "old" or "error" in r:
            continue
        peers = [r.get("manifest")]
        if r["case"] == "construct":
            peers.append(str(r["manifest"]).replace("v1", "v2"))
        for peer in peers:
            n = new.get((r["case"], r["size"], r["world"], peer))
            if n is None:
                continue
            on = f" (new on {peer})" if peer else ""
            lines.append(
                f"  {r['case']} {label(r['size'])} world {r['world']}{on}: "
                f"time x{r['seconds'] / max(n['seconds'], 1e-9):.1f}, "
                f"peak above import {r['peak_above_import_mb']:.0f} MB vs {n['peak_above_import_mb']:.0f} MB"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
