"""Samples and tar members, both ways, with webdataset's rules so that both tools agree.

Writing (:func:`encode_sample`): a sample dict ``{"__key__": "000042", "jpg": b"...",
"txt": "a caption", "json": {...}}`` becomes one member per field, ``KEY.EXT``, sorted by
extension. Keys are checked so that they read back as themselves. Extensions are written
lower-case (a field ``JPG`` is stored as ``KEY.jpg``): this reader and webdataset
lower-case what they read, but Hugging Face ``datasets``, DALI and Ray match extensions
as written against lower-case lists, so ``KEY.JPG`` would not be read as an image there.

Reading (:func:`group_members`): a member name splits into key and extension at the first
dot after the last slash (``a.b/c.seg.png`` -> key ``a.b/c``, extension ``seg.png``); extensions are lower-cased;
consecutive members with the same key form one sample. Names without such a dot, and
webdataset's metadata names (``__*__``), are skipped exactly as webdataset skips them.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, BinaryIO

from ..errors import InvalidKeyError, ShardFormatError
from .tar import iter_member_tuples, member_header

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's rule (documentation)
_META_RE = re.compile(r"__[^/]*__($|/)")

Sample = dict[str, Any]

# A companion set's empty marker members (see :mod:`shardkit.format.companion`): a key it
# has no value for (a joined read drops the sample), or adds no field to (the sample stays).
MISSING = "__missing__"
EMPTY = "__empty__"
MARKERS = (MISSING, EMPTY)


# -- writing: a sample dict to tar members ----------------------------------------------


def validate_key(key: Any) -> str:
    """Return ``key`` if it can name tar members that read back as this key."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"sample key must be a non-empty string, got {key!r}")
    if "\0" in key or "\\" in key:
        raise InvalidKeyError(f"sample key {key!r} contains a NUL or backslash")
    if key.startswith("/"):
        raise InvalidKeyError(f"sample key {key!r} is an absolute path")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidKeyError(f"sample key {key!r} has an empty, '.' or '..' path component")
    if "." in parts[-1]:
        raise InvalidKeyError(
            f"sample key {key!r} has a dot in its last component; readers split "
            "the extension at the first dot, so it would not read back as this key"
        )
    return key


def encode_field(ext: str, value: Any) -> bytes:
    """Bytes for one field: bytes as is, str as UTF-8, int/float as text, dict/list as JSON,
    numpy arrays as .npy."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise TypeError(f"field {ext!r}: booleans are ambiguous; encode them yourself")
    if isinstance(value, (int, float)):
        return str(value).encode("ascii")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if type(value).__module__ == "numpy" and ext.endswith("npy"):
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    raise TypeError(
        f"field {ext!r}: cannot store a {type(value).__name__}; pass bytes, str, int, "
        "float, dict/list (JSON) or a numpy array for .npy"
    )


def field_names(sample: Mapping[str, Any]) -> list[str]:
    """The fields of ``sample`` that become members (``__key__``, ``__url__``... do not)."""
    return [k for k in sample if not k.startswith("_")]


def encode_sample(sample: Mapping[str, Any]) -> list[tuple[bytes, bytes]]:
    """(header, payload) pairs for a sample, members sorted by extension; extensions are
    written lower-case (module docstring). A companion's empty marker (:data:`MARKERS`)
    is written alone."""
    key = validate_key(sample.get("__key__"))
    seen: set[str] = set()
    members = []
    for marker in MARKERS:
        if marker in sample:
            if sample[marker] != b"" or field_names(sample) or sum(m in sample for m in MARKERS) > 1:
                raise InvalidKeyError(f"sample {key!r}: the {marker} marker stands alone and is empty")
            return [(member_header(f"{key}.{marker}", 0), b"")]
    for field in sorted(field_names(sample)):
        ext = field.lower()
        if not ext or "/" in ext or "\0" in ext or ext.startswith("."):
            raise InvalidKeyError(f"sample {key!r}: bad field name {field!r}")
        if ext in seen:
            raise InvalidKeyError(f"sample {key!r}: fields {field!r} differ only in case; readers lower-case them")
        seen.add(ext)
        payload = encode_field(field, sample[field])
        members.append((member_header(f"{key}.{ext}", len(payload)), payload))
    if not members:
        raise InvalidKeyError(f"sample {key!r} has no fields to write")
    return members


# -- reading: tar members to sample dicts -----------------------------------------------


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` for a member name, or None when webdataset would skip it."""
    if name.startswith("__") and (_META_RE.match(name) or ("/" not in name and name.endswith("__"))):
        return None
    # Fast path, same result as the regex: a basename that does not start with a dot
    # splits at its first dot (unless a newline makes the regex's ``.*/`` stop short).
    slash = name.rfind("/")
    dot = name.find(".", slash + 2)
    if dot > 0 and name[slash + 1] != "." and "\n" not in name:
        return name[:dot], name[dot + 1 :].lower()
    return _split_like_regex(name, slash)


