"""writing/merge: parts written anywhere, merged into one dataset; every step repeatable."""

from __future__ import annotations

import os
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardkit.errors import ShardkitError
from shardkit.format.index import Manifest
from shardkit.writing.merge import merge_parts, parse_part, part_name, part_slice
from shardkit.writing.writer import ShardWriter
from tests.helpers import sample


@given(st.integers(0, 10_000), st.integers(1, 300))
def test_part_slices_cover_the_inputs_once_in_order(total, count):
    slices = [part_slice(total, i, count) for i in range(count)]
    assert slices[0][0] == 0 and slices[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    sizes = [stop - start for start, stop in slices]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("text, want", [("0/4", (0, 4)), (" 3 / 4 ", (3, 4)), ("0/1", (0, 1))])
def test_parse_part(text, want):
    assert parse_part(text) == want


@pytest.mark.parametrize("text", ["4/4", "1", "-1/3", "a/b", "0/0", "0/100000"])
def test_parse_part_refuses_bad_parts(text):
    with pytest.raises(ValueError, match="--part"):
        parse_part(text)


def _write_part(dest: str, index: int, count: int, keys: range) -> None:
    with ShardWriter(dest, name=part_name("d", index, count), max_count=3) as w:
        for i in keys:
            w.write(sample(i))


def _keys(folder: str, manifest: Manifest) -> list[str]:
    out = []
    for shard in manifest.shards:
        with tarfile.open(os.path.join(folder, shard.name)) as tf:
            out += [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".cls")]
    return out


def test_merge_renames_parts_in_order_and_is_repeatable(tmp_path):
    dest = str(tmp_path)
    # Parts finish in any order; the merged order is the part order.
    _write_part(dest, 1, 2, range(5, 12))
    _write_part(dest, 0, 2, range(0, 5))
    manifest = merge_parts(dest, name="d")
    assert [s.name for s in manifest.shards] == [f"d-{i:06d}.tar" for i in range(5)]
    assert _keys(dest, manifest) == [f"s{i:06d}" for i in range(12)]
    on_disk = Manifest.from_json(open(os.path.join(dest, "d.manifest.json")).read())
    assert on_disk == manifest and manifest.total_samples == 12
    assert not [n for n in os.listdir(dest) if "part" in n]
    # Merging again changes nothing.
    assert merge_parts(dest, name="d") == manifest


def test_merge_names_the_missing_part(tmp_path):
    dest = str(tmp_path)
    _write_part(dest, 0, 3, range(0, 4))
    _write_part(dest, 2, 3, range(8, 12))
    with pytest.raises(ShardkitError, match=r"part 1|part00001of00003"):
        merge_parts(dest, name="d")
    # Nothing was renamed: the parts can still be completed and merged.
    assert any("part00000of00003" in n for n in os.listdir(dest))
