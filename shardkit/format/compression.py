"""Compressed shards: recognise gzip, zstd, bzip2 and xz by their magic bytes and
decompress them on the fly, so the tar parser only ever sees a plain tar stream.

The format is taken from the first bytes, never from the file name (a ``.tar`` that is
really gzip reads fine, a ``.tar.gz`` that is really plain tar too). gzip, bzip2 and xz
use the standard library; zstd needs the optional ``zstandard`` package
(``pip install 'shardkit[zstd]'``).

A compressed stream cannot be entered at a byte offset: readers of compressed shards
always start at byte 0 of the file and skip inside the decompressed stream. Offsets in
errors and in :class:`~shardkit.format.tar.Member` refer to the decompressed tar stream.
"""

from __future__ import annotations

import bz2
import lzma
import os
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO

from ..errors import ShardFormatError

#: Compression name -> magic bytes at the start of the file.
MAGIC: dict[str, bytes] = {
    "gzip": b"\x1f\x8b",
    "zstd": b"\x28\xb5\x2f\xfd",
    "bzip2": b"BZh",
    "xz": b"\xfd7zXZ\x00",
}
_SNIFF = 6  # longest magic

#: File name endings of compressed shards (for folder discovery and dataset names only;
#: reading goes by the magic bytes).
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.zst", ".tar.zstd", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
SHARD_SUFFIXES = (".tar",) + COMPRESSED_SUFFIXES

#: The one read size of the format layer (it may not import storage's).
CHUNK = 1 << 20