def _split_like_regex(name: str, slash: int) -> tuple[str, str] | None:
    """``_KEY_RE`` evaluated in linear time. The regex itself backtracks quadratically on
    names without a usable dot (a 100 kB name of slashes takes 84 s, and GNU long names
    may be 1 MiB), so one such member in a shard would hang the reader.

    The regex splits at the first dot ``p`` after the last slash and needs a prefix ``X``
    (empty, or ending in ``/`` without a newline, which ``.`` does not match) such that
    ``name[len(X):p]`` is non-empty and dot-free. The shortest candidate decides.
    """
    p = name.find(".", slash + 1)
    if p < 0:
        return None
    d = name.rfind(".", 0, p)
    k = 0 if d < 0 else name.find("/", d) + 1
    if k >= p or (k and name.find("\n", 0, k) >= 0):
        return None
    return name[:p], name[p + 1 :].lower()


def group_members(
    members: Iterable[tuple[str, bytes, int, int]],
    *,
    url: str | None = None,
    complete: Callable[[Sample], bool] | None = None,
) -> Iterator[tuple[int, int, Sample]]:
    """Yield ``(start_offset, end_offset, sample)`` for each run of members sharing a key.

    ``members`` are ``(name, payload, offset, end)`` tuples or :class:`~shardkit.format.tar.Member`.

    A sample is complete when the next key starts. When the archive breaks (truncated or
    corrupt), every complete sample before the damage is yielded before the error is
    re-raised. The sample in progress is yielded too when the bytes prove it whole: the
    error names a member of a *new* key (cut in its payload, or in its header after the
    name field), or ``complete(sample)`` says it has every field the caller needs (a
    reader given ``fields=``); otherwise it may be partial and is dropped.
    """
    sample: Sample | None = None
    key = None
    start = end = 0
    try:
        for name, payload, offset, member_end in members:
            parts = split_name(name)
            if parts is None:
                continue
            member_key, ext = parts
            if member_key != key or sample is None:
                if sample is not None:
                    yield start, end, sample
                key = member_key
                sample = {"__key__": key, "__url__": url}
                start = offset
            if ext in sample:
                raise ShardFormatError(
                    f"sample {key!r} has a second {ext!r} member", url=url, offset=offset, member=name
                )
            sample[ext] = payload
            end = member_end
    except ShardFormatError as e:
        if sample is not None and (_names_new_key(e, key) or (complete is not None and complete(sample))):
            yield start, end, sample
        raise
    if sample is not None:
        yield start, end, sample


def _names_new_key(error: ShardFormatError, key: str | None) -> bool:
    """Whether the member the error names provably belongs to another key than ``key``."""
    cut = split_name(error.member) if error.member is not None else None
    if cut is None or key is None or cut[0] == key:
        return False
    # A lost directory prefix P would make the real key P/<cut key>: only a key that
    # cannot end that way is proven different.
    return not (error.member_dir_unknown and key.endswith("/" + cut[0]))


def iter_samples(
    stream: BinaryIO, *, url: str | None = None, start: int = 0, stop: int | None = None
) -> Iterator[Sample]:
    """Samples of a tar stream as dicts: ``{"__key__", "__url__", ext: bytes, ...}``."""
    for _, _, sample in group_members(iter_member_tuples(stream, url=url, start=start, stop=stop), url=url):
        yield sample
