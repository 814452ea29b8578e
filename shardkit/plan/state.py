"""Resume state: how far a run got in an epoch, as small plain JSON-able data.

One owner each (torchdata.nodes style): a :class:`ResumeState` is the progress of one
dataset's epoch; whoever drives the dataset (the dataset itself under a plain or
stateful DataLoader, or a :class:`~shardkit.loader.ShardLoader`) keeps one and hands it
to the planner. A composite dataset nests its parts' states in its own ``state_dict``.

The state is a chain of :class:`~shardkit.plan.Stage` s (topology + samples emitted per
rank x worker). The rule for using it is :func:`shardkit.plan.continues`: the same
topology continues the last stage exactly, another one re-plans what is left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ShardkitError
from .epoch import Stage, Topology, continues

# 2: a Mix interleaves its parts by seekable blocks (plan/interleave.py); a version-1
# Mix state would resume other samples, so version 1 states are refused.
STATE_VERSION = 2


def topology_to_dict(t: Topology) -> dict[str, Any]:
    return {"world_size": t.world_size, "num_workers": t.num_workers, "even": t.even, "buffer": t.buffer}


def stages_to_state(stages: Sequence[Stage]) -> list[dict[str, Any]]:
    return [{"topology": topology_to_dict(s.topology), "emitted": [list(e) for e in s.emitted]} for s in stages]


def stages_from_state(items: Sequence[Mapping[str, Any]]) -> list[Stage]:
    return [Stage(Topology(**s["topology"]), tuple(tuple(int(x) for x in e) for e in s["emitted"])) for s in items]


@dataclass
class ResumeState:
    """What has been consumed of ``epoch``: the stages so far (empty: nothing)."""

    epoch: int = 0
    stages: list[Stage] = field(default_factory=list)

    def continues(self, topology: Topology) -> bool:
        """True when ``topology`` continues the last stage (see :func:`shardkit.plan.continues`)."""
        return continues(self.stages, topology)

    def skip(self, topology: Topology, rank: int, worker: int) -> int:
        """Samples worker ``worker`` of ``rank`` already emitted in the stage it continues."""
        return self.stages[-1].emitted[rank][worker] if self.continues(topology) else 0

    def history(self, topology: Topology) -> list[Stage]:
        """The finished stages: all of them, or all but the one ``topology`` continues."""
        return self.stages[:-1] if self.continues(topology) else list(self.stages)

    def with_progress(self, topology: Topology, emitted: Sequence[Sequence[int]]) -> ResumeState:
        """A new state whose current stage is ``topology`` with ``emitted[rank][worker]``."""
        stage = Stage(topology, tuple(tuple(int(x) for x in e) for e in emitted))
        return ResumeState(self.epoch, self.history(topology) + [stage])

    def to_dict(self, *, kind: str, seed: int, **extra: Any) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": kind,
            "epoch": self.epoch,
            "seed": seed,
            **extra,
            "stages": stages_to_state(self.stages),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], *, seed: int) -> ResumeState:
        """Parse a saved state, refusing one of another version or seed."""
        if state.get("version") != STATE_VERSION:
            raise ShardkitError(
                f"resume state version {state.get('version')!r} is not supported (this shardkit writes and "
                f"reads version {STATE_VERSION}; version 1 states predate the Mix interleaving of version 2): "
                "restart the epoch, or finish it with the shardkit that saved the state"
            )
        if "seed" in state and state["seed"] != seed:
            raise ShardkitError(
                f"resume state was saved with seed {state['seed']}, this dataset has "
                f"seed {seed}; the remaining samples would not match"
            )
        return cls(int(state["epoch"]), stages_from_state(state.get("stages", [])))