def _read_to_end(read: Callable[[int], bytes]) -> bytes:
    """Everything ``read`` still gives, chunk by chunk."""
    parts = []
    while chunk := read(CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def compression_of(head: bytes) -> str | None:
    """The compression whose magic ``head`` starts with, or None (plain, or unknown)."""
    for name, magic in MAGIC.items():
        if head.startswith(magic):
            return name
    return None


def is_shard_name(name: str) -> bool:
    """Whether a file name looks like a shard (plain or compressed tar)."""
    return name.lower().endswith(SHARD_SUFFIXES)


def peek_head(stream: BinaryIO) -> tuple[bytes, BinaryIO]:
    """The first bytes of ``stream`` without losing them: returns ``(head, stream)``
    where the returned stream still yields every byte from the start.

    Real files are read with ``pread`` (the position and the mmap fast path of the tar
    reader stay untouched); other streams get the head replayed in front of them.
    """
    try:
        fd = stream.fileno()
        return os.pread(fd, _SNIFF, 0), stream
    except (AttributeError, OSError, ValueError):  # not a real file (BytesIO, HTTP, pipe)
        pass
    head = b""
    while len(head) < _SNIFF:
        more = _read(stream, _SNIFF - len(head))
        if not more:
            break
        head += more
    return head, _Replay(head, stream)  # type: ignore[return-value]  # a file-like, not an IO subclass


def _read(stream: Any, n: int) -> bytes:
    """Up to ``n`` bytes through ``readinto`` (all the tar reader asks of a stream)."""
    buffer = bytearray(n)
    got = stream.readinto(buffer) or 0
    return bytes(buffer[:got])


class _Replay:
    """``head`` followed by the rest of ``stream`` (no ``fileno``: never memory-mapped)."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = memoryview(head)
        self._stream = stream

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            memoryview(buffer)[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._stream.readinto(buffer) or 0  # type: ignore[attr-defined]

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return _read_to_end(self.read)
        if self._head:
            out = bytes(self._head[:n])
            self._head = self._head[len(out) :]
            return out
        return _read(self._stream, n)

    def close(self) -> None:
        self._stream.close()


class _GzipReader:
    """gzip members one after another, straight on zlib (which checks each member's CRC
    and size). Not ``gzip.GzipFile``: its reads re-copy the unconsumed input on every
    call, which measured 6x slower than zlib itself on shard-sized payloads."""

    _INPUT = 1 << 16

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._in_member = False
        self._tail = b""  # input read but not consumed yet

    def readinto1(self, buffer: Any) -> int:
        while True:
            data = self._tail or _read(self._raw, self._INPUT)
            if not data:
                if self._in_member:
                    raise EOFError("gzip stream ended before the end of its member")
                return 0
            if self._obj.eof:
                if not data.strip(b"\0"):  # zero padding after the last member (tape-style)
                    self._tail = b""
                    continue
                self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = self._obj.decompress(data, len(buffer))  # bounded: a bomb cannot balloon
            self._in_member = not self._obj.eof
            self._tail = self._obj.unused_data if self._obj.eof else self._obj.unconsumed_tail
            if out:
                memoryview(buffer)[: len(out)] = out
                return len(out)

    def close(self) -> None:
        self._tail = b""


def _zstd_reader(stream: BinaryIO, url: str | None) -> _ZstdReader:
    try:
        import zstandard
    except ImportError:
        raise ShardFormatError(
            "it is zstd-compressed; reading .tar.zst shards needs the zstandard package: pip install 'shardkit[zstd]'",
            url=url,
            offset=0,
        ) from None
    return _ZstdReader(stream, zstandard.ZstdDecompressor())


class _ZstdReader:
    """zstd frames one after another (the CLI and multi-threaded writers may emit several).

    Not zstandard's ``stream_reader``: it reads a stream cut short as a clean end. Input
    goes in small chunks so one call's output stays bounded (a block of 128 KiB can
    come from 4 bytes).
    """

    _INPUT = 8192

    def __init__(self, raw: BinaryIO, decompressor: Any) -> None:
        self._raw = raw
        self._decompressor = decompressor
        self._obj = decompressor.decompressobj()
        self._in_frame = False  # fed bytes to a frame that has not ended yet
        self._pending = memoryview(b"")

    def readinto1(self, buffer: Any) -> int:
        while not self._pending:
            data = _read(self._raw, self._INPUT)
            if not data:
                if self._in_frame:
                    raise EOFError("zstd stream ended before the end of its frame")
                return 0
            out = []
            while data:
                if self._obj.eof:
                    self._obj = self._decompressor.decompressobj()
                out.append(self._obj.decompress(data))
                self._in_frame = not self._obj.eof
                data = self._obj.unused_data if self._obj.eof else b""
            self._pending = memoryview(b"".join(out))
        n = min(len(buffer), len(self._pending))
        memoryview(buffer)[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._pending = memoryview(b"")


def _errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error, lzma.LZMAError, ValueError]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


class Decompressed:
    """A decompressing read-only stream over a compressed shard, with shardkit errors.

    A compressed stream that ends early reads as end-of-stream (so the tar parser reports
    *where* in the archive it was cut, naming the member); corrupt compressed data raises
    :class:`~shardkit.errors.ShardFormatError` naming the URL. No ``fileno``: the tar
    reader must never memory-map the compressed file.
    """

    def __init__(self, stream: BinaryIO, compression: str, *, url: str | None = None) -> None:
        self.compression = compression
        self.url = url
        self.truncated = False
        self._raw = stream
        self._errors = _errors()
        if compression == "gzip":
            self._inner: Any = _GzipReader(stream)
        elif compression == "bzip2":
            self._inner = bz2.BZ2File(stream, mode="rb")
        elif compression == "xz":
            self._inner = lzma.LZMAFile(stream, mode="rb")
        elif compression == "zstd":
            self._inner = _zstd_reader(stream, url)
        else:
            raise ValueError(f"unknown compression {compression!r}")
        self.position = 0  # decompressed bytes handed out so far

    def readinto(self, buffer: Any) -> int:
        try:
            # readinto1, not readinto: a buffered readinto that hits the cut loses the
            # bytes it had already decompressed into the buffer.
            n = self._inner.readinto1(buffer) or 0
        except EOFError:  # gzip/bz2/xz: "ended before the end-of-stream marker"
            self.truncated = True
            return 0
        except self._errors as e:
            if _is_truncation(e):
                self.truncated = True
                return 0
            detail = f"{type(e).__name__}: {e}"
            if "incorrect data check" in detail or "incorrect length check" in detail:
                detail = f"CRC/size check of the gzip trailer failed ({detail})"
            raise ShardFormatError(
                f"corrupt {self.compression} data: {detail}", url=self.url, offset=self.position
            ) from None
        self.position += n
        return n

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return _read_to_end(self.read)
        buffer = bytearray(n)
        got = self.readinto(buffer)
        return bytes(buffer[:got])

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._raw.close()


def _is_truncation(exc: BaseException) -> bool:
    """zstandard reports a cut stream as an error whose text says so."""
    text = str(exc).lower()
    return "incomplete" in text or "truncated" in text or "premature" in text


def open_decompressed(stream: BinaryIO, *, url: str | None = None) -> BinaryIO | Decompressed:
    """``stream`` itself for a plain tar, else a :class:`Decompressed` over it.

    Only for a stream positioned at byte 0 of the file: a compressed shard has no other
    entry point.
    """
    head, stream = peek_head(stream)
    compression = compression_of(head)
    if compression is None:
        return stream
    return Decompressed(stream, compression, url=url)
