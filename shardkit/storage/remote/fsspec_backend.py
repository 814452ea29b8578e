"""Every other URL scheme (``gs://``, ``az://``, ``hf://``, ``sftp://``...) through fsspec.

Importing this module raises ImportError when fsspec is not installed; the dispatcher in
:mod:`shardkit.storage.dispatch` turns that into a clear "install fsspec" error. Credentials and
options are fsspec's (its config files and each filesystem's own environment). No
retry/resume layer here: that is the filesystem implementation's business.
"""

from __future__ import annotations

from typing import BinaryIO

import fsspec  # noqa: F401  (ImportError here is the "not installed" signal)
from fsspec.core import url_to_fs

from ...errors import SourceError
from ..backend import DEFAULT_OPTIONS, Backend, SourceOptions, positioned


def _fs(url: str):  # -> (AbstractFileSystem, path)
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as e:  # e.g. gcsfs missing for gs://
        raise SourceError(f"fsspec cannot open this URL: {e}", url=url) from None


def open_stream(
    url: str, offset: int = 0, length: int | None = None, options: SourceOptions = DEFAULT_OPTIONS
) -> BinaryIO:
    fs, path = _fs(url)
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise SourceError("no such object", url=url, status=404) from None
    except OSError as e:
        raise SourceError(f"cannot open: {e}", url=url) from None
    return positioned(f, offset, length)


def read_bytes(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> bytes | None:
    fs, path = _fs(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SourceError(f"cannot read: {e}", url=url) from None


def list_prefix(url: str, options: SourceOptions = DEFAULT_OPTIONS) -> list[str]:
    """Entries below a folder URL, or those of its folder whose names start with the last
    segment (``.../train-``), spelled like ``url``; sub-folders end with ``/``."""
    fs, path = _fs(url)
    try:
        if url.endswith("/") or fs.isdir(path):
            folder_url, name_prefix, folder = url.rstrip("/") + "/", "", path
        else:
            folder_url, _, name_prefix = url.rpartition("/")
            folder_url += "/"
            folder = path.rstrip("/").rpartition("/")[0] or fs.root_marker
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        raise SourceError("no such folder", url=url, status=404) from None
    except OSError as e:
        raise SourceError(f"cannot list: {e}", url=url) from None
    out = []
    for entry in entries:
        name = entry["name"].rstrip("/").rpartition("/")[2]
        if name.startswith(name_prefix):
            out.append(folder_url + name + ("/" if entry.get("type") == "directory" else ""))
    return sorted(out)


BACKEND = Backend(open_stream, read_bytes, list_prefix)
