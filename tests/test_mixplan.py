"""Property tests of the Mix planner: exact counts, passes, ranks, resume. No data needed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shardkit.plan.epoch import Stage, Topology
from shardkit.plan.mix import MixPart, MixPlanner, interleave, largest_remainder

parts_st = st.lists(
    st.tuples(st.lists(st.integers(0, 12), min_size=1, max_size=4), st.integers(0, 6)), min_size=1, max_size=4
)
world_st = st.integers(1, 5)
workers_st = st.integers(0, 4)


def make_parts(spec) -> list[MixPart]:
    return [MixPart(tuple(counts), buffer=buffer, seed=i) for i, (counts, buffer) in enumerate(spec)]


def cells(topo: Topology):
    return [(r, w) for r in range(topo.world_size) for w in range(topo.streams)]


def emitted(planner: MixPlanner, topo: Topology, stages=()) -> dict[tuple[int, int], list[tuple[int, int]]]:
    return {(r, w): planner.plan(topo, rank=r, worker=w, stages=stages)[0].emitted_ids() for r, w in cells(topo)}


def test_largest_remainder_adds_up_and_is_proportional():
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]
    assert largest_remainder(7, [0, 2, 5]) == [0, 2, 5]
    assert largest_remainder(100, [1, 3]) == [25, 75]
    with pytest.raises(ValueError):
        largest_remainder(5, [0, 0])


@given(total=st.integers(0, 1000), weights=st.lists(st.floats(0, 100), min_size=1, max_size=6))
def test_largest_remainder_properties(total, weights):
    assume(sum(weights) > 0)
    out = largest_remainder(total, weights)
    assert sum(out) == total
    for n, w in zip(out, weights):
        assert abs(n - total * w / sum(weights)) < 1 + 1e-9


def test_interleave_is_exact_and_seeded():
    a = interleave([3, 0, 5], "x")
    assert Counter(a.tolist()) == {0: 3, 2: 5}
    assert np.array_equal(a, interleave([3, 0, 5], "x")) and not np.array_equal(a, interleave([3, 0, 5], "y"))


@settings(max_examples=150, deadline=None)
@given(spec=parts_st, world=world_st, workers=workers_st, epoch=st.integers(0, 3), seed=st.integers(0, 999))
def test_without_weights_every_sample_of_every_part_once(spec, world, workers, epoch, seed):
    parts = make_parts(spec)
    planner = MixPlanner(parts, epoch=epoch, seed=seed)
    topo = Topology(world, workers, even=None)
    got = Counter(x for seq in emitted(planner, topo).values() for x in seq)
    want = Counter((i, j) for i, p in enumerate(parts) for j in range(p.size))
    assert got == want


@settings(max_examples=150, deadline=None)
@given(
    spec=parts_st,
    weights=st.lists(st.integers(0, 5), min_size=4, max_size=4),
    length=st.integers(1, 80),
    world=world_st,
    workers=workers_st,
    epoch=st.integers(0, 4),
    seed=st.integers(0, 999),
)
def test_weights_give_exact_part_counts(spec, weights, length, world, workers, epoch, seed):
    parts = make_parts(spec)
    weights = weights[: len(parts)]
    assume(sum(weights) > 0)
    draws = largest_remainder(length, weights)
    assume(all(p.size or not n for p, n in zip(parts, draws)))
    planner = MixPlanner(parts, epoch=epoch, seed=seed, weights=weights, epoch_length=length)
    topo = Topology(world, workers, even=None)
    per_part = Counter(part for seq in emitted(planner, topo).values() for part, _ in seq)
    assert [per_part.get(i, 0) for i in range(len(parts))] == draws


@settings(max_examples=100, deadline=None)
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=4),
    draws=st.integers(1, 40),
    epochs=st.integers(1, 6),
    seed=st.integers(0, 999),
)
def test_no_repeat_before_a_pass_completes(counts, draws, epochs, seed):
    """A part's draws over consecutive epochs are whole passes, each a permutation."""
    part = MixPart(tuple(counts), seed=3)
    assume(part.size > 0)
    other = MixPart((5,), seed=4)
    chain: list[int] = []
    for epoch in range(epochs):
        planner = MixPlanner([part, other], epoch=epoch, seed=seed, weights=[draws, 5], epoch_length=draws + 5)
        chain += planner.part_ids(0).tolist()
    n = part.size
    for start in range(0, len(chain), n):
        window = chain[start : start + n]
        assert len(set(window)) == len(window)  # no repeat inside a pass
        if len(window) == n:
            assert sorted(window) == list(range(n))


