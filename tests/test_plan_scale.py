"""The planner at LAION scale: nothing it builds is of the size of the dataset.

Billion-sample epochs on a thousand ranks, planned and resumed elastically, within a
small memory bound (tracemalloc sees numpy's buffers) and with exact counts."""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from shardkit.errors import ShardkitError
from shardkit.plan.epoch import EpochPlanner, Stage, Topology
from shardkit.plan.mix import MixPart, MixPlanner
from shardkit.plan.state import STATE_VERSION, ResumeState

BILLION_COUNTS = [10_000] * 100_000  # 1 B samples in 100k shards
MB = 1 << 20


def traced(fn: Callable[[], Any]) -> tuple[Any, int]:
    """fn's result and the peak memory it allocated (bytes)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def half_done(sizes: list[list[int]], topo: Topology) -> Stage:
    return Stage(topo, tuple(tuple(n // 2 + (r + w) % 3 for w, n in enumerate(row)) for r, row in enumerate(sizes)))


def test_billion_samples_thousand_ranks_plan_in_small_memory():
    planner = EpochPlanner(BILLION_COUNTS, epoch=1, seed=3)
    topo = Topology(1024, 8, even="pad", buffer=1000)

    def plan_last_worker():
        plan, info = planner.plan(topo, rank=1023, worker=7)
        return plan, info, plan.pieces, next(plan.emission_order())

    (plan, info, pieces, first), peak = traced(plan_last_worker)
    assert peak < 20 * MB
    assert info.total == 10**9 and info.rank_samples == -(-(10**9) // 1024)
    assert sum(p.stop - p.start for p in pieces) == plan.size == info.worker_samples[7]
    assert 0 <= first < 1000


def test_elastic_resume_at_scale_is_exact_and_small():
    planner = EpochPlanner(BILLION_COUNTS, epoch=0, seed=1)
    big = Topology(1024, 8, even="pad", buffer=1000)
    stage = half_done(planner.stream_sizes(big), big)
    consumed = sum(sum(row) for row in stage.emitted)
    small = Topology(768, 8, even="pad", buffer=1000)

    def resume():
        sizes = planner.stream_sizes(small, [stage])
        plan, info = planner.plan(small, rank=767, worker=7, stages=[stage])
        return sizes, plan, info, plan.pieces, list(itertools.islice(plan.emission_order(), 5))

    (sizes, plan, info, pieces, _), peak = traced(resume)
    assert peak < 40 * MB
    # What is left is every sample not emitted, once; pad tops it up to equal ranks.
    assert info.remaining == 10**9 - consumed
    assert sum(map(sum, sizes)) == info.remaining + info.padded and info.padded < 768
    assert len({sum(row) for row in sizes}) == 1
    assert sum(p.stop - p.start for p in pieces) == plan.size == sizes[767][7]


def test_mix_of_three_billion_sample_parts_resumes_in_small_memory():
    parts = [MixPart(tuple(BILLION_COUNTS[:30_000]), buffer=100, seed=i) for i in range(3)]  # 3 x 300 M
    planner = MixPlanner(parts, epoch=0, seed=2)
    big = Topology(256, 8, even="pad")
    stage = half_done(planner.stream_sizes(big), big)
    small = Topology(192, 4, even="pad")

    def resume():
        plan, info = planner.plan(small, rank=191, worker=3, stages=[stage])
        return plan, info, [p.pieces for p in plan.parts], list(itertools.islice(plan.emission_labels(), 100))

    (plan, info, pieces, labels), peak = traced(resume)
    assert peak < 40 * MB
    assert info.remaining == 9 * 10**8 - sum(map(sum, stage.emitted))
    assert [sum(p.stop - p.start for p in part) for part in pieces] == [p.size for p in plan.parts]
    assert sum(p.size for p in plan.parts) == plan.size == info.worker_samples[3]
    assert sorted(set(labels)) == [0, 1, 2]


def test_states_of_another_version_are_refused_with_the_reason():
    state = ResumeState(0, []).to_dict(kind="worker", seed=0)
    assert state["version"] == STATE_VERSION == 2
    with pytest.raises(ShardkitError, match="version 1 is not supported.*restart the epoch"):
        ResumeState.from_dict({**state, "version": 1}, seed=0)
