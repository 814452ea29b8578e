"""A generator of bad shard inputs: every case is built here from code, nothing is checked in.

Each :class:`Case` builds the bytes of one shard (``case.build(workdir)``) and says what
shardkit must do with it:

- ``kind="format"``: the tar reader raises :class:`~shardkit.errors.ShardFormatError`
  after yielding ``keys`` (the samples before the damage); the rest of the shard is lost.
  ``offset``/``member`` are where the error must point, ``message`` substrings it must say.
- ``kind="sample"``: the tar is fine and yields ``keys``; decoding (``decode="pil"``)
  rejects exactly ``bad_keys`` with a :class:`~shardkit.errors.SampleError`.
- ``kind="ok"``: the shard is accepted and yields exactly ``keys`` (odd, but legal).

``tarfile`` records what Python's tarfile does with the same bytes (see
:func:`tarfile_view`): ``"same"`` (lists the same regular files and payloads),
``"error"`` (raises too), ``"silent"`` (stops early *without* an error: tarfile loses the
rest of the archive silently where shardkit reports it), ``"hangs"`` (tarfile loops
forever: CVE-2025-8194, unpatched Pythons), or a short note where it differs otherwise.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pathlib
import pickle
import random
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

BLOCK = 512
END = bytes(2 * BLOCK)

# --------------------------------------------------------------------------- raw tar


def header(
    name: bytes | str,
    size: int = 0,
    typeflag: bytes = b"0",
    *,
    size_field: bytes | None = None,
    linkname: bytes = b"",
    magic: bytes = b"ustar\x0000",
    prefix: bytes = b"",
    chksum: bytes | None = None,
    signed_checksum: bool = False,
) -> bytes:
    """One 512-byte tar header, built by hand so any field can be wrong."""
    raw = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
    h = bytearray(BLOCK)
    h[0 : min(len(raw), 100)] = raw[:100]
    h[100:108] = b"0000644\0"
    h[108:116] = b"0001750\0"
    h[116:124] = b"0001750\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    assert len(h) == BLOCK, "a header field was given the wrong width"
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157 : 157 + len(linkname)] = linkname[:100]
    h[257 : 257 + len(magic)] = magic
    h[345 : 345 + len(prefix)] = prefix[:155]
    if chksum is not None:
        h[148:156] = chksum
    elif signed_checksum:
        total = sum(b - 256 if b >= 128 else b for b in h)
        h[148:156] = b"%06o\0 " % total
    else:
        h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def padding(n: int) -> bytes:
    return bytes(-n % BLOCK)


def member(name: bytes | str, payload: bytes, typeflag: bytes = b"0", **kw) -> bytes:
    """Header, payload and padding of one member."""
    return header(name, len(payload), typeflag, **kw) + payload + padding(len(payload))


def pax_records(records: dict[str, str]) -> bytes:
    body = b""
    for key, value in records.items():
        item = f" {key}={value}\n".encode("utf-8", "surrogateescape")
        length = len(item) + 1
        while len(str(length)) + len(item) != length:
            length = len(str(length)) + len(item)
        body += str(length).encode() + item
    return body


def extended(
    body: bytes, typeflag: bytes = b"x", name: bytes = b"././@PaxHeader", *, declared: int | None = None
) -> bytes:
    """A pax (``x``/``g``) or GNU (``L``/``K``) extended header carrying ``body``."""
    size = len(body) if declared is None else declared
    return header(name, size, typeflag) + body + padding(len(body))


def gnu_long_name(name: str | bytes) -> bytes:
    raw = name.encode("utf-8") if isinstance(name, str) else name
    return extended(raw + b"\0", b"L", b"././@LongLink")


@cache
def tiny_jpeg(i: int) -> bytes:
    from tests.helpers import tiny_jpeg as make

    return make(i, size=(24, 16))


def good_sample(key: str, i: int = 0) -> bytes:
    """The members of one valid sample: ``key.cls``, ``key.jpg``, ``key.json``."""
    return (
        member(f"{key}.cls", str(i % 3).encode())
        + member(f"{key}.jpg", tiny_jpeg(i))
        + member(f"{key}.json", json.dumps({"i": i}).encode())
    )


def good_samples(*keys: str) -> bytes:
    return b"".join(good_sample(k, i) for i, k in enumerate(keys))


PREFIX_KEYS = ("g0000", "g0001")


def prefix() -> bytes:
    """Two valid samples every broken shard starts with (they must still arrive)."""
    return good_samples(*PREFIX_KEYS)


def valid_tar() -> bytes:
    return good_samples("v0000", "v0001", "v0002") + END


# --------------------------------------------------------------------------- payloads


def png_bytes(width: int = 24, height: int = 16) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(width * height).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@cache
def png_bomb(side: int = 12_000) -> bytes:
    """A single-colour 1-bit greyscale PNG of side x side pixels that compresses to a few kB.

    Decoded to RGB it would need side*side*3 bytes (432 MB for 12000); its IDAT is a
    real deflate stream of all the rows, so a decoder without a size guard really inflates it.
    """
    row = b"\0" + bytes((side + 7) // 8)  # filter byte + packed 1-bit pixels
    comp = zlib.compressobj(9)
    chunks = [comp.compress(row * 500) for _ in range(side // 500)]
    chunks.append(comp.compress(row * (side % 500)))
    chunks.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(chunks))
        + _png_chunk(b"IEND", b"")
    )


class Touch:
    """Unpickling this creates ``path`` (``pathlib.Path.touch``): proof that it was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def marker_path(workdir: str) -> str:
    return os.path.join(workdir, "UNPICKLED-MARKER")


