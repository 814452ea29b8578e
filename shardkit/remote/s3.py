"""S3 backend (``s3://bucket/key``) on boto3.

Why boto3 and not s3fs: s3fs is fsspec + aiobotocore + aiohttp (and pins botocore to
the versions aiobotocore supports), i.e. boto3's stack plus an async stack we do not
need for large sequential GETs; boto3 alone is one well-known dependency (the ``remote``
extra). Throughput is the socket copy either way (see ``tools/bench_remote.py``).

Configuration is boto3's own: credentials, region, profile and endpoint
(``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``~/.aws/config``) -- shardkit adds no
variables. Clients use path-style addressing (works with MinIO/SeaweedFS/moto and any
bucket name). One client per process (boto3 clients are thread-safe, not fork-safe), re-
created after fork and whenever the ``AWS_*`` environment changes.

Retries mirror :mod:`shardkit.remote.http`: botocore's own retries are off so that a
body cut mid-stream is resumed by a new ``GetObject`` with ``Range: bytes=N-`` and
``IfMatch: <ETag>`` from the exact next byte (the object must not change underneath).
Transient: connection errors, timeouts, 429, 5xx, ``SlowDown``/``RequestTimeout``-style
codes; ``options.retries`` bounds consecutive failures without progress. ``NoSuchKey``/
404, 403 and other client errors fail at once.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any, BinaryIO

import boto3
import boto3.exceptions
import botocore.exceptions
import urllib3.exceptions
from botocore.config import Config

from ..errors import SourceError
from ..source import DEFAULT_OPTIONS, Backend, SourceOptions
from .stream import ChunkStream, open_maybe_cached

log = logging.getLogger(__name__)

PIECE = 256 * 1024
MAX_BACKOFF = 30.0
MULTIPART_THRESHOLD = 64 * 1024 * 1024
_TRANSIENT_CODES = frozenset({
    "SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "BandwidthLimitExceeded", "503", "500", "502", "504",
})
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_TRANSIENT_ERRORS = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError,
                     botocore.exceptions.ResponseStreamingError,
                     botocore.exceptions.IncompleteReadError, urllib3.exceptions.HTTPError,
                     OSError)

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _clients, _clients_lock
    _clients, _clients_lock = {}, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def client(options: SourceOptions = DEFAULT_OPTIONS) -> Any:
    """The process's S3 client for this timeout and the current ``AWS_*`` environment."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (os.getpid(), float(options.timeout), env)
    c = _clients.get(key)
    if c is not None:
        return c
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            config = Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 1},  # ours resume mid-body; see module doc
                connect_timeout=options.timeout, read_timeout=options.timeout,
                max_pool_connections=32)
            c = boto3.session.Session().client("s3", config=config)
            if len(_clients) >= 8:  # env/timeout changes are rare; do not grow without bound
                _clients.pop(next(iter(_clients)))
            _clients[key] = c
        return c


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    if not url.startswith("s3://"):
        raise SourceError("not an s3:// URL", url=url)
    bucket, _, key = url[5:].partition("/")
    if not bucket:
        raise SourceError("s3 URL has no bucket name", url=url)
    return bucket, key


def _error_info(e: botocore.exceptions.ClientError) -> tuple[str, int | None]:
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


def _is_transient(code: str, status: int | None) -> bool:
    return code in _TRANSIENT_CODES or (status is not None and (status == 429 or status >= 500))


def _describe(e: BaseException) -> str:
    if isinstance(e, botocore.exceptions.ClientError):
        code, status = _error_info(e)
        msg = e.response.get("Error", {}).get("Message") or ""
        return f"{code or 'error'} (HTTP {status}){': ' + msg if msg else ''}"
    text = str(e)
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _backoff(attempt: int, options: SourceOptions) -> float:
    return min(options.backoff * 2 ** (attempt - 1), MAX_BACKOFF) * random.uniform(0.5, 1.0)


def _permanent(url: str, e: BaseException) -> SourceError:
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        return SourceError("no AWS credentials found (boto3 looked at AWS_ACCESS_KEY_ID/"
                           "AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws)", url=url)
    if isinstance(e, botocore.exceptions.ClientError):
        return SourceError(_describe(e), url=url, status=_error_info(e)[1])
    return SourceError(_describe(e), url=url)


def _call(url: str, options: SourceOptions, fn: Any, **kwargs: Any) -> Any:
    """``fn(**kwargs)`` with the retry policy for non-streaming calls."""
    last, status = "", None
    for attempt in range(options.retries + 1):
        if attempt:
            time.sleep(_backoff(attempt, options))
        try:
            return fn(**kwargs)
        except botocore.exceptions.ClientError as e:
            code, st = _error_info(e)
            if not _is_transient(code, st):
                raise
            last, status = _describe(e), st
        except _TRANSIENT_ERRORS as e:
            last, status = _describe(e), None
    raise SourceError(f"{last} after {options.retries} retries", url=url, status=status)


