"""What the HTTP, S3 and pipe streams share: the file-object surface over ``_chunk``."""

from __future__ import annotations

import io
from typing import Any, BinaryIO, Callable

from ..source import SourceOptions

CHUNK = 1 << 20


class ChunkStream(io.RawIOBase):
    """A readable binary stream; subclasses implement ``_chunk(size)`` (up to ``size``
    bytes, at least one unless at the end, ``b""`` at the end) and keep ``_pos``."""

    _pos = 0

    def _chunk(self, size: int) -> bytes:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        if size is None or size < 0:
            return self.readall()
        return self._chunk(size)

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self._chunk(len(view))
        view[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        parts = []
        while True:
            data = self._chunk(CHUNK)
            if not data:
                return b"".join(parts)
            parts.append(data)

    def tell(self) -> int:
        return self._pos


def open_maybe_cached(stream: Callable[[str, int, int | None, SourceOptions], BinaryIO], url: str,
                      offset: int, length: int | None, options: SourceOptions,
                      expected_sha256: str | None) -> BinaryIO:
    """With ``options.cache_dir`` the whole object is downloaded once into the local
    :class:`~shardkit.cache.ShardCache` (verified against ``expected_sha256`` if given)
    and the range is served from the cached file; otherwise stream it directly."""
    if options.cache_dir:
        from ..cache import open_cached

        return open_cached(url, offset, length, options, expected_sha256=expected_sha256)
    return stream(url, offset, length, options)
