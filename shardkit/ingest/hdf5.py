"""HDF5 source (needs ``h5py``: ``pip install 'shardkit[hdf5]'``).

Datasets (paths inside the file, e.g. ``train/images``, are accepted):

- images: ``options.images_key``, default ``images``, else ``data``. One of:

  * a 1-D dataset of encoded image bytes, one per row: variable-length uint8
    (``h5py.vlen_dtype(np.uint8)``, the usual choice), fixed-size opaque (``np.void``)
    or fixed-length byte strings (``S``); the last two are padded with NUL bytes to
    the longest image (numpy strips trailing NULs from ``S``; JPEG/PNG decoders ignore
    the padding). Variable-length *strings* cannot hold image bytes (HDF5 refuses NULs).
  * a dense array ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``, encoded per
    ``options.image_format`` (png by default; never lossy unless jpg is asked for).
  * a group with one dataset per image (scalar opaque ``np.void(jpeg_bytes)``, 1-D uint8
    bytes, or a dense (H, W[, C]) array), read in h5py's (name) order; the member name
    is the source id and a ``label``/``cls`` attribute on a member its label.
- labels: ``options.labels_key``, default ``labels`` (optional): one integer per image.
- ids: ``options.keys_key``, default ``keys`` (optional): kept as ``json.source_id``
  (the row index, or the member name for a group, otherwise).
- class names: attribute ``classes`` or ``class_names`` on the labels dataset or the
  file root, or a ``classes`` dataset of strings.

Rows are read in chunks (bounded memory). The file is opened in ``__iter__``, never
kept open on the source object, so a source can be pickled to worker processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import ShardkitError
from . import IngestOptions, missing_library
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

FORMAT = "hdf5"
SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ENCODED_ROWS = 256  # encoded rows per read


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise missing_library("h5py", FORMAT) from None
    return h5py


def detect(path: str) -> bool:
    """A file starting with the HDF5 signature (at offset 0, where h5py writes it)."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(8) == SIGNATURE


def _datasets(f: Any) -> list[str]:
    h5py = _h5py()
    names: list[str] = []
    f.visititems(
        lambda name, obj: names.append(f"{name} {obj.shape} {obj.dtype}") if isinstance(obj, h5py.Dataset) else None
    )
    return names


def _names(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(values).tolist()]