class S3Stream(ChunkStream):
    """A GetObject body that re-issues a ranged GetObject when the stream breaks."""

    def __init__(self, url: str, offset: int = 0, length: int | None = None,
                 options: SourceOptions = DEFAULT_OPTIONS) -> None:
        super().__init__()
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range offset={offset} length={length}")
        self.url = url
        self._bucket, self._key = split_url(url)
        self._options = options
        self._pos = offset
        self._end = None if length is None else offset + length
        self._body: Any = None
        self._body_end: int | None = None
        self._etag: str | None = None
        self._eof = length == 0
        self._failures = 0
        self.reconnects = 0
        if not self._eof:
            self._connect()

    def _fail(self, what: str, status: int | None = None) -> None:
        self._failures += 1
        retries = self._options.retries
        if self._failures > retries:
            at = f" at byte {self._pos}" if self._pos else ""
            raise SourceError(f"{what} after {retries} retries{at}", url=self.url, status=status)
        log.debug("%s: %s; retry %d/%d from byte %d", self.url, what, self._failures, retries,
                  self._pos)
        time.sleep(_backoff(self._failures, self._options))

    def _connect(self) -> None:
        while True:
            kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
            if self._pos > 0 or self._end is not None:
                last = "" if self._end is None else str(self._end - 1)
                kwargs["Range"] = f"bytes={self._pos}-{last}"
            if self._etag:
                kwargs["IfMatch"] = self._etag
            try:
                resp = client(self._options).get_object(**kwargs)
            except botocore.exceptions.ClientError as e:
                code, status = _error_info(e)
                if code == "InvalidRange" or status == 416:
                    self._eof = True  # starts at/after the end of the object
                    return
                if code == "PreconditionFailed" or status == 412:
                    raise SourceError(f"object changed while reading (ETag was {self._etag})",
                                      url=self.url, status=status) from None
                if _is_transient(code, status):
                    self._fail(_describe(e), status)
                    continue
                raise _permanent(self.url, e) from None
            except _TRANSIENT_ERRORS as e:
                self._fail(_describe(e))
                continue
            except botocore.exceptions.BotoCoreError as e:
                raise _permanent(self.url, e) from None
            start = self._pos
            content_range = resp.get("ContentRange")
            if content_range:
                spec = content_range.split()[-1]
                first = spec.split("-", 1)[0]
                if not first.isdigit() or int(first) != self._pos:
                    resp["Body"].close()
                    raise SourceError(f"asked for bytes from {self._pos}, got Content-Range "
                                      f"{content_range!r}", url=self.url, status=206)
            elif self._pos > 0:
                resp["Body"].close()
                raise SourceError("S3 server ignored the Range header", url=self.url)
            self._etag = self._etag or resp.get("ETag")
            length = resp.get("ContentLength")
            self._body_end = None if length is None else start + int(length)
            self._body = resp["Body"]
            if self._failures:
                self.reconnects += 1
            return

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # closing a broken stream must not mask the read error
                pass

    def _chunk(self, size: int) -> bytes:
        if self._end is not None:
            size = min(size, self._end - self._pos)
        if size <= 0 or self._eof:
            self._drop()
            return b""
        while True:
            if self._body is None:
                self._connect()
                if self._eof:
                    return b""
                continue
            try:
                # Bounded pieces: StreamingBody.read(n) blocks until n bytes arrive and
                # loses them on a reset, so a huge n could never make progress on a link
                # that drops every few hundred KB. (Its raw read1 would skip botocore's
                # checksum validation of whole-object GETs.)
                data = self._body.read(min(size, PIECE))
            except _TRANSIENT_ERRORS as e:
                self._drop()
                self._fail(f"connection lost mid-body ({_describe(e)})")
                continue
            if not data:
                if self._body_end is not None and self._pos < self._body_end:
                    self._drop()
                    self._fail("body ended early")
                    continue
                self._drop()
                self._eof = True
                return b""
            self._pos += len(data)
            self._failures = 0
            return data

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()


# -- backend API ------------------------------------------------------------------


def open_stream(url: str, offset: int = 0, length: int | None = None,
                options: SourceOptions = DEFAULT_OPTIONS, *,
                expected_sha256: str | None = None) -> BinaryIO:
    """Stream ``s3://bucket/key`` from ``offset``; through the local cache when
    ``options.cache_dir`` is set."""
    return open_maybe_cached(S3Stream, url, offset, length, options, expected_sha256)  # type: ignore[arg-type]


def read_bytes(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> bytes | None:
    """The whole object, or ``None`` if the key does not exist."""
    try:
        with S3Stream(url, 0, None, options) as stream:
            return stream.readall()
    except SourceError as e:
        if e.status == 404 and "NoSuchBucket" not in e.reason:
            return None
        raise


def list_prefix(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> list[str]:
    """Objects and sub-prefixes (ending in ``/``) directly below ``s3://bucket/prefix``."""
    bucket, prefix = split_url(url)
    paginator = client(options).get_paginator("list_objects_v2")
    found: list[str] = []

    def pages() -> list[dict]:
        return list(paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"))

    try:
        for page in _call(url, options, pages):
            for item in page.get("Contents", []):
                found.append(f"s3://{bucket}/{item['Key']}")
            for item in page.get("CommonPrefixes", []):
                found.append(f"s3://{bucket}/{item['Prefix']}")
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
        raise _permanent(url, e) from None
    return sorted(set(found))


def put_file(local_path: str, url: str, options: SourceOptions = DEFAULT_OPTIONS) -> None:
    """Upload a local file: one PutObject up to 64 MiB, multipart (upload_file) above."""
    bucket, key = split_url(url)
    c = client(options)

    def put() -> None:
        if os.path.getsize(local_path) <= MULTIPART_THRESHOLD:
            with open(local_path, "rb") as f:
                c.put_object(Bucket=bucket, Key=key, Body=f)
        else:
            try:
                c.upload_file(local_path, bucket, key)
            except boto3.exceptions.S3UploadFailedError as e:
                cause = e.__cause__ or e.__context__
                raise (cause if cause is not None else e) from None

    try:
        _call(url, options, put)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError,
            boto3.exceptions.Boto3Error) as e:
        raise _permanent(url, e) from None


BACKEND = Backend(open_stream, read_bytes, list_prefix, put_file)

__all__ = ["BACKEND", "S3Stream", "client", "list_prefix", "open_stream", "put_file",
           "read_bytes", "split_url"]
