"""HTTP(S) backend: streaming GETs with retries and exact-byte resume.

Why ``requests`` and not ``httpx``: requests (on urllib3) is the ubiquitous, light choice
and already in the ``remote`` extra; httpx would add httpcore, h11, anyio and sniffio for
features we do not use here (async, HTTP/2) on big sequential GETs. The client is not the
bottleneck (``tools/bench_remote.py``, BENCHMARKS.md). Bodies are read with urllib3's
public ``read1(n)`` -- one ``recv`` per call: unlike ``read(n)`` it returns the bytes that
arrived before a connection reset, so a link that dies every few hundred KB still makes
progress with 1 MiB reads.

Retries, backoff and resume at byte N are :class:`~shardkit.storage.remote.stream.ResumableStream`'s;
this module only opens a GET at an offset and reads its body.

Behaviour:

- One ``requests.Session`` (connection pool) per process, re-created after ``fork``
  because DataLoader workers fork and must not share sockets with the parent.
- Transient failures -- connection refused/reset, timeouts, a body cut short, HTTP 408,
  425, 429 and 5xx -- are retried with exponential backoff (with jitter, so many workers
  do not retry in lock step). The budget ``options.retries`` counts *consecutive*
  failures without progress: a long stream over a flaky link that keeps delivering bytes
  is never abandoned, a dead server is given up on after ``retries`` attempts.
- A body dropped mid-way resumes with ``Range: bytes=N-`` at the exact next byte; the
  ``206 Content-Range`` start must equal N (and size/ETag must not change), so no byte
  is lost or duplicated.
- An answer is used only when its header block is complete and consistent
  (:mod:`~shardkit.storage.remote.reply`): a 206 without a usable ``Content-Range``, a
  200 without ``Content-Length`` or chunked framing, a body shorter than its headers
  say, are all retried from the current byte.
- ``Retry-After`` on 429/503 (seconds or a date) is waited for, up to
  ``options.max_backoff``.
- Servers that ignore ``Range`` (answer 200, e.g. Python's ``http.server``) still work:
  the body is read from byte 0 and the bytes before the wanted position are discarded
  (logged once per server, since every seek/resume then re-downloads the prefix).
- 4xx other than 408/425/429 fail at once with :class:`SourceError` naming URL and
  status (a 404 is not worth retrying).
- ``Accept-Encoding: identity`` is always sent: byte offsets must refer to the stored
  bytes, not to a gzip stream.
- ``options.headers`` maps URL prefixes to extra headers; the longest matching prefix
  wins.
- :func:`list_prefix` parses an HTML directory listing (nginx ``autoindex``, Apache,
  ``http.server``): every ``<a href>`` that resolves directly under the folder. That is
  best effort -- plain HTTP has no listing protocol.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from html.parser import HTMLParser
from http.client import HTTPException
from typing import BinaryIO
from urllib.parse import unquote, urljoin, urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from ...errors import SourceError
from ..backend import CHUNK, DEFAULT_OPTIONS, Backend, SourceOptions
from .reply import parse_length, partial_reply, unsatisfied_total, whole_reply
from .stream import AtEnd, Reply, ResumableStream, Retry, describe, with_retries

log = logging.getLogger(__name__)

_TRANSIENT_STATUS = frozenset({408, 425, 429})
_OK_PUT = frozenset({200, 201, 204})
# Errors raised while connecting or reading a body that a retry can cure.
_TRANSIENT_REQUEST_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
_TRANSIENT_READ_ERRORS = (urllib3.exceptions.HTTPError, HTTPException, OSError, requests.RequestException)

_session: requests.Session | None = None
_session_pid = -1
_session_lock = threading.Lock()
_warned_no_range: set[str] = set()


def _after_fork_in_child() -> None:
    # The parent's pool sockets are shared with the child after fork; drop the session
    # (without closing the sockets the parent still uses) and the lock (a parent thread
    # may have held it at fork time).
    global _session, _session_pid, _session_lock
    _session, _session_pid, _session_lock = None, -1, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def session() -> requests.Session:
    """The process-wide session; a new one in each forked worker."""
    global _session, _session_pid
    pid = os.getpid()
    s = _session
    if s is not None and _session_pid == pid:
        return s
    with _session_lock:
        if _session is None or _session_pid != pid:
            s = requests.Session()
            # Retries are ours (they must resume mid-body); urllib3 must not retry itself.
            adapter = HTTPAdapter(pool_connections=16, pool_maxsize=32, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            _session, _session_pid = s, pid
        return _session  # type: ignore[return-value]


def headers_for(url: str, options: SourceOptions) -> dict[str, str]:
    """Request headers for ``url``: identity encoding plus the longest-prefix match."""
    headers = {"Accept-Encoding": "identity"}
    best: str | None = None
    for prefix in options.headers:
        if url.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    if best is not None:
        headers.update(options.headers[best])
    return headers


def is_transient_status(status: int) -> bool:
    return status in _TRANSIENT_STATUS or status >= 500


def _status_error(url: str, resp: requests.Response) -> SourceError:
    reason = f" {resp.reason}" if resp.reason else ""
    return SourceError(f"HTTP {resp.status_code}{reason}", url=url, status=resp.status_code)


class HTTPStream(ResumableStream):
    """A GET body as a read-only stream that reconnects and resumes transparently.

    ``offset``/``length`` select a byte range of the object; ``tell()`` is the absolute
    position in the object.
    """

    transient_errors = _TRANSIENT_READ_ERRORS

    def __init__(
        self, url: str, offset: int = 0, length: int | None = None, options: SourceOptions = DEFAULT_OPTIONS
    ) -> None:
        self._resp: requests.Response | None = None
        self._skip = 0  # body bytes to discard first (server ignored Range)
        super().__init__(url, offset, length, options)

    def _open_body(self, pos: int, end: int | None) -> Reply:
        headers = headers_for(self.url, self._options)
        if pos > 0 or end is not None:
            headers["Range"] = f"bytes={pos}-{'' if end is None else end - 1}"
        try:
            resp = session().get(self.url, headers=headers, stream=True, timeout=self._options.timeout)
        except _TRANSIENT_REQUEST_ERRORS as e:
            if isinstance(e, requests.exceptions.SSLError):
                raise SourceError(f"TLS error: {describe(e)}", url=self.url) from None
            raise Retry(describe(e)) from None
        except requests.RequestException as e:
            raise SourceError(describe(e), url=self.url) from None
        status = resp.status_code
        if status in (200, 206):
            try:
                reply = _reply_of(resp, pos, end)
            except Retry:
                resp.close()
                raise
            if status == 200 and pos > 0:
                self._warn_no_range()
            self._resp, self._skip = resp, (pos if status == 200 else 0)
            return reply
        resp.close()
        if status == 416:
            total = unsatisfied_total(resp.headers.get("Content-Range"))
            if total is not None and pos >= total:
                raise AtEnd()  # asked to start at/after the end: an empty read
            raise Retry(f"HTTP 416 with Content-Range {resp.headers.get('Content-Range')!r}", 416)
        if is_transient_status(status):
            reason = f" {resp.reason}" if resp.reason else ""
            raise Retry(f"HTTP {status}{reason}", status, resp.headers.get("Retry-After"))
        raise _status_error(self.url, resp)

    def _warn_no_range(self) -> None:
        server = urlsplit(self.url).netloc
        if server not in _warned_no_range:
            _warned_no_range.add(server)
            log.warning(
                "%s ignores HTTP Range requests: seeking or resuming re-downloads the object from byte 0 (%s)",
                server,
                self.url,
            )

    def _read_body(self, size: int) -> bytes:
        assert self._resp is not None
        raw = self._resp.raw
        while self._skip:
            dropped = raw.read1(min(self._skip, CHUNK), decode_content=False)
            if not dropped:
                raise Retry("body ended early")
            self._body_started()
            self._skip -= len(dropped)
        # read1: what one recv delivers, so bytes that arrived before a reset count as
        # progress (read(n) blocks for n bytes and loses them).
        return raw.read1(size, decode_content=False) or b""

    def _close_body(self, complete: bool) -> None:
        resp, self._resp = self._resp, None
        if resp is None:
            return
        if complete:
            # Body fully read: let http.client see its end (read1 does not close it at
            # length 0), then keep the connection in the pool.
            resp.raw.drain_conn()
            resp.raw.release_conn()
        else:
            resp.close()


def _reply_of(resp: requests.Response, pos: int, end: int | None) -> Reply:
    """What a 200/206 answer's headers say (see :mod:`~shardkit.storage.remote.reply`)."""
    h = resp.headers
    length = parse_length(h.get("Content-Length"))
    if resp.status_code == 206:
        return partial_reply(h.get("Content-Range"), length, h.get("ETag"), pos, end)
    chunked = "chunked" in h.get("Transfer-Encoding", "").lower()
    return whole_reply(None if chunked else length, chunked, h.get("ETag"))