@settings(max_examples=100, deadline=None)
@given(
    spec=parts_st, world=world_st, workers=workers_st, even=st.sampled_from(["pad", "drop"]), seed=st.integers(0, 999)
)
def test_pad_and_drop_give_equal_ranks(spec, world, workers, even, seed):
    planner = MixPlanner(make_parts(spec), epoch=1, seed=seed)
    topo = Topology(world, workers, even=even)
    per_cell = emitted(planner, topo)
    per_rank = [sum(len(per_cell[r, w]) for w in range(topo.streams)) for r in range(world)]
    assert len(set(per_rank)) == 1
    assert len({tuple(len(per_cell[r, w]) for w in range(topo.streams)) for r in range(world)}) == 1
    # every rank gets the same count of every part too
    part_counts = [Counter(p for w in range(topo.streams) for p, _ in per_cell[r, w]) for r in range(world)]
    assert all(c == part_counts[0] for c in part_counts)


@settings(max_examples=100, deadline=None)
@given(spec=parts_st, world=world_st, workers=workers_st, data=st.data(), seed=st.integers(0, 999))
def test_resume_same_topology_continues_exactly(spec, world, workers, data, seed):
    planner = MixPlanner(make_parts(spec), epoch=2, seed=seed, weights=None)
    topo = Topology(world, workers, even="pad")
    full = emitted(planner, topo)
    done = {c: data.draw(st.integers(0, len(full[c]))) for c in full}
    stage = Stage(topo, tuple(tuple(done[r, w] for w in range(topo.streams)) for r in range(world)))
    for cell, seq in emitted(planner, topo, [stage]).items():
        assert seq == full[cell][done[cell] :]


@settings(max_examples=100, deadline=None)
@given(
    spec=parts_st,
    old=st.tuples(world_st, workers_st),
    new=st.tuples(world_st, workers_st),
    data=st.data(),
    weights=st.none() | st.lists(st.integers(1, 4), min_size=4, max_size=4),
    seed=st.integers(0, 999),
)
def test_elastic_resume_covers_the_rest_exactly_once(spec, old, new, data, weights, seed):
    parts = make_parts(spec)
    if weights is not None:
        weights = weights[: len(parts)]
        assume(all(p.size for p in parts))
    length = None if weights is None else sum(p.size for p in parts) + 3
    planner = MixPlanner(parts, epoch=1, seed=seed, weights=weights, epoch_length=length)
    a, b = Topology(*old, even=None), Topology(*new, even=None)
    assume(a != b)
    full = emitted(planner, a)
    done = {c: data.draw(st.integers(0, len(full[c]))) for c in full}
    consumed = Counter(x for c, seq in full.items() for x in seq[: done[c]])
    stage = Stage(a, tuple(tuple(done[r, w] for w in range(a.streams)) for r in range(a.world_size)))
    rest = Counter(x for seq in emitted(planner, b, [stage]).values() for x in seq)
    assert consumed + rest == Counter(x for seq in full.values() for x in seq)


def test_epochs_change_the_interleaving_and_part_orders():
    parts = [MixPart((6, 6), buffer=0, seed=0), MixPart((4,), seed=1)]
    topo = Topology(1, 0, even=None)
    e0 = MixPlanner(parts, epoch=0, seed=5).plan(topo, rank=0, worker=0)[0].emitted_ids()
    e1 = MixPlanner(parts, epoch=1, seed=5).plan(topo, rank=0, worker=0)[0].emitted_ids()
    again = MixPlanner(parts, epoch=0, seed=5).plan(topo, rank=0, worker=0)[0].emitted_ids()
    assert e0 == again and e0 != e1 and sorted(e0) == sorted(e1)


def test_bad_mixes_are_refused():
    with pytest.raises(ValueError, match="2 weights for 1 parts"):
        MixPlanner([MixPart((3,))], epoch=0, weights=[1, 2])
    with pytest.raises(ValueError, match="part 1 has no samples"):
        MixPlanner([MixPart((3,)), MixPart((0,))], epoch=0, weights=[1, 1], epoch_length=4)
