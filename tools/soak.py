"""Remote-faults soak: many randomized runs of a ShardLoader reading from nginx through a
fault-injecting proxy, killed mid-epoch and resumed from its last ``state_dict``.

    python tools/soak.py [--runs 200] [--first-seed 0] [--deadline 60] [--work DIR]

Each run (see ``tests/soak.py``) draws its dataset form (manifest, pattern, folder listing,
plain shards), cache, workers, batch size, shuffling, fault rate, an outage of one path
and kill points from its seed; every sample delivered is compared with the source shards
read by Python's tarfile. Prints one line per run, then a summary in Markdown: runs,
faults injected by kind, samples lost / duplicated / corrupted, hangs, and the runs that
gave up with their messages (each must name the URL, after the retry budget was spent).
Exits 1 when any run lost, duplicated or corrupted a sample, hung, or gave up quietly or
early. Needs nginx (apt-get install nginx-light). Loopback only; bounded in runs and time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.servers import NGINX, run_nginx  # noqa: E402
from tests.soak import OPTIONS, Summary, draw_spec, make_soak_data, soak_run  # noqa: E402


def _line(seed: int, r) -> str:  # noqa: ANN001 - a RunResult
    spec = r.spec
    outage = f" outage={spec.outage[0]}*{spec.outage[1]}" if spec.outage else ""
    status = "ok" if r.ok else "FAIL"
    return (
        f"run {seed:4d} {status:4s} {spec.source:8s} workers={spec.workers} cache={int(spec.cache)} "
        f"batch={spec.batch_size} rate={spec.rate:.2f}{outage} | delivered {r.delivered}/{r.expected} "
        f"lost {r.lost} dup {r.duplicated} corrupt {r.corrupted} kills {r.kills} gave up {len(r.gave_up)} "
        f"faults {sum(r.faults.values())} {r.seconds:.1f}s"
    )


def report(s: Summary, wall: float) -> str:
    rows = [
        ("runs", s.runs),
        ("runs complete (every sample delivered, after restarts)", s.complete),
        ("samples expected / delivered", f"{s.samples_expected} / {s.samples_delivered}"),
        ("samples lost", s.lost),
        ("samples duplicated", s.duplicated),
        ("samples corrupted (bytes differ from the source shard)", s.corrupted),
        ("hangs", s.hangs),
        ("loader processes killed mid-epoch and resumed", s.kills),
        ("faults injected", sum(s.faults.values())),
        ("runs that gave up at least once (then resumed)", s.runs_that_gave_up),
        ("give-ups (the loader raised; restarted from its last state)", s.give_ups),
        (f"give-ups before the retry budget ({OPTIONS['retries']} retries) was spent", len(s.premature)),
        ("give-ups not naming the URL", len(s.quiet)),
        ("wall time", f"{wall:.0f} s"),
    ]
    out = ["| soak | result |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), ""]
    out += ["| fault injected | count |", "| --- | --- |"]
    out += [f"| {kind} | {n} |" for kind, n in sorted(s.faults.items())]
    out += ["", "| give-up message (port and numbers blanked) | count |", "| --- | --- |"]
    out += [f"| {msg} | {n} |" for msg, n in s.messages.most_common()]
    for label, items in (("premature", s.premature), ("quiet", s.quiet)):
        for msg in items[:10]:
            out.append(f"{label}: {msg.strip().splitlines()[-1][:300]}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds before a run counts as hung")
    ap.add_argument("--work", help="folder for the shards and caches (default: a temp folder)")
    args = ap.parse_args()
    if NGINX is None:
        print("nginx is not installed (apt-get install nginx-light)", file=sys.stderr)
        return 2
    work = args.work or tempfile.mkdtemp(prefix="shardkit-soak-")
    os.makedirs(work, exist_ok=True)
    data = make_soak_data(os.path.join(work, "www"))
    summary = Summary()
    started = time.monotonic()
    try:
        with run_nginx(data.root) as nginx:
            for seed in range(args.first_seed, args.first_seed + args.runs):
                result = soak_run(draw_spec(seed), data, nginx.port, work, deadline=args.deadline)
                summary.add(result)
                print(_line(seed, result), flush=True)
                for msg in result.gave_up:
                    print(f"     gave up: {msg.strip().splitlines()[-1][:240]}", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(report(summary, time.monotonic() - started))
    bad = summary.lost or summary.duplicated or summary.corrupted or summary.hangs
    return 1 if bad or summary.quiet or summary.premature or summary.complete < summary.runs else 0


if __name__ == "__main__":
    sys.exit(main())
