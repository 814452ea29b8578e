"""NumPy sources: ``.npy``, ``.npz`` and raw memmap files of dense images.

- ``.npy``: an ``(N, H, W)``, ``(N, H, W, C)`` or channel-first ``(N, C, H, W)`` array,
  memory-mapped (``np.load(mmap_mode="r")``). An object array of encoded image bytes is
  read only with ``options.allow_pickle`` (loading it unpickles the whole file).
- ``.npz``: the images array is ``options.images_key`` (default ``images``, else the
  first 3-D/4-D uint8 array), labels ``options.labels_key`` (default ``labels``, if
  present), ids ``options.keys_key`` (default ``keys``, if present). Members are streamed
  row-chunk by row-chunk straight from the zip, compressed (``savez_compressed``) or not,
  so memory stays bounded.
- anything else: a raw memmap; ``options.shape`` (full array shape, first dimension may
  be -1 to infer N from the file size) and ``options.dtype`` are required.

Labels from ``options.labels`` (a ``.npy`` file, or a text file of one integer a line)
override those found in an ``.npz``. Dense images are encoded per
``options.image_format`` (see :func:`encode_array`); channel-first arrays are recognised
when axis 1 has 1, 3 or 4 entries and the last axis does not.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import ShardkitError
from . import IngestOptions
from .common import (
    RecordSkipper,
    check_dense,
    check_image_format,
    chunk_rows,
    encode_array,
    image_payload,
    json_id,
    make_sample,
    to_labels,
)

log = logging.getLogger(__name__)

FORMAT = "numpy"
_CHUNK_BYTES = 64 << 20  # rows read at once: bounded memory, few calls
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


# -- dense image encoding (shared with the HDF5 source) ------------------------------------


# -- labels ---------------------------------------------------------------------------------


def _load_label_file(path: str, count: int) -> np.ndarray:
    if not os.path.isfile(path):
        raise ShardkitError(f"{path}: labels file not found")
    try:
        with open(path, "rb") as f:
            is_npy = f.read(6) == _NPY_MAGIC
        values = np.load(path, allow_pickle=False) if is_npy else np.loadtxt(path, dtype=np.int64, ndmin=1)
    except ValueError as e:
        raise ShardkitError(f"{path}: cannot read labels ({e})") from None
    return to_labels(values, count, path)


# -- npz members, streamed --------------------------------------------------------------------


def _npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _npz_members(path: str) -> dict[str, tuple[tuple[int, ...], bool, np.dtype]]:
    """Array name -> (shape, fortran_order, dtype), reading only the headers."""
    members = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".npy"):
                    with zf.open(info) as f:
                        members[info.filename[:-4]] = _npy_header(f)
    except (zipfile.BadZipFile, ValueError) as e:
        raise ShardkitError(f"{path}: not a readable .npz file ({e})") from None
    return members


def _iter_npz_rows(
    path: str, name: str, shape: tuple[int, ...], dtype: np.dtype, rows: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(start, chunk) of a C-order npz member, decompressing as it goes."""
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    with zipfile.ZipFile(path) as zf, zf.open(name + ".npy") as f:
        _npy_header(f)
        for start in range(0, shape[0], rows):
            n = min(rows, shape[0] - start)
            data = f.read(n * row_bytes)
            if len(data) != n * row_bytes:
                raise ShardkitError(f"{path}: array {name!r} ends early, at row {start + len(data) // row_bytes}")
            yield start, np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:]))


# -- the source -----------------------------------------------------------------------------


def detect(path: str) -> bool:
    """An .npy/.npz file with the matching magic bytes (raw memmaps need --from numpy)."""
    if not os.path.isfile(path):
        return False
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".npy", ".npz"):
        return False
    with open(path, "rb") as f:
        head = f.read(6)
    return head == _NPY_MAGIC if suffix == ".npy" else head[:4] == _ZIP_MAGIC


