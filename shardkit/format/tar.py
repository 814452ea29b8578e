"""The tar format both ways: a fast streaming parser and the header encoder.

Reading: :func:`iter_members` yields (name, payload, offset, end) for each regular file.

Python's ``tarfile`` builds a TarInfo object per member and reads headers with small
reads; on shards of small images that overhead dominates. This parser reads the stream
in big chunks into one buffer and slices headers out of it with memoryviews; payloads
bigger than what is buffered are read straight into their own buffer. Local files are
memory-mapped, so no read syscalls happen at all.

Supported: ustar (with the 155-byte prefix), GNU long names/links (``L``/``K``), pax
extended headers (``x`` per member, ``g`` global; ``path`` and ``size`` honoured),
base-256 numbers, the old signed-checksum variant. Directories, links, devices and FIFOs
are skipped. The archive ends at the first zero block; a stream that ends anywhere else
(mid-header, mid-payload, or without end-of-archive blocks) is truncated and raises
:class:`ShardFormatError` naming the URL and byte offset. Python's ``tarfile`` is the
correctness oracle in the tests.

Writing: :func:`member_header` encodes the header block(s) for one regular file (ustar
when the name fits, pax otherwise), with fixed mtime/uid/gid/mode so output is
deterministic; :data:`END_BLOCKS` ends an archive. Both directions share
:data:`BLOCK` and :func:`header_checksum`.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from ..errors import ShardFormatError
from .compression import CHUNK, Decompressed, open_decompressed

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
END_BLOCKS = bytes(2 * BLOCK)  # end-of-archive marker
_MAX_OCTAL_SIZE = 8**11 - 1  # largest size the 12-byte octal field holds; pax beyond
_REGULAR = (b"0", b"\0", b"7")
# Types whose size field is ignored by tarfile (no payload follows); unknown types
# are skipped over their payload, like tarfile does.
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")
_EXTENDED = (b"x", b"g", b"L", b"K")
_MAX_STEP = 1 << 26  # largest single allocation while reading a big payload from a stream
# A pax or GNU long-name record larger than this is not a name but an attack or garbage.
MAX_EXTENDED_HEADER = 1 << 20


class Member(NamedTuple):
    """One regular file from the archive.

    ``offset`` is where the member's first header starts (including any pax/GNU
    extended headers in front of it), so seeking there reproduces the member; ``end``
    is the offset just after its padding (where the next header starts).
    """

    name: str
    payload: bytes
    offset: int
    end: int


def _nts(field: memoryview | bytes) -> bytes:
    raw = bytes(field)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _number(field: memoryview, what: str, url: str | None, offset: int) -> int:
    """Parse an octal or base-256 numeric header field."""
    first = field[0]
    if first in (0x80, 0xFF):
        # base-256 (GNU/star): big-endian two's complement, first byte is the marker.
        value = int.from_bytes(bytes(field[1:]), "big")
        if first == 0xFF:
            value -= 1 << (8 * (len(field) - 1))
        return value
    text = _nts(field).strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ShardFormatError(f"bad {what} field {bytes(field)!r} in tar header", url=url, offset=offset) from None


def header_checksum(header: bytes | bytearray | memoryview) -> int:
    """The ustar checksum of a 512-byte header: the unsigned sum of its bytes, with the
    checksum field (bytes 148-155) counted as eight spaces whatever it holds."""
    # adler32's low half is 1 + (sum of bytes) mod 65521; a 256-byte half sums to at
    # most 65280, so two adler32 calls give the exact unsigned byte sum in C speed.
    total = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2
    return total - sum(header[148:156]) + 8 * 0x20


def _checksum_ok(header: memoryview, url: str | None, offset: int) -> bool:
    """Slow path: odd checksum field layouts and the old signed-char variant."""
    total = header_checksum(header)
    stored_field = header[148:156]
    text = _nts(stored_field).strip(b" \0")
    try:
        stored = int(text, 8) if text else -1
    except ValueError:
        return False
    if stored == total:
        return True
    # Some old tars summed signed chars.
    signed = total - 256 * sum(1 for b in bytes(header) if b >= 128)
    signed += 256 * sum(1 for b in bytes(stored_field) if b >= 128)
    return stored == signed


# Compressed shards are decompressed before parsing (shardkit.format.compression), so these
# magics at offset 0 of the *tar* stream mean the data was compressed twice.
_TWICE = "; the shard was compressed twice: decompress the outer layer"
_MAGIC = (
    (b"\x1f\x8b", "it is gzip-compressed inside the decompressed stream" + _TWICE),
    (b"BZh", "it is bzip2-compressed inside the decompressed stream" + _TWICE),
    (b"\xfd7zXZ\x00", "it is xz-compressed inside the decompressed stream" + _TWICE),
    (b"\x28\xb5\x2f\xfd", "it is zstd-compressed inside the decompressed stream" + _TWICE),
    (b"PK\x03\x04", "it is a zip file, not a tar"),
    (b"PK\x05\x06", "it is an (empty) zip file, not a tar"),
)


def _sniff(first: bytes) -> str | None:
    """What a stream that is not a tar looks like (for the error message), if recognisable."""
    for magic, what in _MAGIC:
        if first.startswith(magic):
            return what
    text = first.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")):
        return "it looks like an HTML/XML document (an error page served instead of the shard?)"
    if text.startswith(b"{") and b'"' in text[:64]:
        return "it looks like JSON (an error response served instead of the shard?)"
    return None


def _not_a_tar(first: bytes, url: str | None) -> ShardFormatError:
    """The error for a stream whose first block is not a tar header (error path only)."""
    if not first:
        return ShardFormatError("empty file, not a tar archive", url=url, offset=0)
    what = _sniff(first)
    if what is not None:
        return ShardFormatError(f"not a tar archive: {what} (first bytes {first[:16]!r})", url=url, offset=0)
    if len(first) < BLOCK:
        return ShardFormatError(
            f"truncated archive: stream ended in the first tar header (only "
            f"{len(first)} bytes; first bytes {first[:16]!r})",
            url=url,
            offset=0,
        )
    return ShardFormatError(
        f"not a tar archive (bad header checksum at the start; first bytes {first[:16]!r})", url=url, offset=0
    )


def _parse_pax(data: bytes, url: str | None, offset: int) -> dict[str, str]:
    """Parse pax records ``"%d %s=%s\\n"``; malformed records raise."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # trailing NUL padding
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise ShardFormatError("bad pax header record (no length)", url=url, offset=offset)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ShardFormatError("bad pax header record length", url=url, offset=offset) from None
        end = pos + length
        if length <= 0 or end > len(data) or space >= end or data[end - 1 : end] != b"\n":
            raise ShardFormatError("bad pax header record", url=url, offset=offset)
        keyword, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise ShardFormatError("bad pax header record (no '=')", url=url, offset=offset)
        records[keyword.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


# name, size, chksum, typeflag, magic, prefix (everything else is ignored)
_HEADER = struct.Struct("100s24x12s12x8s1s100x6s2x80x155s12x")


class _Window:
    """A read window over a stream: ``buf[lo:hi]`` holds the next unread bytes.

    Backed by an mmap for local files (the window is the whole file), else by a buffer
    refilled with ``readinto``. ``base`` is the absolute offset of ``buf[0]``. The
    parser reads ``buf/lo/hi`` directly on its fast path and calls ``fill`` only when
    a header or payload is not fully buffered.
    """

    def __init__(self, stream: BinaryIO, start: int) -> None:
        self._stream = stream
        self._map: mmap.mmap | None = None
        try:
            self._map = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
        except (AttributeError, OSError, ValueError):  # not a real file, or empty
            self._map = None
        if self._map is not None:
            self.buf = memoryview(self._map)
            self.base, self.lo, self.hi = 0, start, len(self._map)
            self.eof = True
        else:
            self._raw = bytearray(CHUNK)
            self.buf = memoryview(self._raw)
            self.base, self.lo, self.hi = start, 0, 0
            self.eof = False

    def close(self) -> None:
        try:
            self.buf.release()
            if self._map is not None:
                self._map.close()
        except BufferError:  # a header view is still alive; the GC will unmap it
            pass
        self._map = None

    def fill(self, n: int) -> bool:
        """Make at least n (<= buffer size) bytes available from ``lo``; False at EOF."""
        while self.hi - self.lo < n:
            if self.eof:
                return False
            keep = self.hi - self.lo
            if self.lo:
                self._raw[:keep] = self._raw[self.lo : self.hi]
                self.base += self.lo
                self.lo, self.hi = 0, keep
            got = self._stream.readinto(self.buf[self.hi :])  # type: ignore[attr-defined]
            if not got:
                self.eof = True
            else:
                self.hi += got
        return True

    def skip(self, n: int) -> bool:
        """Consume n bytes; False if the stream ended first."""
        while n:
            if self.lo == self.hi and not self.fill(1):
                return False
            step = min(n, self.hi - self.lo)
            self.lo += step
            n -= step
        return True

    def take(self, n: int) -> bytes | None:
        """Consume and return n bytes, or None if the stream ends first."""
        if self.hi - self.lo >= n:
            out = bytes(self.buf[self.lo : self.lo + n])
            self.lo += n
            return out
        if self.eof:
            return None
        # Large payload: copy what is buffered, read the rest straight into chunks that
        # double as data arrives. Never bytearray(n) up front: n is what the header
        # claims, and a corrupt size (up to 2**88 in base-256) must end as a truncated
        # archive, not as MemoryError/OverflowError or gigabytes zeroed for a 1 kB stream.
        parts: list[bytes | bytearray] = [bytes(self.buf[self.lo : self.hi])]
        left = n - (self.hi - self.lo)
        self.base += self.hi
        self.lo = self.hi = 0
        step = CHUNK
        while left:
            part = bytearray(min(left, step))
            view = memoryview(part)
            try:
                have = 0
                while have < len(part):
                    got = self._stream.readinto(view[have:])  # type: ignore[attr-defined]
                    if not got:
                        self.eof = True
                        return None
                    have += got
                    self.base += got
            finally:
                view.release()
            parts.append(part)
            left -= len(part)
            step = min(2 * step, _MAX_STEP)
        return b"".join(parts)


def iter_members(
    stream: BinaryIO, *, url: str | None = None, start: int = 0, stop: int | None = None
) -> Iterator[Member]:
    """Yield the regular files of a tar archive read from ``stream``.

    ``start`` is the absolute offset the stream is positioned at (a header boundary; for
    mapped local files the reader seeks there itself), used in error messages and
    :attr:`Member.offset`. With ``stop``, reading ends cleanly at that offset (a header
    boundary taken from an index) instead of at the end-of-archive blocks.
    """
    yield from map(Member._make, iter_member_tuples(stream, url=url, start=start, stop=stop))


def iter_member_tuples(
    stream: BinaryIO, *, url: str | None = None, start: int = 0, stop: int | None = None
) -> Iterator[tuple[str, bytes, int, int]]:
    """:func:`iter_members` yielding plain ``(name, payload, offset, end)`` tuples (faster).

    A stream read from its start (``start=0``) may be gzip/zstd/bzip2/xz-compressed
    (recognised by its magic bytes, see :mod:`shardkit.format.compression`); offsets then refer
    to the decompressed tar stream. Closing the stream stays the caller's job.
    """
    if start == 0:
        stream = open_decompressed(stream, url=url)  # type: ignore[assignment]
    window = _Window(stream, start)
    try:
        if not isinstance(stream, Decompressed):
            yield from _parse(window, url, stop)
            return
        try:
            yield from _parse(window, url, stop)
            # Read to the end of the compressed stream: its checksum (gzip CRC, xz check)
            # is verified there, and a shard that is cut short or damaged must not pass.
            while stream.read(CHUNK):
                pass
            if stream.truncated:
                raise ShardFormatError(
                    "truncated archive: the compressed stream ends before its end marker",
                    url=url,
                    offset=stream.position,
                )
        except ShardFormatError as e:
            raise _in_compressed(e, stream) from None
    finally:
        window.close()


def _in_compressed(error: ShardFormatError, stream: Decompressed) -> ShardFormatError:
    """Say that offsets are in the decompressed stream, and when the compressed data was cut."""
    if error.offset is None:
        return error
    note = f" (offset in the decompressed {stream.compression} stream"
    note += "; the compressed file itself is cut short)" if stream.truncated else ")"
    reason = error.reason
    if stream.truncated and not reason.startswith("truncated"):
        reason = "truncated archive: " + reason  # e.g. "empty file": cut before the first whole block
    return ShardFormatError(reason + note, url=error.url, offset=error.offset, member=error.member)


def _size(field: bytes, pax: dict[str, str], url: str | None, here: int) -> int:
    if "size" in pax:
        try:
            size = int(pax["size"])
        except ValueError:
            raise ShardFormatError(f"bad pax size {pax['size']!r}", url=url, offset=here) from None
    elif field[0] & 0x80:
        size = _number(memoryview(field), "size", url, here)
    else:
        try:
            size = int(field.rstrip(b"\0 ") or b"0", 8)
        except ValueError:  # e.g. bytes after the NUL terminator: read it as tarfile does
            size = _number(memoryview(field), "size", url, here)
    if size < 0:
        raise ShardFormatError(f"negative member size {size}", url=url, offset=here)
    return size


def _cut_header(partial: bytes, long_name: str | None, url: str | None, here: int) -> ShardFormatError:
    """The error for a stream that ends inside a header, naming the member when the bytes
    that arrived prove its name: a reader can then tell that the sample before it is whole."""
    message = "truncated archive: stream ended in a tar header"
    if len(partial) <= 156 or partial[156:157] not in _REGULAR:
        return ShardFormatError(message, url=url, offset=here)  # no type flag yet, or an extended header
    dir_unknown = False
    if long_name is not None:
        name = long_name
    else:
        name = _nts(partial[:100]).decode("utf-8", "surrogateescape")
        prefix = partial[345:500]
        if len(partial) >= 500 and partial[257:263] == b"ustar\0" and prefix[:1] != b"\0":
            name = _nts(prefix).decode("utf-8", "surrogateescape") + "/" + name
        elif not (len(partial) >= 263 and partial[257:263] != b"ustar\0") and not (
            len(partial) > 345 and not prefix[0]
        ):
            dir_unknown = True  # a POSIX prefix (a directory) may precede the name
    error = ShardFormatError(message, url=url, offset=here, member=name)
    error.member_dir_unknown = dir_unknown
    return error


def _parse(w: _Window, url: str | None, stop: int | None) -> Iterator[tuple[str, bytes, int, int]]:
    global_pax: dict[str, str] = {}
    pax: dict[str, str] = {}
    long_name: str | None = None
    member_start: int | None = None
    unpack = _HEADER.unpack_from
    checksum = header_checksum
    while True:
        here = w.base + w.lo
        if stop is not None and here >= stop:
            if here > stop or member_start is not None:
                raise ShardFormatError(f"index offset {stop} is not a member boundary", url=url, offset=here)
            return
        if w.hi - w.lo < BLOCK and not w.fill(BLOCK):
            if here == 0:
                raise _not_a_tar(bytes(w.buf[w.lo : w.hi]), url)
            if w.hi == w.lo:
                raise ShardFormatError(
                    "truncated archive: stream ended before the end-of-archive marker", url=url, offset=here
                )
            raise _cut_header(
                bytes(w.buf[w.lo : w.hi]), pax.get("path") or global_pax.get("path") or long_name, url, here
            )
        lo = w.lo
        buf = w.buf
        header = buf[lo : lo + BLOCK]
        if not buf[lo] and header == _ZERO_BLOCK:  # a name never starts with NUL
            if member_start is not None:
                raise ShardFormatError("end-of-archive marker after an extended header", url=url, offset=here)
            return
        raw_name, size_field, chksum, typeflag, magic, prefix = unpack(buf, lo)
        # The field as this module writes it (and GNU tar, Python's tarfile); the slow
        # path handles other layouts of the field and the old signed variant.
        if chksum != b"%06o\0 " % checksum(header) and not _checksum_ok(header, url, here):
            if here == 0:
                raise _not_a_tar(bytes(header), url)
            raise ShardFormatError("bad tar header checksum", url=url, offset=here)
        size = _size(size_field, pax, url, here)
        if member_start is None:
            member_start = here
        w.lo = lo + BLOCK
        padded = (size + BLOCK - 1) & ~(BLOCK - 1)
        if typeflag in _EXTENDED:
            if size > MAX_EXTENDED_HEADER:
                raise ShardFormatError(f"extended header of {size} bytes is implausibly large", url=url, offset=here)
            data = w.take(size)
            if data is None or not w.skip(padded - size):
                raise ShardFormatError("truncated archive: stream ended in an extended header", url=url, offset=here)
            if typeflag == b"x":
                pax = _parse_pax(data, url, here)
            elif typeflag == b"g":
                global_pax.update(_parse_pax(data, url, here))
                member_start = None  # a global header belongs to no member
            elif typeflag == b"L":
                long_name = _nts(data).decode("utf-8", "surrogateescape")
            continue  # K (long link name) only matters for links, which we skip
        if "path" in pax or "path" in global_pax:
            name = pax["path"] if "path" in pax else global_pax["path"]
        elif long_name is not None:
            name = long_name
        else:
            end = raw_name.find(b"\0")
            name = (raw_name if end < 0 else raw_name[:end]).decode("utf-8", "surrogateescape")
            if prefix[0] and magic == b"ustar\0":
                # POSIX ustar only: GNU format keeps atime/ctime in these bytes.
                name = _nts(prefix).decode("utf-8", "surrogateescape") + "/" + name
        start = member_start
        member_start = None
        if pax:
            pax = {}
        long_name = None
        if typeflag in _REGULAR and not (typeflag == b"\0" and name.endswith("/")):
            lo = w.lo
            if w.hi - lo >= padded:  # fast path: the whole payload is buffered
                payload = bytes(w.buf[lo : lo + size])
                w.lo = lo + padded
            else:
                taken = w.take(size)
                if taken is None:
                    raise ShardFormatError(
                        f"truncated archive: member of {size} bytes runs past the end of the stream",
                        url=url,
                        offset=here,
                        member=name,
                    )
                payload = taken
                if not w.skip(padded - size):
                    raise ShardFormatError(
                        "truncated archive: stream ended in member padding", url=url, offset=here, member=name
                    )
            yield name, payload, start, w.base + w.lo
        elif typeflag not in _NO_DATA:
            if not w.skip(padded):
                raise ShardFormatError(
                    f"truncated archive: member of {size} bytes runs past the end of the stream",
                    url=url,
                    offset=here,
                    member=name,
                )


# -- writing ------------------------------------------------------------------------------


def padding(size: int) -> bytes:
    """The zero bytes that pad a payload of ``size`` bytes to a whole block."""
    return _ZERO_BLOCK[: -size % BLOCK]


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _pax_header(records: dict[str, str]) -> bytes:
    body = b""
    for key, value in records.items():
        item = f" {key}={value}\n".encode()
        length = len(item) + 1
        while len(str(length)) + len(item) != length:
            length = len(str(length)) + len(item)
        body += str(length).encode() + item
    return _ustar_header(b"././@PaxHeader", len(body), b"x") + body + padding(len(body))


def _ustar_header(name: bytes, size: int, typeflag: bytes = b"0", magic: bytes = b"ustar\x0000") -> bytes:
    header = bytearray(BLOCK)
    header[0 : len(name)] = name
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = _octal(size, 12) if size <= _MAX_OCTAL_SIZE else _octal(0, 12)
    header[136:148] = b"00000000000\0"  # mtime 0: deterministic output
    header[156:157] = typeflag
    header[257:265] = magic
    header[148:156] = b"%06o\0 " % header_checksum(header)
    return bytes(header)


_GNU_MAGIC = b"ustar  \0"


def _gnu_long_name(raw: bytes) -> bytes:
    """A GNU ``././@LongLink`` record (typeflag L) carrying a name of any length."""
    body = raw + b"\0"
    return _ustar_header(b"././@LongLink", len(body), b"L", _GNU_MAGIC) + body + padding(len(body))


def member_header(name: str, size: int) -> bytes:
    """Tar header block(s) for a regular file.

    A name of up to 100 bytes (UTF-8) fits a ustar header. A longer one goes in a GNU
    long-name record, not in a ustar prefix or a pax header: GNU tar, ``tarfile``,
    webdataset, Hugging Face ``datasets`` and DALI's own tar index all read GNU long
    names, while DALI ignores pax headers and would see only the truncated name. Sizes
    beyond the 12-byte octal field (8 GiB) need a pax ``size`` record.
    """
    raw = name.encode("utf-8")
    head = b""
    if len(raw) > 100:
        head = _gnu_long_name(raw)
        raw = raw[:100]
    if size > _MAX_OCTAL_SIZE:
        return head + _pax_header({"size": str(size)}) + _ustar_header(raw, size)
    return head + _ustar_header(raw, size, magic=_GNU_MAGIC if head else b"ustar\x0000")
