"""Property tests of the epoch planner: pure functions, no data needed."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shardkit.plan.epoch import (
    EpochPlanner,
    Stage,
    Topology,
    deal_shards,
    shuffle_order,
    simulate_consumption,
    to_pieces,
)

counts_st = st.lists(st.integers(0, 40), min_size=1, max_size=12)
world_st = st.integers(1, 8)
workers_st = st.integers(0, 8)


def emitted_ids(planner: EpochPlanner, topo: Topology, stages=()) -> dict[tuple[int, int], list[int]]:
    out = {}
    for r in range(topo.world_size):
        for w in range(topo.streams):
            plan, _ = planner.plan(topo, rank=r, worker=w, stages=stages)
            out[r, w] = list(plan.emitted_ids())
    return out


@settings(max_examples=200, deadline=None)
@given(
    counts=counts_st,
    world=world_st,
    workers=workers_st,
    buffer=st.integers(0, 20),
    epoch=st.integers(0, 5),
    seed=st.integers(0, 2**31),
)
def test_every_sample_exactly_once_without_even(counts, world, workers, buffer, epoch, seed):
    planner = EpochPlanner(counts, epoch=epoch, seed=seed)
    topo = Topology(world, workers, even=None, buffer=buffer)
    ids = [i for seq in emitted_ids(planner, topo).values() for i in seq]
    assert sorted(ids) == list(range(sum(counts)))
    per_rank = [sum(len(v) for (r, _), v in emitted_ids(planner, topo).items() if r == rank) for rank in range(world)]
    assert max(per_rank) - min(per_rank) <= 1


@settings(max_examples=200, deadline=None)
@given(
    counts=counts_st,
    world=world_st,
    workers=workers_st,
    even=st.sampled_from(["pad", "drop"]),
    seed=st.integers(0, 1000),
)
def test_pad_and_drop_give_equal_ranks_and_touch_few_samples(counts, world, workers, even, seed):
    planner = EpochPlanner(counts, epoch=1, seed=seed)
    topo = Topology(world, workers, even=even, buffer=5)
    per_cell = emitted_ids(planner, topo)
    per_rank = [[i for (r, _), v in per_cell.items() if r == rank for i in v] for rank in range(world)]
    assert len({len(ids) for ids in per_rank}) == 1
    # the same worker split on every rank, so batch counts match too
    assert len({tuple(len(per_cell[r, w]) for w in range(topo.streams)) for r in range(world)}) == 1
    ids = Counter(i for ids in per_rank for i in ids)
    n = sum(counts)
    if even == "pad":
        assert set(ids) == set(range(n))
        assert sum(ids.values()) - n <= world - 1
    else:
        assert all(c == 1 for c in ids.values())
        assert n - len(ids) <= world - 1


@settings(max_examples=100, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=2, max_size=10), seed=st.integers(0, 1000))
def test_order_changes_across_epochs_and_repeats_for_same_inputs(counts, seed):
    topo = Topology(2, 2, even=None, buffer=8)
    a = emitted_ids(EpochPlanner(counts, epoch=0, seed=seed), topo)
    b = emitted_ids(EpochPlanner(counts, epoch=0, seed=seed), topo)
    assert a == b
    if sum(counts) >= 12:
        orders = {
            tuple(i for v in emitted_ids(EpochPlanner(counts, epoch=e, seed=seed), topo).values() for i in v)
            for e in range(4)
        }
        assert len(orders) > 1


def test_one_shard_feeds_eight_workers():
    planner = EpochPlanner([80], epoch=0)
    cells = emitted_ids(planner, Topology(1, 8, even=None))
    assert [len(v) for v in cells.values()] == [10] * 8
    plan, _ = planner.plan(Topology(1, 8, even=None), rank=0, worker=3)
    assert [(p.shard, p.start, p.stop) for p in plan.pieces] == [(0, 30, 40)]  # starts mid-shard


def test_shuffle_buffer_bounds_lookahead_and_is_a_permutation():
    for buffer in (0, 1, 2, 7, 50):
        order = list(shuffle_order(40, buffer, random.Random(1)))
        assert sorted(order) == list(range(40))
        for t, pos in enumerate(order[: 40 - buffer]):
            assert pos <= t + max(buffer - 1, 0)


@settings(max_examples=120, deadline=None)
@given(
    counts=st.lists(st.integers(0, 25), min_size=1, max_size=8),
    world=st.integers(1, 4),
    workers=st.integers(0, 4),
    new_world=st.integers(1, 4),
    new_workers=st.integers(0, 4),
    buffer=st.integers(0, 10),
    data=st.data(),
)
def test_elastic_resume_covers_the_rest_exactly_once(counts, world, workers, new_world, new_workers, buffer, data):
    planner = EpochPlanner(counts, epoch=2, seed=9)
    old = Topology(world, workers, even=None, buffer=buffer)
    cells = emitted_ids(planner, old)
    emitted = tuple(
        tuple(data.draw(st.integers(0, len(cells[r, w]))) for w in range(old.streams)) for r in range(world)
    )
    consumed = [i for (r, w), v in cells.items() for i in v[: emitted[r][w]]]
    new = Topology(new_world, new_workers, even=None, buffer=buffer)
    rest = [i for v in emitted_ids(planner, new, [Stage(old, emitted)]).values() for i in v]
    assert sorted(consumed + rest) == list(range(sum(counts)))
    # resuming with the same topology continues each worker exactly where it stopped
    same = emitted_ids(planner, old, [Stage(old, emitted)])
    assert all(same[c] == cells[c][emitted[c[0]][c[1]] :] for c in cells)


def test_to_pieces_and_deal_shards():
    starts = np.array([0, 5, 5, 12])
    assert [(p.shard, p.start, p.stop) for p in to_pieces(np.array([3, 4, 5, 6, 0, 1]), starts)] == [
        (0, 3, 5),
        (2, 0, 2),
        (0, 0, 2),
    ]
    dealt = [
        deal_shards(10, epoch=0, seed=0, shuffle_shards=True, world_size=2, rank=r, num_workers=2, worker=w)
        for r in range(2)
        for w in range(2)
    ]
    assert sorted(s for d in dealt for s in d) == list(range(10))


def test_simulate_consumption_is_round_robin():
    assert simulate_consumption([3, 1, 2], 0) == [0, 0, 0]
    assert simulate_consumption([3, 1, 2], 4) == [2, 1, 1]
    assert simulate_consumption([3, 1, 2], 99) == [3, 1, 2]


@settings(max_examples=80, deadline=None)
@given(
    counts=st.lists(st.integers(0, 60), min_size=1, max_size=10),
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 4), st.integers(0, 12)), min_size=2, max_size=4),
    data=st.data(),
)
def test_successive_elastic_resumes_cover_the_rest_exactly_once(counts, shapes, data):
    """Stop and resume under a new topology several times: what every stage emitted,
    plus the rest of the last one, is each sample exactly once."""
    planner = EpochPlanner(counts, epoch=1, seed=4)
    stages: list[Stage] = []
    consumed: list[int] = []
    for world, workers, buffer in shapes:
        topo = Topology(world, workers, even=None, buffer=buffer)
        if stages and stages[-1].topology == topo:
            continue
        cells = emitted_ids(planner, topo, stages)
        done = {c: data.draw(st.integers(0, len(v))) for c, v in cells.items()}
        consumed += [i for c, v in cells.items() for i in v[: done[c]]]
        stages.append(Stage(topo, tuple(tuple(done[r, w] for w in range(topo.streams)) for r in range(world))))
    last = Topology(2, 3, even=None, buffer=5)
    rest = [i for v in emitted_ids(planner, last, stages).values() for i in v]
    assert len(consumed) + len(rest) == sum(counts)
    assert sorted(consumed + rest) == list(range(sum(counts)))
