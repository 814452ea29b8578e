"""A fast streaming tar parser: (name, payload, offset) for each regular file.

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
"""

from __future__ import annotations

import mmap
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from .errors import ShardFormatError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
# Types whose size field is ignored by tarfile (no payload follows); unknown types
# are skipped over their payload, like tarfile does.
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")
_CHUNK = 1 << 20
# A pax or GNU long-name record larger than this is not a name but an attack or garbage.
MAX_EXTENDED_HEADER = 1 << 20


@dataclass(frozen=True)
class Member:
    """One regular file from the archive.

    ``offset`` is where the member's first header starts (including any pax/GNU
    extended headers in front of it), so seeking there reproduces the member; ``end``
    is the offset just after its padding (where the next header starts).
    """

    name: str
    payload: bytes
    offset: int
    end: int


def _block_ceil(n: int) -> int:
    return (n + BLOCK - 1) & ~(BLOCK - 1)


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
        raise ShardFormatError(f"bad {what} field {bytes(field)!r} in tar header", url=url,
                               offset=offset) from None


def _checksum_ok(header: memoryview, url: str | None, offset: int) -> bool:
    # adler32's low half is 1 + (sum of bytes) mod 65521; a 256-byte half sums to at
    # most 65280, so two adler32 calls give the exact unsigned byte sum in C speed.
    total = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2
    stored_field = header[148:156]
    total -= sum(stored_field)
    total += 8 * 0x20  # the checksum field counts as eight spaces
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
        if length <= 0 or end > len(data) or space >= end or data[end - 1:end] != b"\n":
            raise ShardFormatError("bad pax header record", url=url, offset=offset)
        keyword, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq:
            raise ShardFormatError("bad pax header record (no '=')", url=url, offset=offset)
        records[keyword.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


class _Window:
    """A read window over a stream: ``view(n)`` exposes the next n bytes without copying.

    Backed by an mmap for local files, else a growable buffer refilled with
    ``readinto``. ``pos`` is the absolute byte offset in the archive.
    """

    def __init__(self, stream: BinaryIO, start: int, url: str | None) -> None:
        self.url = url
        self.pos = start
        self._stream = stream
        self._map: mmap.mmap | None = None
        try:
            fileno = stream.fileno()
            self._map = mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)
        except (AttributeError, OSError, ValueError):  # not a real file, or empty
            self._map = None
        if self._map is not None:
            self._buf = memoryview(self._map)
            self._lo = start  # window == whole file; indices are absolute offsets
            self._hi = len(self._map)
            self._base = 0
        else:
            self._raw = bytearray(_CHUNK)
            self._buf = memoryview(self._raw)
            self._lo = self._hi = 0
            self._base = start  # absolute offset of self._raw[0]
        self._eof = self._map is not None

    def close(self) -> None:
        if self._map is not None:
            self._buf.release()
            self._map.close()
            self._map = None

    def _fill(self, n: int) -> bool:
        """Make at least n bytes available at the read position; False at EOF."""
        while self._hi - self._lo < n:
            if self._eof:
                return False
            keep = self._hi - self._lo
            if self._lo:
                self._raw[:keep] = self._raw[self._lo:self._hi]
                self._base += self._lo
                self._lo, self._hi = 0, keep
            if len(self._raw) < n:
                self._buf.release()
                self._raw.extend(bytes(n - len(self._raw)))
                self._buf = memoryview(self._raw)
            got = self._stream.readinto(self._buf[self._hi:])
            if not got:
                self._eof = True
            else:
                self._hi += got
        return True

    def available(self) -> int:
        return self._hi - self._lo

    def view(self, n: int) -> memoryview | None:
        """The next n bytes (not consumed), or None when fewer remain."""
        if self._hi - self._lo < n and not self._fill(n):
            return None
        return self._buf[self._lo:self._lo + n]

    def skip(self, n: int) -> bool:
        """Consume n bytes; False if the stream ended first."""
        if self._map is not None:
            if self._lo + n > self._hi:
                return False
            self._lo += n
            self.pos += n
            return True
        while n:
            if self._lo == self._hi and not self._fill(1):
                return False
            step = min(n, self._hi - self._lo)
            self._lo += step
            self.pos += step
            n -= step
        return True

    def take(self, n: int) -> bytes | None:
        """Consume and return n bytes, or None if the stream ends first."""
        if self._hi - self._lo >= n:
            out = bytes(self._buf[self._lo:self._lo + n])
            self._lo += n
            self.pos += n
            return out
        if self._map is not None:
            return None
        # Large payload: copy what is buffered, read the rest straight into place.
        out = bytearray(n)
        have = self._hi - self._lo
        out[:have] = self._buf[self._lo:self._hi]
        self._lo = self._hi
        view = memoryview(out)
        while have < n:
            got = self._stream.readinto(view[have:])
            if not got:
                self._eof = True
                view.release()
                return None
            have += got
        view.release()
        self.pos += n
        return bytes(out)


