"""S3 backend (``s3://bucket/key``) on boto3.

Why boto3 and not s3fs: s3fs is fsspec + aiobotocore + aiohttp (and pins botocore to
the versions aiobotocore supports), i.e. boto3's stack plus an async stack we do not
need for large sequential GETs; boto3 alone is one well-known dependency (the ``remote``
extra).

Configuration is boto3's own: credentials, region, profile and endpoint
(``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``~/.aws/config``) -- shardkit adds no
variables. Clients use path-style addressing (works with MinIO/SeaweedFS/moto and any
bucket name). One client per process (boto3 clients are thread-safe, not fork-safe), re-
created after fork and whenever the ``AWS_*`` environment changes.

Retries are :class:`~shardkit.storage.remote.stream.ResumableStream`'s: botocore's own are off so that a
body cut mid-stream is resumed by a new ``GetObject`` with ``Range: bytes=N-`` and
``IfMatch: <ETag>`` from the exact next byte (the object must not change underneath).
Transient: connection errors, timeouts, 429, 5xx, ``SlowDown``/``RequestTimeout``-style
codes (a ``Retry-After`` is waited for, up to ``options.max_backoff``), and answers whose
headers are incomplete or inconsistent with the request (no ``Content-Length``, a
``Content-Range`` that does not start at the byte asked for...: the checks of
:mod:`~shardkit.storage.remote.reply`, shared with HTTP); ``options.retries`` bounds
consecutive failures without progress. ``NoSuchKey``/
404, 403 and other client errors fail at once.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, BinaryIO

import boto3
import boto3.exceptions
import botocore.exceptions
import urllib3.exceptions
from botocore.config import Config

from ...errors import SourceError
from ..backend import DEFAULT_OPTIONS, Backend, SourceOptions
from .reply import parse_length, partial_reply, whole_reply
from .stream import AtEnd, Reply, ResumableStream, Retry, with_retries

log = logging.getLogger(__name__)

PIECE = 256 * 1024
MULTIPART_THRESHOLD = 64 * 1024 * 1024
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "BandwidthLimitExceeded",
        "503",
        "500",
        "502",
        "504",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_TRANSIENT_ERRORS = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    urllib3.exceptions.HTTPError,
    OSError,
)

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
                connect_timeout=options.timeout,
                read_timeout=options.timeout,
                max_pool_connections=32,
            )
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


def _retry_after(e: botocore.exceptions.ClientError) -> str | None:
    headers = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    return headers.get("retry-after")


def _describe(e: BaseException) -> str:
    if isinstance(e, botocore.exceptions.ClientError):
        code, status = _error_info(e)
        msg = e.response.get("Error", {}).get("Message") or ""
        return f"{code or 'error'} (HTTP {status}){': ' + msg if msg else ''}"
    text = str(e)
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _permanent(url: str, e: BaseException) -> SourceError:
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        return SourceError(
            "no AWS credentials found (boto3 looked at AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws)",
            url=url,
        )
    if isinstance(e, botocore.exceptions.ClientError):
        return SourceError(_describe(e), url=url, status=_error_info(e)[1])
    return SourceError(_describe(e), url=url)


def _call(url: str, options: SourceOptions, fn: Any, **kwargs: Any) -> Any:
    """``fn(**kwargs)`` with the retry policy for non-streaming calls."""

    def attempt() -> Any:
        try:
            return fn(**kwargs)
        except botocore.exceptions.ClientError as e:
            code, status = _error_info(e)
            if not _is_transient(code, status):
                raise
            raise Retry(_describe(e), status, _retry_after(e)) from None
        except _TRANSIENT_ERRORS as e:
            raise Retry(_describe(e)) from None

    return with_retries(url, options, attempt)


class S3Stream(ResumableStream):
    """A GetObject body that re-issues a ranged GetObject (``IfMatch`` the first ETag)
    when the stream breaks; the retry loop is :class:`ResumableStream`'s."""

    transient_errors = _TRANSIENT_ERRORS

    def __init__(
        self, url: str, offset: int = 0, length: int | None = None, options: SourceOptions = DEFAULT_OPTIONS
    ) -> None:
        self._bucket, self._key = split_url(url)
        self._body: Any = None
        super().__init__(url, offset, length, options)

    def _open_body(self, pos: int, end: int | None) -> Reply:
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        ranged = pos > 0 or end is not None
        if ranged:
            kwargs["Range"] = f"bytes={pos}-{'' if end is None else end - 1}"
        if self.etag:
            kwargs["IfMatch"] = self.etag
        try:
            resp = client(self._options).get_object(**kwargs)
        except botocore.exceptions.ClientError as e:
            code, status = _error_info(e)
            if code == "InvalidRange" or status == 416:
                raise AtEnd() from None  # starts at/after the end of the object
            if code == "PreconditionFailed" or status == 412:
                raise SourceError(
                    f"object changed while reading (ETag was {self.etag})", url=self.url, status=status
                ) from None
            if _is_transient(code, status):
                raise Retry(_describe(e), status, _retry_after(e)) from None
            raise _permanent(self.url, e) from None
        except _TRANSIENT_ERRORS as e:
            raise Retry(_describe(e)) from None
        except botocore.exceptions.BotoCoreError as e:
            raise _permanent(self.url, e) from None
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        try:
            length = parse_length(resp.get("ContentLength"))
            if status == 206 or (ranged and status != 200):
                reply = partial_reply(resp.get("ContentRange"), length, resp.get("ETag"), pos, end)
            elif pos > 0:
                raise SourceError("S3 server ignored the Range header", url=self.url)
            else:
                reply = whole_reply(length, False, resp.get("ETag"))
        except (Retry, SourceError):
            _close_quietly(resp["Body"])
            raise
        self._body = resp["Body"]
        return reply

    def _read_body(self, size: int) -> bytes:
        # Bounded pieces: StreamingBody.read(n) blocks until n bytes arrive and loses them
        # on a reset, so a huge n could never make progress on a link that drops every few
        # hundred KB. (Its raw read1 would skip botocore's checksum validation.)
        return self._body.read(min(size, PIECE))

    def _close_body(self, complete: bool) -> None:
        body, self._body = self._body, None
        if body is not None:
            _close_quietly(body)


def _close_quietly(body: Any) -> None:
    try:
        body.close()
    except Exception:  # closing a broken stream must not mask the read error
        pass


# -- backend API ------------------------------------------------------------------


def open_stream(
    url: str, offset: int = 0, length: int | None = None, options: SourceOptions = DEFAULT_OPTIONS
) -> BinaryIO:
    """Stream ``s3://bucket/key`` from ``offset`` (``length`` bytes or to the end)."""
    return S3Stream(url, offset, length, options)  # type: ignore[return-value]


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
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError, boto3.exceptions.Boto3Error) as e:
        raise _permanent(url, e) from None


BACKEND = Backend(open_stream, read_bytes, list_prefix, put_file)

__all__ = ["BACKEND", "S3Stream", "client", "list_prefix", "open_stream", "put_file", "read_bytes", "split_url"]
