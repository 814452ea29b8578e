"""Real ``torchrun`` jobs (gloo on CPU, loopback only) over shards of uneven sizes.

The data: 5 shards of [13, 0, 7, 22, 1] samples (43, which no world size here divides).
To keep the suite fast, a few torchrun invocations serve many tests:

- P, 2 ranks x {0, 2} workers: every configuration of tests/dist_worker.py (even=None,
  pad, drop) for 2 epochs; then saves rank 0's ``loader.state_dict()`` 3 batches into
  epoch 1 (2 ranks x 2 workers) as state A.
- Q, 1 rank x 3 workers: saves state B 5 batches into epoch 1.
- S, two torchrun processes ``--nnodes=2 --node_rank=0/1`` (static rendezvous on
  127.0.0.1), 2 ranks each: 4 ranks x 2 workers. P, Q and S run at the same time.
- then R, 2 ranks: the same configurations as P with the same seed (determinism across
  runs); resumes state A with the same topology (2x2 -> 2x2) and state B (1x3 -> 2x2);
  and Q2, 1 rank x 3 workers: resumes state A (2x2 -> 1x3).

Every process we start is killed (by its own id / process group) when a run fails.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import make_shards, pairs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "dist_worker.py")
COUNTS = [13, 0, 7, 22, 1]
ALL_KEYS = sorted(f"s{i:06d}" for i in range(sum(COUNTS)))
RUN_TIMEOUT = 150  # seconds for one torchrun invocation (normally 5-15 s)

pytestmark = pytest.mark.timeout(420)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """One torchrun process (in its own session) plus the ranks it starts."""

    def __init__(
        self, tag: str, out: str, args: list[str], *, nproc: int, port: int, nnodes: int = 1, node_rank: int = 0
    ) -> None:
        self.tag, self.out = tag, out
        self.log = os.path.join(out, f"{tag}-node{node_rank}.log")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc}",
            "--rdzv_backend=static",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "--local_addr=127.0.0.1",
            "--max_restarts=0",
            WORKER,
            "--out",
            out,
            "--tag",
            tag,
            *args,
        ]
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            GLOO_SOCKET_IFNAME="lo",
            NCCL_SOCKET_IFNAME="lo",
            MASTER_ADDR="127.0.0.1",
            PYTHONUNBUFFERED="1",
        )
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait(self, deadline: float) -> int | None:
        try:
            return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the ranks' process groups (they hold DataLoader workers) and torchrun's."""
        pids = []
        for name in os.listdir(self.out):
            if name.startswith(f"{self.tag}-rank") and name.endswith(".pid"):
                with open(os.path.join(self.out, name)) as f:
                    pids.append(int(f.read().strip() or 0))
        for pid in pids + [self.proc.pid]:
            if pid > 0:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()[-6000:]


def run_jobs(jobs: list[Job], timeout: float = RUN_TIMEOUT) -> None:
    """Wait for all jobs; on any failure or timeout kill them all and fail with their logs."""
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for job in jobs:
            codes.append(job.wait(deadline))
            if codes[-1] != 0:
                break
    finally:
        if len(codes) < len(jobs) or any(c != 0 for c in codes):
            for job in jobs:
                job.kill()
            logs = "\n".join(
                f"--- {j.tag} (exit {c}) ---\n{j.output()}"
                for j, c in zip(jobs, codes + [None] * (len(jobs) - len(codes)))
            )
            pytest.fail(f"torchrun failed or timed out after {timeout:.0f} s:\n{logs}", pytrace=False)


