"""Look inside shards: list samples, extract one field, verify, summarise."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import ShardkitError
from ..format.index import ShardInfo, decode_index, decode_index_keys, index_url, scan_shard
from ..format.samples import Sample, iter_samples
from ..read.urls import ShardList, resolve_shards
from ..storage.dispatch import DEFAULT_OPTIONS, SourceOptions, open_stream, read_bytes

log = logging.getLogger(__name__)


def shard_samples(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> Iterator[Sample]:
    stream = open_stream(url, options=options)
    try:
        yield from iter_samples(stream, url=url)
    finally:
        stream.close()


def find_sample(shards: ShardList, key: str, options: SourceOptions = DEFAULT_OPTIONS) -> Sample:
    for url in shards.urls:
        for sample in shard_samples(url, options):
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
    urls: str | list[str], *, decode: bool = False, options: SourceOptions = DEFAULT_OPTIONS, progress: bool = False
) -> VerifyReport:
    """Parse every shard; compare sha256, counts and sizes with the manifest (and the
    ``.idx`` files); optionally decode every image. Problems are collected, not raised."""
    from tqdm import tqdm

    shards = resolve_shards(urls, options=options)
    infos: list[ShardInfo | None] = list(shards.manifest.shards) if shards.manifest else [None] * len(shards.urls)
    report = VerifyReport()
    decoder = None
    if decode:
        from ..decode.fields import make_decoder

        decoder = make_decoder("pil")
    for i, url in enumerate(tqdm(shards.urls, unit="shard", disable=not progress)):
        report.shards += 1
        info = infos[i] if i < len(infos) else None
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
            continue
        n = len(scan.offsets) - 1
        report.samples += n
        report.bytes += scan.bytes
        if info is not None:
            if info.sha256 and info.sha256 != scan.sha256:
                report.problems.append(
                    Problem(url, f"sha256 {scan.sha256} does not match the manifest's {info.sha256}")
                )
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
    return report


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
