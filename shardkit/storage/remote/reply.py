"""Is this answer usable? The header checks HTTP and S3 share, before a body is read.

A response is used only when its header block is complete and consistent with the request.
Python's ``http.client`` (under requests, urllib3 and botocore alike) accepts a header
block that ends because the connection closed, so a block cut short looks like a complete
one with fewer headers, or with the last value truncated. Two rules make that harmless:

- What the headers say must hang together: a 206 carries a well-formed ``Content-Range``
  that starts at the byte asked for, ends at or after it and inside the total, and agrees
  with ``Content-Length`` when both are there; a 200 carries ``Content-Length`` or chunked
  framing (without either, a body cut short cannot be told from a whole one). Anything
  else raises :class:`~shardkit.storage.remote.stream.Retry`: a transient failure,
  retried from the current byte.
- The object's size and ETag in a :class:`Reply` are only *claims* until a byte of its
  body arrives: body bytes come after the blank line that ends the block, so their arrival
  proves the block was whole. :class:`~shardkit.storage.remote.stream.ResumableStream`
  records size and ETag only then, and retries a body that ends before its first byte.
"""

from __future__ import annotations

import re

from .stream import Reply, Retry

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)


def parse_length(value: str | None) -> int | None:
    """``Content-Length`` as an int (None when absent); a malformed one is a Retry."""
    if value is None:
        return None
    text = str(value).strip()
    if not text.isdigit():
        raise Retry(f"incomplete response: Content-Length {value!r}")
    return int(text)


def partial_reply(
    content_range: str | None, content_length: int | None, etag: str | None, pos: int, end: int | None
) -> Reply:
    """The Reply of a 206 answer to ``Range: bytes=pos-[end-1]``, or Retry."""
    if content_range is None:
        raise Retry("incomplete response: 206 without Content-Range (header block cut short?)")
    m = _CONTENT_RANGE.fullmatch(content_range.strip())
    if m is None:
        raise Retry(f"incomplete response: Content-Range {content_range!r}")
    first, last = int(m[1]), int(m[2])
    total = None if m[3] == "*" else int(m[3])
    if first != pos:
        raise Retry(f"asked for bytes from {pos}, server answered Content-Range {content_range!r}")
    if last < first or (total is not None and last >= total):
        raise Retry(f"inconsistent Content-Range {content_range!r}")
    if content_length is not None and content_length != last - first + 1:
        raise Retry(f"Content-Length {content_length} disagrees with Content-Range {content_range!r}")
    # A body shorter than asked (last + 1 < end) is usable: the stream asks for the rest.
    return Reply(last + 1, total, etag)


def whole_reply(content_length: int | None, chunked: bool, etag: str | None) -> Reply:
    """The Reply of a 200 answer (the whole object from byte 0), or Retry."""
    if content_length is None and not chunked:
        raise Retry(
            "incomplete response: 200 without Content-Length or chunked framing "
            "(header block cut short, or a body whose end cannot be checked)"
        )
    return Reply(None if chunked else content_length, None if chunked else content_length, etag)


def unsatisfied_total(content_range: str | None) -> int | None:
    """The object size a 416 answer gives (``bytes */N``), or None."""
    m = _UNSATISFIED_RANGE.fullmatch((content_range or "").strip())
    return int(m[1]) if m else None


__all__ = ["parse_length", "partial_reply", "unsatisfied_total", "whole_reply"]
