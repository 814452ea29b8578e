"""ShardReader on real shards: pieces with and without the index, errors, stats, the index cache.

The oracle is Python's ``tarfile`` reading the same file: which members it sees, their
payloads, and where their headers start and end. Shards are written by ShardWriter
(tests.helpers.make_shards), with tiny JPEGs of different sizes, so sample offsets are uneven.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import dataclass

import numpy as np
import pytest

from shardkit.errors import ShardFormatError, ShardkitError
from shardkit.plan.epoch import Piece
from shardkit.read.pipeline import make_handler
from shardkit.read.reader import ReadStats, ShardReader
from shardkit.storage.backend import DEFAULT_OPTIONS, SourceOptions
from tests.helpers import make_shards

pytestmark = pytest.mark.timeout(30)

N = 12  # samples in the test shard
BLOCK = 512


@dataclass
class TarSample:
    """One sample as tarfile sees it: key, payload per extension, and its byte span."""

    key: str
    fields: dict[str, bytes]
    start: int  # offset of its first member's header
    end: int  # offset just after its last member's padding
    member_ends: list[int]  # end of each member (header + payload + padding), in file order


def tar_samples(path: str) -> list[TarSample]:
    """Group tarfile's members into samples (key = name up to the first dot)."""
    out: list[TarSample] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = member.name.split(".", 1)
            payload = tar.extractfile(member).read()  # type: ignore[union-attr]
            end = member.offset_data + -(-member.size // BLOCK) * BLOCK
            if not out or out[-1].key != key:
                out.append(TarSample(key, {}, member.offset, end, []))
            out[-1].fields[ext] = payload
            out[-1].end = end
            out[-1].member_ends.append(end)
    return out


def fields_of(sample: dict) -> dict[str, bytes]:
    return {k: v for k, v in sample.items() if not k.startswith("__")}


def assert_same(got: list[dict], expected: list[TarSample], url: str) -> None:
    assert [s["__key__"] for s in got] == [t.key for t in expected]
    assert [fields_of(s) for s in got] == [t.fields for t in expected]
    assert all(s["__url__"] == url for s in got)


class Collect:
    """An error handler that keeps what it is given (and skips)."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []

    def __call__(self, exc: Exception) -> None:
        self.errors.append(exc)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """One shard of N samples with its .idx (never modified; tests copy it)."""
    dest = str(tmp_path_factory.mktemp("reader"))
    (path,) = make_shards(dest, [N], image=True)
    return path


@pytest.fixture(scope="module")
def oracle(source) -> list[TarSample]:
    samples = tar_samples(source)
    assert len(samples) == N and len({t.end - t.start for t in samples}) > 1  # uneven sizes
    return samples


@pytest.fixture
def shard(source, tmp_path) -> str:
    """A private copy of the shard and its index, free to cut or delete."""
    path = str(tmp_path / os.path.basename(source))
    shutil.copyfile(source, path)
    shutil.copyfile(source + ".idx", path + ".idx")
    return path


def until_error(items) -> tuple[list, Exception | None]:
    """What an iterator yields before it raises, and what it raises (None if it ends)."""
    got: list = []
    try:
        for item in items:
            got.append(item)  # noqa: PERF402 - the items before the error are the point
    except Exception as e:  # noqa: BLE001 - returned for the test to inspect
        return got, e
    return got, None


def counters(stats: ReadStats) -> dict[str, int]:
    """The reader's own counters from ``as_dict()`` (which may hold others too)."""
    return {k: v for k, v in stats.as_dict().items() if k in ("samples_read", "bytes_read", "skipped", "shards_opened")}


def reader_for(urls: list[str], handler="raise", **kw) -> ShardReader:
    return ShardReader(urls, options=DEFAULT_OPTIONS, handler=make_handler(handler), **kw)


PIECES = [(3, 7), (0, 1), (1, 12), (11, 12), (0, N)]


@pytest.mark.parametrize("start,stop", PIECES)
def test_read_piece_with_index_reads_only_its_bytes(shard, oracle, start, stop):
    reader = reader_for([shard])
    got = list(reader.read_piece(Piece(0, start, stop)))
    assert_same(got, oracle[start:stop], shard)
    expected_bytes = oracle[stop - 1].end - oracle[start].start
    assert reader.stats.bytes_read == expected_bytes
    if (start, stop) != (0, N):
        assert reader.stats.bytes_read < os.path.getsize(shard)
    assert counters(reader.stats) == {
        "samples_read": stop - start,
        "bytes_read": expected_bytes,
        "skipped": 0,
        "shards_opened": 1,
    }


def test_read_piece_with_index_never_parses_the_samples_before_it(shard, oracle):
    """Proof of the seek: garbage over samples 0..4 does not matter to a piece starting at 5."""
    with open(shard, "r+b") as f:
        f.write(b"\xab" * oracle[5].start)
    reader = reader_for([shard])
    assert_same(list(reader.read_piece(Piece(0, 5, 9))), oracle[5:9], shard)
    os.remove(shard + ".idx")
    with pytest.raises(ShardFormatError, match="not a tar archive"):
        list(reader_for([shard]).read_piece(Piece(0, 5, 9)))


@pytest.mark.parametrize("start,stop", PIECES)
def test_read_piece_without_index_skips_to_the_same_samples(shard, oracle, start, stop):
    os.remove(shard + ".idx")
    reader = reader_for([shard])
    got = list(reader.read_piece(Piece(0, start, stop)))
    assert reader.offsets(0) is None
    assert_same(got, oracle[start:stop], shard)
    # read from the start of the shard: at least everything up to the piece's end
    assert reader.stats.bytes_read >= oracle[stop - 1].end
    assert reader.stats.skipped == 0 and reader.stats.shards_opened == 1


@pytest.mark.parametrize("extra", [1, 3])
@pytest.mark.parametrize("indexed", [True, False], ids=["index", "no-index"])
def test_piece_past_the_end_of_the_shard_raises_naming_the_url(shard, oracle, indexed, extra):
    if not indexed:
        os.remove(shard + ".idx")
    got, error = until_error(reader_for([shard]).read_piece(Piece(0, 9, N + extra)))
    assert isinstance(error, ShardkitError) and shard in str(error)
    if not indexed:  # the samples the shard has come first
        assert_same(got, oracle[9:], shard)
        assert str(N + extra) in str(error) and str(N) in str(error)


@pytest.mark.parametrize("extra", [1, 3])
@pytest.mark.parametrize("indexed", [True, False], ids=["index", "no-index"])
def test_piece_past_the_end_yields_none_for_each_lost_position(shard, oracle, indexed, extra):
    if not indexed:
        os.remove(shard + ".idx")
    handler = Collect()
    reader = reader_for([shard], handler)
    start, stop = 9, N + extra
    got = list(reader.read_piece(Piece(0, start, stop)))
    assert len(got) == stop - start  # every planned position is accounted for
    lost = [i for i, s in enumerate(got) if s is None]
    assert reader.stats.skipped == len(lost) >= stop - N
    assert all(got[i] is None for i in range(len(got)) if start + i >= N)
    for i, sample in enumerate(got):
        if sample is not None:
            assert_same([sample], [oracle[start + i]], shard)
    assert lost == list(range(lost[0], len(got)))  # losses are the tail of the piece
    assert len(handler.errors) == 1 and isinstance(handler.errors[0], ShardkitError)
    assert shard in str(handler.errors[0])
    if not indexed:
        assert_same(got[: N - start], oracle[start:], shard)
        assert reader.stats.skipped == stop - N


def test_read_shard_yields_every_sample(shard, oracle):
    reader = reader_for([shard])
    assert_same(list(reader.read_shard(0)), oracle, shard)
    assert counters(reader.stats) == {"samples_read": N, "bytes_read": oracle[-1].end, "skipped": 0, "shards_opened": 1}
    os.remove(shard + ".idx")  # read_shard needs no index
    assert_same(list(reader_for([shard]).read_shard(0)), oracle, shard)


def test_read_shard_of_an_empty_shard(tmp_path):
    paths = make_shards(str(tmp_path), [0, 2])
    with tarfile.open(paths[0]) as tar:
        assert tar.getmembers() == []
    reader = reader_for(paths)
    assert list(reader.read_shard(0)) == []
    assert [s["__key__"] for s in reader.read_shard(1)] == ["s000000", "s000001"]
    assert list(reader.read_piece(Piece(0, 0, 0))) == []
    assert reader.stats.samples_read == 2 and reader.stats.skipped == 0


def _cut_at(oracle: list[TarSample], where: str, k: int) -> int:
    """A byte offset inside sample k (or at its start)."""
    sample = oracle[k]
    if where == "at_sample_start":
        return sample.start
    if where == "in_first_header":
        return sample.start + 100
    if where == "in_first_payload":
        return sample.start + BLOCK  # header complete, payload missing
    assert where == "in_last_member"
    return sample.member_ends[-2] + BLOCK + 3  # header of the last member, then part of its payload


@pytest.mark.parametrize(
    "where",
    [
        "in_last_member",
        "at_sample_start",
        "in_first_header",
        "in_first_payload",
    ],
)
def test_truncated_shard_keeps_the_complete_samples_before_the_cut(shard, oracle, where):
    k = 7
    cut = _cut_at(oracle, where, k)
    complete = [t for t in oracle if t.end <= cut]
    assert [t.key for t in complete] == [t.key for t in oracle[:k]]
    if where in ("at_sample_start", "in_first_header"):
        # No header of sample k was read, so the reader cannot know sample k-1 ended: it
        # might have had more members. It is dropped rather than yielded possibly partial
        # (the hostile-input corpus pins the same rule); a readable header of a new key
        # (in_first_payload) proves k-1 whole.
        complete = complete[:-1]
    with open(shard, "r+b") as f:
        f.truncate(cut)
    handler = Collect()
    reader = reader_for([shard], handler)
    got = list(reader.read_shard(0))
    assert len(handler.errors) == 1
    error = handler.errors[0]
    assert isinstance(error, ShardFormatError) and error.url == shard and "truncated" in str(error)
    assert reader.stats.skipped == 1
    assert_same(got, complete, shard)


@pytest.mark.parametrize("fields, kept", [("jpg cls", True), ("jpg;png json", True), ("jpg txt", False)])
def test_a_cut_sample_with_every_requested_field_is_kept(shard, oracle, fields, kept):
    """Cut where sample 7 starts: nothing proves sample 6 ended, but when it holds every
    field the dataset asks for, nothing it is read for is missing."""
    with open(shard, "r+b") as f:
        f.truncate(_cut_at(oracle, "at_sample_start", 7))
    handler = Collect()
    reader = reader_for([shard], handler, fields=fields)
    got = list(reader.read_shard(0))
    assert len(handler.errors) == 1 and "truncated" in str(handler.errors[0])
    assert_same(got, oracle[:7] if kept else oracle[:6], shard)
    if kept:  # through a dataset: its fields= reach the reader
        from shardkit.read.dataset import ShardDataset

        ds = ShardDataset(shard, fields=fields, handler="skip", decode=None, shuffle=False)
        first = [slot.split(";")[0] for slot in fields.split()]
        assert [tuple(map(bytes, s)) for s in ds] == [tuple(t.fields[f] for f in first) for t in oracle[:7]]


def test_truncated_shard_with_raise_handler_raises_after_the_samples_before(shard, oracle):
    with open(shard, "r+b") as f:
        f.truncate(_cut_at(oracle, "in_last_member", 4))
    got, error = until_error(reader_for([shard]).read_shard(0))
    assert isinstance(error, ShardFormatError) and "truncated" in str(error) and error.url == shard
    assert_same(got, oracle[:4], shard)


@pytest.mark.parametrize("indexed", [True, False], ids=["index", "no-index"])
def test_damage_after_a_piece_does_not_reach_the_handler(shard, oracle, indexed):
    """A piece ending at sample 4 needs nothing from sample 5 on; the shard is cut in sample 5."""
    if not indexed:
        os.remove(shard + ".idx")
    with open(shard, "r+b") as f:
        f.truncate(_cut_at(oracle, "in_first_header", 5))
    handler = Collect()
    reader = reader_for([shard], handler)
    got = list(reader.read_piece(Piece(0, 1, 4)))
    assert_same(got, oracle[1:4], shard)
    assert handler.errors == [] and reader.stats.skipped == 0


def test_stats_are_shared_and_counted(tmp_path):
    paths = make_shards(str(tmp_path), [5, 4, 6])
    expected = [tar_samples(p) for p in paths]
    stats = ReadStats()
    reader = reader_for(paths, stats=stats)
    assert reader.stats is stats
    keys = [s["__key__"] for s in reader.read_shard(0)]
    keys += [s["__key__"] for s in reader.read_piece(Piece(2, 2, 5))]
    keys += [s["__key__"] for s in reader.read_piece(Piece(1, 0, 4))]
    assert keys == [t.key for t in expected[0] + expected[2][2:5] + expected[1]]
    assert stats.samples_read == 5 + 3 + 4
    assert stats.shards_opened == 3
    assert stats.bytes_read == (expected[0][-1].end + expected[2][4].end - expected[2][2].start + expected[1][-1].end)
    assert stats.skipped == 0
    assert counters(stats) == {
        "samples_read": stats.samples_read,
        "bytes_read": stats.bytes_read,
        "skipped": 0,
        "shards_opened": 3,
    }


def test_offsets_match_tarfile_and_are_cached(shard, oracle, tmp_path):
    bare = str(tmp_path / "bare.tar")
    shutil.copyfile(shard, bare)  # no .idx beside it
    reader = reader_for([shard, bare])
    offsets = reader.offsets(0)
    assert offsets is not None
    assert [int(o) for o in offsets] == [t.start for t in oracle] + [oracle[-1].end]
    assert reader.offsets(1) is None
    # cached: neither a removed index nor a new one changes the answer
    os.rename(shard + ".idx", bare + ".idx")
    assert np.array_equal(reader.offsets(0), offsets)
    assert reader.offsets(1) is None
    # a new reader sees the files as they are now
    fresh = reader_for([shard, bare])
    assert fresh.offsets(0) is None
    assert np.array_equal(fresh.offsets(1), offsets)


def test_offsets_cache_keeps_the_16_most_recently_used(shard):
    reader = reader_for([shard] * 18)
    for i in range(16):
        assert reader.offsets(i) is not None
    reader.offsets(0)  # now the most recently used: shard 1 goes first
    reader.offsets(16)
    reader.offsets(17)  # evicts 1 and 2
    os.remove(shard + ".idx")
    assert reader.offsets(0) is not None and reader.offsets(3) is not None  # still cached
    assert reader.offsets(2) is None and reader.offsets(1) is None  # read again: gone


def test_bad_index_goes_to_the_handler(shard):
    with open(shard + ".idx", "wb") as f:
        f.write(b"not an index at all")
    with pytest.raises(ShardFormatError, match="bad magic") as info:
        reader_for([shard]).offsets(0)
    assert info.value.url == shard + ".idx"
    handler = Collect()
    reader = reader_for([shard], handler)
    assert list(reader.read_piece(Piece(0, 2, 6))) == [None] * 4
    assert reader.stats.skipped == 4
    assert len(handler.errors) == 1 and shard + ".idx" in str(handler.errors[0])


def test_prefetch_of_local_shards_is_a_no_op(shard, oracle, tmp_path):
    cache_dir = tmp_path / "cache"
    reader = ShardReader(
        [shard], options=SourceOptions(cache_dir=str(cache_dir), read_ahead=2), handler=make_handler("raise")
    )
    reader.prefetch([])
    reader.prefetch([shard])
    assert not cache_dir.exists() or not any(p.is_file() for p in cache_dir.rglob("*"))
    assert_same(list(reader.read_piece(Piece(0, 2, 5))), oracle[2:5], shard)
    assert not cache_dir.exists() or not any(p.is_file() for p in cache_dir.rglob("*"))
