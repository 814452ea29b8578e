"""The vocabulary every byte source shares; imports nothing else from shardkit.

- :class:`SourceOptions`: how remote sources behave (retries, headers, cache...).
- :class:`Backend`: what a URL scheme provides (open at an offset, read a small object,
  list a prefix, optionally upload a file). A backend only knows its own scheme: the
  cache and the choice of backend live in :mod:`shardkit.storage.dispatch`.
- :func:`positioned`: seek a seekable file and bound what can be read from it.

Dependencies point one way (see the README's "How it is built")::

    backend  <-  localfile, remote.stream  <-  remote.http/s3/pipe/fsspec
             <-  cache                     <-  source (picks backend, adds the cache)
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlparse

#: The one read size of the storage layer (copies, hashing, draining a body).
CHUNK = 1 << 20


@dataclass
class SourceOptions:
    """How remote sources behave; local files ignore everything here.

    headers: extra HTTP headers per URL prefix, e.g. ``{"https://host/": {"Authorization": ...}}``.
    retries / timeout / backoff / max_backoff: transient-failure policy for HTTP and S3.
        ``retries`` counts consecutive failures without progress; the wait before retry
        ``n`` is ``backoff * 2**(n-1)`` seconds (with jitter) up to ``max_backoff``; a
        server's ``Retry-After`` (seconds or an HTTP date) is waited for, up to
        ``max_backoff`` too. ``timeout`` bounds each connect and each wait for bytes.
    cache_dir / cache_size: keep downloaded shards on local disk (bounded, LRU); every
        non-local scheme (http, s3, pipe, fsspec) goes through it when set.
    read_ahead: with a cache, download this many of a worker's upcoming shards in the
        background while it reads the current one (needs ``cache_dir``).
    allow_pipe: permit ``pipe:CMD`` URLs (they run a shell command).
    """

    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    retries: int = 8
    timeout: float = 60.0
    backoff: float = 0.5
    max_backoff: float = 30.0
    cache_dir: str | None = None
    cache_size: int | str | None = None
    read_ahead: int = 0
    allow_pipe: bool = False

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(f"backoff and max_backoff must be >= 0, got {self.backoff} and {self.max_backoff}")
        if self.read_ahead < 0:
            raise ValueError(f"read_ahead must be >= 0, got {self.read_ahead}")
        if self.read_ahead and not self.cache_dir:
            raise ValueError("read_ahead downloads upcoming shards into the cache: it needs cache_dir")


DEFAULT_OPTIONS = SourceOptions()


def merge_source_options(
    given: SourceOptions | None,
    *,
    cache_dir: str | None,
    cache_size: int | str | None,
    headers: dict[str, dict[str, str]] | None,
    allow_pipe: bool,
) -> SourceOptions:
    """The options of a dataset given either as keyword arguments or as one ``given``
    SourceOptions (never both for the same option). ``given`` is copied, never modified."""
    if given is None:
        return SourceOptions(
            cache_dir=cache_dir, cache_size=cache_size, headers=dict(headers or {}), allow_pipe=allow_pipe
        )
    clashes = [
        name
        for name, value in (
            ("cache_dir", cache_dir),
            ("cache_size", cache_size),
            ("headers", headers),
            ("allow_pipe", allow_pipe),
        )
        if value
    ]
    if clashes:
        raise ValueError(f"pass {', '.join(clashes)} inside source_options, not beside it")
    return dataclasses.replace(given, headers=dict(given.headers))


class OpenStream(Protocol):
    def __call__(
        self, url: str, offset: int = 0, length: int | None = None, options: SourceOptions = ...
    ) -> BinaryIO: ...


@dataclass(frozen=True)
class Backend:
    """One URL scheme's operations. ``open_stream`` returns a stream positioned at
    ``offset`` that yields ``length`` bytes (or to the end); ``read_bytes`` returns a whole
    small object or ``None`` when it does not exist; ``list_prefix`` the URLs directly
    below a folder/prefix; ``put_file`` uploads a finished local file (None: read-only)."""

    open_stream: OpenStream
    read_bytes: Callable[..., bytes | None]
    list_prefix: Callable[..., list[str]]
    put_file: Callable[..., None] | None = None
    remote: bool = True  # False only for local files, which are never cached


def scheme_of(url: str) -> str:
    """'' for local paths, else the lower-case URL scheme ('http', 's3', 'pipe', ...)."""
    if url.startswith("pipe:"):
        return "pipe"
    parsed = urlparse(url)
    # A one-letter scheme is a Windows drive letter, not a URL scheme.
    if len(parsed.scheme) <= 1:
        return ""
    return parsed.scheme.lower()


def local_path(url: str) -> str | None:
    """The filesystem path for a local URL (plain path or file://), else None."""
    scheme = scheme_of(url)
    if scheme == "":
        return url
    if scheme == "file":
        return unquote(urlparse(url).path)
    return None


class ChunkStream(io.RawIOBase):
    """The file-object surface of a read-only stream built on ``_chunk(size)`` (up to
    ``size`` bytes, at least one unless at the end) and a position ``_pos``."""

    _pos = 0

    def _chunk(self, size: int) -> bytes:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        return self._chunk(size)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._chunk(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        parts: list[bytes] = []
        while data := self._chunk(CHUNK):
            parts.append(data)
        return b"".join(parts)

    def tell(self) -> int:
        return self._pos


class _BoundedReader(io.RawIOBase):
    """Expose at most ``length`` bytes of a file, from its current position."""

    def __init__(self, raw: BinaryIO, length: int) -> None:
        self._raw = raw
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer)
        if len(view) > self._left:
            view = view[: self._left]
        n = self._raw.readinto(view)  # type: ignore[attr-defined]  # typeshed's BinaryIO lacks readinto
        self._left -= n or 0
        return n or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


def positioned(f: BinaryIO, offset: int = 0, length: int | None = None) -> BinaryIO:
    """Seek a seekable file to ``offset`` and expose at most ``length`` bytes from there."""
    if offset:
        f.seek(offset)
    if length is not None:
        return _BoundedReader(f, length)  # type: ignore[return-value]
    return f


def copy_to_file(src: BinaryIO, path: str) -> int:
    """Copy a stream into a new file at ``path``; returns the byte count."""
    n = 0
    with open(path, "wb") as dst:
        while True:
            data = src.read(CHUNK)
            if not data:
                return n
            dst.write(data)
            n += len(data)
