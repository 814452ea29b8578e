"""One resumable remote stream: retries, backoff, position tracking, resume at byte N.

HTTP and S3 differ only in how a body is opened at an offset and how bytes are read
from it; everything else lives here, once:

- Transient failures (a backend raises :class:`Retry`, or one of its
  ``transient_errors`` escapes a read) are retried with exponential backoff and jitter,
  so many workers do not retry in lock step. ``options.retries`` bounds *consecutive*
  failures without progress: a long stream over a flaky link that keeps delivering bytes
  is never abandoned, a dead server is given up on after ``retries`` attempts.
- ``tell()`` is the absolute position in the object. A body that breaks or ends early is
  re-opened at exactly that position, so no byte is lost or duplicated.
- An answer is used only when its header block is complete and consistent with the
  request (:mod:`shardkit.storage.remote.reply`); the object's size and ETag are recorded
  from the first body that delivers a byte, which proves its header block was whole. A
  body that ends before its first byte, before the end its headers gave or before the
  object's size is retried, never taken as the end: fewer bytes than the object holds
  are never returned without an error.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar

from ...errors import SourceError
from ..backend import DEFAULT_OPTIONS, ChunkStream, SourceOptions

log = logging.getLogger(__name__)

T = TypeVar("T")


class Retry(Exception):
    """Raised by a backend for a failure that a retry may cure."""

    def __init__(self, what: str, status: int | None = None, retry_after: str | None = None) -> None:
        super().__init__(what)
        self.what, self.status, self.retry_after = what, status, retry_after


class AtEnd(Exception):
    """Raised by ``_open_body`` when the requested start is at or past the object's end."""


@dataclass(frozen=True)
class Reply:
    """What a response's header block says about the body it opens (see
    :mod:`shardkit.storage.remote.reply`).

    ``end``: absolute end (exclusive) of this body; ``None`` for a chunked body, which ends
    at its terminator. ``size``/``etag``: the whole object's, when the headers say.
    """

    end: int | None
    size: int | None = None
    etag: str | None = None


