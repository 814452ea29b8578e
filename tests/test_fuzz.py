"""Hypothesis fuzz of the tar reader and the sample grouper.

Random mutations of valid shards (bits flipped, bytes set, sizes rewritten, blocks
inserted / duplicated / deleted, truncation, checksums re-fixed so the damage reaches the
code behind the checksum test) must either parse or raise ShardFormatError: never
another exception, never a hang, never more payload bytes than input bytes, never a big
allocation driven by a declared size; the mmap, in-memory and trickle-stream paths must
agree exactly. Longer, coverage-guided runs: ``tools/fuzz_tar.py``.
"""

from __future__ import annotations

import io
import re
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardkit.format.samples import group_members, split_name
from shardkit.format.tar import iter_member_tuples
from tests import bad_corpus

pytestmark = pytest.mark.timeout(60)

SEEDS = bad_corpus.seed_shards()
BLOCK = 512


Trickle, memfd, parse = bad_corpus.Trickle, bad_corpus.memfd, bad_corpus.parse_or_error


def header_offsets(data: bytes, limit: int = 64) -> list[int]:
    """Where the reader would look for headers (best effort, for targeted mutations)."""
    offsets, pos = [], 0
    while pos + BLOCK <= len(data) and len(offsets) < limit:
        block = data[pos : pos + BLOCK]
        if not any(block):
            break
        offsets.append(pos)
        size = 0 if block[156:157] in (b"1", b"2", b"3", b"4", b"5", b"6") else bad_corpus._size_of(block)
        pos += BLOCK + -(-size // BLOCK) * BLOCK
    return offsets


SIZES = st.one_of(
    st.integers(0, 4096),
    st.sampled_from([8**11 - 1, 2**33, 2**63, 2**87, -1, -512]),
)
OPS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
    st.tuples(st.just("insert"), st.integers(0, 64), st.sampled_from(["zeros", "random", "copy"]), st.integers(0, 64)),
    st.tuples(st.just("duplicate"), st.integers(0, 64)),
    st.tuples(st.just("delete"), st.integers(0, 64)),
    st.tuples(st.just("size"), st.integers(0, 63), SIZES, st.booleans()),
    st.tuples(st.just("typeflag"), st.integers(0, 63), st.sampled_from(list(b"0125xgLKSV\0"))),
    st.tuples(st.just("fix")),
)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        blocks = max(1, len(buf) // BLOCK)
        kind = op[0]
        if kind == "flip" and buf:
            buf[op[1] % len(buf)] ^= 1 << op[2]
        elif kind == "set" and buf:
            buf[op[1] % len(buf)] = op[2]
        elif kind == "truncate":
            del buf[op[1] % (len(buf) + 1) :]
        elif kind == "insert":
            at = (op[1] % (blocks + 1)) * BLOCK
            if op[2] == "zeros":
                block = bytes(BLOCK)
            elif op[2] == "random":
                block = bytes((op[3] * 131 + i * 7) % 256 for i in range(BLOCK))
            else:
                src = (op[3] % blocks) * BLOCK
                block = bytes(buf[src : src + BLOCK]).ljust(BLOCK, b"\0")
            buf[at:at] = block
        elif kind == "duplicate" and len(buf) >= BLOCK:
            src = (op[1] % blocks) * BLOCK
            buf[src:src] = buf[src : src + BLOCK]
        elif kind == "delete" and len(buf) >= BLOCK:
            src = (op[1] % blocks) * BLOCK
            del buf[src : src + BLOCK]
        elif kind in ("size", "typeflag"):
            heads = header_offsets(bytes(buf))
            if not heads:
                continue
            at = heads[op[1] % len(heads)]
            if kind == "typeflag":
                buf[at + 156] = op[2]
            else:
                value, base256 = op[2], op[3]
                if base256 or value < 0 or value >= 8**11:
                    field = (value % (1 << 95)).to_bytes(12, "big")
                    field = bytes([0xFF if value < 0 else 0x80]) + field[1:]
                else:
                    field = b"%011o\0" % value
                buf[at + 124 : at + 136] = field
            buf = bytearray(bad_corpus.fix_checksums(bytes(buf)))
        elif kind == "fix":
            buf = bytearray(bad_corpus.fix_checksums(bytes(buf)))
    return bytes(buf)


@pytest.mark.timeout(60)
@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=st.sampled_from(range(len(SEEDS))), ops=st.lists(OPS, min_size=1, max_size=6))
def test_mutated_shards_parse_or_raise_shard_format_error(seed, ops):
    data = mutate(SEEDS[seed], ops)
    tracemalloc.start()
    try:
        try:
            first = parse(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{type(e).__name__} (not ShardFormatError): {e}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The read window (1 MiB), the first large-payload chunk (1 MiB) and copies of what
    # was really read: a declared size must never be allocated up front.
    assert peak < (2 << 20) + 4 * len(data) + (256 << 10), f"peak {peak} for {len(data)} input bytes"
    samples, error = first
    payload = sum(len(v) for _, _, s in samples for k, v in s.items() if not k.startswith("__"))
    assert payload <= len(data)
    assert parse(Trickle(data)) == first
    if data:
        assert parse(memfd(data)) == first
    if error is None and samples:  # an index-driven read of the same range agrees
        start, stop = samples[0][0], samples[-1][1]
        again = parse_range(data, start, stop)
        assert again == [s for _, _, s in samples]


def parse_range(data: bytes, start: int, stop: int) -> list[dict]:
    members = iter_member_tuples(io.BytesIO(data[start:]), url="x", start=start, stop=stop)
    return [s for _, _, s in group_members(members, url="x")]


# --------------------------------------------------------------------------- key splitting

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_RE = re.compile(r"__[^/]*__($|/)")


def regex_split(name: str) -> tuple[str, str] | None:
    """webdataset's rule, literally (the oracle; only for short names: it backtracks)."""
    if _META_RE.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    match = _KEY_RE.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(st.text(alphabet="ab./_\nX\u00e9", max_size=24))
def test_split_name_is_the_webdataset_regex(name):
    assert split_name(name) == regex_split(name)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "name",
    [
        "a/" * 500_000,
        "/" * 1_000_000,
        "a.b/" * 250_000 + ".x",
        "x" * 1_000_000,
        "." * 1_000_000,
        "__" + "/" * 1_000_000,
    ],
)
def test_split_name_is_linear_on_adversarial_names(name):
    started = time.perf_counter()
    split_name(name)
    assert time.perf_counter() - started < 0.5