def _check_framing(resp: requests.Response) -> None:
    """A whole answer read by requests must have said how long it is (else a header
    block cut short reads as an empty body)."""
    if resp.status_code == 200:
        _reply_of(resp, 0, None)


def _request(method: str, url: str, options: SourceOptions, *, body_path: str | None = None) -> requests.Response:
    """One non-streaming request with the retry policy; returns the final response
    (any non-transient status: the caller decides what it means)."""

    def attempt() -> requests.Response:
        try:
            with open(body_path, "rb") if body_path is not None else contextlib.nullcontext() as data:
                resp = session().request(
                    method, url, data=data, headers=headers_for(url, options), timeout=options.timeout
                )
        except _TRANSIENT_REQUEST_ERRORS as e:
            if isinstance(e, requests.exceptions.SSLError):
                raise SourceError(f"TLS error: {describe(e)}", url=url) from None
            raise Retry(describe(e)) from None
        except requests.RequestException as e:
            raise SourceError(describe(e), url=url) from None
        if is_transient_status(resp.status_code):
            resp.close()
            raise Retry(f"HTTP {resp.status_code}", resp.status_code, resp.headers.get("Retry-After"))
        if method == "GET":
            _check_framing(resp)
        return resp

    return with_retries(url, options, attempt)


# -- backend API ------------------------------------------------------------------


