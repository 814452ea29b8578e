"""format/columns: compact per-shard columns that behave like the lists they replace.

Oracles: plain Python lists (equality, iteration, indexing, slicing), ``hashlib`` and
``base64`` for digests."""

from __future__ import annotations

import base64
import hashlib
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardkit.format.columns import (
    Digests,
    FieldSets,
    IntColumn,
    NamesBuilder,
    PackedNames,
    PatternNames,
    names_of,
)
from tests.helpers import pairs


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


@given(st.lists(st.integers(0, 2**40), max_size=40), st.integers(-45, 45), st.integers(-45, 45))
def test_int_column_behaves_like_its_list(values, a, b):
    column = IntColumn(values)
    assert column == values and values == column and column == tuple(values)
    assert len(column) == len(values) and list(column) == values
    assert all(type(v) is int for v in column)
    assert column[a:b] == values[a:b] and len(column[a:b]) == len(values[a:b])
    if values:
        assert column[a % len(values)] == values[a % len(values)] and column[-1] == values[-1]
    assert column.total == sum(values)
    assert column != [*values, 1] and column != "abc"


def test_int_column_is_its_array_read_only_and_pickles():
    source = np.arange(5, dtype=np.int64)
    column = IntColumn(source)
    source[0] = 99  # the column took a copy
    assert column == [0, 1, 2, 3, 4]
    array = np.asarray(column, dtype=np.int64)
    assert np.shares_memory(array, column.array) and not array.flags.writeable
    with pytest.raises(ValueError):
        array[0] = 1
    again = pickle.loads(pickle.dumps(column))
    assert again == column and len(again) == 5 and not again.array.flags.writeable
    with pytest.raises(TypeError):
        hash(column)
    with pytest.raises(IndexError):
        column[5]


def test_digests_hold_32_bytes_each_and_give_hex_or_none():
    hexes = [sha(0), None, sha(2)]
    digests = Digests.from_hex(hexes)
    assert digests == hexes and len(digests) == 3 and digests[-1] == sha(2)
    assert not digests.all_known and digests.any_known
    assert digests.take([2, 0]) == [sha(2), sha(0)]
    assert digests[1:] == [None, sha(2)]
    full = Digests.from_hex([sha(i) for i in range(5)])
    assert full.all_known and len(full.block) == 5 * 32
    text = full.base64()
    assert base64.b64decode(text) == b"".join(bytes.fromhex(sha(i)) for i in range(5))
    assert Digests.from_base64(text) == [sha(i) for i in range(5)]
    with pytest.raises(ValueError, match="shard 1"):
        Digests.from_hex([sha(0), "xyz"])
    with pytest.raises(ValueError, match="shard 0"):
        Digests.from_hex([sha(0).upper()[:-2] + " 1"])


def test_digests_unknown_cost_no_block():
    none = Digests.unknown(1000)
    assert len(none) == 1000 and none.block == b"" and not none.any_known
    assert none[999] is None and none.take([3, 4]) == [None, None]
    with pytest.raises(IndexError):
        none[1000]


@pytest.mark.parametrize(
    "text",
    [
        "A" * 43,  # not whole 4-character groups
        base64.b64encode(bytes(31)).decode(),  # not whole digests
        "A" * 20 + "=" + "A" * 23,  # padding in the middle
        "A" * 40 + "A*AA",  # outside the alphabet (a lenient decoder would skip it)
        "Ä" * 44,
    ],
)
def test_digests_refuse_anything_but_canonical_base64(text):
    with pytest.raises(ValueError, match="base64|digests"):
        Digests.from_base64(text)


def test_long_base64_is_decoded_in_slices_from_inside_a_text():
    block = b"".join(bytes.fromhex(sha(i)) for i in range(20_000))  # several slices
    text = 'x"' + base64.b64encode(block).decode() + '"y'
    digests = Digests.from_base64(text, start=2, stop=len(text) - 2)
    assert digests.block == block and digests[12_345] == sha(12_345)


@pytest.mark.parametrize(
    "names, kind",
    [
        ([f"data-{i:06d}.tar" for i in range(5)], PatternNames),
        ([f"part-{i}.tar.gz" for i in range(7, 12)], PatternNames),  # starting at 7, no padding
        ([f"d-{i:02d}.tar" for i in range(98, 103)], PatternNames),  # 2 digits, then 3
        (["only.tar"], PackedNames),
        (["a-1.tar", "a-2.tar", "b-3.tar"], PackedNames),  # breaks after two
        (["a-1.tar", "a-01.tar"], PackedNames),
        (["x/é-0.tar", "x/é-1.tar", "\udc80odd.tar"], PackedNames),
        ([], PackedNames),
    ],
)
def test_names_are_a_pattern_when_they_follow_one_and_always_the_same_names(names, kind):
    built = names_of(names)
    assert isinstance(built, kind)
    assert built == names and list(built) == names and len(built) == len(names)
    if names:
        for got, want in pairs(names, built):
            assert got == want
        assert built[-1] == names[-1] and built[1:] == names[1:] and built[::2] == names[::2]


def test_names_builder_keeps_the_pattern_through_batches_and_packs_from_a_break():
    builder = NamesBuilder()
    builder.extend([f"d-{i:06d}.tar" for i in range(1000)])
    builder.extend([f"d-{i:06d}.tar" for i in range(1000, 2000)])
    assert isinstance(builder.build(), PatternNames) and len(builder.build()) == 2000
    builder.extend([f"d-{i:06d}.tar" for i in range(2000, 2010)] + ["other.tar"])
    names = builder.build()
    want = [f"d-{i:06d}.tar" for i in range(2010)] + ["other.tar"]
    assert isinstance(names, PackedNames) and names == want and len(names) == len(want)


def test_field_sets_store_each_distinct_list_once():
    lists = [["jpg", "txt"], ["jpg", "txt"], [], ["cls", "jpg"], ["jpg", "txt"]]
    fields = FieldSets.of(lists)
    assert fields == lists and len(fields.sets) == 3 and fields[3] == ["cls", "jpg"]
    assert fields[1:3] == lists[1:3]
    assert sorted(fields.used()) == [(), ("cls", "jpg"), ("jpg", "txt")]
    assert sorted(fields[2:3].used()) == [()]
    with pytest.raises(ValueError, match="field-set indexes"):
        FieldSets([("a",)], [0, 1])
