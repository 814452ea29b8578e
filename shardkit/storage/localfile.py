"""Local files (plain paths and ``file://`` URLs) as a :class:`~shardkit.storage.backend.Backend`."""

from __future__ import annotations

import os
from typing import BinaryIO

from ..errors import SourceError
from .backend import DEFAULT_OPTIONS, Backend, SourceOptions, local_path, positioned


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _path(url: str) -> str:
    path = local_path(url)
    if path is None:
        raise SourceError("not a local path or file:// URL", url=url)
    return path


def open_stream(
    url: str, offset: int = 0, length: int | None = None, options: SourceOptions = DEFAULT_OPTIONS
) -> BinaryIO:
    try:
        f = open(_path(url), "rb", buffering=0)
    except FileNotFoundError:
        raise SourceError("no such file", url=url) from None
    except IsADirectoryError:
        raise SourceError("is a directory, not a shard", url=url) from None
    except OSError as e:
        raise SourceError(f"cannot open: {e.strerror}", url=url) from None
    return positioned(f, offset, length)  # type: ignore[arg-type]


def read_bytes(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> bytes | None:
    try:
        with open(_path(url), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SourceError(f"cannot read: {e.strerror}", url=url) from None


def list_prefix(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> list[str]:
    path = _path(url)
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise SourceError(f"cannot list folder: {e.strerror}", url=url) from None
    return [os.path.join(path, n) for n in names]


BACKEND = Backend(open_stream, read_bytes, list_prefix, remote=False)
