"""Companion sets on disk: what makes a set of shards a companion of another, and the
checks that it still lines up with it. Bytes and manifests only, no I/O.

A companion holds new fields for an existing ("base") set: one shard per base shard,
with the same name (a compressed base shard ``x.tar.gz`` gets ``x.tar``), the same keys
in the same order, its own ``.idx`` files, and a manifest whose ``base`` entry records
the base manifest's name, URL and sha256. Every base key keeps its place: a key the
companion has no value for is an empty marker member, ``KEY.__missing__`` (a joined read
leaves the sample out, counted as filtered) or ``KEY.__empty__`` (the sample stays, with
no fields from this companion). webdataset sees markers as metadata (``__``-prefixed),
not as fields.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from .compression import COMPRESSED_SUFFIXES
from .index import Manifest
from .samples import EMPTY, MARKERS, MISSING  # the encoder writes them; defined beside it

__all__ = [
    "EMPTY",
    "MARKERS",
    "MISSING",
    "alignment_problems",
    "base_ref",
    "companion_shard_name",
    "first_key_mismatch",
    "manifest_sha256",
]


def manifest_sha256(data: bytes) -> str:
    """The sha256 a companion records for its base manifest (of its bytes as stored)."""
    return hashlib.sha256(data).hexdigest()


def companion_shard_name(base_name: str) -> str:
    """The file name of the companion shard for base shard ``base_name`` (companions are
    plain tar, so a compressed base shard's name loses its compression suffix)."""
    lower = base_name.lower()
    for suffix in COMPRESSED_SUFFIXES:
        if lower.endswith(suffix):
            return base_name[: len(base_name) - len(suffix)] + ".tar"
    return base_name


def base_ref(name: str, manifest_url: str, sha256: str) -> dict[str, str]:
    """The ``base`` entry of a companion manifest."""
    return {"name": name, "manifest": manifest_url, "sha256": sha256}


def alignment_problems(
    base: Manifest,
    base_sha256: str,
    companion: Manifest,
    *,
    shards: Sequence[str] | None = None,
) -> list[tuple[str | None, str]]:
    """What stops ``companion`` from lining up with ``base``: ``(shard name or None, message)``
    pairs, empty when they align.

    ``base_sha256`` is the sha256 of the base manifest's bytes. ``shards``: the base shard
    names read (default: all of the base manifest's); each needs a companion shard of
    the matching name and sample count. A companion made for another version of the base
    is named with the first shard whose name or count differs, when one does.
    """
    problems: list[tuple[str | None, str]] = []
    if companion.base is None:
        return [(None, "is not a companion set (its manifest records no base)")]
    if not companion.complete:
        problems.append((None, "its manifest is marked incomplete (the companion write was interrupted)"))
    by_name = {s.name: s for s in companion.shards}
    base_by_name = {s.name: s for s in base.shards}
    wanted = list(shards) if shards is not None else [s.name for s in base.shards]
    for name in wanted:
        info = base_by_name.get(name)
        mine = by_name.get(companion_shard_name(name))
        if mine is None:
            problems.append((name, f"has no companion shard {companion_shard_name(name)!r}"))
        elif info is not None and mine.samples != info.samples:
            problems.append((name, f"has {info.samples} samples, its companion shard {mine.samples}"))
    if companion.base["sha256"] != base_sha256:
        recorded = f"{companion.base['name']!r} at {companion.base['manifest']}"
        if len(companion.shards) != len(base.shards):
            why = f"the base has {len(base.shards)} shards, the companion {len(companion.shards)}"
        elif problems:
            why = "see the shards named"
        else:
            why = "shard names and counts agree, so shard contents changed (rewritten?)"
        problems.append(
            (
                problems[0][0] if problems else None,
                f"was written for a base manifest with sha256 {companion.base['sha256'][:16]}... "
                f"({recorded}); this base's is {base_sha256[:16]}...: {why}",
            )
        )
    return problems


def first_key_mismatch(base_keys: Sequence[str], keys: Sequence[str]) -> str | None:
    """None when ``keys`` are ``base_keys`` in the same order, else what differs first."""
    for i, (want, got) in enumerate(zip(base_keys, keys)):
        if want != got:
            return f"sample {i} has key {got!r} where the base has {want!r}"
    if len(base_keys) != len(keys):
        return f"holds {len(keys)} keys, the base {len(base_keys)}"
    return None
