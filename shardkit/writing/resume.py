"""The resume record of a write: where each finished shard's successor starts in the input.

After each finished shard the driver saves ``NAME.resume.json`` (atomically): the write's
options and, per finished shard, the input (and the sample of that input, when an input
gives several) that the next shard starts at. A killed write adopts the shards listed in
both the manifest and that record, present with their size and index, and carries on at
the recorded input; the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ShardkitError
from ..format.index import Manifest, ShardInfo, manifest_name
from ..storage.localfile import atomic_write
from .writer import shard_path

SUFFIX = ".resume.json"

#: Where a shard starts: (input index, sample of that input's samples).
Start = tuple[int, int]


@dataclass
class ResumePoint:
    """A killed write to carry on: the complete shards to adopt and where each one's
    successor starts (``starts[-1]`` is where the write resumes)."""

    adopt: list[ShardInfo]
    starts: list[Start]

    @property
    def next(self) -> Start:
        return self.starts[len(self.adopt) - 1] if self.adopt else (0, 0)


def record_path(dest: str, name: str) -> str:
    return os.path.join(dest, name + SUFFIX)


def load(
    dest: str, name: str, fingerprint: Mapping[str, Any], *, shard_names: Sequence[str] | None = None
) -> ResumePoint | None:
    """What to carry on for a killed write of ``name`` in ``dest``; None when it is complete.

    Only shards listed in both the manifest and the record, present with the right size
    and an index, are adopted; everything after them is written again. A record made with
    other options is refused. ``shard_names``: the shards' file names, when the write
    named them (a companion set's, see ``ShardWriter(shard_names=...)``).
    """
    manifest_path = os.path.join(dest, manifest_name(name))
    if not os.path.exists(manifest_path):
        return ResumePoint([], [])
    with open(manifest_path, "rb") as f:
        manifest = Manifest.from_json(f.read(), url=manifest_path)
    state: dict[str, Any] = {}
    if os.path.exists(record_path(dest, name)):
        with open(record_path(dest, name), encoding="utf-8") as f:
            state = json.load(f)
    if manifest.complete:
        return None
    if state and state.get("options") != json.loads(json.dumps(dict(fingerprint))):
        raise ShardkitError(
            f"{dest}: the interrupted write of {name!r} used other options or input "
            f"({state.get('options')}); re-run with those, or use --overwrite"
        )
    inputs = list(state.get("next_input", []))
    samples = list(state.get("next_sample", [])) or [0] * len(inputs)
    starts = list(zip(inputs, samples))
    adopt = []
    for number, info in enumerate(manifest.shards[: len(starts)]):
        path = shard_path(dest, name, number) if shard_names is None else os.path.join(dest, shard_names[number])
        if (
            info.name != os.path.basename(path)
            or not os.path.exists(path + ".idx")
            or not os.path.exists(path)
            or os.path.getsize(path) != info.bytes
        ):
            break
        adopt.append(info)
    return ResumePoint(adopt, starts[: len(adopt)])


def save(dest: str, name: str, fingerprint: Mapping[str, Any], starts: list[Start]) -> None:
    doc = {
        "version": 1,
        "options": dict(fingerprint),
        "next_input": [index for index, _ in starts],
        "next_sample": [sample for _, sample in starts],
    }
    atomic_write(record_path(dest, name), (json.dumps(doc, sort_keys=True) + "\n").encode())


def remove(dest: str, name: str) -> None:
    """The write is complete: drop its record."""
    if os.path.exists(record_path(dest, name)):
        os.remove(record_path(dest, name))
