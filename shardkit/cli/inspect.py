"""Look inside shards: list samples, extract one field, verify, summarise."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ShardkitError
from ..format.companion import alignment_problems, companion_shard_name, first_key_mismatch, manifest_sha256
from ..format.index import ShardInfo, ShardScan, decode_index, decode_index_keys, index_url, scan_shard
from ..format.samples import Sample, iter_samples
from ..read.urls import ShardList, resolve_shards
from ..storage.dispatch import DEFAULT_OPTIONS, SourceOptions, join_url, open_stream, read_bytes

log = logging.getLogger(__name__)


def shard_samples(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> Iterator[Sample]:
    stream = open_stream(url, options=options)
    try:
        yield from iter_samples(stream, url=url)
    finally:
        stream.close()


def samples_of(
    shards: ShardList,
    *,
    join: Sequence[str] = (),
    join_wins: Mapping[str, int] | None = None,
    options: SourceOptions = DEFAULT_OPTIONS,
) -> Iterator[Sample]:
    """Every sample of ``shards`` in order; with ``join``, joined with those companions
    (checked to line up first, read in lockstep; samples held as missing are left out)."""
    if not join:
        for url in shards.urls:
            yield from shard_samples(url, options)
        return
    from ..read.join import JoinedReader, open_join
    from ..read.pipeline import make_handler
    from ..read.reader import ShardReader

    joined = open_join(shards, join, wins=join_wins, options=options)
    handler = make_handler("raise")
    parts = [ShardReader(p.urls, options=options, handler=handler, sha256=p.sha256) for p in joined.parts]
    reader = JoinedReader(shards.urls, parts=parts, join=joined, options=options, handler=handler)
    for shard in range(len(shards.urls)):
        yield from reader.read_shard(shard)


def find_sample(
    shards: ShardList,
    key: str,
    options: SourceOptions = DEFAULT_OPTIONS,
    *,
    join: Sequence[str] = (),
    join_wins: Mapping[str, int] | None = None,
) -> Sample:
    for sample in samples_of(shards, join=join, join_wins=join_wins, options=options):
        if sample["__key__"] == key:
            return sample
    raise ShardkitError(f"no sample with key {key!r} in {len(shards.urls)} shard(s)")


@dataclass
class Problem:
    url: str
    message: str


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    urls: str | list[str],
    *,
    decode: bool = False,
    options: SourceOptions = DEFAULT_OPTIONS,
    progress: bool = False,
    join: Sequence[str] = (),
) -> VerifyReport:
    """Parse every shard; compare sha256, counts and sizes with the manifest (and the
    ``.idx`` files); optionally decode every image. Problems are collected, not raised.

    ``join``: companion sets of these shards, each verified the same way and checked
    against them: the manifest sha256 it records, shard names and counts, and every key
    in order. A companion given on its own is checked against the base its manifest
    records, when that base can be read.
    """
    shards = resolve_shards(urls, options=options)
    infos: list[ShardInfo | None] = list(shards.manifest.shards) if shards.manifest else [None] * len(shards.urls)
    report = VerifyReport()
    decoder = None
    if decode:
        from ..decode.fields import make_decoder

        decoder = make_decoder("pil")
    keys: list[list[str] | None] = []
    for i, url in enumerate(_bar(shards.urls, progress)):
        scan = _check_shard(url, infos[i] if i < len(infos) else None, decoder, options, report)
        keys.append(scan.keys if scan is not None else None)
    for companion in join:
        _check_companion(shards, lambda i: keys[i], companion, decoder, options, report, progress)
    if not join and shards.manifest is not None and shards.manifest.base is not None:
        _check_against_recorded_base(shards, keys, options, report)
    return report


def _bar(urls: Sequence[str], progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(urls, unit="shard", disable=not progress)


def _check_shard(
    url: str, info: ShardInfo | None, decoder: Any, options: SourceOptions, report: VerifyReport
) -> ShardScan | None:
    """Verify one shard into ``report``; its scan (keys included), or None when it does not parse."""
    report.shards += 1
    try:
        stream = open_stream(url, options=options)
        try:
            scan = scan_shard(stream, url=url)
        finally:
            stream.close()
    except ShardkitError as e:
        report.problems.append(Problem(url, str(e)))
        if decoder is not None:  # the samples before the damage may still hide bad members
            _decode_members(url, decoder, options, report, stop_on_error=True)
        return None
    n = len(scan.offsets) - 1
    report.samples += n
    report.bytes += scan.bytes
    if info is not None:
        if info.sha256 and info.sha256 != scan.sha256:
            report.problems.append(Problem(url, f"sha256 {scan.sha256} does not match the manifest's {info.sha256}"))
        if info.samples != n:
            report.problems.append(Problem(url, f"has {n} samples, the manifest says {info.samples}"))
        if info.bytes != scan.bytes:
            report.problems.append(Problem(url, f"is {scan.bytes} bytes, the manifest says {info.bytes}"))
    idx = read_bytes(index_url(url), options=options)
    if idx is not None and scan.compression is not None:
        report.problems.append(
            Problem(
                index_url(url),
                f"an index beside a {scan.compression}-compressed "
                "shard cannot be used (offsets cannot seek into it): delete it",
            )
        )
    elif idx is not None:
        try:
            offsets = decode_index(idx, url=index_url(url))
            if list(offsets) != scan.offsets:
                report.problems.append(Problem(index_url(url), "index offsets do not match the shard"))
            keys = decode_index_keys(idx, url=index_url(url))
            if keys is not None and keys != scan.keys:
                report.problems.append(Problem(index_url(url), "index keys do not match the shard"))
        except ShardkitError as e:
            report.problems.append(Problem(index_url(url), str(e)))
    if decoder is not None:
        _decode_members(url, decoder, options, report)
    return scan


def _check_companion(
    base: ShardList,
    base_keys: Callable[[int], list[str] | None],
    spec: str,
    decoder: Any,
    options: SourceOptions,
    report: VerifyReport,
    progress: bool,
) -> None:
    """Verify companion ``spec`` as a shard set, and against ``base`` (its shards' keys from ``base_keys``)."""
    try:
        companion = resolve_shards(spec, options=options)
    except ShardkitError as e:
        report.problems.append(Problem(spec, str(e)))
        return
    if base.manifest is None or base.manifest_url is None or companion.manifest is None:
        which = spec if companion.manifest is None else base.manifest_url or base.urls[0]
        report.problems.append(Problem(which, "no manifest: a companion and its base each need theirs"))
        return
    data = read_bytes(base.manifest_url, options=options) or b""
    names = [_name(u) for u in base.urls]
    for shard, message in alignment_problems(base.manifest, manifest_sha256(data), companion.manifest, shards=names):
        where = companion.manifest_url or spec
        report.problems.append(Problem(where, f"shard {shard}: {message}" if shard else message))
    by_name = {s.name: s for s in companion.manifest.shards}
    for i, name in enumerate(_bar(names, progress)):
        info = by_name.get(companion_shard_name(name))
        if info is None:
            continue  # reported above
        url = join_url(companion.manifest_url or spec, info.name)
        scan = _check_shard(url, info, decoder, options, report)
        want = base_keys(i)
        if scan is not None and want is not None:
            problem = first_key_mismatch(want, scan.keys)
            if problem:
                report.problems.append(Problem(url, f"does not line up with base shard {base.urls[i]}: it {problem}"))


def _check_against_recorded_base(
    companion: ShardList, keys: list[list[str] | None], options: SourceOptions, report: VerifyReport
) -> None:
    """A companion verified on its own: check it against the base its manifest records."""
    assert companion.manifest is not None and companion.manifest.base is not None
    recorded = companion.manifest.base["manifest"]
    try:
        base = resolve_shards(recorded, options=options)
    except ShardkitError as e:
        log.warning("cannot check %s against its base (%s); verify BASE --join COMPANION does", recorded, e)
        return
    assert base.manifest is not None and base.manifest_url is not None
    data = read_bytes(base.manifest_url, options=options) or b""
    names = {_name(u) for u in companion.urls}
    wanted = [n for n in (s.name for s in base.manifest.shards) if companion_shard_name(n) in names]
    where = companion.manifest_url or companion.urls[0]
    for shard, message in alignment_problems(base.manifest, manifest_sha256(data), companion.manifest, shards=wanted):
        report.problems.append(Problem(where, f"shard {shard}: {message}" if shard else message))
    position = {companion_shard_name(_name(u)): u for u in base.urls}
    for i, url in enumerate(companion.urls):
        base_url = position.get(_name(url))
        if base_url is None or keys[i] is None:
            continue
        want = shard_keys(base_url, options)
        problem = first_key_mismatch(want, keys[i] or [])
        if problem:
            report.problems.append(Problem(url, f"does not line up with base shard {base_url}: it {problem}"))


def shard_keys(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> list[str]:
    """A shard's keys in order: from its version-2 ``.idx``, else by reading it."""
    data = read_bytes(index_url(url), options=options)
    keys = decode_index_keys(data, url=index_url(url)) if data is not None else None
    return keys if keys is not None else [s["__key__"] for s in shard_samples(url, options)]


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _decode_members(
    url: str, decoder: Any, options: SourceOptions, report: VerifyReport, *, stop_on_error: bool = False
) -> None:
    """Decode every member of every sample on its own, reporting each one that fails by name."""
    try:
        for sample in shard_samples(url, options):
            key = sample["__key__"]
            for field, value in sample.items():
                if field.startswith("__"):
                    continue
                try:
                    decoder.decode_field(field, value)
                except Exception as e:  # noqa: BLE001 - reported, not raised
                    reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
                    report.problems.append(Problem(url, f"member {f'{key}.{field}'!r} does not decode: {reason}"))
    except ShardkitError as e:
        if not stop_on_error:  # a format error already reported by the scan
            report.problems.append(Problem(url, str(e)))


def stats(urls: str | list[str], *, options: SourceOptions = DEFAULT_OPTIONS) -> dict[str, Any]:
    """Samples, bytes, field types and label histogram, per shard and in total."""
    shards = resolve_shards(urls, options=options)
    per_shard = []
    total_fields: Counter[str] = Counter()
    total_labels: Counter[int] = Counter()
    for url in shards.urls:
        fields: Counter[str] = Counter()
        labels: Counter[int] = Counter()
        field_bytes: Counter[str] = Counter()
        n = 0
        for sample in shard_samples(url, options):
            n += 1
            for ext, value in sample.items():
                if ext.startswith("__"):
                    continue
                fields[ext] += 1
                field_bytes[ext] += len(value)
            if "cls" in sample:
                try:
                    labels[int(sample["cls"])] += 1
                except ValueError:
                    labels[-1] += 1
        total_fields.update(fields)
        total_labels.update(labels)
        per_shard.append(
            {
                "url": url,
                "samples": n,
                "fields": dict(fields),
                "field_bytes": dict(field_bytes),
                "labels": dict(sorted(labels.items())),
            }
        )
    classes = shards.manifest.classes if shards.manifest else None
    return {
        "shards": len(shards.urls),
        "samples": sum(s["samples"] for s in per_shard),
        "fields": dict(total_fields),
        "labels": dict(sorted(total_labels.items())),
        "classes": classes,
        "per_shard": per_shard,
    }


def describe(sample: Sample) -> dict[str, Any]:
    """A JSON-friendly one-line view of a sample (field sizes, small text fields inline)."""
    out: dict[str, Any] = {"key": sample["__key__"]}
    for ext, value in sample.items():
        if ext.startswith("__"):
            continue
        if ext in ("cls", "txt", "json") and len(value) <= 200:
            text = value.decode("utf-8", "replace")
            out[ext] = json.loads(text) if ext == "json" and _is_json(text) else text
        else:
            out[ext] = f"{len(value)} bytes"
    return out


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False
