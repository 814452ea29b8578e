"""plan/state: the resume state's round trip and its continue-or-re-plan rule."""

from __future__ import annotations

import json

import pytest

from shardkit.errors import ShardkitError
from shardkit.plan.epoch import Stage, Topology
from shardkit.plan.state import STATE_VERSION, ResumeState

TWO_BY_TWO = Topology(world_size=2, num_workers=2, even="pad", buffer=10)


def test_empty_state_starts_the_epoch():
    state = ResumeState(epoch=3)
    assert not state.continues(TWO_BY_TWO) and state.skip(TWO_BY_TWO, 1, 1) == 0 and state.history(TWO_BY_TWO) == []


def test_same_topology_continues_each_worker_where_it_stopped():
    state = ResumeState(epoch=0).with_progress(TWO_BY_TWO, [[5, 4], [3, 0]])
    assert state.continues(TWO_BY_TWO)
    assert [state.skip(TWO_BY_TWO, r, w) for r in (0, 1) for w in (0, 1)] == [5, 4, 3, 0]
    assert state.history(TWO_BY_TWO) == []
    # Progress in the same topology replaces the current stage instead of adding one.
    later = state.with_progress(TWO_BY_TWO, [[6, 6], [6, 6]])
    assert len(later.stages) == 1 and later.stages[0].emitted == ((6, 6), (6, 6))


def test_another_topology_keeps_the_finished_stages_and_starts_a_new_one():
    other = Topology(world_size=3, num_workers=1, even="pad", buffer=10)
    state = ResumeState(epoch=0).with_progress(TWO_BY_TWO, [[5, 4], [3, 0]])
    assert not state.continues(other) and state.skip(other, 0, 0) == 0
    assert state.history(other) == state.stages
    moved = state.with_progress(other, [[1], [2], [0]])
    assert [s.topology for s in moved.stages] == [TWO_BY_TWO, other]
    # A change of only the buffer or the even mode is another topology too.
    assert not moved.continues(Topology(world_size=3, num_workers=1, even="drop", buffer=10))


def test_state_round_trips_through_json():
    state = ResumeState(epoch=2).with_progress(TWO_BY_TWO, [[5, 4], [3, 0]])
    state = state.with_progress(Topology(world_size=1, num_workers=0, even=None, buffer=0), [[7]])
    doc = json.loads(json.dumps(state.to_dict(kind="ShardDataset", seed=9, extra_field=1)))
    assert doc["version"] == STATE_VERSION and doc["kind"] == "ShardDataset" and doc["extra_field"] == 1
    again = ResumeState.from_dict(doc, seed=9)
    assert again == state
    assert all(isinstance(s, Stage) for s in again.stages)


def test_state_of_another_seed_or_version_is_refused():
    doc = ResumeState(epoch=1).with_progress(TWO_BY_TWO, [[1, 1], [1, 1]]).to_dict(kind="ShardDataset", seed=1)
    with pytest.raises(ShardkitError, match="seed 1.*seed 2"):
        ResumeState.from_dict(doc, seed=2)
    with pytest.raises(ShardkitError, match="version"):
        ResumeState.from_dict({**doc, "version": STATE_VERSION + 1}, seed=1)
