"""Resume state: how far a run got in an epoch, as small plain JSON-able data.

One owner each (torchdata.nodes style): a :class:`ResumeState` is the progress of one
dataset's epoch; whoever drives the dataset (the dataset itself under a plain or
stateful DataLoader, or a :class:`~shardkit.loader.ShardLoader`) keeps one and hands it
to the planner. A composite dataset nests its parts' states in its own ``state_dict``.

The state is a chain of :class:`~shardkit.plan.Stage` s (topology + samples emitted per
rank x worker). The rule for using it is :func:`shardkit.plan.continues`: the same
topology continues the last stage exactly, another one re-plans what is left.

A state also records the plan its positions count in (:class:`PlanIdentity`: split by
sample or by whole shard, the shard and sample counts, the other planner inputs). A
position means nothing in another plan, so loading a state under another one is an error
that says what changed; a change of topology is not a change of plan (see above).
"""

from __future__ import annotations

import hashlib
import json
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


@dataclass(frozen=True)
class PlanIdentity:
    """The plan a saved position counts in.

    ``by``: ``"sample"`` (sample counts known: the sample-level planner) or ``"shard"``
    (no counts: whole shards are split). ``shards``/``samples``: how many (samples None
    when split by shard); ``counts_sha256``: a digest of the per-shard counts in order;
    ``options``: the other inputs that change which samples an epoch holds or their order
    (``shuffle_shards``, ``epoch_length``, ``resampled``, a Mix's weights...), as
    JSON-able values. The seed is checked on its own.
    """

    by: str
    shards: int
    samples: int | None = None
    counts_sha256: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, counts: Sequence[int] | None, *, shards: int, **options: Any) -> PlanIdentity:
        """The identity of a plan over ``shards`` shards with these ``counts`` (None: by shard)."""
        if counts is None:
            return cls("shard", shards, options=dict(options))
        return cls("sample", shards, sum(counts), _digest([int(c) for c in counts]), dict(options))

    @classmethod
    def of_parts(cls, parts: Sequence[PlanIdentity], **options: Any) -> PlanIdentity:
        """A plan made of parts (a Mix): by sample only when every part is."""
        by = "sample" if all(p.by == "sample" for p in parts) else "shard"
        samples = sum(p.samples or 0 for p in parts) if by == "sample" else None
        digest = _digest([[p.by, p.shards, p.counts_sha256, dict(p.options)] for p in parts])
        return cls(by, sum(p.shards for p in parts), samples, digest, {"parts": len(parts), **options})

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "shards": self.shards,
            "samples": self.samples,
            "counts_sha256": self.counts_sha256,
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanIdentity:
        return cls(str(d["by"]), int(d["shards"]), d.get("samples"), d.get("counts_sha256"), dict(d.get("options", {})))

    def describe(self) -> str:
        if self.by == "sample":
            return f"by sample over {self.shards} shard(s), {self.samples} sample(s)"
        return f"by whole shard over {self.shards} shard(s), no sample counts"

    def changes(self, now: PlanIdentity) -> list[str]:
        """What differs between this (saved) plan and ``now``, in words."""
        out = []
        if self.by != now.by:
            out.append(
                f"it was split {self.describe()}, now {now.describe()}"
                + (
                    " (the manifest or .idx files that gave the counts are not found now)"
                    if now.by == "shard"
                    else " (a manifest or .idx files appeared)"
                )
            )
        elif self.shards != now.shards:
            out.append(f"the number of shards changed ({self.shards} -> {now.shards})")
        elif self.counts_sha256 != now.counts_sha256:
            out.append(
                f"the sample counts changed ({self.samples} -> {now.samples} samples over {now.shards} "
                "shard(s)): the shards were rewritten"
            )
        for key in sorted(set(self.options) | set(now.options)):
            before, after = self.options.get(key), now.options.get(key)
            if _canonical(before) != _canonical(after):
                out.append(f"{key} changed ({before!r} -> {after!r})")
        return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _digest(value: Any) -> str:
    return hashlib.sha256(_canonical(value).encode()).hexdigest()


@dataclass
class ResumeState:
    """What has been consumed of ``epoch``: the stages so far (empty: nothing), and the
    plan they count in (``None``: not recorded, as in states saved before it was)."""

    epoch: int = 0
    stages: list[Stage] = field(default_factory=list)
    plan: PlanIdentity | None = None

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
        return ResumeState(self.epoch, self.history(topology) + [stage], self.plan)

    def to_dict(self, *, kind: str, seed: int, plan: PlanIdentity | None = None, **extra: Any) -> dict[str, Any]:
        """Plain data to save; ``plan`` (default: the state's own) is recorded with it."""
        plan = plan or self.plan
        return {
            "version": STATE_VERSION,
            "kind": kind,
            "epoch": self.epoch,
            "seed": seed,
            **({"plan": plan.to_dict()} if plan is not None else {}),
            **extra,
            "stages": stages_to_state(self.stages),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], *, seed: int, plan: PlanIdentity | None = None) -> ResumeState:
        """Parse a saved state, refusing one of another version or seed, or one saved
        under a plan other than ``plan`` (a state that recorded none is taken as is)."""
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
        saved = PlanIdentity.from_dict(state["plan"]) if state.get("plan") is not None else None
        if saved is not None and plan is not None:
            changes = saved.changes(plan)
            if changes:
                raise ShardkitError(
                    "resume state was saved under another plan: "
                    + "; ".join(changes)
                    + ". Its positions mean nothing in this plan: resuming would lose and repeat samples"
                )
        return cls(int(state["epoch"]), stages_from_state(state.get("stages", [])), saved or plan)