def results(out: str, tag: str, world: int) -> list[dict]:
    ranks = []
    for r in range(world):
        with open(os.path.join(out, f"{tag}-rank{r}.json")) as f:
            ranks.append(json.load(f))
    assert [d["rank"] for d in ranks] == list(range(world))
    assert all(d["world_size"] == world for d in ranks)
    return ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    base = tmp_path_factory.mktemp("dist")
    data = str(base / "data")
    out = str(base / "out")
    os.makedirs(out)
    make_shards(data, COUNTS, image=True)
    a, b = os.path.join(out, "state_a.json"), os.path.join(out, "state_b.json")
    common = ["--data", data]

    # Round 1: P, Q and the two "nodes" of S together; round 2: R and Q2 (they need P's and Q's states).
    port_s = free_port()
    s_args = common + ["--configs", "--only", "none-w2,pad-w2,drop-w0"]
    round1 = [Job("S", out, s_args, nproc=2, nnodes=2, node_rank=n, port=port_s) for n in (0, 1)]
    round1.append(Job("P", out, common + ["--configs", "--save-state", a, "--steps", "3"], nproc=2, port=free_port()))
    round1.append(Job("Q", out, common + ["--save-state", b, "--steps", "5"], nproc=1, port=free_port()))
    run_jobs(round1)
    round2 = [
        Job("R", out, common + ["--configs", "--resume-from", a, "--resume-from", b], nproc=2, port=free_port()),
        Job("Q2", out, common + ["--resume-from", a], nproc=1, port=free_port()),
    ]
    run_jobs(round2)
    return {
        "P": results(out, "P", 2),
        "Q": results(out, "Q", 1),
        "R": results(out, "R", 2),
        "Q2": results(out, "Q2", 1),
        "S": results(out, "S", 4),
    }


def configs(ranks: list[dict]) -> dict[str, list[list[dict]]]:
    """name -> [rank][epoch] records."""
    names = ranks[0]["configs"].keys()
    return {n: [d["configs"][n] for d in ranks] for n in names}


def epoch_keys(per_rank: list[list[dict]], epoch: int) -> list[str]:
    return [k for runs in per_rank for k in runs[epoch]["keys"]]


@pytest.mark.parametrize("run", ["P", "S"])
def test_every_sample_once_per_epoch_with_even_none(runs, run):
    ranks = runs[run]
    for name, per_rank in configs(ranks).items():
        if not name.startswith("none"):
            continue
        for epoch in range(2):
            keys = epoch_keys(per_rank, epoch)
            assert sorted(keys) == ALL_KEYS, (run, name, epoch)
            sizes = [len(runs_[epoch]["keys"]) for runs_ in per_rank]
            assert max(sizes) - min(sizes) <= 1, sizes  # as even as possible
    if run == "P":
        # bs=3: 21 vs 22 samples -> 7 vs 8 batches. Unbalanced ranks are real without pad/drop,
        # which is what the MIN/MAX all_reduce below is there to catch.
        none_w0 = configs(ranks)["none-w0"]
        assert none_w0[0][0]["min_batches"] != none_w0[0][0]["max_batches"]


@pytest.mark.parametrize("run", ["P", "S"])
def test_pad_and_drop_give_every_rank_the_same_batch_count(runs, run):
    ranks = runs[run]
    world = len(ranks)
    checked = 0
    for name, per_rank in configs(ranks).items():
        if name.startswith("none"):
            continue
        for epoch in range(2):
            recs = [runs_[epoch] for runs_ in per_rank]
            # all_reduce(MIN) == all_reduce(MAX) inside the job (the worker also exits non-zero otherwise)
            assert all(r["min_batches"] == r["max_batches"] == r["batches"] for r in recs), (name, recs)
            assert len({r["batches"] for r in recs}) == 1
            assert all(r["len"] == r["batches"] for r in recs)  # len(loader) is exact
            assert len({len(r["keys"]) for r in recs}) == 1
            keys = epoch_keys(per_rank, epoch)
            counts = collections.Counter(keys)
            info = recs[0]["info"]
            assert all(r["info"] == info for r in recs)
            if name.startswith("pad"):
                extra = len(keys) - len(ALL_KEYS)
                assert sorted(counts) == ALL_KEYS
                assert extra == info["padded"] == sum(c - 1 for c in counts.values())
                assert 0 < extra <= world - 1  # 43 is not divisible by 2 or 4
            else:
                missing = len(ALL_KEYS) - len(keys)
                assert max(counts.values()) == 1
                assert missing == info["dropped"] == len(set(ALL_KEYS) - set(counts))
                assert 0 < missing <= world - 1
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("run", ["P", "S"])
def test_new_order_each_epoch(runs, run):
    for name, per_rank in configs(runs[run]).items():
        assert epoch_keys(per_rank, 0) != epoch_keys(per_rank, 1), name
        for rank_runs in per_rank:
            assert rank_runs[0]["keys"] != rank_runs[1]["keys"], name