def marker_pickle(workdir: str) -> bytes:
    return pickle.dumps(Touch(marker_path(workdir)), protocol=4)


def marker_npy(workdir: str) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.array([Touch(marker_path(workdir))], dtype=object), allow_pickle=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Built:
    data: bytes
    offset: int | None = None  # where a format error must point
    member: str | None = None  # the member a format error must name


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[str], Built]
    kind: str  # "format" | "sample" | "ok"
    keys: tuple[str, ...]
    bad_keys: tuple[str, ...] = ()
    message: tuple[str, ...] = ()
    tarfile: str = "same"  # same | error | lenient | hangs | different (see the module docstring)
    tarfile_note: str = ""
    webdataset: bool = True  # for "ok" cases: webdataset must group the same keys
    behaviour: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def decode(self) -> bool:
        return self.kind == "sample"

    def build(self, workdir: str) -> Built:
        return self.make(workdir)

    def write(self, workdir: str) -> tuple[str, Built]:
        """Write the shard to ``workdir/<name>.tar``; returns its path and what was built."""
        built = self.build(workdir)
        path = os.path.join(workdir, f"{self.name}.tar")
        with open(path, "wb") as f:
            f.write(built.data)
        return path, built


CASES: list[Case] = []


Maker = Callable[[str], Built]


def case(name: str, kind: str, keys: tuple[str, ...], **kw) -> Callable[[Maker], Maker]:
    def register(fn: Maker) -> Maker:
        CASES.append(Case(name, fn, kind, keys, **kw))
        return fn

    return register


def _plain(fn: Callable[[], bytes]) -> Callable[[str], Built]:
    return lambda workdir: Built(fn())


P = PREFIX_KEYS
# A sample is complete only when the next key starts: damage right after the prefix loses g0001,
# unless the damage is inside a member of a new key (its header was read): then g0001 is whole.
P1 = PREFIX_KEYS[:1]

# -- truncation -----------------------------------------------------------------------


@case(
    "truncated_in_header",
    "format",
    P,
    message=("truncated", "tar header"),
    tarfile="lenient",
    tarfile_note="tarfile treats the cut header as the end of the archive: no error",
    behaviour="ShardFormatError at the cut header's offset, naming the member whose name and "
    "type flag survived (a new key: g0001 is whole); tarfile stops silently there",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + good_sample("b0000")[:300], offset=len(head), member="b0000.cls")


@case(
    "truncated_in_header_before_type",
    "format",
    P1,
    message=("truncated", "tar header"),
    tarfile="lenient",
    tarfile_note="tarfile treats the cut header as the end of the archive: no error",
    behaviour="ShardFormatError at the cut header's offset; the type flag did not arrive, so the "
    "name proves nothing and g0001 may be partial",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + good_sample("b0000")[:150], offset=len(head))


@case(
    "truncated_in_payload",
    "format",
    P,
    message=("truncated", "past the end"),
    tarfile="error",
    behaviour="ShardFormatError naming the member and its header offset",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + member("b0000.bin", os.urandom(3000))[: BLOCK + 1000], offset=len(head), member="b0000.bin")


@case(
    "truncated_in_padding",
    "format",
    P,
    message=("truncated", "padding"),
    tarfile="error",
    behaviour="ShardFormatError naming the member; tarfile returns the member and stops silently",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + member("b0000.bin", b"p" * 700)[: BLOCK + 800], offset=len(head), member="b0000.bin")


@case(
    "truncated_before_end_blocks",
    "format",
    ("g0000", "g0001"),
    message=("truncated", "end-of-archive"),
    tarfile="lenient",
    tarfile_note="tarfile accepts a tar without end blocks",
    behaviour="all members complete but no end-of-archive blocks: an error (the last sample "
    "is lost, it may be incomplete); tarfile accepts it",
)
def _(workdir: str) -> Built:
    data = good_samples("g0000", "g0001", "g0002")
    return Built(data, offset=len(data))


@case(
    "truncated_in_end_blocks",
    "format",
    P1,
    message=("truncated",),
    tarfile="lenient",
    tarfile_note="tarfile accepts a partial end block",
    behaviour="a partial zero block where the end marker should be: truncated",
)
def _(workdir: str) -> Built:
    data = prefix()
    return Built(data + bytes(300), offset=len(data))


@case(
    "truncated_in_first_header",
    "format",
    (),
    message=("truncated", "first tar header"),
    tarfile="error",
    behaviour="fewer than 512 bytes in all: truncated at offset 0",
)
def _(workdir: str) -> Built:
    return Built(valid_tar()[:200], offset=0)


