"""A bounded local cache of whole remote shards, shared by processes on one machine.

:mod:`shardkit.storage.dispatch` puts every non-local URL through it when ``SourceOptions.cache_dir``
is set: the first reader of a URL downloads the whole object (with the backend's plain
stream, passed in as a function: the cache knows no backend), every later reader (any
DataLoader worker, any training process on the machine) opens the local copy.

Layout under ``cache_dir``::

    objects/<sha256(url)>-<basename>   complete shards (the basename only for humans)
    tmp/<sha256(url)>.<pid>.<rand>.part downloads in progress
    locks/<sha256(url)>.lock           exists only while someone holds it
    .evict.lock                        serialises eviction + insertion

Concurrency rules, all with ``fcntl.flock`` (released by the kernel when a process dies,
so a crash never leaves a lock behind; no shared memory):

- One downloader per URL: the downloader holds an exclusive lock on ``locks/<key>.lock``;
  others block on it and then find the finished object. The holder unlinks the lock file
  before releasing it, and every locker checks that the file it locked is still the one
  at that path (inode), so lock files do not pile up and the unlink is race-free.
- Readers hold a shared lock on the cached file for as long as it is open. Eviction takes
  a non-blocking exclusive lock and skips files it cannot lock, so a shard that is being
  read is never evicted. A new shard is share-locked before it is renamed into place.
- Eviction and the rename of a new shard happen under ``.evict.lock``, evicting the least
  recently used shards (mtime, touched on every open) until the new one fits: complete
  shards stay under ``cache_size`` unless readers pin more (then at most the new shard on
  top). Downloads in progress are not counted.
- A ``.part`` file whose URL lock can be taken belongs to a crashed download and is
  deleted (when the cache is opened, and before each download of that URL).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from ..errors import SourceError
from ..sizes import parse_size
from .backend import CHUNK, SourceOptions

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")

FetchFn = Callable[[str], None]
UrlFetchFn = Callable[[str, str], None]


def url_key(url: str) -> str:
    """Cache key: sha256 of the full URL (two buckets with the same basename differ)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def _readable_suffix(url: str) -> str:
    path = urlsplit(url).path if "://" in url else url
    base = _SAFE.sub("_", unquote(path.rstrip("/").rsplit("/", 1)[-1]))[:100]
    return f"-{base}" if base else ""


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return mine.st_nlink > 0 and (mine.st_ino, mine.st_dev) == (st.st_ino, st.st_dev)


