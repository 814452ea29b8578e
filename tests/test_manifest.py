"""format/manifest: both layouts read, version 2 written, every bad value named.

Oracles: the text shardkit's version-1 writer produced (pasted below, from the writer of
commit f6c472a), and Python's ``json`` and ``base64`` reading version 2 independently of
shardkit's reader."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardkit.errors import ShardFormatError
from shardkit.format.columns import PackedNames, PatternNames
from shardkit.format.index import Manifest, ShardInfo, ShardTable, dataset_name_for
from tests.helpers import pairs

# What shardkit wrote before version 2 (the writer of f6c472a, verbatim).
VERSION_1 = """{
 "format": "shardkit",
 "version": 1,
 "name": "d",
 "complete": false,
 "total_samples": 5,
 "total_bytes": 15360,
 "fields": [
  "cls",
  "jpg"
 ],
 "classes": [
  "cat",
  "dog"
 ],
 "shards": [
  {
   "name": "d-000000.tar",
   "samples": 3,
   "bytes": 10240,
   "sha256": "abababababababababababababababababababababababababababababababab",
   "fields": [
    "cls",
    "jpg"
   ]
  },
  {
   "name": "d-000001.tar",
   "samples": 0,
   "bytes": 1024,
   "sha256": "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",
   "fields": []
  },
  {
   "name": "sub/extra.tar",
   "samples": 2,
   "bytes": 4096,
   "sha256": null,
   "fields": [
    "jpg"
   ]
  }
 ]
}
"""
VERSION_1_SHARDS = [
    ShardInfo("d-000000.tar", 3, 10240, "ab" * 32, ["cls", "jpg"]),
    ShardInfo("d-000001.tar", 0, 1024, "cd" * 32, []),
    ShardInfo("sub/extra.tar", 2, 4096, None, ["jpg"]),
]


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def writer_like(n: int) -> Manifest:
    """``n`` shards named, hashed and described as ShardWriter writes them."""
    return Manifest(
        [ShardInfo(f"d-{i:06d}.tar", 10 + i % 3, 4096 + 512 * i, sha(i), ["jpg", "txt"]) for i in range(n)], name="d"
    )


def test_manifest_round_trips_and_refuses_foreign_json():
    m = Manifest(
        shards=[ShardInfo("d-0.tar", 3, 4096, "ab" * 32, ["cls", "jpg"]), ShardInfo("d-1.tar", 0, 1024)],
        name="d",
        classes=["cat", "dog"],
    )
    again = Manifest.from_json(m.to_json())
    assert again == m and again.total_samples == 3 and again.fields == ["cls", "jpg"]
    with pytest.raises(ShardFormatError, match="not a shardkit manifest"):
        Manifest.from_json('{"shards": []}', url="m.json")
    with pytest.raises(ShardFormatError, match="m.json.*version 99"):
        Manifest.from_json(m.to_json().replace('"version": 2', '"version": 99'), url="m.json")
    with pytest.raises(ShardFormatError, match="not valid JSON"):
        Manifest.from_json("{", url="m.json")


@pytest.mark.parametrize(
    "names, want",
    [
        (["train-000000.tar", "train-000001.tar"], "train"),
        (["a/val_12.tar.gz"], "val"),
        (["x-0.tar", "y-1.tar"], "data"),
        ([], "data"),
    ],
)
def test_dataset_name_from_shard_names(names, want):
    assert dataset_name_for(names) == want


def test_version_1_as_shardkit_wrote_it_is_read_and_written_back_unchanged():
    for data in (VERSION_1, VERSION_1.encode(), b"\xef\xbb\xbf" + VERSION_1.encode(), VERSION_1.encode("utf-16")):
        m = Manifest.from_json(data, url="d.manifest.json")
        assert m.version == 1 and m.name == "d" and m.classes == ["cat", "dog"] and not m.complete
        assert list(m.shards) == VERSION_1_SHARDS and len(m.shards) == 3
        assert m.total_samples == 5 and m.total_bytes == 15360 and m.fields == ["cls", "jpg"]
        assert m.to_json() == VERSION_1  # the version it has is the version it writes
    upgraded = Manifest.from_json(replace(m, version=2).to_json())
    assert upgraded.version == 2 and upgraded.shards == m.shards == VERSION_1_SHARDS


def test_version_1_numbers_given_as_strings_are_read_as_before():
    text = VERSION_1.replace('"samples": 3', '"samples": "3"')
    assert [s.samples for s in Manifest.from_json(text).shards] == [3, 0, 2]


def test_writer_names_are_a_pattern_and_digests_one_base64_block():
    m = writer_like(5)
    doc = json.loads(m.to_json())
    assert doc["version"] == 2 and doc["total_samples"] == m.total_samples == sum(10 + i % 3 for i in range(5))
    columns = doc["shards"]
    assert columns["count"] == 5
    assert columns["name"] == {"prefix": "d-", "start": 0, "digits": 6, "suffix": ".tar"}
    assert base64.b64decode(columns["sha256"]["base64"]) == b"".join(bytes.fromhex(sha(i)) for i in range(5))
    assert columns["field_sets"] == [["jpg", "txt"]] and columns["fields"] == [0] * 5
    read = Manifest.from_json(m.to_json())
    assert isinstance(read.shards, ShardTable) and isinstance(read.shards.names, PatternNames)
    assert read == m and read.shards[4] == m.shards[4]


def _decode_columns(text: str) -> list[ShardInfo]:
    """Version 2 read with json and base64 only (the format, not shardkit's reader)."""
    columns = json.loads(text)["shards"]
    n = columns["count"]
    name = columns["name"]
    if isinstance(name, dict):
        names = [f"{name['prefix']}{name['start'] + i:0{name['digits']}d}{name['suffix']}" for i in range(n)]
    else:
        names = name
    digests = columns["sha256"]
    if digests is None:
        digests = [None] * n
    elif isinstance(digests, dict):
        block = base64.b64decode(digests["base64"], validate=True)
        digests = [block[32 * i : 32 * i + 32].hex() for i in range(n)]
    sets = columns.get("field_sets", [[]])
    ids = columns.get("fields", [0] * n)
    return [ShardInfo(names[i], columns["samples"][i], columns["bytes"][i], digests[i], sets[ids[i]]) for i in range(n)]


shard_infos = st.builds(
    ShardInfo,
    name=st.one_of(st.sampled_from(["a.tar", "b/c-1.tar", "é.tar.gz"]), st.text(min_size=1, max_size=8)),
    samples=st.integers(0, 10**6),
    bytes=st.integers(0, 2**40),
    sha256=st.one_of(st.none(), st.integers(0, 50).map(sha)),
    fields=st.lists(st.sampled_from(["jpg", "txt", "cls", "json"]), unique=True, max_size=3).map(sorted),
)


@given(st.lists(shard_infos, max_size=12), st.booleans())
def test_version_2_says_what_the_shards_are(shards, numbered):
    if numbered:  # as ShardWriter names them
        shards = [replace(s, name=f"x-{i:06d}.tar") for i, s in enumerate(shards)]
    m = Manifest(shards, name="x", classes=None)
    text = m.to_json()
    assert _decode_columns(text) == shards
    read = Manifest.from_json(text)
    assert read == m and list(read.shards) == shards and read.fields == m.fields
    assert read.total_samples == sum(s.samples for s in shards)
    assert isinstance(read.shards.names, PatternNames if numbered and shards else (PatternNames, PackedNames))


@pytest.mark.parametrize("version", [1, 2])
def test_digests_known_from_any_shard_on_across_batches(version):
    # version 1 is read a batch of shard objects at a time: digests that start, stop and
    # come back in different batches all land on their shard
    def digest(i: int) -> str | None:
        return None if i < 5000 or 7000 <= i < 9000 or i % 1001 == 0 else sha(i)

    shards = [ShardInfo(f"d-{i:06d}.tar", i % 7, i, digest(i), ["jpg"] if i % 3 else []) for i in range(12_000)]
    read = Manifest.from_json(Manifest(shards, version=version).to_json())
    assert read.version == version and len(read.shards) == len(shards)
    assert read.shards.sha256 == [s.sha256 for s in shards] and list(read.shards) == shards


def test_version_2_in_any_json_formatting_reads_the_same():
    m = writer_like(4)
    doc = json.loads(m.to_json())
    for text in (json.dumps(doc, indent=3), json.dumps(doc), json.dumps(doc, separators=(" ,", " : "))):
        again = Manifest.from_json(text)
        assert again == m and len(again.shards) == 4
    doc["shards"]["sha256"] = [sha(i) for i in range(4)]  # the list form
    doc["shards"]["name"] = [f"d-{i:06d}.tar" for i in range(4)]
    assert Manifest.from_json(json.dumps(doc)) == m


def _mutated(change) -> str:
    doc = json.loads(writer_like(3).to_json())
    change(doc)
    return json.dumps(doc)


def _set(doc: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        doc = doc[key]
    doc[last] = value


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("shards.samples", [1, 2], r'"samples" has 2 entries for 3 shards'),
        ("shards.samples", [1, -2, 3], r'"samples" is not a list of counts'),
        ("shards.bytes", [1, 2.5, 3], r'"bytes" is not a list of counts'),
        ("shards.bytes", [1, 2, 2**64], r'"bytes" is not a list of counts'),
        ("shards.count", "3", r'"count" .* is not a number of shards'),
        ("shards.sha256", {"base64": "AAAA*AAA"}, r"not base64"),
        ("shards.sha256", {"base64": "", "hex": ""}, r'not just "base64"'),
        ("shards.sha256", [sha(0), "12", None], r"shard 1: sha256 '12'"),
        ("shards.sha256", "ab" * 96, r'"sha256" is a str'),
        ("shards.name", {"prefix": "d-", "start": 0, "digits": 0, "suffix": ".tar"}, r"bad name pattern"),
        ("shards.name", ["a.tar", "", "c.tar"], r'"name" is neither'),
        ("shards.fields", [0, 0, 1], r"field-set indexes"),
        ("shards.field_sets", [["jpg", 3]], r'"field_sets" is not a list of lists'),
        ("shards", [{"name": "a.tar", "samples": 1, "bytes": 1}], r"layout of version 1 in a version-2"),
        ("shards", "all of them", r"a str, not a list or columns"),
    ],
)
def test_bad_version_2_values_are_named(path, value, message):
    text = _mutated(lambda doc: _set(doc, path, value))
    with pytest.raises(ShardFormatError, match=message) as info:
        Manifest.from_json(text, url="http://h/d.manifest.json")
    assert "http://h/d.manifest.json" in str(info.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.replace('"sha256": "abab', '"sha256": "zzab'), r"shard 0: sha256 'zzab"),
        (lambda t: t.replace('"samples": 3,', ""), r"shard 0: KeyError\('samples'\)"),
        (lambda t: t.replace('"samples": 0,', '"samples": -1,'), r"shard 1: samples -1 is not a count"),
        (lambda t: t.replace('"version": 1', '"version": 2'), r"layout of version 1 in a version-2"),
        (lambda t: t.replace('"version": 1', '"version": 7').replace('"bytes": 1024,', '"bytes": [],'), r"version 7"),
        (lambda t: t.replace('"version": 1', '"version": true'), r"version True is not supported"),
        (lambda t: t + "{}", r"not valid JSON.*Extra data"),
        (lambda t: t.replace('"fields": []\n', '"fields": []\n,'), r"not valid JSON"),
    ],
)
def test_bad_version_1_values_are_named(change, message):
    with pytest.raises(ShardFormatError, match=message):
        Manifest.from_json(change(VERSION_1), url="d.manifest.json")


def test_a_read_manifest_gives_copies_of_its_shards():
    read = Manifest.from_json(writer_like(3).to_json())
    info = read.shards[1]
    info.samples = 999
    assert read.shards[1].samples == 11 and read.total_samples == 33
    window = read.shards[1:]
    assert isinstance(window, ShardTable) and len(window) == 2
    for got, want in pairs(writer_like(3).shards[1:], window):
        assert got == want
