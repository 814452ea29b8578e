"""read/worker: a worker executes exactly the planner's WorkerPlan, and resumes inside it."""

from __future__ import annotations

import pytest

from shardkit.plan.epoch import EpochPlanner, Topology
from shardkit.plan.state import ResumeState
from shardkit.read.pipeline import make_handler
from shardkit.read.reader import ShardReader
from shardkit.read.worker import EpochSpec, WorkerEpoch, execute
from shardkit.storage.backend import SourceOptions
from tests.helpers import make_shards, pairs

COUNTS = [17, 1, 0, 30, 16]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return make_shards(str(tmp_path_factory.mktemp("worker")), COUNTS)


def _reader(shards: list[str]) -> ShardReader:
    return ShardReader(shards, options=SourceOptions(), handler=make_handler("raise"))


def _key(sample_id: int) -> str:
    return f"s{sample_id:06d}"  # make_shards numbers samples in shard order


@pytest.mark.parametrize("buffer", [0, 7, 1000])
@pytest.mark.parametrize("rank, worker", [(0, 0), (1, 2), (2, 1)])
def test_execute_emits_the_plans_emission_order(shards, buffer, rank, worker):
    topology = Topology(world_size=3, num_workers=3, even="pad", buffer=buffer)
    plan, _ = EpochPlanner(COUNTS, epoch=2, seed=5).plan(topology, rank=rank, worker=worker)
    emitted = [s["__key__"] for s in execute(plan, _reader(shards))]
    expected = [_key(int(i)) for i in plan.emitted_ids()]
    for got, want in pairs(emitted, expected):
        assert got == want


def test_worker_epoch_resumes_where_it_stopped(shards):
    spec = EpochSpec(len(shards), COUNTS, seed=1, shuffle_shards=True, epoch_length=None, resampled=False)
    topology = Topology(world_size=2, num_workers=2, even="pad", buffer=10)

    def run(resume: ResumeState | None) -> list[str]:
        epoch = WorkerEpoch(spec, _reader(shards), topology=topology, rank=1, worker=0, epoch=0, resume=resume)
        return [s["__key__"] for s in epoch.samples()]

    full = run(None)
    assert len(full) > 5
    resume = ResumeState(epoch=0).with_progress(topology, [[0, 0], [5, 0]])
    assert run(resume) == full[5:]
    # A state saved in another epoch does not apply to this one.
    assert run(ResumeState(epoch=1).with_progress(topology, [[0, 0], [5, 0]])) == full


def test_epoch_length_gives_each_worker_its_quota_across_passes(shards):
    spec = EpochSpec(len(shards), COUNTS, seed=1, shuffle_shards=True, epoch_length=150, resampled=False)
    topology = Topology(world_size=1, num_workers=2, even="pad", buffer=0)
    per_worker = [
        [
            s["__key__"]
            for s in WorkerEpoch(spec, _reader(shards), topology=topology, rank=0, worker=w, epoch=0).samples()
        ]
        for w in (0, 1)
    ]
    assert [len(k) for k in per_worker] == [75, 75]
    # Within one pass each sample comes once; 150 > 64 samples means a second pass.
    first_pass = per_worker[0][:32] + per_worker[1][:32]
    assert len(set(first_pass)) == 64