class ShardCache:
    """Bounded, multi-process-safe cache of whole objects keyed by URL.

    ``cache_size``: an int or human size (``"20GB"``); ``None`` means unbounded.
    Counters in :meth:`stats` are per process (each DataLoader worker has its own).
    """

    def __init__(self, cache_dir: str, cache_size: int | str | None = None) -> None:
        self.cache_dir = os.path.abspath(cache_dir)
        self.limit = None if cache_size is None else parse_size(cache_size)
        self._objects = os.path.join(self.cache_dir, "objects")
        self._tmp = os.path.join(self.cache_dir, "tmp")
        self._locks = os.path.join(self.cache_dir, "locks")
        for d in (self._objects, self._tmp, self._locks):
            os.makedirs(d, exist_ok=True)
        self._stats_lock = threading.Lock()
        self._stats = {"hits": 0, "misses": 0, "bytes_downloaded": 0, "evictions": 0, "prefetched": 0}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._pending: dict[str, Future] = {}
        self.clean_temp_files()

    # -- paths and locks ----------------------------------------------------------

    def path_for(self, url: str) -> str:
        """Where the complete copy of ``url`` lives (whether or not it is cached)."""
        return os.path.join(self._objects, url_key(url) + _readable_suffix(url))

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[name] += n

    @contextlib.contextmanager
    def _url_lock(self, key: str, blocking: bool = True) -> Iterator[bool]:
        """Exclusive lock for one URL; yields False if ``blocking=False`` and it is taken."""
        path = os.path.join(self._locks, key + ".lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                yield False
                return
            if _same_file(fd, path):
                break
            os.close(fd)  # the previous holder unlinked it: lock the current file
        try:
            yield True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # while still holding it; see the module docstring
            os.close(fd)

    @contextlib.contextmanager
    def _evict_lock(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.cache_dir, ".evict.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _open_shared(self, path: str) -> BinaryIO | None:
        """The cached file, share-locked (so it cannot be evicted), or None if absent."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # an evictor holds LOCK_EX only to unlink
            if not _same_file(fd, path):
                os.close(fd)
                return None
            with contextlib.suppress(OSError):
                os.utime(fd)  # LRU clock
        except BaseException:
            os.close(fd)
            raise
        return open(fd, "rb", buffering=0)  # closing it releases the shared lock

    # -- public API ---------------------------------------------------------------

    def open(self, url: str, fetch_fn: FetchFn, *, expected_sha256: str | None = None) -> BinaryIO:
        """A read-only file with the whole object, downloading it once if needed.

        ``fetch_fn(path)`` must write the complete object to ``path``. Close the returned
        file when done: until then the shard cannot be evicted.
        """
        return self._open(url, fetch_fn, expected_sha256)[0]

    def _open(self, url: str, fetch_fn: FetchFn, expected_sha256: str | None) -> tuple[BinaryIO, bool]:
        """(file, whether this call downloaded it)."""
        path = self.path_for(url)
        f = self._open_shared(path)
        if f is not None:
            self._count("hits")
            return f, False
        with self._url_lock(url_key(url)):
            f = self._open_shared(path)  # downloaded by whoever held the lock meanwhile
            if f is not None:
                self._count("hits")
                return f, False
            f = self._download(url, url_key(url), path, fetch_fn, expected_sha256)
            self._count("misses")
            return f, True

    def contains(self, url: str) -> bool:
        return os.path.exists(self.path_for(url))

    def prefetch(self, urls: Iterable[str], fetch: UrlFetchFn) -> list[Future]:
        """Download ``urls`` in a background thread (in order) unless cached or queued;
        ``fetch(url, path)`` writes the whole object to ``path``.

        Errors are logged, not raised: the later :meth:`open` retries and reports them.
        """
        pool = self._executor()
        futures = []
        for url in urls:
            pending = self._pending.get(url)
            if pending is not None and not pending.done():
                futures.append(pending)
                continue
            if self.contains(url):
                continue
            future = pool.submit(self._prefetch_one, url, fetch)
            self._pending[url] = future
            futures.append(future)
        for url in [u for u, fut in self._pending.items() if fut.done()]:
            del self._pending[url]
        return futures

    def counters(self) -> dict[str, int]:
        """This process's counters (hits, misses, bytes downloaded, evictions, prefetched):
        cheap, no file system access."""
        with self._stats_lock:
            return dict(self._stats)

    def stats(self) -> dict[str, int]:
        """This process's counters plus the bytes currently cached (all processes; this
        lists the cache folder)."""
        out = self.counters()
        out["bytes_cached"] = sum(size for _, size, _ in self._entries())
        return out

    def clean_temp_files(self) -> int:
        """Delete ``.part`` files of crashed downloads; returns how many."""
        removed = 0
        for name in os.listdir(self._tmp):
            key = name.split(".", 1)[0]
            with self._url_lock(key, blocking=False) as mine:
                if mine:
                    removed += self._remove_temps(key)
        return removed

    def close(self) -> None:
        """Stop the prefetch thread (waiting for the running download)."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    # -- internals ----------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():  # threads do not survive fork
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardkit-prefetch")
            self._pool_pid = os.getpid()
            self._pending = {}
        return self._pool

    def _prefetch_one(self, url: str, fetch: UrlFetchFn) -> None:
        try:
            f, downloaded = self._open(url, lambda path: fetch(url, path), None)
            f.close()
            if downloaded:
                self._count("prefetched")
        except Exception as e:  # reported again by the reader's own open()
            log.warning("prefetch of %s failed: %s", url, e)

    def _remove_temps(self, key: str) -> int:
        removed = 0
        for name in os.listdir(self._tmp):
            if name.startswith(key + "."):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._tmp, name))
                    removed += 1
        return removed

    def _download(self, url: str, key: str, path: str, fetch_fn: FetchFn, expected_sha256: str | None) -> BinaryIO:
        """Fetch into a temp file and rename it into place; caller holds the URL lock."""
        self._remove_temps(key)  # a crashed earlier download of this URL
        tmp = os.path.join(self._tmp, f"{key}.{os.getpid()}.{secrets.token_hex(4)}.part")
        try:
            fetch_fn(tmp)
            fd = os.open(tmp, os.O_RDONLY)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        f = open(fd, "rb", buffering=0)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # pinned before it becomes visible
            size = os.fstat(fd).st_size
            if expected_sha256 is not None:
                digest = _sha256_of(f)
                f.seek(0)
                if digest != expected_sha256.lower():
                    raise SourceError(
                        f"sha256 mismatch: expected {expected_sha256}, downloaded {digest} ({size} bytes)", url=url
                    )
            with self._evict_lock():
                self._evict(size)
                os.rename(tmp, path)
                with contextlib.suppress(OSError):
                    os.utime(fd)
        except BaseException:
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._count("bytes_downloaded", size)
        return f

    def _entries(self) -> list[tuple[float, int, str]]:
        out = []
        for name in os.listdir(self._objects):
            p = os.path.join(self._objects, name)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, p))
        return out

    def _evict(self, incoming: int) -> None:
        """Remove least recently used, unpinned shards until ``incoming`` more bytes fit."""
        if self.limit is None:
            return
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        for _, size, p in entries:
            if total + incoming <= self.limit:
                return
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                total -= size
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue  # someone is reading it
                raise
            try:
                if _same_file(fd, p):
                    os.unlink(p)
                    self._count("evictions")
                total -= size
            finally:
                os.close(fd)


def _sha256_of(f: BinaryIO) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = f.readinto(buf)  # type: ignore[attr-defined]  # typeshed's BinaryIO lacks readinto
        if not n:
            return h.hexdigest()
        h.update(view[:n])


_caches: dict[tuple[int, str, str], ShardCache] = {}
_caches_lock = threading.Lock()


def cache_for(options: SourceOptions) -> ShardCache:
    """The process's :class:`ShardCache` for ``options.cache_dir``/``cache_size``."""
    if not options.cache_dir:
        raise ValueError("options.cache_dir is not set")
    key = (os.getpid(), os.path.abspath(options.cache_dir), str(options.cache_size))
    with _caches_lock:
        cache = _caches.get(key)
        if cache is None:
            cache = ShardCache(options.cache_dir, options.cache_size)
            _caches[key] = cache
        return cache


__all__ = ["ShardCache", "cache_for", "url_key"]