class NumpySource:
    """Dense images (or object arrays of encoded bytes) from .npy / .npz / raw memmap."""

    def __init__(self, path: str, options: IngestOptions) -> None:
        self.path = path
        self.options = options
        self.image_format = check_image_format(options.image_format)
        self.classes: list[str] | None = None
        self.skipped: list[tuple[str, str]] = []  # (where, reason), filled while iterating
        self._labels: np.ndarray | None = None
        self._keys: list[Any] | None = None
        self._member: str | None = None  # npz array name
        self._fortran = False
        with open(path, "rb") as f:
            head = f.read(6)
        if head == _NPY_MAGIC:
            self.kind = "npy"
            with open(path, "rb") as f:
                self.shape, self._fortran, self.dtype = _npy_header(f)
        elif head[:4] == _ZIP_MAGIC:
            self.kind = "npz"
            self._open_npz()
        else:
            self.kind = "raw"
            self._open_raw()
        where = f"{path}" + (f": array {self._member!r}" if self._member else "")
        if self.dtype.hasobject:
            if not options.allow_pickle:
                raise ShardkitError(
                    f"{where}: holds Python objects, which loading would unpickle; "
                    "pass allow_pickle=True (--allow-pickle) only for a file you trust"
                )
            if self.kind != "npy" or len(self.shape) != 1:
                raise ShardkitError(f"{where}: object arrays are only read from a 1-D .npy of image bytes")
        else:
            check_dense(self.shape, self.dtype, self.image_format, where)
        if options.labels:
            self._labels = _load_label_file(options.labels, self.shape[0])

    def _open_npz(self) -> None:
        members = _npz_members(self.path)
        listing = ", ".join(f"{n} {s}" for n, (s, _, _) in members.items()) or "none"
        opts = self.options
        if opts.images_key is not None:
            if opts.images_key not in members:
                raise ShardkitError(f"{self.path}: no array {opts.images_key!r}; it has: {listing}")
            name = opts.images_key
        elif "images" in members:
            name = "images"
        else:
            found = next((n for n, (s, _, d) in members.items() if d == np.uint8 and len(s) in (3, 4)), None)
            if found is None:
                raise ShardkitError(
                    f"{self.path}: no 'images' array and no 3-D/4-D uint8 array; it has: {listing} (pass --images-key)"
                )
            name = found
        self._member = name
        self.shape, self._fortran, self.dtype = members[name]
        arrays = None
        for attr, default in (("labels_key", "labels"), ("keys_key", "keys")):
            wanted = getattr(opts, attr)
            if wanted is not None and wanted not in members:
                raise ShardkitError(f"{self.path}: no array {wanted!r}; it has: {listing}")
            key = wanted or (default if default in members else None)
            if key is None:
                continue
            if arrays is None:
                arrays = np.load(self.path, allow_pickle=False)
            where = f"{self.path}: array {key!r}"
            try:
                values = arrays[key]  # one int/string per image: small next to the images
            except ValueError as e:  # e.g. an object array, which would need unpickling
                raise ShardkitError(f"{where}: cannot read ({e})") from None
            if attr == "labels_key":
                self._labels = to_labels(values, self.shape[0], where)
            else:
                if len(values) != self.shape[0]:
                    raise ShardkitError(f"{where}: {len(values)} keys for {self.shape[0]} images")
                self._keys = [json_id(v) for v in values]
        if arrays is not None:
            arrays.close()
        if self._fortran:
            log.warning("%s: array %r is Fortran-ordered; it will be loaded whole into memory", self.path, name)

    def _open_raw(self) -> None:
        opts = self.options
        if not opts.shape or not opts.dtype:
            raise ShardkitError(
                f"{self.path}: not an .npy/.npz file; reading it as a raw memmap "
                "needs its shape and dtype (--shape N,H,W,C --dtype uint8)"
            )
        try:
            self.dtype = np.dtype(opts.dtype)
        except TypeError:
            raise ShardkitError(f"{self.path}: unknown dtype {opts.dtype!r}") from None
        shape = tuple(int(s) for s in opts.shape)
        size = os.path.getsize(self.path)
        per_row = self.dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        if shape and shape[0] == -1:
            if per_row == 0 or size % per_row:
                raise ShardkitError(
                    f"{self.path}: {size} bytes is not a whole number of {shape[1:]} {self.dtype} images"
                )
            shape = (size // per_row, *shape[1:])
        expected = per_row * shape[0] if shape else 0
        if expected != size:
            raise ShardkitError(
                f"{self.path}: shape {shape} of {self.dtype} needs {expected} bytes, the file has {size}"
            )
        self.shape = shape

    def __len__(self) -> int:
        return int(self.shape[0])

    def _chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        rows = chunk_rows(self.shape, self.dtype.itemsize)
        if self.kind == "npz" and not self._fortran:
            assert self._member is not None
            yield from _iter_npz_rows(self.path, self._member, self.shape, self.dtype, rows)
            return
        if self.kind == "npz":
            with np.load(self.path, allow_pickle=False) as arrays:
                array = arrays[self._member]
        elif self.kind == "npy":
            array = np.load(
                self.path, mmap_mode=None if self.dtype.hasobject else "r", allow_pickle=self.dtype.hasobject
            )
        else:
            array = np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)
        for start in range(0, self.shape[0], rows):
            yield start, np.asarray(array[start : start + rows])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skipper = RecordSkipper(self.options, self.skipped)
        produced = 0
        labels = self._labels
        for start, chunk in self._chunks():
            for offset, item in enumerate(chunk):
                i = start + offset
                if self.dtype.hasobject:
                    where = f"{self.path}: record {i}"
                    result = (
                        image_payload(bytes(item), where)
                        if isinstance(item, (bytes, np.ndarray))
                        else f"{where}: holds a {type(item).__name__}, not image bytes"
                    )
                    if isinstance(result, str):
                        skipper.bad(result, produced, where)
                        continue
                    ext, payload = result
                else:
                    ext, payload = encode_array(item, self.image_format, self.options.quality)
                meta = {
                    "source": self.path,
                    "source_format": FORMAT,
                    "source_id": self._keys[i] if self._keys is not None else i,
                }
                label = int(labels[i]) if labels is not None else None
                yield make_sample(produced, ext, payload, label, meta)
                produced += 1


def open_source(path: str, options: IngestOptions) -> NumpySource:
    """Open a .npy, .npz or raw memmap file of images."""
    if os.path.isdir(path):
        raise ShardkitError(f"{path}: the numpy source is one .npy/.npz/raw file, not a folder")
    return NumpySource(path, options)
