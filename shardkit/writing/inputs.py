"""What :func:`shardkit.write` writes: its inputs as keyed items for the workers, the work
they run on each, and the fingerprint a resumed write must match.

A path input is opened with :func:`shardkit.ingest.open_source`: image files travel as
``(key, Entry)`` and are read in the workers; the rows of a table as ``(key, Row)`` (its
caption, label and JSON columns converted here, its images read or checked in the
workers), streamed; samples of a dataset format are read here and travel whole. A
sequence of items travels as ``(position, item)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from ..ingest import FILE_FORMATS, IngestOptions, detect_format, open_source
from ..ingest.files import EntryLoader, FileSource
from ..ingest.table import RowLoader, TableSource
from .work import SampleWork


@dataclass
class Plan:
    """How :func:`shardkit.write` feeds the engine: keyed items, their work, and how to run it."""

    items: Iterable[tuple[str, Any]]
    work: SampleWork
    total: int | None
    classes: list[str] | None
    fingerprint: dict[str, Any]
    idle: bool = False  # the work does nothing: one process unless more are asked for
    batch_size: int = 8
    prefetch: int = 2
    source: Any = None

    @property
    def columns(self) -> dict[str, str]:
        """Where each column of a table input went (empty for other inputs)."""
        return self.source.plan.destinations() if isinstance(self.source, TableSource) else {}

    @property
    def notes(self) -> list[str]:
        """What the input said about its columns and values while it was read."""
        return list(getattr(self.source, "notes", []))


Loader = TypeVar("Loader", EntryLoader, RowLoader)


def _checking(load: Loader, *, validate: bool) -> Loader:
    """``load`` with its image check switched on or off (its other settings kept)."""
    return replace(load, checks=replace(load.checks, validate=validate))


def plan_items(
    inputs: Iterable[Any],
    *,
    fn: Any,
    validate: bool,
    strict: bool,
    max_pixels: int | None,
    classes: list[str] | None,
) -> Plan:
    try:
        total: int | None = len(inputs)  # type: ignore[arg-type]
    except TypeError:
        total = None
    width = max(6, len(str(total - 1))) if total else 9
    items = ((f"{i:0{width}d}", item) for i, item in enumerate(inputs))
    return Plan(
        items,
        SampleWork(fn=fn, validate=validate, max_pixels=max_pixels, strict=strict),
        total,
        classes,
        {"inputs": total, "validate": validate, "max_pixels": max_pixels},
        idle=fn is None and not validate,
    )


def plan_source(
    src: str,
    *,
    fn: Any,
    validate: bool,
    strict: bool,
    max_pixels: int | None,
    fmt: str | None,
    options: IngestOptions | None,
    shuffle: bool,
    seed: int | None,
    resize: int | None,
    quality: int | None,
    classes: list[str] | None,
) -> Plan:
    given = options or IngestOptions()
    default = IngestOptions()
    for name, value in (("validate", validate), ("strict", strict), ("max_pixels", max_pixels)):
        mine = getattr(given, name)
        if mine != getattr(default, name) and mine != value:
            raise ValueError(f"options.{name}={mine!r} contradicts {name}={value!r}: pass {name} to write() only")
    if given.workers != default.workers:
        raise ValueError("options.workers (threads for iterating a source by hand) is not used here; pass workers=")
    ingest = replace(given, validate=validate, strict=strict, max_pixels=max_pixels)
    detected = fmt or detect_format(src)
    if detected in FILE_FORMATS:
        source = open_source(
            src, fmt=detected, options=ingest, shuffle=shuffle, seed=seed or 0, resize=resize, quality=quality
        )
    else:  # dataset formats: quality is the JPEG quality of dense arrays; file options are refused
        if quality is not None:
            ingest = replace(ingest, quality=quality)
        source = open_source(src, fmt=detected, options=ingest, shuffle=shuffle, resize=resize)
    own = getattr(source, "classes", None)
    if classes is not None and own is not None and list(classes) != list(own):
        raise ValueError(f"{src} names its classes ({', '.join(own[:5])}...); classes= would contradict them")
    fingerprint: dict[str, Any] = {
        "src": os.path.abspath(src),
        "format": fmt,
        "shuffle": shuffle,
        "seed": (seed or 0) if shuffle else 0,
        "resize": resize,
        "quality": quality,
        "validate": validate,
        "max_pixels": max_pixels,
    }
    if isinstance(source, TableSource):
        fingerprint["columns"] = source.plan.destinations()
        # With fn, the check runs on what fn returns, not on the row it was given.
        rows = _checking(source.loader(), validate=validate and fn is None)
        work = SampleWork(fn=fn, load=rows, validate=validate and fn is not None, max_pixels=max_pixels, strict=strict)
        heavy = source.embedded  # rows carry their image bytes through the pipes
        return Plan(
            source.items(),
            work,
            len(source),
            own or classes,
            fingerprint,
            # images in the table, not checked nor re-encoded: the workers would only pass bytes along
            idle=heavy and fn is None and not validate and not (resize or quality),
            batch_size=4 if heavy else 8,
            prefetch=1 if heavy else 2,
            source=source,
        )
    if isinstance(source, FileSource):
        # With fn, the check runs on what fn returns, not on the file it was given.
        load = _checking(source.loader(), validate=validate and fn is None)
        work = SampleWork(fn=fn, load=load, validate=validate and fn is not None, max_pixels=max_pixels, strict=strict)
        return Plan(source.entries, work, len(source.entries), own or classes, fingerprint, source=source)
    try:
        total: int | None = len(source)
    except TypeError:
        total = None
    return Plan(
        ((sample["__key__"], sample) for sample in source),
        SampleWork(fn=fn, validate=validate, max_pixels=max_pixels, strict=strict),
        total,
        own or classes,
        fingerprint,
        idle=fn is None and not validate,  # the source is read here; nothing is left for workers
        batch_size=4,  # samples carry their image bytes through the pipes
        prefetch=1,
        source=source,
    )
