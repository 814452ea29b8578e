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
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from ...errors import SourceError
from ..backend import DEFAULT_OPTIONS, ChunkStream, SourceOptions

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
T = TypeVar("T")


class Retry(Exception):
    """Raised by a backend for a failure that a retry may cure."""

    def __init__(self, what: str, status: int | None = None, retry_after: str | None = None) -> None:
        super().__init__(what)
        self.what, self.status, self.retry_after = what, status, retry_after


class AtEnd(Exception):
    """Raised by ``_open_body`` when the requested start is at or past the object's end."""


def describe(exc: BaseException) -> str:
    """A short one-line description of an exception for error messages."""
    text = str(exc)
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def backoff_delay(attempt: int, options: SourceOptions, retry_after: str | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): exponential with jitter; a
    server's ``Retry-After`` (seconds) is honoured up to the cap."""
    delay = min(options.backoff * 2 ** (attempt - 1), MAX_BACKOFF) * random.uniform(0.5, 1.0)
    if retry_after:
        try:
            delay = max(delay, min(float(retry_after), MAX_BACKOFF))
        except ValueError:  # an HTTP date; not worth parsing for a cap of 30 s
            pass
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
      exclusive, or the object's end); return the absolute end of that body when known.
      Raise :class:`Retry` for transient failures, :class:`AtEnd` when ``pos`` is past
      the end, :class:`SourceError` for permanent ones.
    - ``_read_body(size)``: up to ``size`` bytes of the open body (``b""`` at its end).
    - ``_close_body(complete)``: drop the body (``complete``: it was read to its end, so
      the connection may be reused).
    - ``transient_errors``: exception types a read may raise that a reconnect can cure.
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
        self._body_end: int | None = None
        self._eof = length == 0
        self._failures = 0
        self.reconnects = 0
        if not self._eof:
            self._connect()  # fail at open time on 404/403, not on the first read

    # -- subclass hooks -------------------------------------------------------------
    def _open_body(self, pos: int, end: int | None) -> int | None:
        raise NotImplementedError

    def _read_body(self, size: int) -> bytes:
        raise NotImplementedError

    def _close_body(self, complete: bool) -> None:
        raise NotImplementedError

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

    def _connect(self) -> None:
        while True:
            try:
                self._body_end = self._open_body(self._pos, self._end)
            except Retry as r:
                self._fail(r.what, r.status, r.retry_after)
                continue
            except AtEnd:
                self._eof = True
                return
            self._open = True
            if self._failures:
                self.reconnects += 1
            return

    def _drop(self, complete: bool = False) -> None:
        if self._open:
            self._open = False
            self._close_body(complete)

    def _chunk(self, size: int) -> bytes:
        """Up to ``size`` bytes: at least one unless at the end."""
        if self._end is not None:
            size = min(size, self._end - self._pos)
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
            except Retry as r:
                self._drop()
                self._fail(r.what, r.status, r.retry_after)
                continue
            except self.transient_errors as e:
                self._drop()
                self._fail(f"connection lost mid-body ({describe(e)})")
                continue
            if not data:
                if self._body_end is not None and self._pos < self._body_end:
                    self._drop()
                    self._fail("body ended early")
                    continue
                self._drop(complete=True)
                self._eof = True
                return b""
            self._pos += len(data)
            self._failures = 0
            if self._end is not None and self._pos >= self._end:
                # Stopped inside a longer body (a server without Range): not reusable.
                self._drop(complete=self._body_end == self._pos)
                self._eof = True
            return data

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()