class HDF5Source:
    """Images (encoded or dense) plus optional labels and ids from one HDF5 file."""

    def __init__(self, path: str, options: IngestOptions) -> None:
        h5py = _h5py()
        self.path = path
        self.options = options
        self.image_format = check_image_format(options.image_format)
        self.skipped: list[tuple[str, str]] = []  # (where, reason), filled while iterating
        self.classes: list[str] | None = None
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise ShardkitError(f"{path}: cannot open as HDF5 ({e})") from None
        with f:
            self.images_key = self._resolve(f, options.images_key, ("images", "data"), "images")
            assert self.images_key is not None
            images = f[self.images_key]
            where = f"{path}: dataset {self.images_key!r}"
            self.kind = self._kind(images, h5py, where)
            if self.kind == "group":
                self.count = len(images)
            else:
                self.count = int(images.shape[0]) if images.shape else 0
            if self.kind == "dense":
                check_dense(images.shape, images.dtype, self.image_format, where)
            self.labels_key = self._resolve(f, options.labels_key, ("labels",), "labels", optional=True)
            self.keys_key = self._resolve(f, options.keys_key, ("keys",), "ids", optional=True)
            if self.labels_key is not None:
                labels = f[self.labels_key]
                if labels.shape[:1] != (self.count,):
                    raise ShardkitError(
                        f"{path}: dataset {self.labels_key!r} has shape {labels.shape} for {self.count} images"
                    )
                if labels.dtype.kind not in "iufb":
                    raise ShardkitError(f"{path}: dataset {self.labels_key!r} holds {labels.dtype}, not integer labels")
            if self.keys_key is not None and f[self.keys_key].shape[:1] != (self.count,):
                raise ShardkitError(
                    f"{path}: dataset {self.keys_key!r} has shape {f[self.keys_key].shape} for {self.count} images"
                )
            self.classes = self._classes(f)

    def _resolve(
        self, f: Any, wanted: str | None, defaults: tuple[str, ...], what: str, optional: bool = False
    ) -> str | None:
        h5py = _h5py()
        kinds = (h5py.Dataset, h5py.Group) if what == "images" else h5py.Dataset
        if wanted is not None:
            if not isinstance(f.get(wanted), kinds):
                raise ShardkitError(
                    f"{self.path}: no dataset {wanted!r} for the {what}; it has: "
                    f"{', '.join(_datasets(f)) or 'no datasets'}"
                )
            return wanted
        for name in defaults:
            if isinstance(f.get(name), kinds):
                return name
        if optional:
            return None
        raise ShardkitError(
            f"{self.path}: no dataset {' or '.join(map(repr, defaults))} for the "
            f"{what}; it has: {', '.join(_datasets(f)) or 'no datasets'} "
            "(pass --images-key)"
        )

    @staticmethod
    def _kind(images: Any, h5py: Any, where: str) -> str:
        if isinstance(images, h5py.Group):
            return "group"
        dtype = images.dtype
        base = h5py.check_vlen_dtype(dtype)
        if images.ndim == 1 and (
            (base is not None and np.dtype(base).kind in "iu" and np.dtype(base).itemsize == 1)
            or h5py.check_string_dtype(dtype) is not None
            or dtype.kind in "VS"
        ):
            return "encoded"
        if dtype.kind in "iufb" and images.ndim in (3, 4):
            return "dense"
        raise ShardkitError(
            f"{where}: shape {images.shape} {dtype} is neither encoded images "
            "(1-D vlen uint8, opaque or bytes) nor a dense (N,H,W[,C]) array"
        )

    def _classes(self, f: Any) -> list[str] | None:
        holders = [f[self.labels_key]] if self.labels_key is not None else []
        for holder in (*holders, f):
            for attr in ("classes", "class_names"):
                if attr in holder.attrs:
                    return _names(holder.attrs[attr])
        if isinstance(f.get("classes"), _h5py().Dataset):
            return _names(f["classes"][()])
        return None

    def __len__(self) -> int:
        return self.count

    @staticmethod
    def _member_label(member: Any, label: int | None, where: str) -> int | None:
        for attr in ("label", "cls"):
            if attr in member.attrs:
                value = np.asarray(member.attrs[attr])
                if value.size != 1 or value.dtype.kind not in "iu":
                    raise ShardkitError(f"{where}: attribute {attr!r} is {value!r}, not an integer label")
                return int(value.reshape(-1)[0])
        return label

    def __iter__(self) -> Iterator[dict[str, Any]]:
        h5py = _h5py()
        skipper = RecordSkipper(self.options, self.skipped)
        produced = 0
        with h5py.File(self.path, "r") as f:
            images = f[self.images_key]
            labels = f[self.labels_key] if self.labels_key is not None else None
            keys = f[self.keys_key] if self.keys_key is not None else None
            if self.kind == "dense":
                rows = chunk_rows(images.shape, images.dtype.itemsize)
            else:
                rows = _ENCODED_ROWS
            members = list(images) if self.kind == "group" else None
            for start in range(0, self.count, rows):
                stop = min(start + rows, self.count)
                chunk = images[start:stop] if members is None else members[start:stop]
                chunk_labels = (
                    to_labels(labels[start:stop], stop - start, f"{self.path}: dataset {self.labels_key!r}")
                    if labels is not None
                    else None
                )
                chunk_keys = keys[start:stop] if keys is not None else None
                for j, item in enumerate(chunk):
                    i = start + j
                    where = f"{self.path}: dataset {self.images_key!r} record {i}"
                    label = int(chunk_labels[j]) if chunk_labels is not None else None
                    source_id: Any = json_id(chunk_keys[j]) if chunk_keys is not None else i
                    if members is not None:  # group: item is a member name
                        where = f"{self.path}: dataset {self.images_key}/{item}"
                        member = images[item]
                        if not isinstance(member, h5py.Dataset):
                            skipper.bad(f"{where}: a group, not an image dataset", produced, where)
                            continue
                        label = self._member_label(member, label, where)
                        source_id = item if chunk_keys is None else source_id
                        item = member[()]
                    if self.kind == "dense" or (
                        members is not None and isinstance(item, np.ndarray) and item.ndim in (2, 3)
                    ):
                        if members is not None:
                            check_dense((1, *item.shape), item.dtype, self.image_format, where)
                        ext, payload = encode_array(item, self.image_format, self.options.quality)
                    else:
                        data = item.tobytes() if isinstance(item, (np.ndarray, np.void)) else bytes(item)
                        result = image_payload(data, where)
                        if isinstance(result, str):
                            skipper.bad(result, produced, where)
                            continue
                        ext, payload = result
                    meta = {"source": self.path, "source_format": FORMAT, "source_id": source_id}
                    yield make_sample(produced, ext, payload, label, meta)
                    produced += 1


def open_source(path: str, options: IngestOptions) -> HDF5Source:
    """Open an HDF5 file of images."""
    if os.path.isdir(path):
        raise ShardkitError(f"{path}: the hdf5 source is one file, not a folder")
    return HDF5Source(path, options)
