"""ShardWriter: samples in, deterministic size-bounded tar shards plus sidecars out.

Rules, each for a reason:
- A shard never exceeds ``shard_size`` file bytes (headers, padding and end blocks
  counted), unless one sample alone is bigger: it then gets a shard of its own and a
  warning. Readers can then size buffers and caches from the setting.
- Shards are written under a temporary name and renamed only when complete, after their
  index; a crash never leaves a half shard under a final name.
- Output is deterministic (fixed mtime/uid/gid/mode, members sorted by extension), so the
  same input gives byte-identical shards: re-runs are checkable with sha256.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ShardkitError
from ..format.index import Manifest, ShardInfo, encode_index, manifest_name
from ..format.samples import encode_field, encode_sample, field_names, validate_key
from ..format.tar import BLOCK, END_BLOCKS, padding
from ..sizes import parse_size
from ..storage.localfile import atomic_write

log = logging.getLogger(__name__)

# Encoding lives in format/samples.py beside the grouping; re-exported for existing imports.
__all__ = ["ShardWriter", "encode_field", "encode_sample", "shard_path", "validate_key"]

TMP_SUFFIX = ".tmp"


class _ShardFile:
    """A shard being written: bytes are hashed and written on a background thread.

    sha256 and write(2) both release the GIL, so they overlap with the caller reading and
    encoding the next samples. Order is kept (one thread, one FIFO); an I/O error
    surfaces at the next ``write`` or at ``finish``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._hash = hashlib.sha256()
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=64)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shardkit-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            pieces = self._queue.get()
            if pieces is None:
                return
            if self._error is not None:
                continue
            try:
                for piece in pieces:
                    self._hash.update(piece)
                _write_all(self._fd, pieces)
            except BaseException as e:  # noqa: BLE001 - handed to the writing thread
                self._error = e

    def write(self, pieces: list[bytes]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(pieces)

    def _stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def finish(self) -> str:
        """Flush, fsync and close; returns the sha256 of everything written."""
        self._stop()
        try:
            if self._error is not None:
                raise self._error
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
        return self._hash.hexdigest()

    def abandon(self) -> None:
        self._stop()
        os.close(self._fd)
        os.remove(self.path)


def _write_all(fd: int, pieces: list[bytes]) -> None:
    views = [memoryview(p) for p in pieces if p]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def shard_path(dest: str, name: str, number: int) -> str:
    return os.path.join(dest, f"{name}-{number:06d}.tar")


class ShardWriter:
    """Write samples into ``{dest}/{name}-000000.tar``, ``-000001.tar``, ...

    Each shard gets an index sidecar (``.tar.idx``) and the dataset a manifest
    (``{name}.manifest.json``) listing shards, counts, sizes and sha256. Use as a context
    manager; on an exception (or Ctrl-C) the samples already written are kept: the open
    shard is completed and the manifest is written with ``"complete": false``.

    Args:
        dest: output folder (created if missing).
        name: shard file name prefix (and the manifest's name).
        shard_names: the file name of each shard in order, in place of
            ``{name}-000000.tar``...: a companion set takes its base's (writing more
            shards than named is an error).
        shard_size: maximum shard file size ("1GB", "512MiB", bytes).
        max_count: maximum samples per shard (None: no limit).
        classes: class names to record in the manifest (label i -> classes[i]).
        overwrite: replace shards of the same name already in ``dest``.
        source_options: credentials/retries for a remote ``dest``.
        base: for a companion set, the manifest's ``base`` entry (see
            :mod:`shardkit.format.companion`).

    ``dest`` may be ``s3://bucket/prefix`` or an HTTP URL accepting PUT: shards are
    staged in a temporary folder and each is uploaded when complete (its index right
    after it, the manifest last), so a reader never sees a half-written shard.
    """

    def __init__(
        self,
        dest: str,
        *,
        name: str = "data",
        shard_size: int | str = "1GB",
        max_count: int | None = None,
        classes: list[str] | None = None,
        overwrite: bool = False,
        source_options: Any = None,
        shard_names: Sequence[str] | None = None,
        base: Mapping[str, str] | None = None,
    ) -> None:
        if "/" in name or not name:
            raise ValueError(f"shard name must be a plain file name prefix, got {name!r}")
        if shard_names is not None:
            names = list(shard_names)
            bad = [n for n in names if not n.endswith(".tar") or "/" in n or n.startswith(".")]
            if bad or len(set(names)) != len(names):
                raise ValueError(f"shard_names must be distinct plain '.tar' file names, got {(bad or names)[0]!r}")
        self.shard_names = None if shard_names is None else list(shard_names)
        self.base = None if base is None else dict(base)
        from ..storage.dispatch import DEFAULT_OPTIONS, local_path

        self.remote = None if local_path(dest) is not None else dest.rstrip("/")
        self._source_options = source_options or DEFAULT_OPTIONS
        if self.remote is not None:
            import tempfile

            dest = tempfile.mkdtemp(prefix="shardkit-upload-")
        self.dest = dest
        self.name = name
        self.shard_size = parse_size(shard_size)
        if self.shard_size < 3 * BLOCK:
            raise ValueError(f"shard_size {self.shard_size} is smaller than an empty tar (1536 bytes)")
        if max_count is not None and max_count < 1:
            raise ValueError("max_count must be at least 1")
        self.max_count = max_count
        self.classes = classes
        self.shards: list[ShardInfo] = []
        self.samples_written = 0
        self.bytes_written = 0
        self._file: _ShardFile | None = None
        self._offsets: list[int] = []
        self._keys: list[str] = []  # the shard's sample keys, for its version-2 index
        self._fields: set[str] = set()
        self._size = 0
        self._closed = False
        os.makedirs(dest, exist_ok=True)
        # Only this dataset's files: "data" must not touch "data-2021-000000.tar".
        own_shard = re.compile(re.escape(name) + r"-\d{6}\.tar")
        own_temp = re.compile(re.escape(name) + r"(-\d{6}\.tar(\.idx)?|\.manifest\.json)" + re.escape(TMP_SUFFIX))
        named = set(self.shard_names or ())
        temps = {n + s + TMP_SUFFIX for n in named for s in ("", ".idx")}

        def own(entry: str) -> bool:
            return entry in named if self.shard_names is not None else bool(own_shard.fullmatch(entry))

        entries = sorted(os.listdir(dest))
        for entry in entries:
            if own_temp.fullmatch(entry) or entry in temps:
                log.warning("removing %s left by an interrupted write", os.path.join(dest, entry))
                os.remove(os.path.join(dest, entry))
        existing = [os.path.join(dest, e) for e in entries if own(e)]
        if existing and not overwrite:
            raise ShardkitError(
                f"{dest} already holds {len(existing)} shard(s) named "
                f"{name + '-NNNNNN.tar' if self.shard_names is None else 'as this write names them'} "
                "(first: {}); pass overwrite=True (--overwrite) to replace them".format(os.path.basename(existing[0]))
            )
        self._stale = existing
        if existing:
            # From now on the folder describes the new dataset (empty, incomplete), so a
            # crash mid-overwrite can never read as a mix of old and new shards.
            self._write_manifest(complete=False)

    # -- writing ---------------------------------------------------------------------
    def write(self, sample: Mapping[str, Any]) -> None:
        """Append one sample (``__key__`` plus one entry per extension)."""
        if self._closed:
            raise ShardkitError("ShardWriter is closed")
        members = encode_sample(sample)
        size = sum(len(h) + len(p) + (-len(p)) % BLOCK for h, p in members)
        if self._file is not None and (
            self._size + size + len(END_BLOCKS) > self.shard_size
            or (self.max_count is not None and len(self._offsets) >= self.max_count)
        ):
            self._finish_shard()
        if size + len(END_BLOCKS) > self.shard_size:
            log.warning(
                "sample %r is %d bytes, more than shard_size %d: it gets a shard of its own",
                sample["__key__"],
                size,
                self.shard_size,
            )
            if self._file is not None:
                self._finish_shard()
        if self._file is None:
            self._start_shard()
        assert self._file is not None
        self._offsets.append(self._size)
        self._keys.append(sample["__key__"])
        pieces: list[bytes] = []
        for header, payload in members:
            pieces += (header, payload, padding(len(payload)))
        try:
            self._file.write(pieces)
        except BaseException:
            # A half-written sample must not end up in a finished shard.
            self._abandon_shard()
            raise
        self._size += size
        self._fields.update(f.lower() for f in field_names(sample))
        self.samples_written += 1

    def next_shard(self, *, allow_empty: bool = False) -> None:
        """Finish the current shard now; the next sample starts a new one.

        With ``allow_empty``, a shard with no samples is written when none is open.
        """
        if self._file is None:
            if not allow_empty:
                return
            self._start_shard()
        self._finish_shard()

    def adopt(self, shards: list[ShardInfo]) -> None:
        """Resume: take ``shards`` (complete, already in ``dest`` under their final names) as
        this writer's first shards; the next sample starts shard ``len(shards)``."""
        if self._file is not None or self.shards or self.remote is not None:
            raise ShardkitError("adopt() needs a fresh writer with a local dest")
        self.shards = list(shards)
        self.samples_written = sum(s.samples for s in shards)
        self.bytes_written = sum(s.bytes for s in shards)
        self._write_manifest(complete=False)

    def discard_open_shard(self) -> None:
        """Drop the shard being written (its temp file), e.g. when the input failed mid-way,
        so that closing does not finish it as a short, complete-looking shard."""
        if self._file is not None:
            self._file.abandon()
            self._file = None
            self.samples_written -= len(self._offsets)
            log.warning("discarded unfinished shard %d (%d samples)", len(self.shards), len(self._offsets))

    def abort(self) -> Manifest:
        """Stop after a failure: drop the shard being written (:meth:`discard_open_shard`)
        and close with an incomplete manifest, so a resumed run carries on from the last
        finished shard. (Leaving a ``with`` block on an error keeps that shard instead.)"""
        self.discard_open_shard()
        return self.close(complete=False)

    def shard_path(self, number: int) -> str:
        """Where shard ``number`` goes (locally: a remote dest is staged here)."""
        if self.shard_names is None:
            return shard_path(self.dest, self.name, number)
        if number >= len(self.shard_names):
            raise ShardkitError(f"{self.dest}: writing shard {number + 1}, but only {len(self.shard_names)} are named")
        return os.path.join(self.dest, self.shard_names[number])

    def _start_shard(self) -> None:
        path = self.shard_path(len(self.shards))
        self._file = _ShardFile(path + TMP_SUFFIX)
        self._offsets = []
        self._keys = []
        self._fields = set()
        self._size = 0

    def _finish_shard(self) -> None:
        assert self._file is not None
        end = self._size
        self._file.write([END_BLOCKS])
        self._size += len(END_BLOCKS)
        try:
            sha256 = self._file.finish()
        except BaseException:
            os.remove(self._file.path)
            self._file = None
            raise
        self._file = None
        path = self.shard_path(len(self.shards))
        atomic_write(path + ".idx", encode_index(self._offsets + [end], self._keys))
        os.replace(path + TMP_SUFFIX, path)
        if self.remote is not None:
            self._upload(path)
            self._upload(path + ".idx")
        self.shards.append(
            ShardInfo(
                name=os.path.basename(path),
                samples=len(self._offsets),
                bytes=self._size,
                sha256=sha256,
                fields=sorted(self._fields),
            )
        )
        if self.remote is None:
            # Kept current after every shard: a killed write leaves a manifest of what is complete.
            self._write_manifest(complete=False)
        self.bytes_written += self._size
        log.debug("wrote %s: %d samples, %d bytes", path, len(self._offsets), self._size)

    def _abandon_shard(self) -> None:
        assert self._file is not None
        self._file.abandon()
        self._file = None
        self.samples_written -= len(self._offsets) - 1
        log.error("abandoned shard %d after a failed write; its samples were not kept", len(self.shards))

    # -- closing ---------------------------------------------------------------------
    def close(self, *, complete: bool = True) -> Manifest:
        """Finish the open shard and write the manifest; returns it."""
        if self._closed:
            return self.manifest(complete)
        self._closed = True
        if self._file is not None:
            self._finish_shard()
        for path in self._stale:
            if os.path.basename(path) not in {s.name for s in self.shards}:
                for stale in (path, path + ".idx"):
                    if os.path.exists(stale):
                        os.remove(stale)
        manifest = self._write_manifest(complete)
        if self.remote is not None:
            self._upload(os.path.join(self.dest, manifest_name(self.name)))
            os.rmdir(self.dest)
        return manifest

    def _upload(self, path: str) -> None:
        """Upload a finished local file next to the others at the remote dest, then drop it."""
        from ..storage.dispatch import put_file

        assert self.remote is not None
        put_file(path, f"{self.remote}/{os.path.basename(path)}", options=self._source_options)
        os.remove(path)

    def _write_manifest(self, complete: bool) -> Manifest:
        manifest = self.manifest(complete)
        atomic_write(os.path.join(self.dest, manifest_name(self.name)), manifest.to_json().encode())
        return manifest

    def manifest(self, complete: bool = True) -> Manifest:
        return Manifest(
            shards=list(self.shards), name=self.name, classes=self.classes, complete=complete, base=self.base
        )

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            log.warning(
                "stopping early (%s): keeping the %d samples written so far", exc_type.__name__, self.samples_written
            )
        self.close(complete=exc_type is None)