def iter_members(stream: BinaryIO, *, url: str | None = None, start: int = 0,
                 stop: int | None = None) -> Iterator[Member]:
    """Yield the regular files of a tar archive read from ``stream``.

    ``start`` is the absolute offset the stream is positioned at (a header boundary; for
    mapped local files the reader seeks there itself), used in error messages and
    :attr:`Member.offset`. With ``stop``, reading ends cleanly at that offset (a header
    boundary taken from an index) instead of at the end-of-archive blocks.
    """
    window = _Window(stream, start, url)
    try:
        yield from _parse(window, url, stop)
    finally:
        window.close()


def _parse(window: _Window, url: str | None, stop: int | None) -> Iterator[Member]:
    global_pax: dict[str, str] = {}
    pax: dict[str, str] = {}
    long_name: str | None = None
    member_start: int | None = None
    while True:
        here = window.pos
        if stop is not None and here >= stop:
            if here > stop or member_start is not None:
                raise ShardFormatError(f"index offset {stop} is not a member boundary",
                                       url=url, offset=here)
            return
        header = window.view(BLOCK)
        if header is None:
            if window.available() == 0 and here == 0:
                raise ShardFormatError("empty file, not a tar archive", url=url, offset=0)
            what = "in a tar header" if window.available() else "before the end-of-archive marker"
            raise ShardFormatError(f"truncated archive: stream ended {what}", url=url, offset=here)
        if header == _ZERO_BLOCK:
            if member_start is not None:
                raise ShardFormatError("end-of-archive marker after an extended header",
                                       url=url, offset=here)
            return
        if not _checksum_ok(header, url, here):
            if here == 0:
                raise ShardFormatError("not a tar archive (bad header checksum at the start; "
                                       f"first bytes {bytes(header[:16])!r})", url=url, offset=0)
            raise ShardFormatError("bad tar header checksum", url=url, offset=here)
        typeflag = bytes(header[156:157])
        size = _number(header[124:136], "size", url, here)
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise ShardFormatError(f"bad pax size {pax['size']!r}", url=url, offset=here) from None
        if size < 0:
            raise ShardFormatError(f"negative member size {size}", url=url, offset=here)
        if member_start is None:
            member_start = here
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > MAX_EXTENDED_HEADER:
                raise ShardFormatError(f"extended header of {size} bytes is implausibly large",
                                       url=url, offset=here)
            window.skip(BLOCK)
            data = window.take(size)
            if data is None or not window.skip(_block_ceil(size) - size):
                raise ShardFormatError("truncated archive: stream ended in an extended header",
                                       url=url, offset=here)
            if typeflag == b"x":
                pax = _parse_pax(data, url, here)
            elif typeflag == b"g":
                global_pax.update(_parse_pax(data, url, here))
                member_start = None  # a global header belongs to no member
            elif typeflag == b"L":
                long_name = _nts(data).decode("utf-8", "surrogateescape")
            continue  # K (long link name) only matters for links, which we skip
        name = pax.get("path", global_pax.get("path"))
        if name is None:
            if long_name is not None:
                name = long_name
            else:
                name = _nts(header[0:100]).decode("utf-8", "surrogateescape")
                prefix = _nts(header[345:500])
                if prefix and header[257:262] == b"ustar" and header[262] == 0:
                    # POSIX ustar only: GNU format keeps atime/ctime in these bytes.
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        is_regular = typeflag in _REGULAR and not (typeflag == b"\0" and name.endswith("/"))
        window.skip(BLOCK)
        start = member_start
        member_start, pax, long_name = None, {}, None
        if is_regular:
            payload = window.take(size)
            if payload is None:
                raise ShardFormatError(
                    f"truncated archive: member of {size} bytes runs past the end of the stream",
                    url=url, offset=here, member=name)
            if not window.skip(_block_ceil(size) - size):
                raise ShardFormatError("truncated archive: stream ended in member padding",
                                       url=url, offset=here, member=name)
            yield Member(name, payload, start, window.pos)
        elif typeflag not in _NO_DATA:
            if not window.skip(_block_ceil(size)):
                raise ShardFormatError(
                    f"truncated archive: member of {size} bytes runs past the end of the stream",
                    url=url, offset=here, member=name)
