"""format/samples: grouping members into samples, and what a cut shard still proves whole.

Oracle: the shard's own members as ``tarfile`` lists them from the uncut file.
"""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from shardkit.errors import ShardFormatError
from shardkit.format.samples import group_members
from shardkit.format.tar import iter_member_tuples
from shardkit.writing.writer import ShardWriter

FIELDS = ("cls", "jpg", "txt")


def _shard(tmp_path, keys: list[str], *, fmt: str = "shardkit") -> bytes:
    samples = [{"__key__": k, "cls": i, "jpg": os.urandom(700 + 37 * i), "txt": f"t{i}"} for i, k in enumerate(keys)]
    if fmt == "shardkit":
        with ShardWriter(str(tmp_path), shard_size="1GB") as w:
            for s in samples:
                w.write(s)
        return (tmp_path / w.shards[0].name).read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for ext in FIELDS:
                data = str(s[ext]).encode() if ext != "jpg" else s[ext]
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _header_offsets(data: bytes) -> list[tuple[str, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, m.offset) for m in tf.getmembers()]


def _read_cut(data: bytes, cut: int, complete=None) -> list[dict]:
    out = []
    with pytest.raises(ShardFormatError):
        for _, _, sample in group_members(iter_member_tuples(io.BytesIO(data[:cut])), complete=complete):
            out.append(sample)
    return out


def _has_fields(sample: dict) -> bool:
    return all(f in sample for f in FIELDS)


@pytest.mark.parametrize("fmt", ["shardkit", "ustar"])
def test_a_cut_inside_the_next_header_keeps_the_sample_before_it(tmp_path, fmt):
    keys = ["a/one", "a/two", "b/three"]
    data = _shard(tmp_path, keys, fmt=fmt)
    firsts = [off for name, off in _header_offsets(data) if name.endswith(".cls")]
    for i, start in enumerate(firsts[1:], start=1):
        for into in range(1, 512):
            got = _read_cut(data, start + into)
            # Every sample yielded is whole and in order.
            assert [s["__key__"] for s in got] == keys[: len(got)] and all(_has_fields(s) for s in got)
            # Once the type flag (byte 156) and the name arrived, the sample before is proven whole.
            if into > 156:
                assert len(got) == i, (fmt, i, into)
            else:
                assert len(got) == i - 1


def test_a_name_that_may_lack_its_directory_proves_nothing_about_a_matching_key(tmp_path):
    # Sample "x/k" followed by a member whose header is cut before its (ustar) prefix:
    # the name field "k.txt" alone could be "x/k.txt" -- the same sample.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name in ("d" * 120 + "/k.cls", "d" * 120 + "/k.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"1"))
    data = buf.getvalue()
    second = _header_offsets(data)[1][1]
    assert _read_cut(data, second + 200) == []  # prefix not yet read: may be the same key
    assert _read_cut(data, second + 511) == []  # prefix read: it is the same key


def test_cut_at_a_sample_boundary_keeps_the_sample_when_its_fields_are_complete(tmp_path):
    keys = ["s0", "s1", "s2"]
    data = _shard(tmp_path, keys)
    boundary = [off for name, off in _header_offsets(data) if name == "s2.cls"][0]
    assert [s["__key__"] for s in _read_cut(data, boundary)] == ["s0"]  # s1 might have more members
    kept = _read_cut(data, boundary, complete=_has_fields)
    assert [s["__key__"] for s in kept] == ["s0", "s1"]
    # Cut inside s1's last member: s1 lacks txt, so it is not complete and is dropped.
    last = [off for name, off in _header_offsets(data) if name == "s1.txt"][0]
    assert [s["__key__"] for s in _read_cut(data, last + 520, complete=_has_fields)] == ["s0"]
    # ... unless the caller needs only the fields that arrived.
    partial = _read_cut(data, last + 520, complete=lambda s: "jpg" in s and "cls" in s)
    assert [s["__key__"] for s in partial] == ["s0", "s1"] and "txt" not in partial[1]
