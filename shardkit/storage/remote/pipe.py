"""``pipe:CMD`` URLs (webdataset compatibility): the shard is the stdout of a shell command.

Only reached when the caller passed ``allow_pipe=True`` (the dispatcher in
:mod:`shardkit.storage.dispatch` checks), because the URL *is* a shell command line and is run
with ``shell=True`` on purpose -- ``pipe:curl -s URL | zstd -d`` needs a shell.

Failures: when the command exits non-zero the stream raises :class:`SourceError` with
the exit status and the tail of its stderr (at end of output or on close). There is no
retry: a command cannot be resumed at a byte offset. ``offset`` skips bytes of stdout.
"""

from __future__ import annotations

import io
import logging
import subprocess
import tempfile
from typing import BinaryIO

from ...errors import SourceError
from ..backend import CHUNK, DEFAULT_OPTIONS, Backend, ChunkStream, SourceOptions

log = logging.getLogger(__name__)

STDERR_TAIL = 2000


def _command(url: str) -> str:
    if not url.startswith("pipe:"):
        raise SourceError("not a pipe: URL", url=url)
    cmd = url[5:].strip()
    if not cmd:
        raise SourceError("pipe: URL has an empty command", url=url)
    return cmd


class PipeStream(ChunkStream):
    """stdout of ``CMD`` as a stream; checks the exit status at the end."""

    def __init__(self, url: str, offset: int = 0, length: int | None = None) -> None:
        super().__init__()
        self.url = url
        # stderr to a temp file, not a pipe: a chatty command must not block on a full pipe.
        self._stderr = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(
                _command(url), shell=True, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL
            )
        except OSError as e:
            self._stderr.close()
            raise SourceError(f"cannot start command: {e}", url=url) from None
        self._left = length
        self._done = False
        self._pos = 0
        while self._pos < offset:  # a pipe cannot seek
            data = self._read_raw(min(CHUNK, offset - self._pos))
            if not data:
                break

    def _stderr_tail(self) -> str:
        self._stderr.seek(0, io.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - STDERR_TAIL))
        return self._stderr.read().decode("utf-8", "replace").strip()

    def _finish(self) -> None:
        """Reap the command; raise if it failed."""
        if self._done:
            return
        self._done = True
        status = self._proc.wait()
        if status != 0:
            tail = self._stderr_tail()
            what = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            raise SourceError(
                f"command failed ({what})" + (f"; stderr: {tail}" if tail else ""), url=self.url, status=status
            )

    def _read_raw(self, size: int) -> bytes:
        assert self._proc.stdout is not None
        data = self._proc.stdout.read(size) if size > 0 else b""
        if not data and size > 0:
            self._finish()
        self._pos += len(data)
        return data

    def _chunk(self, size: int) -> bytes:
        if self._left is not None:
            size = min(size, self._left)
        data = self._read_raw(size)
        if self._left is not None:
            self._left -= len(data)
        return data

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._done and self._proc.poll() is None:
                # Closed before the end (e.g. a length-bounded read): stop the command
                # rather than wait for it; that is not a failure.
                self._proc.kill()
                self._proc.wait()
                self._done = True
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            if not self._done:
                self._finish()
        finally:
            self._stderr.close()
            super().close()


def open_stream(
    url: str, offset: int = 0, length: int | None = None, options: SourceOptions = DEFAULT_OPTIONS
) -> BinaryIO:
    return PipeStream(url, offset, length)  # type: ignore[return-value]


def read_bytes(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> bytes | None:
    """The whole stdout of the command (a failing command raises, never returns None)."""
    with PipeStream(url) as stream:
        return stream.readall()


def list_prefix(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> list[str]:
    raise SourceError("cannot list a pipe: URL", url=url)


BACKEND = Backend(open_stream, read_bytes, list_prefix)
