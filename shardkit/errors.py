"""Exceptions raised by shardkit.

Every error about data names where it happened (URL, member, byte offset) so a user
can find the bad shard without a debugger.
"""

from __future__ import annotations


class ShardkitError(Exception):
    """Base class for every error shardkit raises on purpose."""


class ShardFormatError(ShardkitError):
    """A shard is not a valid tar, or a sample in it breaks the format rules.

    Attributes ``url``, ``offset`` and ``member`` say where (any may be None).
    """

    def __init__(
        self, message: str, *, url: str | None = None, offset: int | None = None, member: str | None = None
    ) -> None:
        self.url = url
        self.offset = offset
        self.member = member
        # True when ``member`` is the name field of a header cut short, and a directory
        # prefix stored later in that header may be missing from it.
        self.member_dir_unknown = False
        self.reason = message
        where = []
        if url is not None:
            where.append(str(url))
        if member is not None:
            where.append(f"member {member!r}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class SampleError(ShardkitError):
    """A sample could not be decoded or transformed (bad image, bad JSON, ...)."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        key: str | None = None,
        member: str | None = None,
        offset: int | None = None,
    ) -> None:
        self.url = url
        self.key = key
        self.member = member
        self.offset = offset
        self.reason = message
        where = [str(x) for x in (url,) if x is not None]
        if member is not None:
            where.append(f"member {member!r}")
        elif key is not None:
            where.append(f"sample {key!r}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class SourceError(ShardkitError):
    """A URL could not be opened or read (missing file, HTTP error, S3 error)."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None) -> None:
        self.url = url
        self.status = status
        self.reason = message
        super().__init__(f"{url}: {message}" if url else message)


class InvalidKeyError(ShardkitError, ValueError):
    """A sample key or extension that would not round-trip through the format."""


KeyError_ = InvalidKeyError  # the name before 0.2


class WorkerDied(ShardkitError):
    """A worker process exited while the write still needed it."""


class SkippedSampleWarning(UserWarning):
    """Issued by ``handler="warn"``: one per skipped sample (or per broken piece of a
    shard), naming the shard URL, the member and the reason.

    Shown by default, each time (not once per location like most warnings); silence it
    with ``warnings.filterwarnings("ignore", category=SkippedSampleWarning)`` or use
    ``handler="skip"``.
    """