def open_stream(
    url: str, offset: int = 0, length: int | None = None, options: SourceOptions = DEFAULT_OPTIONS
) -> BinaryIO:
    """Stream ``url`` from ``offset`` (``length`` bytes or to the end)."""
    return HTTPStream(url, offset, length, options)  # type: ignore[return-value]


def read_bytes(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> bytes | None:
    """The whole object, or ``None`` on HTTP 404/410."""
    try:
        with HTTPStream(url, 0, None, options) as stream:
            return stream.readall()
    except SourceError as e:
        if e.status in (404, 410):
            return None
        raise


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            for name, value in attrs:
                if name == "href" and value:
                    self.hrefs.append(value)


def list_prefix(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> list[str]:
    """Best effort: the links of the HTML index page of ``url``'s folder that point
    directly below it and start with the last path segment of ``url`` (so
    ``http://h/d/train-`` lists ``train-*``). Sub-folders end with ``/``."""
    folder, _, name_prefix = url.partition("?")[0].rpartition("/")
    folder += "/"
    resp = _request("GET", folder, options)
    if resp.status_code != 200:
        raise _status_error(folder, resp)
    parser = _LinkParser()
    parser.feed(resp.text)
    want = unquote(name_prefix)
    found = set()
    for href in parser.hrefs:
        if href.startswith(("?", "#")):
            continue  # sort links of Apache-style listings
        target = urljoin(folder, href).partition("#")[0].partition("?")[0]
        if not target.startswith(folder):
            continue
        rest = target[len(folder) :]
        if not rest or rest in ("./", "../") or "/" in rest.rstrip("/"):
            continue
        if unquote(rest).startswith(want):
            found.add(target)
    return sorted(found)


def put_file(local_path: str, url: str, options: SourceOptions = DEFAULT_OPTIONS) -> None:
    """Upload a local file with HTTP PUT (e.g. nginx WebDAV), retrying transient failures."""
    resp = _request("PUT", url, options, body_path=local_path)
    resp.close()
    if resp.status_code not in _OK_PUT:
        raise _status_error(url, resp)


BACKEND = Backend(open_stream, read_bytes, list_prefix, put_file)

__all__ = ["BACKEND", "HTTPStream", "open_stream", "read_bytes", "list_prefix", "put_file", "session", "headers_for"]