# -- checksums and garbage ----------------------------------------------------------------


def _corrupt_header(data: bytes, at: int, fn: Callable[[bytearray], None]) -> bytes:
    out = bytearray(data)
    block = out[at : at + BLOCK]
    fn(block)
    out[at : at + BLOCK] = block
    return bytes(out)


@case(
    "bad_checksum",
    "format",
    P1,
    message=("checksum",),
    tarfile="lenient",
    tarfile_note="tarfile stops at a bad header after the first one: the rest is lost without an error",
    behaviour="a flipped bit in a later header: ShardFormatError at that header; tarfile "
    "treats it as the end of the archive and loses the rest silently",
)
def _(workdir: str) -> Built:
    head = prefix()
    data = head + good_samples("b0000", "b0001") + END

    def flip(block: bytearray) -> None:
        block[3] ^= 0x04

    return Built(_corrupt_header(data, len(head), flip), offset=len(head))


@case(
    "bad_checksum_first_header",
    "format",
    (),
    message=("not a tar archive", "checksum"),
    tarfile="error",
    behaviour="'not a tar archive' at offset 0",
)
def _(workdir: str) -> Built:
    def flip(block: bytearray) -> None:
        block[0] ^= 0x01

    return Built(_corrupt_header(valid_tar(), 0, flip), offset=0)


@case(
    "checksum_not_octal",
    "format",
    P1,
    message=("checksum",),
    tarfile="lenient",
    tarfile_note="tarfile stops there without an error",
    behaviour="checksum field 'zzzzzz': treated as a bad checksum",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + header("b0000.jpg", 10, chksum=b"zzzzzz\0 ") + bytes(BLOCK) + END, offset=len(head))


@case(
    "garbage_block_inserted",
    "format",
    P1,
    message=("checksum",),
    tarfile="lenient",
    tarfile_note="tarfile stops there without an error",
    behaviour="512 random bytes between two samples: bad checksum at that offset",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + random.Random(7).randbytes(BLOCK) + good_sample("b0000") + END, offset=len(head))


# -- sizes ---------------------------------------------------------------------------------


@case(
    "size_past_end",
    "format",
    P,
    message=("past the end",),
    tarfile="error",
    behaviour="a size of 1 MB in a 10 kB file: truncated, member named",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + header("b0000.jpg", 10**6) + b"x" * 2000 + END, offset=len(head), member="b0000.jpg")