def describe(exc: BaseException) -> str:
    """A short one-line description of an exception for error messages."""
    text = str(exc)
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` value (delay-seconds or an HTTP date) in seconds from now; None
    when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def backoff_delay(attempt: int, options: SourceOptions, retry_after: str | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): exponential with jitter up to
    ``options.max_backoff``; a server's ``Retry-After`` is waited for, up to that cap too."""
    cap = options.max_backoff
    delay = min(options.backoff * 2.0 ** min(attempt - 1, 60), cap) * random.uniform(0.5, 1.0)
    wait = retry_after_seconds(retry_after)
    if wait is not None:
        delay = max(delay, min(wait, cap))
    return delay


def with_retries(url: str, options: SourceOptions, attempt: Callable[[], T]) -> T:
    """``attempt()`` until it returns, retrying each :class:`Retry` it raises, at most
    ``options.retries`` times (for whole requests: listings, uploads, small reads)."""
    last: Retry | None = None
    for n in range(options.retries + 1):
        if n:
            assert last is not None
            time.sleep(backoff_delay(n, options, last.retry_after))
        try:
            return attempt()
        except Retry as r:
            last = r
    assert last is not None
    raise SourceError(f"{last.what} after {options.retries} retries", url=url, status=last.status)


class ResumableStream(ChunkStream):
    """A read-only remote byte range that reconnects and resumes transparently.

    Subclasses implement:

    - ``_open_body(pos, end)``: start a body at absolute byte ``pos`` (up to ``end``,
      exclusive, or the object's end) and return its :class:`Reply`. Raise
      :class:`Retry` for transient failures (an answer whose headers are incomplete or
      inconsistent with the request included), :class:`AtEnd` when ``pos`` is past the
      end, :class:`SourceError` for permanent ones.
    - ``_read_body(size)``: up to ``size`` bytes of the open body (``b""`` at its end).
      Bytes it reads and discards itself must be reported with :meth:`_body_started`.
    - ``_close_body(complete)``: drop the body (``complete``: it was read to its end, so
      the connection may be reused).
    - ``transient_errors``: exception types a read may raise that a reconnect can cure.

    ``size`` and ``etag`` are the object's, recorded from the first answer whose body
    delivered a byte (so from a complete header block) and required of every later one.
    A body never ends the stream before the end its headers gave, nor before the
    object's size: it is resumed from the current byte instead.
    """

    transient_errors: tuple[type[BaseException], ...] = ()

    def __init__(
        self, url: str, offset: int = 0, length: int | None = None, options: SourceOptions = DEFAULT_OPTIONS
    ) -> None:
        super().__init__()
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range offset={offset} length={length}")
        self.url = url
        self._options = options
        self._pos = offset
        self._end = None if length is None else offset + length
        self._open = False
        self._reply = Reply(None)
        self._confirmed = False  # a byte of the open body arrived: its header block was whole
        self.size: int | None = None
        self.etag: str | None = None
        self._eof = length == 0
        self._failures = 0
        self.reconnects = 0
        if not self._eof:
            self._connect()  # fail at open time on 404/403, not on the first read

    # -- subclass hooks -------------------------------------------------------------
    def _open_body(self, pos: int, end: int | None) -> Reply:
        raise NotImplementedError

    def _read_body(self, size: int) -> bytes:
        raise NotImplementedError

    def _close_body(self, complete: bool) -> None:
        raise NotImplementedError

    def _body_started(self) -> None:
        """The open body delivered its first byte, so its header block was complete: its
        size and ETag are facts now, and must be the object's."""
        if self._confirmed:
            return
        self._confirmed = True
        reply = self._reply
        if reply.size is not None:
            if self.size is not None and reply.size != self.size:
                raise SourceError(f"object size changed while reading ({self.size} -> {reply.size})", url=self.url)
            self.size = reply.size
        if reply.etag:
            if self.etag and reply.etag != self.etag:
                raise SourceError(f"object changed while reading (ETag {self.etag} -> {reply.etag})", url=self.url)
            self.etag = reply.etag

    # -- the retry loop -------------------------------------------------------------
    def _fail(self, what: str, status: int | None = None, retry_after: str | None = None) -> None:
        """Count one transient failure; sleep, or raise once the budget is spent."""
        self._failures += 1
        retries = self._options.retries
        if self._failures > retries:
            at = f" at byte {self._pos}" if self._pos else ""
            raise SourceError(f"{what} after {retries} retries{at}", url=self.url, status=status)
        log.debug("%s: %s; retry %d/%d from byte %d", self.url, what, self._failures, retries, self._pos)
        time.sleep(backoff_delay(self._failures, self._options, retry_after))

    def _limit(self) -> int | None:
        """Where this stream ends, when known: the end asked for, or the object's size."""
        if self.size is None:
            return self._end
        return self.size if self._end is None else min(self._end, self.size)

    def _connect(self) -> None:
        while True:
            try:
                reply = self._open_body(self._pos, self._end)
            except Retry as r:
                self._fail(r.what, r.status, r.retry_after)
                continue
            except AtEnd:
                if self.size is not None and self._pos < self.size:
                    self._fail(f"server said byte {self._pos} is past the end of a {self.size}-byte object")
                    continue
                self._eof = True
                return
            self._reply, self._confirmed, self._open = reply, False, True
            if self._failures:
                self.reconnects += 1
            return

    def _drop(self, complete: bool = False) -> None:
        if self._open:
            self._open = False
            self._close_body(complete)

    def _chunk(self, size: int) -> bytes:
        """Up to ``size`` bytes: at least one unless at the end."""
        limit = self._limit()
        if limit is not None:
            size = min(size, limit - self._pos)
        if size <= 0 or self._eof:
            self._drop()
            return b""
        while True:
            if not self._open:
                self._connect()
                if self._eof:
                    return b""
                continue
            try:
                data = self._read_body(size)
                if data and not self._confirmed:
                    self._body_started()
            except Retry as r:
                self._drop()
                self._fail(r.what, r.status, r.retry_after)
                continue
            except self.transient_errors as e:
                self._drop()
                self._fail(f"connection lost mid-body ({describe(e)})")
                continue
            except SourceError:
                self._drop()
                raise
            if not data:
                if self._body_ended():
                    return b""
                continue
            self._pos += len(data)
            self._failures = 0
            if self._end is not None and self._pos >= self._end:
                # Stopped inside a longer body (a server without Range): not reusable.
                self._drop(complete=self._reply.end == self._pos)
                self._eof = True
            return data

    def _body_ended(self) -> bool:
        """The open body gave ``b""``: True at the stream's end, False to go on (the body
        was short, or whole but shorter than what is asked: the rest is asked for)."""
        end = self._reply.end
        if not self._confirmed and not (end is not None and end <= self._pos):
            # Not one byte arrived: a header block cut short looks just like this.
            self._drop()
            self._fail("answer ended before its body (header block cut short?)")
            return False
        if end is not None and self._pos < end:
            self._drop()
            self._fail("body ended early")
            return False
        self._drop(complete=True)
        limit = self._limit()
        if self._confirmed and limit is not None and self._pos < limit:
            return False  # a whole body that moved us on, shorter than asked: ask for the rest
        self._eof = True
        return True

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()
