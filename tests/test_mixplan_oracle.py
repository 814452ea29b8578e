"""The O(shards) Mix planner against the one it replaced (tests/old_planner/mix.py).

The interleaving of parts changed (a uniformly shuffled array of labels cannot be had
without materialising it), so the old planner is given the new interleaving through its
hook; everything else -- each part's draws, streams, pieces, shuffle order, resume
after topology changes, the counts -- must be identical."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shardkit.plan.epoch import Stage, Topology
from shardkit.plan.interleave import BLOCK, Interleave
from shardkit.plan.mix import MixPart, MixPlanner, interleave
from tests.old_planner import epoch as old_epoch
from tests.old_planner import mix as old

parts_st = st.lists(
    st.tuples(st.lists(st.integers(0, 12), min_size=1, max_size=4), st.sampled_from([0, 2, 5])), min_size=1, max_size=3
)
topo_st = st.builds(
    Topology,
    world_size=st.integers(1, 5),
    num_workers=st.integers(0, 3),
    even=st.sampled_from([None, "pad", "drop"]),
    buffer=st.just(0),  # a Mix applies each part's own buffer
)


def planners(spec, weights, length, epoch, seed) -> tuple[MixPlanner, old.MixPlanner]:
    new_parts = [MixPart(tuple(c), buffer=b, seed=i, shuffle_shards=i != 1) for i, (c, b) in enumerate(spec)]
    old_parts = [old.MixPart(tuple(c), buffer=b, seed=i, shuffle_shards=i != 1) for i, (c, b) in enumerate(spec)]
    kwargs = dict(epoch=epoch, seed=seed, weights=weights, epoch_length=length)
    return MixPlanner(new_parts, **kwargs), old.MixPlanner(old_parts, interleave=interleave, **kwargs)


def assert_same(new: MixPlanner, ref: old.MixPlanner, topo: Topology, stages: list[Stage]) -> None:
    old_topo = old_epoch.Topology(**vars(topo))
    old_stages = [old_epoch.Stage(old_epoch.Topology(**vars(s.topology)), s.emitted) for s in stages]
    for i in range(len(new.parts)):
        assert new.part_ids(i).tolist() == ref.sequences[i].tolist()
    assert new.stream_sizes(topo, stages) == ref.stream_sizes(old_topo, old_stages)
    for r in range(topo.world_size):
        assert new.rank_part_counts(topo, r, stages) == ref.rank_part_counts(old_topo, r, old_stages)
        for w in range(topo.streams):
            plan, info = new.plan(topo, rank=r, worker=w, stages=stages)
            want, want_info = ref.plan(old_topo, rank=r, worker=w, stages=old_stages)
            assert vars(info) == vars(want_info)
            assert plan.size == want.size and plan.skip == want.skip
            assert plan.labels.array().tolist() == want.labels.tolist()
            labels = list(plan.emission_labels())
            assert len(labels) == plan.size - plan.skip and labels == want.emission_labels().tolist()
            for part, want_part in zip(plan.parts, want.parts):
                assert part.size == want_part.size and part.skip == want_part.skip
                assert part.pieces == [old_to_new(p) for p in want_part.pieces]
                assert list(part.read_positions()) == want_part.read_positions().tolist()
                assert list(part.emission_order()) == list(want_part.emission_order())
            ids = plan.emitted_ids()
            want_ids = want.emitted_ids()
            assert len(ids) == len(want_ids) and ids == want_ids


def old_to_new(piece):
    from shardkit.plan.epoch import Piece

    return Piece(piece.shard, piece.start, piece.stop)


@settings(max_examples=120, deadline=None)
@given(
    spec=parts_st,
    weights=st.none() | st.lists(st.integers(0, 4), min_size=3, max_size=3),
    extra=st.integers(-5, 30),
    topos=st.lists(topo_st, min_size=0, max_size=3),
    last=st.sampled_from(["new", "same"]),
    final=topo_st,
    epoch=st.integers(0, 3),
    seed=st.integers(0, 999),
    data=st.data(),
)
def test_mix_plans_match_the_old_planner(spec, weights, extra, topos, last, final, epoch, seed, data):
    length = None
    if weights is not None:
        weights = weights[: len(spec)]
        assume(sum(weights) > 0 and all(sum(c) for c, _ in spec))
        length = max(1, sum(sum(c) for c, _ in spec) + extra)
    new, ref = planners(spec, weights, length, epoch, seed)
    stages: list[Stage] = []
    for topo in topos:
        if stages and stages[-1].topology == topo:
            stages = stages[:-1]
        sizes = new.stream_sizes(topo, stages)
        stages.append(Stage(topo, tuple(tuple(data.draw(st.integers(0, n)) for n in row) for row in sizes)))
    topo = stages[-1].topology if stages and last == "same" else final
    assert_same(new, ref, topo, stages)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5), seed=st.text(max_size=5), data=st.data())
def test_interleave_is_exact_seekable_and_proportional_per_block(sizes, seed, data):
    labels = Interleave(sizes, seed)
    full = labels.array()
    assert len(full) == sum(sizes)
    assert Counter(full.tolist()) == Counter({i: n for i, n in enumerate(sizes) if n})
    x = data.draw(st.integers(0, sum(sizes)))
    assert labels.counts_before(x) == np.bincount(full[:x], minlength=len(sizes)).tolist()
    rest = list(labels.labels(x))
    assert len(rest) == len(full) - x and rest == full[x:].tolist()
    # every whole block holds each part in proportion: less than one off per level of the parts tree
    total, levels = sum(sizes), math.ceil(math.log2(len(sizes))) if len(sizes) > 1 else 0
    for start in range(0, total - BLOCK + 1, BLOCK):
        got = np.bincount(full[start : start + BLOCK], minlength=len(sizes))
        assert all(abs(g - BLOCK * n / total) < max(levels, 1) for g, n in zip(got.tolist(), sizes))