@case(
    "size_octal_8GiB",
    "format",
    P,
    message=("past the end",),
    tarfile="error",
    behaviour="size field 77777777777 (8 GiB) in a small file: fails fast without allocating "
    "8 GiB (before the fix, the stream path allocated bytearray(8 GiB) first: 40 s)",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(
        head + header("b0000.jpg", size_field=b"77777777777\0") + b"x" * 700 + END, offset=len(head), member="b0000.jpg"
    )


@case(
    "size_base256_huge",
    "format",
    P,
    message=("past the end",),
    tarfile="error",
    tarfile_note="tarfile raises OverflowError (not a ReadError)",
    behaviour="base-256 size 2**80: truncated error (before the fix: MemoryError/OverflowError from the stream path)",
)
def _(workdir: str) -> Built:
    head = prefix()
    field_ = b"\x80" + (2**80).to_bytes(11, "big")
    return Built(head + header("b0000.jpg", size_field=field_) + b"x" * 700 + END, offset=len(head), member="b0000.jpg")


@case(
    "size_negative_octal",
    "format",
    P1,
    message=("negative",),
    tarfile="hangs",
    tarfile_note="tarfile (so webdataset) loops forever: CVE-2025-8194 (fixed in Python 3.13.6/3.14)",
    behaviour="size '-0000001000': ShardFormatError; Python's tarfile (and so webdataset) "
    "loops forever on it (CVE-2025-8194)",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + header("b0000.jpg", size_field=b"-0000001000\0") + bytes(BLOCK) + END, offset=len(head))


@case(
    "size_negative_base256",
    "format",
    P1,
    message=("negative",),
    tarfile="hangs",
    tarfile_note="tarfile (so webdataset) loops forever: CVE-2025-8194",
    behaviour="base-256 size -512: ShardFormatError; tarfile loops forever (CVE-2025-8194)",
)
def _(workdir: str) -> Built:
    head = prefix()
    field_ = (-512).to_bytes(12, "big", signed=True)  # 0xFF... two's complement
    return Built(head + header("b0000.jpg", size_field=field_) + bytes(BLOCK) + END, offset=len(head))


@case(
    "size_field_garbage",
    "format",
    P1,
    message=("bad size field",),
    tarfile="lenient",
    tarfile_note="tarfile stops there without an error",
    behaviour="size field '12345678xyz': ShardFormatError; tarfile stops silently",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + header("b0000.jpg", size_field=b"12345678xyz\0") + bytes(BLOCK) + END, offset=len(head))


@case(
    "size_field_nul_then_garbage",
    "ok",
    P,
    behaviour="size field '1274' + NUL + junk: read up to the NUL, as tarfile and GNU tar do",
)
def _(workdir: str) -> Built:
    payload = b"n" * 700
    return Built(
        good_sample("g0000")
        + header("g0000.bin", size_field=b"1274\0\xff\xfe12345")
        + payload
        + padding(700)
        + good_sample("g0001", 1)
        + END
    )


# -- pax headers -------------------------------------------------------------------------------


@case(
    "pax_absurd_length",
    "format",
    P1,
    message=("implausibly large",),
    tarfile="error",
    behaviour="a pax header claiming 2 GiB: refused before reading it",
)
def _(workdir: str) -> Built:
    head = prefix()
    body = pax_records({"path": "b0000.jpg"})
    return Built(head + extended(body, declared=2**31) + END, offset=len(head))


@case(
    "pax_bad_record_length",
    "format",
    P1,
    message=("pax",),
    tarfile="lenient",
    tarfile_note="tarfile ignores the bad record and lists a member with a garbled name",
    behaviour="a pax record whose length prefix is wrong",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + extended(b"99 path=b0000.jpg\n") + member("b0000.jpg", b"x") + END, offset=len(head))


@case(
    "pax_record_no_equals",
    "format",
    P1,
    message=("pax",),
    tarfile="lenient",
    tarfile_note="tarfile ignores the malformed record",
    behaviour="a pax record without '='",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + extended(b"15 pathb0000jpg\n") + member("b0000.jpg", b"x") + END, offset=len(head))


@case(
    "pax_record_length_not_a_number",
    "format",
    P1,
    message=("pax",),
    tarfile="lenient",
    tarfile_note="tarfile ignores the malformed record",
    behaviour="a pax record length that is not a number",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + extended(b"x9 path=b0000.jpg\n") + member("b0000.jpg", b"x") + END, offset=len(head))


@case(
    "pax_size_not_a_number",
    "format",
    P1,
    message=("bad pax size",),
    tarfile="lenient",
    tarfile_note="tarfile takes size 0 and reads the payload as the next header",
    behaviour="pax size=abc: ShardFormatError (tarfile takes size 0 and then misparses the payload)",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(
        head + extended(pax_records({"size": "abc"})) + member("b0000.jpg", b"x" * 600) + END,
        offset=len(head) + 2 * BLOCK,
    )


@case(
    "pax_size_huge",
    "format",
    P,
    message=("past the end",),
    tarfile="error",
    tarfile_note="tarfile raises OverflowError",
    behaviour="pax size=10**30: truncated error (before the fix: OverflowError on streams)",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(
        head + extended(pax_records({"size": str(10**30)})) + member("b0000.jpg", b"x" * 600) + END,
        offset=len(head) + 2 * BLOCK,
        member="b0000.jpg",
    )


@case(
    "pax_header_then_end",
    "format",
    P1,
    message=("end-of-archive marker after an extended header",),
    tarfile="error",
    behaviour="a pax header with no member after it",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + extended(pax_records({"path": "b0000.jpg"})) + END, offset=len(head) + 2 * BLOCK)


# -- GNU long names ---------------------------------------------------------------------------


@case(
    "gnu_longname_huge",
    "format",
    P1,
    message=("implausibly large",),
    tarfile="lenient",
    tarfile_note="tarfile has no limit on long names",
    behaviour="a GNU long name of 2 MiB: refused (limit 1 MiB)",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + gnu_long_name(b"n" * (2 << 20) + b".jpg") + member("x", b"") + END, offset=len(head))


@case(
    "gnu_longname_truncated",
    "format",
    P1,
    message=("truncated", "extended header"),
    tarfile="error",
    behaviour="the stream ends inside a GNU long-name record",
)
def _(workdir: str) -> Built:
    head = prefix()
    return Built(head + header(b"././@LongLink", 3000, b"L") + b"n" * 700, offset=len(head))


@case(
    "gnu_longname_chain",
    "ok",
    webdataset=False,
    keys=P + ("last",),
    tarfile="different",
    tarfile_note="tarfile (and so webdataset) names the member with the FIRST long name of a chain, "
    "shardkit with the last",
    behaviour="20 GNU long-name headers in a row: accepted, the last one names the member",
)
def _(workdir: str) -> Built:
    chain = b"".join(gnu_long_name(f"chain{i:02d}/" + "c" * 120 + ".jpg") for i in range(19))
    return Built(prefix() + chain + gnu_long_name("last.jpg") + header("short.jpg", 3) + b"abc" + padding(3) + END)


@case(
    "gnu_longname_quadratic",
    "ok",
    webdataset=False,
    keys=P + ("g0002",),
    behaviour="a 512 KiB GNU long name 'a/a/a/...' (no extension) is skipped in milliseconds; the "
    "webdataset key regex backtracks quadratically on it (minutes to hours): fixed in "
    "samples.split_name",
)
def _(workdir: str) -> Built:
    name = "a/" * (256 * 1024 - 4)
    return Built(prefix() + gnu_long_name(name) + header("x", 3) + b"abc" + padding(3) + good_sample("g0002") + END)


@case(
    "slashes_quadratic",
    "ok",
    webdataset=False,
    keys=P + ("g0002",),
    behaviour="a 512 KiB long name of slashes only: skipped in milliseconds (regex: hours)",
)
def _(workdir: str) -> Built:
    return Built(
        prefix() + gnu_long_name("/" * (512 * 1024)) + header("x", 3) + b"abc" + padding(3) + good_sample("g0002") + END
    )


LONG_KEY = "d" * 200 + "/" * 300_000 + "k"


@case(
    "long_key",
    "ok",
    webdataset=False,
    keys=P + (LONG_KEY,),
    behaviour="a 300 kB key is a key like any other (linear time)",
)
def _(workdir: str) -> Built:
    return Built(prefix() + gnu_long_name(LONG_KEY + ".jpg") + header("x", 3) + b"abc" + padding(3) + END)


# -- not a tar at all ----------------------------------------------------------------------------


@case("empty_file", "format", (), message=("empty file",), tarfile="error", behaviour="0 bytes: 'empty file'")
def _(workdir: str) -> Built:
    return Built(b"", offset=0)


@case(
    "gzip_tar",
    "ok",
    ("v0000", "v0001", "v0002"),
    behaviour="a .tar.gz (found by its magic bytes, whatever its name): decompressed and read",
)
def _(workdir: str) -> Built:
    return Built(gzip.compress(valid_tar(), mtime=0))


@case(
    "gzip_tar_cut",
    "format",
    P,
    message=("truncated", "gzip", "cut short"),
    tarfile="error",
    behaviour="a .tar.gz cut short inside a member: the samples before it arrive, "
    "the error names the member and its offset in the decompressed stream",
)
def _(workdir: str) -> Built:
    head = prefix()
    data = head + member("b0000.bin", random.Random(3).randbytes(3000)) + END
    return Built(gzip.compress(data, mtime=0)[:-1500], offset=len(head), member="b0000.bin")


@case(
    "gzip_tar_corrupt",
    "format",
    (),
    message=("corrupt gzip data", "CRC"),
    tarfile="lenient",
    tarfile_note="tarfile stops at the end-of-archive marker and never checks the CRC",
    behaviour="a .tar.gz whose gzip CRC does not match: 'corrupt gzip data' (the stream is read to its end)",
)
def _(workdir: str) -> Built:
    data = bytearray(gzip.compress(good_samples("c0000") + END, mtime=0))
    data[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    return Built(bytes(data))


@case(
    "gzip_twice",
    "format",
    (),
    message=("gzip", "compressed twice"),
    tarfile="error",
    behaviour="a .tar.gz.gz: the outer layer is removed, the inner one is named",
)
def _(workdir: str) -> Built:
    return Built(gzip.compress(gzip.compress(valid_tar(), mtime=0), mtime=0), offset=0)


@case(
    "zip_file",
    "format",
    (),
    message=("zip",),
    tarfile="error",
    behaviour="a zip archive: 'it is a zip file, not a tar'",
)
def _(workdir: str) -> Built:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(3):
            zf.writestr(zipfile.ZipInfo(f"z{i}.jpg", (2020, 1, 1, 0, 0, 0)), tiny_jpeg(i))
    return Built(buf.getvalue(), offset=0)


@case(
    "html_error_page_short",
    "format",
    (),
    message=("HTML",),
    tarfile="error",
    behaviour="a 404 page shorter than a tar header: 'looks like an HTML/XML document'",
)
def _(workdir: str) -> Built:
    return Built(b"<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>\n", offset=0)


@case(
    "html_error_page",
    "format",
    (),
    message=("HTML",),
    tarfile="error",
    behaviour="a long HTML page served with status 200 instead of the shard",
)
def _(workdir: str) -> Built:
    body = b"<p>Please sign in to continue.</p>\n" * 60
    return Built(
        b"\n  <!DOCTYPE html>\n<html lang=en><head><title>Sign in</title></head><body>" + body + b"</body></html>\n",
        offset=0,
    )


@case(
    "s3_xml_error",
    "format",
    (),
    message=("HTML/XML",),
    tarfile="error",
    behaviour="an S3 XML error document instead of the shard",
)
def _(workdir: str) -> Built:
    return Built(
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access '
        b"Denied</Message><RequestId>X</RequestId></Error>",
        offset=0,
    )


@case(
    "json_error_body",
    "format",
    (),
    message=("JSON",),
    tarfile="error",
    behaviour="a JSON error body instead of the shard",
)
def _(workdir: str) -> Built:
    return Built(json.dumps({"error": {"code": 403, "message": "quota exceeded " * 50}}).encode(), offset=0)


# -- grouping ----------------------------------------------------------------------------------------


@case(
    "duplicate_ext_consecutive",
    "format",
    P,
    message=("second 'jpg' member",),
    behaviour="two d0000.jpg in a row: ShardFormatError naming the member (webdataset raises too)",
)
def _(workdir: str) -> Built:
    head = prefix()
    first = member("d0000.jpg", tiny_jpeg(5))
    return Built(
        head + first + member("d0000.jpg", tiny_jpeg(6)) + good_sample("g0009") + END,
        offset=len(head) + len(first),
        member="d0000.jpg",
    )


@case(
    "duplicate_key_not_consecutive",
    "ok",
    ("k", "m", "k"),
    behaviour="k.jpg, m.jpg, k.cls: three samples, like webdataset",
)
def _(workdir: str) -> Built:
    return Built(member("k.jpg", tiny_jpeg(1)) + member("m.jpg", tiny_jpeg(2)) + member("k.cls", b"1") + END)


@case(
    "keys_with_dots",
    "ok",
    ("a", "dir.v1/s", "UP"),
    behaviour="a.b.c.jpg -> key 'a' ext 'b.c.jpg'; dir.v1/s.seg.png -> key 'dir.v1/s' ext 'seg.png'; "
    "extensions lower-cased (as webdataset)",
)
def _(workdir: str) -> Built:
    return Built(
        member("a.b.c.jpg", b"1")
        + member("a.cls", b"2")
        + member("dir.v1/s.seg.png", b"3")
        + member("dir.v1/s.json", b"{}")
        + member("UP.JPG", b"4")
        + END
    )


@case(
    "hidden_and_meta_names",
    "ok",
    ("__meta__",) + P,
    behaviour=".hidden.jpg, noext, __meta__ and dir/ entries are skipped; __meta__.json is a sample "
    "with key '__meta__' (exactly as webdataset)",
)
def _(workdir: str) -> Built:
    return Built(
        member(".hidden.jpg", b"1")
        + member("noext", b"2")
        + member("__meta__.json", b"{}")
        + member("__meta__", b"{}")
        + header("dir/", 0, b"5")
        + prefix()
        + END
    )


# -- names --------------------------------------------------------------------------------------------


@case(
    "name_dotdot",
    "ok",
    ("../../etc/passwd", "a/../../b"),
    behaviour="'..' in names is just part of the key: nothing is ever written to disk",
)
def _(workdir: str) -> Built:
    return Built(member("../../etc/passwd.jpg", b"1") + member("a/../../b.jpg", b"2") + END)


@case("name_absolute", "ok", ("/etc/shadow",), behaviour="an absolute name is a key like any other")
def _(workdir: str) -> Built:
    return Built(member("/etc/shadow.jpg", b"1") + END)


@case(
    "name_nul_ustar",
    "ok",
    P,
    behaviour="ustar name b'evil\\0.jpg': the name ends at the NUL (as tarfile), so it has no extension and is skipped",
)
def _(workdir: str) -> Built:
    return Built(member(b"evil\0.jpg", b"1") + prefix() + END)


@case(
    "name_nul_pax",
    "ok",
    ("a\0b",),
    behaviour="a pax path 'a\\0b.jpg' keeps its NUL (pax values are length-delimited): key 'a\\x00b'",
)
def _(workdir: str) -> Built:
    return Built(extended(pax_records({"path": "a\0b.jpg"})) + member("placeholder.jpg", b"1") + END)


# -- member types -----------------------------------------------------------------------------------


@case(
    "symlinks_and_hardlinks",
    "ok",
    P,
    behaviour="symlink l0000.jpg and hard link h0000.jpg (with a bogus size 1000) are skipped, "
    "as tarfile/webdataset skip non-regular members; the size of a link is ignored",
)
def _(workdir: str) -> Built:
    return Built(
        header("l0000.jpg", 0, b"2", linkname=b"g0000.jpg")
        + header("h0000.jpg", 1000, b"1", linkname=b"g0000.jpg")
        + prefix()
        + END
    )


@case("device_files", "ok", P, behaviour="char/block devices, FIFO and directory entries are skipped")
def _(workdir: str) -> Built:
    return Built(
        header("c0000.jpg", 0, b"3")
        + header("b0000.jpg", 0, b"4")
        + header("f0000.jpg", 0, b"6")
        + header("d0000", 0, b"5")
        + prefix()
        + END
    )


@case("unknown_typeflag", "ok", P, behaviour="an unknown type 'Q' with a 700-byte payload is skipped over its payload")
def _(workdir: str) -> Built:
    return Built(member("q0000.jpg", b"q" * 700, b"Q") + prefix() + END)


# -- odd but valid -------------------------------------------------------------------------------------


@case("only_end_blocks", "ok", (), behaviour="an empty tar (two zero blocks): no samples, no error")
def _(workdir: str) -> Built:
    return Built(END)


@case("trailing_garbage", "ok", P, behaviour="bytes after the end-of-archive marker are ignored")
def _(workdir: str) -> Built:
    return Built(prefix() + END + random.Random(3).randbytes(5000))


@case(
    "zero_block_midway",
    "ok",
    ("g0000",),
    behaviour="a zero block ends the archive, as for tarfile and GNU tar: later samples are "
    "not read (a lone zero block is indistinguishable from the end marker)",
)
def _(workdir: str) -> Built:
    return Built(good_sample("g0000") + bytes(BLOCK) + good_sample("g0001") + END)


@case("base256_size", "ok", P, behaviour="a valid base-256 size field is read like tarfile reads it")
def _(workdir: str) -> Built:
    payload = b"b" * 700
    return Built(
        good_sample("g0000")
        + header("g0000.bin", size_field=b"\x80" + (700).to_bytes(11, "big"))
        + payload
        + padding(700)
        + good_sample("g0001", 1)
        + END
    )


@case(
    "v7_header_signed_checksum",
    "ok",
    webdataset=False,
    keys=P,
    tarfile="different",
    tarfile_note="tarfile prepends bytes 345-500 as a name prefix even without the POSIX ustar magic",
    behaviour="old v7 headers (no ustar magic: bytes 345-500 are not a name prefix, GNU keeps "
    "atime there) and a signed checksum are accepted",
)
def _(workdir: str) -> Built:
    return Built(
        member("g0000.jpg", tiny_jpeg(0), magic=b"", prefix=b"ignored")
        + member("g0000.\xe9x", b"1", signed_checksum=True)
        + good_sample("g0001", 1)
        + END
    )


@case("pax_global_header", "ok", P, behaviour="a pax global header (as `git archive` writes) is accepted")
def _(workdir: str) -> Built:
    return Built(extended(pax_records({"comment": "0123abcd"}), b"g", b"pax_global_header") + prefix() + END)


# -- samples that decoding rejects ------------------------------------------------------------------------

SK = ("g0000", "b0000", "g0001")


def _bad_between(field_name: str, payload: bytes) -> bytes:
    return (
        good_sample("g0000")
        + member(f"b0000.{field_name}", payload)
        + member("b0000.cls", b"1")
        + good_sample("g0001", 1)
        + END
    )


@case(
    "zero_length_jpg",
    "sample",
    SK,
    bad_keys=("b0000",),
    message=("b0000.jpg",),
    behaviour="a 0-byte b0000.jpg is read as b''; decoding rejects exactly that sample",
)
def _(workdir: str) -> Built:
    return Built(_bad_between("jpg", b""))


@case(
    "corrupt_jpeg",
    "sample",
    SK,
    bad_keys=("b0000",),
    message=("JPEG",),
    behaviour="a JPEG with garbage after its first 200 bytes: SampleError, that sample skipped",
)
def _(workdir: str) -> Built:
    return Built(_bad_between("jpg", tiny_jpeg(9)[:200] + random.Random(1).randbytes(600)))


@case(
    "truncated_jpeg",
    "sample",
    SK,
    bad_keys=("b0000",),
    message=("JPEG", "truncated"),
    behaviour="the first 60% of a JPEG: SampleError ('truncated')",
)
def _(workdir: str) -> Built:
    data = tiny_jpeg(9)
    return Built(_bad_between("jpg", data[: len(data) * 6 // 10]))


@case(
    "corrupt_png",
    "sample",
    SK,
    bad_keys=("b0000",),
    message=("PNG",),
    behaviour="a PNG with a flipped byte in its IDAT: SampleError",
)
def _(workdir: str) -> Built:
    data = bytearray(png_bytes())
    data[60] ^= 0xFF
    return Built(_bad_between("png", bytes(data)))


@case(
    "truncated_png",
    "sample",
    SK,
    bad_keys=("b0000",),
    message=("PNG",),
    behaviour="half a PNG: SampleError ('truncated')",
)
def _(workdir: str) -> Built:
    data = png_bytes()
    return Built(_bad_between("png", data[: len(data) // 2]))


@case(
    "png_decompression_bomb",
    "sample",
    SK,
    bad_keys=("b0000",),
    message=("decompression-bomb",),
    behaviour="a 12000x12000 single-colour PNG (few kB, 432 MB as RGB): refused from its header "
    "before any pixel memory is allocated",
)
def _(workdir: str) -> Built:
    return Built(_bad_between("png", png_bomb()))


@case(
    "json_not_json",
    "sample",
    SK,
    bad_keys=("b0000",),
    message=("JSON",),
    behaviour="b0000.json = '{not json': SampleError",
)
def _(workdir: str) -> Built:
    return Built(_bad_between("json", b"{not json"))


@case(
    "cls_not_int",
    "sample",
    SK,
    bad_keys=("b0000",),
    message=("not an integer",),
    behaviour="b0000.cls = 'cat': SampleError",
)
def _(workdir: str) -> Built:
    return Built(
        good_sample("g0000")
        + member("b0000.cls", b"cat")
        + member("b0000.jpg", tiny_jpeg(3))
        + good_sample("g0001", 1)
        + END
    )


@case(
    "pickle_pyd",
    "sample",
    SK,
    bad_keys=("b0000",),
    message=("allow_pickle",),
    extra={"pickle": True},
    behaviour="b0000.pyd holds a pickle that would create a marker file: refused "
    "(SampleError) unless allow_pickle=True, and the marker is never created",
)
def _(workdir: str) -> Built:
    return Built(_bad_between("pyd", marker_pickle(workdir)))


@case(
    "pickle_pickle",
    "sample",
    SK,
    bad_keys=("b0000",),
    message=("allow_pickle",),
    extra={"pickle": True},
    behaviour="the same as a .pickle member",
)
def _(workdir: str) -> Built:
    return Built(_bad_between("pickle", marker_pickle(workdir)))


@case(
    "npy_object_array",
    "sample",
    SK,
    bad_keys=("b0000",),
    message=("npy",),
    extra={"pickle": True},
    behaviour="a .npy object array (pickles inside) is refused without allow_pickle",
)
def _(workdir: str) -> Built:
    return Built(_bad_between("npy", marker_npy(workdir)))


def by_name(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)


# --------------------------------------------------------------------------- tarfile's view


def tarfile_view(data: bytes) -> tuple[str, object]:
    """What Python's tarfile makes of ``data``: ("ok", [(name, payload)...]) for the regular
    files, or ("error", "ExcType: message"). Run it in a subprocess for cases that hang."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            out = []
            for info in tf:
                if info.isreg():
                    f = tf.extractfile(info)
                    out.append((info.name, f.read() if f is not None else b""))
            return "ok", out
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return "error", f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------- fuzzing helpers


def _size_of(block: bytes) -> int:
    """Best-effort size of a header block (octal or base-256), 0 when unreadable or negative."""
    field_ = block[124:136]
    if field_[0] & 0x80:
        value = int.from_bytes(field_[1:], "big") - ((1 << 88) if field_[0] == 0xFF else 0)
    else:
        try:
            value = int(field_.split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            value = 0
    return max(value, 0)


def fix_checksums(data: bytes, max_headers: int = 10_000) -> bytes:
    """Recompute the checksum of every header the reader would visit, so mutated archives
    get past the checksum test and exercise the code behind it (sizes, pax, names)."""
    out = bytearray(data)
    pos = 0
    for _ in range(max_headers):
        if pos + BLOCK > len(out):
            break
        block = out[pos : pos + BLOCK]
        if not any(block):
            break
        block[148:156] = b" " * 8
        out[pos + 148 : pos + 156] = b"%06o\0 " % sum(block)
        size = _size_of(bytes(block))
        if block[156:157] in (b"1", b"2", b"3", b"4", b"5", b"6"):
            size = 0
        pos += BLOCK + (-(-size // BLOCK)) * BLOCK
    return bytes(out)


def seed_shards() -> list[bytes]:
    """A few valid shards in the formats the reader meets: ustar, GNU long names, pax
    (long names, global headers), base-256 sizes, links and directories."""
    seeds = [valid_tar(), END, good_samples("s0000") + END]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for i, (name, size) in enumerate(
                [("a.jpg", 10), ("a.cls", 1), ("d" * 90 + "/b.seg.png", 600), ("x" * 120 + ".json", 0), ("b.txt", 1500)]
            ):
                if fmt == tarfile.USTAR_FORMAT and len(name) > 100 and "/" not in name:
                    continue
                info = tarfile.TarInfo(name)
                info.size = size
                tf.addfile(info, io.BytesIO(bytes([65 + i]) * size))
            link = tarfile.TarInfo("l.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
            tf.addfile(link)
            folder = tarfile.TarInfo("dir")
            folder.type = tarfile.DIRTYPE
            tf.addfile(folder)
        seeds.append(buf.getvalue())
    seeds.append(
        extended(pax_records({"comment": "x"}), b"g", b"pax_global_header")
        + extended(pax_records({"path": "p/q.r.jpg", "size": "5"}))
        + member("q.jpg", b"12345")
        + gnu_long_name("L" * 200 + ".cls")
        + member("short", b"7")
        + header("b.bin", size_field=b"\x80" + (700).to_bytes(11, "big"))
        + b"b" * 700
        + padding(700)
        + END
    )
    return seeds


# -- stream shapes and a parse-or-error runner shared by tests/test_fuzz.py and tools/fuzz_tar.py


class Trickle(io.RawIOBase):
    """A non-seekable stream returning at most ``chunk`` bytes per read (7 by default:
    every refill boundary of the reader gets hit)."""

    def __init__(self, data: bytes, chunk: int = 7) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._chunk = chunk

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._chunk, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def memfd(data: bytes):
    """A real file (so the reader memory-maps it) without touching the disk."""
    fd = os.memfd_create("fuzz")
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return os.fdopen(fd, "rb", buffering=0)


def parse_or_error(stream, url: str = "x") -> tuple[list[tuple[int, int, dict]], str | None]:
    """``(samples with offsets, error message or None)``; only ShardFormatError is expected."""
    from shardkit.errors import ShardFormatError
    from shardkit.format.samples import group_members
    from shardkit.format.tar import iter_member_tuples

    out: list[tuple[int, int, dict]] = []
    try:
        for item in group_members(iter_member_tuples(stream, url=url), url=url):
            out.append(item)
    except ShardFormatError as e:
        assert e.url == url and url in str(e)
        return out, str(e)
    finally:
        stream.close()
    return out, None
