"""Open a shard URL as a readable byte stream: the one place that picks a backend and
puts remote URLs through the cache.

Schemes: local paths and ``file://`` (:mod:`shardkit.storage.localfile`), ``http(s)://`` and
``s3://`` (:mod:`shardkit.storage.remote`), other fsspec schemes when fsspec is installed, and
``pipe:`` only with ``allow_pipe=True``. With ``options.cache_dir`` every non-local URL
is read through :class:`~shardkit.storage.cache.ShardCache`, which downloads the whole object
once with the backend's plain stream; the backends never know the cache exists.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future
from typing import BinaryIO

from ..errors import SourceError
from . import localfile
from .backend import DEFAULT_OPTIONS, Backend, SourceOptions, copy_to_file, local_path, positioned, scheme_of
from .cache import cache_for

log = logging.getLogger(__name__)

__all__ = [
    "SourceOptions",
    "backend_for",
    "join_url",
    "list_prefix",
    "local_path",
    "open_stream",
    "prefetch",
    "put_file",
    "read_bytes",
    "read_optional",
    "scheme_of",
]


def backend_for(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> Backend:
    """The backend of ``url``'s scheme (raises SourceError for unusable schemes)."""
    scheme = scheme_of(url)
    if scheme in ("", "file"):
        return localfile.BACKEND
    if scheme in ("http", "https", "s3"):
        try:
            if scheme == "s3":
                from .remote import s3 as module
            else:
                from .remote import http as module  # type: ignore[no-redef]
        except ImportError as e:
            raise SourceError(f"{scheme}:// URLs need {e.name!r}: pip install 'shardkit[remote]'", url=url) from None
        return module.BACKEND
    if scheme == "pipe":
        if not options.allow_pipe:
            raise SourceError("pipe: URLs run a shell command; pass allow_pipe=True to permit it", url=url)
        from .remote import pipe

        return pipe.BACKEND
    try:
        from .remote import fsspec_backend
    except ImportError:
        raise SourceError(
            f"unsupported URL scheme {scheme!r} (install fsspec for gs://, az://, hf://...)", url=url
        ) from None
    return fsspec_backend.BACKEND


def _fetcher(backend: Backend, options: SourceOptions):  # -> Callable[[str, str], None]
    def fetch(url: str, path: str) -> None:
        with backend.open_stream(url, options=options) as src:
            copy_to_file(src, path)

    return fetch


def open_stream(
    url: str,
    *,
    offset: int = 0,
    length: int | None = None,
    options: SourceOptions = DEFAULT_OPTIONS,
    expected_sha256: str | None = None,
) -> BinaryIO:
    """Open ``url`` for reading from byte ``offset``, at most ``length`` bytes.

    Remote URLs go through the cache when ``options.cache_dir`` is set; the whole object
    is then downloaded once and checked against ``expected_sha256`` (from a manifest) if
    given. Without a cache ``expected_sha256`` is not checked (a range read cannot be).
    """
    backend = backend_for(url, options)
    if not (backend.remote and options.cache_dir):
        return backend.open_stream(url, offset, length, options)
    fetch = _fetcher(backend, options)
    f = cache_for(options).open(url, lambda path: fetch(url, path), expected_sha256=expected_sha256)
    return positioned(f, offset, length)


def prefetch(urls: Sequence[str], options: SourceOptions) -> list[Future]:
    """Download the first ``options.read_ahead`` remote ``urls`` into the cache in the
    background (nothing without a cache or with ``read_ahead=0``). Pass the shards this
    worker reads next; errors surface later, when they are opened."""
    if not options.cache_dir or options.read_ahead <= 0:
        return []
    wanted = [u for u in urls if backend_for(u, options).remote][: options.read_ahead]
    if not wanted:
        return []
    return cache_for(options).prefetch(
        wanted, lambda url, path: _fetcher(backend_for(url, options), options)(url, path)
    )


def put_file(local: str, url: str, *, options: SourceOptions = DEFAULT_OPTIONS) -> None:
    """Upload a finished local file to ``url`` (S3 or an HTTP server accepting PUT)."""
    backend = backend_for(url, options)
    if backend.put_file is None:
        raise SourceError("this URL scheme does not support writing", url=url)
    backend.put_file(local, url, options=options)


def read_bytes(url: str, *, options: SourceOptions = DEFAULT_OPTIONS) -> bytes | None:
    """Read a whole (small) object; ``None`` when it does not exist. Never cached: these
    are indexes and manifests, which may change when a dataset is rewritten."""
    return backend_for(url, options).read_bytes(url, options=options)


def read_optional(url: str, *, options: SourceOptions = DEFAULT_OPTIONS) -> bytes | None:
    """A small object that may be missing (an index or manifest looked for beside the
    shards): ``None`` when it is not found.

    Only "not found" means absent: one that exists but cannot be read (the retries spent
    on 5xx answers or cut connections) raises, naming it. A 401/403 also counts as
    absent, with a warning, because object stores answer 403 for a missing key to
    readers without list permission. ``pipe:`` sidecars are never looked for: a command
    cannot say "not found", and one made up from the user's command is not theirs to run.
    """
    if scheme_of(url) == "pipe":
        return None
    try:
        return read_bytes(url, options=options)
    except SourceError as e:
        if e.status in (401, 403):
            log.warning("%s: %s; going on without it", url, e.reason)
            return None
        raise


def list_prefix(url: str, *, options: SourceOptions = DEFAULT_OPTIONS) -> list[str]:
    """URLs of the entries directly below a folder or object-store prefix, sorted."""
    return backend_for(url, options).list_prefix(url, options=options)


def join_url(base: str, name: str) -> str:
    """Resolve ``name`` (a shard file name from a manifest) against the manifest's folder URL."""
    if scheme_of(name) or os.path.isabs(name):
        return name
    if scheme_of(base) in ("", "file"):
        return os.path.join(os.path.dirname(local_path(base) or base), name)
    return base.rsplit("/", 1)[0] + "/" + name
