"""What a write did (:class:`WriteResult`), built from the manifest it left."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..format.index import Manifest, manifest_name
from .work import Skip


@dataclass
class WriteResult:
    """What a write did: shards and samples in the dataset, the inputs skipped in this run,
    and the images kept although they decoded only with a warning (``warned``: ``(where,
    warning)``; the reader decodes them too; ``strict=True`` refuses them instead)."""

    shards: int
    samples: int
    bytes: int
    seconds: float
    skipped: list[Skip] = field(default_factory=list)
    pattern: str = ""
    manifest: str = ""
    resumed_shards: int = 0
    workers: int = 1
    written: int | None = None  # samples written by this run (resumed shards excluded)
    filtered: int = 0  # inputs ``fn`` returned None (or no samples) for, in this run
    warned: list[Skip] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)  # a table's columns -> where they went
    notes: list[str] = field(default_factory=list)  # what the input said about its columns and values

    @property
    def rate(self) -> float:
        """Samples written per second by this run."""
        done = self.samples if self.written is None else self.written
        return done / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "samples": self.samples,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.rate, 1),
            "skipped": len(self.skipped),
            "skipped_files": [{"path": where, "reason": reason} for where, reason in self.skipped],
            "warned": len(self.warned),
            "warned_files": [{"path": where, "warning": warning} for where, warning in self.warned],
            "filtered": self.filtered,
            "columns": self.columns,
            "notes": self.notes,
            "resumed_shards": self.resumed_shards,
            "workers": self.workers,
            "pattern": self.pattern,
            "manifest": self.manifest,
        }


def shard_pattern(dest: str, name: str, n_shards: int) -> str:
    """The brace pattern that reads the shards back: ``dest/name-{000000..000009}.tar``."""
    if n_shards <= 1:
        return os.path.join(dest, f"{name}-000000.tar")
    return os.path.join(dest, f"{name}-{{000000..{n_shards - 1:06d}}}.tar")


def build_result(
    manifest: Manifest,
    dest: str,
    name: str,
    started: float,
    skipped: list[Skip],
    resumed: int,
    workers: int,
    filtered: int,
    warned: list[Skip] | None = None,
) -> WriteResult:
    """The one builder of a WriteResult, from the manifest the write left."""
    return WriteResult(
        shards=len(manifest.shards),
        samples=manifest.total_samples,
        bytes=manifest.total_bytes,
        seconds=time.perf_counter() - started,
        skipped=skipped,
        pattern=shard_pattern(dest, name, len(manifest.shards)),
        manifest=os.path.join(dest, manifest_name(name)),
        resumed_shards=resumed,
        workers=workers,
        written=sum(s.samples for s in manifest.shards[resumed:]),
        filtered=filtered,
        warned=list(warned or []),
    )
