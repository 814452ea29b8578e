"""The tar reader against Python's tarfile, GNU tar and webdataset."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardkit.errors import ShardFormatError
from shardkit.format.samples import iter_samples, split_name
from shardkit.format.tar import iter_members
from tests.helpers import pairs


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_members(data: bytes, *, via_file: str | None = None) -> list[tuple[str, bytes]]:
    if via_file is None:
        return [(m.name, m.payload) for m in iter_members(io.BytesIO(data), url="mem")]
    with open(via_file, "wb") as f:
        f.write(data)
    with open(via_file, "rb") as f:  # the mmap path
        return [(m.name, m.payload) for m in iter_members(f, url=via_file)]


name_part = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\0", exclude_categories=("Cs",)), min_size=1, max_size=40
)
names = (
    st.lists(name_part, min_size=1, max_size=8)
    .map("/".join)
    .filter(lambda n: n not in (".", "..") and not any(p in (".", "..") for p in n.split("/")))
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=st.lists(st.tuples(names, st.integers(0, 3 * 512 + 1)), min_size=0, max_size=12),
    fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
    mapped=st.booleans(),
)
def test_reader_matches_tarfile(tmp_path_factory, members, fmt, mapped):
    payloads = [(name, os.urandom(size)) for name, size in members]
    data = tar_bytes(payloads, fmt)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        expected = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isreg()]
    path = str(tmp_path_factory.mktemp("t") / "x.tar") if mapped else None
    assert read_members(data, via_file=path) == expected


def test_offsets_let_a_reader_start_mid_archive():
    data = tar_bytes([("a" * 150 + ".jpg", b"1" * 700), ("b.jpg", b"2"), ("c/" + "d" * 120 + ".cls", b"3")])
    members = list(iter_members(io.BytesIO(data), url="mem"))
    for i, m in enumerate(members):
        again = list(iter_members(io.BytesIO(data[m.offset :]), url="mem", start=m.offset))
        assert [(x.name, x.payload) for x in again] == [(x.name, x.payload) for x in members[i:]]
    # stop at a member boundary ends cleanly without end blocks
    part = list(iter_members(io.BytesIO(data), url="mem", stop=members[1].end))
    assert [m.name for m in part] == [members[0].name, members[1].name]


def test_base256_size_and_skipped_types():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, kind in (
            ("dir", tarfile.DIRTYPE),
            ("link", tarfile.SYMTYPE),
            ("hard", tarfile.LNKTYPE),
            ("fifo", tarfile.FIFOTYPE),
            ("dev", tarfile.CHRTYPE),
        ):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "x.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tf.addfile(info)
        info = tarfile.TarInfo("x.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    data = bytearray(buf.getvalue())
    # Rewrite x.jpg's size field in base-256 (GNU) form, then fix the checksum.
    pos = next(i for i in range(0, len(data), 512) if data[i : i + 6] == b"x.jpg\0")
    header = data[pos : pos + 512]
    header[124:136] = b"\x80" + (3).to_bytes(11, "big")
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    data[pos : pos + 512] = header
    assert [(m.name, m.payload) for m in iter_members(io.BytesIO(bytes(data)))] == [("x.jpg", b"abc")]
    assert [m.name for m in tarfile.open(fileobj=io.BytesIO(bytes(data))).getmembers() if m.isreg()] == ["x.jpg"]


@pytest.mark.parametrize("cut", [100, 512 + 10, 1024 + 5, -1024, -1200])
def test_truncation_is_an_error_with_url_and_offset(cut):
    data = tar_bytes([("a.jpg", b"x" * 700), ("b.jpg", b"y" * 10)], tarfile.USTAR_FORMAT)
    end = len(tar_bytes([("a.jpg", b"x" * 700), ("b.jpg", b"y" * 10)], tarfile.USTAR_FORMAT).rstrip(b"\0"))
    truncated = data[:cut] if cut > 0 else data[: end + 10 + cut + 1024] if cut == -1024 else data[:end]
    with pytest.raises(ShardFormatError) as err:
        list(iter_members(io.BytesIO(truncated), url="s3://b/t.tar"))
    assert "s3://b/t.tar" in str(err.value) and "byte offset" in str(err.value)
    assert "truncated" in str(err.value)


def test_bad_checksum_and_non_tar():
    data = bytearray(tar_bytes([("a.jpg", b"x"), ("b.jpg", b"y")], tarfile.USTAR_FORMAT))
    data[1024 + 10] ^= 0xFF  # corrupt the second header's name
    with pytest.raises(ShardFormatError, match="checksum") as err:
        list(iter_members(io.BytesIO(bytes(data)), url="u"))
    assert err.value.offset == 1024
    with pytest.raises(ShardFormatError, match="not a tar archive"):
        list(iter_members(io.BytesIO(b"<html><body>404 Not Found</body></html>" * 20), url="u"))
    with pytest.raises(ShardFormatError, match="empty file"):
        list(iter_members(io.BytesIO(b""), url="u"))


def test_size_past_end_is_an_error():
    data = bytearray(tar_bytes([("a.jpg", b"x" * 10)], tarfile.USTAR_FORMAT))
    header = data[:512]
    header[124:136] = b"%011o\0" % (10**9)
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    data[:512] = header
    with pytest.raises(ShardFormatError, match="past the end"):
        list(iter_members(io.BytesIO(bytes(data)), url="u"))


@pytest.mark.parametrize(
    "name",
    [
        "a.b/c.seg.PNG",
        "dir/noext",
        "dir/.hidden.jpg",
        ".x.jpg",
        "a..b",
        "x/__k__.jpg",
        "k.tar.gz",
        "a/b/c.JSON",
        "d.d/e/f.g.h",
    ],
)
def test_split_name_follows_webdataset(name):
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    assert split_name(name) == (None if key is None else (key, ext.lower()))


def test_metadata_names_are_skipped():
    assert split_name("__meta__") is None
    assert split_name("__meta__/x.jpg") is None


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar"])
def test_gnu_tar_archives_read_like_webdataset(tmp_path, fmt):
    import webdataset as wds

    src = tmp_path / "src"
    long_dir = "d" * 60 + "/" + "e" * 60 + "/" + "f" * 60 + "/" + "g" * 80  # > 255 chars in all
    names = ["s1.jpg", "s1.CLS", "v.1.2/s2.jpg", "v.1.2/s2.json", "x" * 120 + ".jpg", long_dir + "/s4.png"]
    if fmt == "ustar":
        names = [n for n in names if len(n) <= 100 or "/" in n[-101:]][:4]
    files = []
    for i, name in enumerate(names):
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(100 + i * 300))
        files.append(name)
    shard = tmp_path / "out.tar"
    subprocess.run(["tar", f"--format={fmt}", "-cf", str(shard), "-C", str(src), *files], check=True)
    ours = list(iter_samples(open(shard, "rb"), url=str(shard)))
    theirs = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert len(ours) == len(theirs) >= (2 if fmt == "ustar" else 4)
    for a, b in pairs(ours, theirs):
        assert a["__key__"] == b["__key__"]
        assert {k: v for k, v in a.items() if not k.startswith("__")} == {
            k: v for k, v in b.items() if not k.startswith("__")
        }
