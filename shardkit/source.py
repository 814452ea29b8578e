"""Open a shard URL as a readable byte stream: one scheme table for every backend.

Schemes: local paths and ``file://`` (here), ``http(s)://`` and ``s3://``
(:mod:`shardkit.remote`), other fsspec schemes when fsspec is installed, and ``pipe:``
only when the caller passes ``allow_pipe=True``.

Every backend provides the same three calls, so the reader never cares where bytes
come from:

- ``open_stream(url, offset=0, length=None, options=...)``: a binary file-like object
  positioned at ``offset`` that yields ``length`` bytes (or to the end);
- ``read_bytes(url, options=...)``: a whole small object (manifest, index), or ``None``
  when it does not exist;
- ``list_prefix(url, options=...)``: URLs of the objects directly below a folder/prefix.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import BinaryIO, Callable
from urllib.parse import unquote, urlparse

from .errors import SourceError


@dataclass
class SourceOptions:
    """How remote sources behave; local files ignore everything here.

    headers: extra HTTP headers per URL prefix, e.g. ``{"https://host/": {"Authorization": ...}}``.
    retries / timeout / backoff: transient-failure policy for HTTP and S3.
    cache_dir / cache_size: keep downloaded shards on local disk (bounded, LRU).
    allow_pipe: permit ``pipe:CMD`` URLs (they run a shell command).
    """

    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    retries: int = 8
    timeout: float = 60.0
    backoff: float = 0.5
    cache_dir: str | None = None
    cache_size: int | str | None = None
    read_ahead: int = 0
    allow_pipe: bool = False


DEFAULT_OPTIONS = SourceOptions()


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


class _BoundedReader(io.RawIOBase):
    """Expose at most ``length`` bytes of a file, from its current position."""

    def __init__(self, raw: BinaryIO, length: int) -> None:
        self._raw = raw
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        view = memoryview(buffer)
        if len(view) > self._left:
            view = view[: self._left]
        n = self._raw.readinto(view)
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


def _open_local(url: str, offset: int = 0, length: int | None = None,
                options: SourceOptions = DEFAULT_OPTIONS) -> BinaryIO:
    path = local_path(url)
    assert path is not None
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise SourceError("no such file", url=url) from None
    except IsADirectoryError:
        raise SourceError("is a directory, not a shard", url=url) from None
    except OSError as e:
        raise SourceError(f"cannot open: {e.strerror}", url=url) from None
    return positioned(f, offset, length)  # type: ignore[arg-type]


def _read_local(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> bytes | None:
    path = local_path(url)
    assert path is not None
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SourceError(f"cannot read: {e.strerror}", url=url) from None


def _list_local(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> list[str]:
    path = local_path(url)
    assert path is not None
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise SourceError(f"cannot list folder: {e.strerror}", url=url) from None
    return [os.path.join(path, n) for n in names]


@dataclass(frozen=True)
class Backend:
    open_stream: Callable[..., BinaryIO]
    read_bytes: Callable[..., bytes | None]
    list_prefix: Callable[..., list[str]]
    put_file: Callable[..., None] | None = None  # upload a finished local file


_LOCAL = Backend(_open_local, _read_local, _list_local)


def _backend(url: str, options: SourceOptions) -> Backend:
    scheme = scheme_of(url)
    if scheme in ("", "file"):
        return _LOCAL
    if scheme in ("http", "https", "s3"):
        try:
            if scheme == "s3":
                from .remote import s3 as module
            else:
                from .remote import http as module
        except ImportError as e:
            raise SourceError(f"{scheme}:// URLs need {e.name!r}: pip install 'shardkit[remote]'",
                              url=url) from None
        return module.BACKEND
    if scheme == "pipe":
        if not options.allow_pipe:
            raise SourceError("pipe: URLs run a shell command; pass allow_pipe=True to permit it",
                              url=url)
        from .remote import pipe

        return pipe.BACKEND
    try:
        from .remote import fsspec_backend
    except ImportError:
        raise SourceError(f"unsupported URL scheme {scheme!r} (install fsspec for gs://, az://, hf://...)",
                          url=url) from None
    return fsspec_backend.BACKEND


def open_stream(url: str, *, offset: int = 0, length: int | None = None,
                options: SourceOptions = DEFAULT_OPTIONS, expected_sha256: str | None = None) -> BinaryIO:
    """Open ``url`` for reading from byte ``offset``, at most ``length`` bytes.

    ``expected_sha256`` (from a manifest) is checked when a remote shard is downloaded
    whole into the cache.
    """
    backend = _backend(url, options)
    if expected_sha256 is not None and backend is not _LOCAL and options.cache_dir:
        return backend.open_stream(url, offset=offset, length=length, options=options,
                                   expected_sha256=expected_sha256)
    return backend.open_stream(url, offset=offset, length=length, options=options)


def put_file(local: str, url: str, *, options: SourceOptions = DEFAULT_OPTIONS) -> None:
    """Upload a finished local file to ``url`` (S3 or an HTTP server accepting PUT)."""
    backend = _backend(url, options)
    if backend.put_file is None:
        raise SourceError("this URL scheme does not support writing", url=url)
    backend.put_file(local, url, options=options)


def read_bytes(url: str, *, options: SourceOptions = DEFAULT_OPTIONS) -> bytes | None:
    """Read a whole (small) object; ``None`` when it does not exist."""
    return _backend(url, options).read_bytes(url, options=options)


def list_prefix(url: str, *, options: SourceOptions = DEFAULT_OPTIONS) -> list[str]:
    """URLs of the entries directly below a folder or object-store prefix, sorted."""
    return _backend(url, options).list_prefix(url, options=options)


def join_url(base: str, name: str) -> str:
    """Resolve ``name`` (a shard file name from a manifest) against the manifest's folder URL."""
    if scheme_of(name) or os.path.isabs(name):
        return name
    if scheme_of(base) in ("", "file"):
        return os.path.join(os.path.dirname(local_path(base) or base), name)
    return base.rsplit("/", 1)[0] + "/" + name
