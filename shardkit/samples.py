"""Group tar members into samples with webdataset's rules, so both tools agree.

A member name splits into key and extension at the first dot after the last slash
(``a.b/c.seg.png`` -> key ``a.b/c``, extension ``seg.png``); extensions are lower-cased;
consecutive members with the same key form one sample. Names without such a dot, and
webdataset's metadata names (``__*__``), are skipped exactly as webdataset skips them.
"""

from __future__ import annotations

import re
from typing import Any, BinaryIO, Iterable, Iterator

from .errors import ShardFormatError
from .tar import Member, iter_members

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_RE = re.compile(r"__[^/]*__($|/)")

Sample = dict[str, Any]


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` for a member name, or None when webdataset would skip it."""
    if _META_RE.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    match = _KEY_RE.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def group_members(members: Iterable[Member], *, url: str | None = None
                  ) -> Iterator[tuple[int, int, Sample]]:
    """Yield ``(start_offset, end_offset, sample)`` for each run of members sharing a key."""
    sample: Sample | None = None
    key = None
    start = end = 0
    for member in members:
        parts = split_name(member.name)
        if parts is None:
            continue
        member_key, ext = parts
        if sample is None or member_key != key:
            if sample is not None:
                yield start, end, sample
            key = member_key
            sample = {"__key__": key, "__url__": url}
            start = member.offset
        if ext in sample:
            raise ShardFormatError(f"sample {key!r} has a second {ext!r} member",
                                   url=url, offset=member.offset, member=member.name)
        sample[ext] = member.payload
        end = member.end
    if sample is not None:
        yield start, end, sample


def iter_samples(stream: BinaryIO, *, url: str | None = None, start: int = 0,
                 stop: int | None = None) -> Iterator[Sample]:
    """Samples of a tar stream as dicts: ``{"__key__", "__url__", ext: bytes, ...}``."""
    for _, _, sample in group_members(iter_members(stream, url=url, start=start, stop=stop),
                                      url=url):
        yield sample