def test_decoded_batches_under_torchrun(runs):
    # pad-w2 decodes to uint8 NCHW tensors (asserted in the worker); samples were read.
    for d in runs["P"]:
        stats = d["configs"]["pad-w2"][0]["stats"]
        assert stats["batches"] == d["configs"]["pad-w2"][0]["batches"]
        assert stats["samples_read"] == len(d["configs"]["pad-w2"][0]["keys"])
        assert stats["bytes_read"] > 0


def test_same_seed_same_result_across_runs(runs):
    assert configs(runs["P"]).keys() == configs(runs["R"]).keys()
    for name, per_rank in configs(runs["P"]).items():
        again = configs(runs["R"])[name]
        for a, b in pairs(per_rank, again):
            assert [e["keys"] for e in a] == [e["keys"] for e in b], name
            assert [e["batches"] for e in a] == [e["batches"] for e in b], name


def _saved_epoch1(ranks: list[dict]) -> list[str]:
    return [k for d in ranks for k in d["saved"]["keys"]]


def _assert_rest_of_epoch(before: list[str], after: list[str]) -> None:
    assert not set(before) & set(after), "samples seen before the checkpoint came again"
    both = before + after
    dupes = [k for k, c in collections.Counter(both).items() if c > 1]
    assert not dupes, dupes
    assert sorted(both) == ALL_KEYS, f"missing: {sorted(set(ALL_KEYS) - set(both))}"


def test_any_rank_state_describes_all_ranks(runs):
    # Rank 0 replays rank 1's progress: both ranks' state_dict() must agree.
    p = runs["P"]
    assert p[0]["saved"]["state"] == p[1]["saved"]["state"]
    assert p[0]["saved"]["steps"] == 3
    json.dumps(p[0]["saved"]["state"])


def test_resume_2x2_to_1x3(runs):
    before = _saved_epoch1(runs["P"])
    assert len(before) == 2 * 3 * 3  # 2 ranks x 3 batches x 3 samples
    resumed = runs["Q2"][0]["resumed"]["state_a.json"]
    assert resumed["epoch"] == 1
    _assert_rest_of_epoch(before, resumed["keys"])


def test_resume_1x3_to_2x2(runs):
    before = _saved_epoch1(runs["Q"])
    assert len(before) == 5 * 3
    after = [k for d in runs["R"] for k in d["resumed"]["state_b.json"]["keys"]]
    _assert_rest_of_epoch(before, after)


def test_resume_same_topology_continues_exactly(runs):
    # 2x2 -> 2x2: each rank's resumed keys are exactly the rest of its uninterrupted epoch
    # (P's "none-w2" configuration is the same loader: even=None, 2 workers, same seed).
    for rank, d in enumerate(runs["R"]):
        full = runs["P"][rank]["configs"]["none-w2"][1]["keys"]
        before = runs["P"][rank]["saved"]["keys"]
        after = d["resumed"]["state_a.json"]["keys"]
        assert full == before + after


# -- loader.stats() per epoch (checked on the torchrun runs) --------------------------------


def _stat_records(runs):
    for run in ("P", "S"):
        for d in runs[run]:
            for name, per_epoch in d["configs"].items():
                for epoch, rec in enumerate(per_epoch):
                    yield f"{run}/rank{d['rank']}/{name}/epoch{epoch}", epoch, rec


def test_loader_stats_report_each_epoch(runs):
    for where, epoch, rec in _stat_records(runs):
        stats = rec["stats"]
        assert stats["epoch"] == epoch, where
        assert stats["batches"] == rec["batches"], where
        assert stats["samples_read"] == len(rec["keys"]), where  # per epoch, not cumulative
        assert stats["bytes_read"] > 0 and stats["shards_opened"] > 0, where
        assert stats["skipped"] == 0, where
        assert 0 <= stats["wait_s"] <= stats["epoch_s"], where


def test_loader_stats_count_samples_delivered(runs):
    for where, _, rec in _stat_records(runs):
        assert rec["stats"]["samples"] == len(rec["keys"]), where


def test_loader_stats_report_padded_and_dropped(runs):
    for where, _, rec in _stat_records(runs):
        stats, info = rec["stats"], rec["info"]
        assert (stats.get("padded"), stats.get("dropped")) == (info["padded"], info["dropped"]), where
