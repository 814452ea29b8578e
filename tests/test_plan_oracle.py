"""The O(shards) epoch planner against the planner it replaced (tests/old_planner, which
materialises every sample id): identical plans on small inputs -- the same pieces, read
positions and emission order for every rank and worker, the same counts -- also for
resumes after several topology changes, so saved states and seeds keep their meaning."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shardkit.plan.epoch import EpochPlanner, Stage, Topology, simulate_consumption
from tests.old_planner import epoch as old

counts_st = st.lists(st.integers(0, 30), min_size=1, max_size=10)
topo_st = st.builds(
    Topology,
    world_size=st.integers(1, 6),
    num_workers=st.integers(0, 4),
    even=st.sampled_from([None, "pad", "drop"]),
    buffer=st.sampled_from([0, 1, 2, 3, 7, 40]),
)


def assert_same_plans(new: EpochPlanner, ref: old.EpochPlanner, topo: Topology, stages: list[Stage]) -> int:
    """Compare every [rank][worker] plan; return how many samples they emit."""
    old_stages = [old.Stage(old.Topology(**vars(s.topology)), s.emitted) for s in stages]
    old_topo = old.Topology(**vars(topo))
    assert new.stream_sizes(topo, stages) == ref.stream_sizes(old_topo, old_stages)
    emitted = 0
    for r in range(topo.world_size):
        for w in range(topo.streams):
            plan, info = new.plan(topo, rank=r, worker=w, stages=stages)
            want, want_info = ref.plan(old_topo, rank=r, worker=w, stages=old_stages)
            assert vars(info) == vars(want_info)
            assert plan.size == want.size and plan.skip == want.skip
            assert [(p.shard, p.start, p.stop) for p in plan.pieces] == [
                (p.shard, p.start, p.stop) for p in want.pieces
            ]
            assert list(plan.read_positions()) == want.read_positions().tolist()
            order, want_order = list(plan.emission_order()), list(want.emission_order())
            assert len(order) == len(want_order) and order == want_order
            ids = list(plan.emitted_ids())
            assert len(ids) == len(order) and ids == [int(want.ids[p]) for p in want_order]
            emitted += len(ids)
    return emitted


def draw_stage(data: st.DataObject, planner: EpochPlanner, topo: Topology, stages: list[Stage]) -> Stage:
    """A stage of ``topo`` after ``stages`` with any progress per stream."""
    sizes = planner.stream_sizes(topo, stages)
    emitted = tuple(tuple(data.draw(st.integers(0, n)) for n in per_rank) for per_rank in sizes)
    return Stage(topo, emitted)


@settings(max_examples=250, deadline=None)
@given(counts=counts_st, topo=topo_st, epoch=st.integers(0, 4), seed=st.integers(0, 2**31), shuffle=st.booleans())
def test_fresh_epoch_plans_match_the_old_planner(counts, topo, epoch, seed, shuffle):
    new = EpochPlanner(counts, epoch=epoch, seed=seed, shuffle_shards=shuffle)
    ref = old.EpochPlanner(counts, epoch=epoch, seed=seed, shuffle_shards=shuffle)
    assert new.total == ref.total
    assert_same_plans(new, ref, topo, [])


@settings(max_examples=250, deadline=None)
@given(
    counts=counts_st,
    topos=st.lists(topo_st, min_size=1, max_size=4),
    last=st.sampled_from(["new", "same"]),
    final=topo_st,
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_resumed_plans_match_after_successive_topology_changes(counts, topos, last, final, seed, data):
    """Stages under changing topologies (a repeated topology is a continued stage), then
    either a new topology or a continuation of the last one."""
    new = EpochPlanner(counts, epoch=3, seed=seed)
    ref = old.EpochPlanner(counts, epoch=3, seed=seed)
    stages: list[Stage] = []
    for topo in topos:
        if stages and stages[-1].topology == topo:
            stages = stages[:-1]  # the same topology again continues that stage
        stages.append(draw_stage(data, new, topo, stages))
    topo = stages[-1].topology if last == "same" else final
    assert_same_plans(new, ref, topo, stages)


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 9), workers=st.integers(0, 3), buffer=st.sampled_from([0, 3, 5]), data=st.data())
def test_tiny_remainders_under_pad_wrap_several_times(world, workers, buffer, data):
    """More ranks than samples left: under "pad" every stream wraps and overlaps others."""
    counts = data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    new = EpochPlanner(counts, epoch=0, seed=1)
    ref = old.EpochPlanner(counts, epoch=0, seed=1)
    first = Topology(world, workers, even="pad", buffer=buffer)
    stages = [draw_stage(data, new, first, [])]
    second = Topology(data.draw(st.integers(1, 9)), workers, even="pad", buffer=buffer)
    if second != first:
        stages.append(draw_stage(data, new, second, stages))
    assert_same_plans(new, ref, Topology(world + 1, workers, even="pad", buffer=buffer), stages)


@settings(max_examples=300, deadline=None)
@given(batches=st.lists(st.integers(0, 30), min_size=1, max_size=9), taken=st.integers(-2, 300))
def test_consumption_replay_matches_the_round_robin_loop(batches, taken):
    got = simulate_consumption(batches, taken)
    assert len(got) == len(batches) and got == old.simulate_consumption(batches, taken)
