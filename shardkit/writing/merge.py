"""Parts written on many machines, merged into one dataset.

``shardkit write SRC DEST --part I/N`` writes input slice I of N as its own little dataset
named ``NAME-partIIIIIofNNNNN`` (shards ``NAME-part00001of00004-000000.tar``, ..., and a
manifest marked complete when the part is done), so parts never collide and may run in
any order, anywhere, into one shared folder. :func:`merge_parts` then, once:

1. checks that all N parts are complete (naming every missing or unfinished one);
2. renames the parts' shards (index first, then the shard) to the plain sequence
   ``NAME-000000.tar`` ... in part order, so a brace pattern reads the dataset;
3. writes ``NAME.manifest.json`` atomically (temp + rename: readers see no manifest or
   the whole one), then removes the part manifests.

Every step can be repeated: a merge interrupted anywhere is finished by running it again.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import replace

from ..errors import ShardkitError
from ..format.index import INDEX_SUFFIX, Manifest, ShardInfo, manifest_name
from ..storage.localfile import atomic_write
from .writer import shard_path

log = logging.getLogger(__name__)


def parse_part(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``; parts are numbered from 0."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--part must look like I/N (e.g. 0/4), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if not 0 < count <= 99999 or not 0 <= index < count:
        raise ValueError(f"--part {text}: need 0 <= I < N <= 99999 (parts are numbered from 0)")
    return index, count


def part_name(name: str, index: int, count: int) -> str:
    """The dataset name a part writes under: ``data-part00001of00004``."""
    return f"{name}-part{index:05d}of{count:05d}"


def part_slice(total: int, index: int, count: int) -> tuple[int, int]:
    """Inputs ``[start, stop)`` of part ``index`` of ``count``: contiguous, sizes differ by <= 1."""
    return total * index // count, total * (index + 1) // count


def require_local(dest: str, what: str) -> None:
    from ..storage.dispatch import local_path

    if local_path(dest) is None:
        raise ShardkitError(
            f"{what} needs a local or shared-filesystem DEST (NFS, Lustre, a mounted bucket), "
            f"not {dest}: write the parts to a shared folder, merge, then upload the folder "
            "(e.g. aws s3 sync)"
        )


def _part_manifests(dest: str, name: str) -> dict[int, tuple[int, str]]:
    """Part index -> (part count, manifest path) for every part manifest of ``name`` in ``dest``."""
    pattern = re.compile(re.escape(name) + r"-part(\d{5})of(\d{5})" + re.escape(manifest_name("")))
    found: dict[int, tuple[int, str]] = {}
    counts: set[int] = set()
    for entry in sorted(os.listdir(dest)):
        match = pattern.fullmatch(entry)
        if match:
            index, count = int(match.group(1)), int(match.group(2))
            counts.add(count)
            found[index] = (count, os.path.join(dest, entry))
    if len(counts) > 1:
        raise ShardkitError(
            f"{dest} holds parts of {name} written with different part counts "
            f"({', '.join(map(str, sorted(counts)))}); remove the stale ones and re-run"
        )
    return found


def part_sets(dest: str) -> dict[str, set[int]]:
    """Dataset name -> the part counts of the part manifests for it in ``dest``."""
    pattern = re.compile(r"(.+)-part\d{5}of(\d{5})" + re.escape(manifest_name("")))
    found: dict[str, set[int]] = {}
    for entry in sorted(os.listdir(dest)):
        match = pattern.fullmatch(entry)
        if match:
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
    return found


def _describe_sets(sets: dict[str, set[int]]) -> str:
    return ", ".join(f"{n!r} (of {'/'.join(map(str, sorted(c)))} parts)" for n, c in sorted(sets.items()))


def _merged_names(dest: str) -> list[str]:
    """Names of the complete, merged datasets in ``dest`` (their manifest, no parts left)."""
    names = []
    for entry in sorted(os.listdir(dest)):
        if entry.endswith(manifest_name("")) and not re.search(r"-part\d{5}of\d{5}\.", entry):
            with open(os.path.join(dest, entry), "rb") as f:
                if Manifest.from_json(f.read(), url=os.path.join(dest, entry)).complete:
                    names.append(entry[: -len(manifest_name(""))])
    return names


def find_name(dest: str) -> str:
    """The dataset whose parts are in ``dest``, when there is one; otherwise an error that
    lists the candidates. A folder with no parts and one complete dataset names that one
    (merging it again is a no-op)."""
    sets = part_sets(dest)
    if len(sets) == 1:
        return next(iter(sets))
    if sets:
        raise ShardkitError(
            f"{dest} holds parts of {len(sets)} datasets: {_describe_sets(sets)}; choose one with --name"
        )
    merged = _merged_names(dest)
    if len(merged) == 1:
        return merged[0]
    raise ShardkitError(
        f"{dest}: no parts to merge (no NAME-partIIIIIofNNNNN{manifest_name('')} from shardkit write --part I/N)"
        + (f"; it holds the complete datasets {', '.join(map(repr, merged))}" if merged else "")
    )


def merge_parts(dest: str, *, name: str | None = None) -> Manifest:
    """Merge the complete parts of ``name`` in ``dest`` into one dataset; returns its manifest.

    ``name`` None: the one dataset with parts in ``dest`` (see :func:`find_name`). Raises
    ShardkitError naming every missing or incomplete part (nothing is changed then).
    """
    require_local(dest, "merge")
    if not os.path.isdir(dest):
        raise ShardkitError(f"{dest}: no such folder")
    if name is None:
        name = find_name(dest)
    final = os.path.join(dest, manifest_name(name))
    parts = _part_manifests(dest, name)
    if not parts:
        if os.path.exists(final):
            with open(final, "rb") as f:
                manifest = Manifest.from_json(f.read(), url=final)
            if manifest.complete:
                log.info("%s is already merged", final)
                return manifest
        others = part_sets(dest)
        raise ShardkitError(
            f"{dest}: no parts of {name!r} to merge (expected {name}-partIIIIIofNNNNN{manifest_name('')} "
            f"from shardkit write --part I/N --name {name})"
            + (f"; it holds parts of {_describe_sets(others)}: choose one with --name" if others else "")
        )
    count = next(iter(parts.values()))[0]
    manifests: list[Manifest] = []
    problems: list[str] = []
    for index in range(count):
        if index not in parts:
            problems.append(
                f"part {index}/{count} is missing (no {part_name(name, index, count)}"
                f"{manifest_name('')}; run it, or it was already merged)"
            )
            continue
        path = parts[index][1]
        with open(path, "rb") as f:
            manifest = Manifest.from_json(f.read(), url=path)
        if not manifest.complete:
            problems.append(
                f"part {index}/{count} is incomplete ({len(manifest.shards)} shard(s) so far; re-run it: it resumes)"
            )
        manifests.append(manifest)
    if problems:
        raise ShardkitError(f"cannot merge {name} in {dest}: " + "; ".join(problems))
    classes = manifests[0].classes
    if any(m.classes != classes for m in manifests):
        raise ShardkitError(
            f"the parts of {name} in {dest} disagree on class names; were they written from the same input?"
        )
    plan: list[tuple[str, str, ShardInfo]] = []
    for manifest in manifests:
        for info in manifest.shards:
            target = os.path.basename(shard_path(dest, name, len(plan)))
            plan.append((info.name, target, info))
    # Check everything first, so a failed merge changes nothing.
    for source, target, info in plan:
        src, dst = os.path.join(dest, source), os.path.join(dest, target)
        where = src if os.path.exists(src) else dst
        if not os.path.exists(where) or os.path.getsize(where) != info.bytes:
            raise ShardkitError(
                f"{src}: missing or not {info.bytes} bytes as its part manifest says; re-run that part with --overwrite"
            )
        if not os.path.exists(where + INDEX_SUFFIX):
            raise ShardkitError(f"{where}{INDEX_SUFFIX}: missing; re-run that part with --overwrite")
    stale = [
        e
        for e in os.listdir(dest)
        if re.fullmatch(re.escape(name) + r"-\d{6}\.tar", e) and e not in {t for _, t, _ in plan}
    ]
    shards: list[ShardInfo] = []
    for source, target, info in plan:
        src, dst = os.path.join(dest, source), os.path.join(dest, target)
        if os.path.exists(src):
            os.replace(src + INDEX_SUFFIX, dst + INDEX_SUFFIX)
            os.replace(src, dst)
        shards.append(replace(info, name=target))
    for entry in stale:  # an older, bigger dataset of the same name: not part of this one
        log.warning("removing %s: not part of the merged dataset", os.path.join(dest, entry))
        for path in (os.path.join(dest, entry), os.path.join(dest, entry + INDEX_SUFFIX)):
            if os.path.exists(path):
                os.remove(path)
    manifest = Manifest(shards=shards, name=name, classes=classes, complete=True)
    atomic_write(final, manifest.to_json().encode())
    for _, path in parts.values():
        os.remove(path)
    log.info("merged %d part(s) of %s: %d shards, %d samples", count, name, len(shards), manifest.total_samples)
    return manifest
