"""LMDB source (needs ``lmdb``: ``pip install 'shardkit[lmdb]'``).

The source is an LMDB environment folder (holding ``data.mdb``) or a single-file
environment (``subdir=False``). Records are read in key order; each key -> value is
one sample, the key (UTF-8, undecodable bytes backslash-escaped) kept as
``json.source_id``. Keys shaped ``__name__`` are metadata, not samples: ``__classes__``
may hold a JSON list of class names; others (e.g. the ``__len__``/``__keys__`` of common
conversion scripts) are ignored.

Value layouts, recognised by their first bytes:

1. Raw encoded image bytes (JPEG, PNG, WebP, ...; the format is sniffed). No label.
2. A shardkit record (write one with :func:`encode_record`)::

       b"SKJ1" | uint32 little-endian N | N bytes UTF-8 JSON object | image bytes

   JSON fields: ``cls`` (or ``label``): integer class; ``ext``: the image format
   (sniffed when absent); any others are kept under ``json.meta``.
3. A Python pickle (protocol 2+, first byte ``0x80``). Refused unless
   ``options.allow_pickle`` (unpickling runs code from the file). Accepted objects:
   ``bytes`` (the image); a tuple/list ``(image,)`` or ``(image, label)``; a dict with the
   image under ``image``/``img``/``jpg``/``jpeg``/``png``/``webp``/``data``/``bytes`` and
   the label under ``label``/``cls``/``target``/``class``. The image may be bytes, a 1-D
   uint8 array of encoded bytes, or a dense (H, W[, C]) uint8 array (encoded per
   ``options.image_format``).

The environment is opened read-only with ``lock=False`` inside ``__iter__`` (never kept
on the source object, so it can be pickled to worker processes).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import ShardkitError
from . import IngestOptions, missing_library
from .common import RecordSkipper, check_dense, check_image_format, encode_array, image_payload, make_sample, sniff_ext

log = logging.getLogger(__name__)

FORMAT = "lmdb"
RECORD_MAGIC = b"SKJ1"
_LMDB_MAGIC = b"\xde\xc0\xef\xbe"  # MDB_MAGIC in the meta page, little-endian
_IMAGE_FIELDS = ("image", "img", "jpg", "jpeg", "png", "webp", "data", "bytes")
_LABEL_FIELDS = ("label", "cls", "target", "class")


def encode_record(image: bytes, label: int | None = None, **meta: Any) -> bytes:
    """A value in shardkit's LMDB record layout (see the module docstring)."""
    header: dict[str, Any] = dict(meta)
    if label is not None:
        header["cls"] = int(label)
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return RECORD_MAGIC + struct.pack("<I", len(body)) + body + bytes(image)


def _lmdb() -> Any:
    try:
        import lmdb
    except ImportError:
        raise missing_library("lmdb", FORMAT) from None
    return lmdb


def _data_file(path: str) -> str:
    return os.path.join(path, "data.mdb") if os.path.isdir(path) else path


def detect(path: str) -> bool:
    """A folder with data.mdb, or a file, whose meta page carries the LMDB magic."""
    data = _data_file(path)
    if not os.path.isfile(data):
        return False
    with open(data, "rb") as f:
        head = f.read(24)
    # The page header before the magic is 16 bytes on 64-bit builds, 12 on 32-bit ones.
    return head[16:20] == _LMDB_MAGIC or head[12:16] == _LMDB_MAGIC


def _is_meta(key: bytes) -> bool:
    return len(key) > 4 and key.startswith(b"__") and key.endswith(b"__")


def _key_text(key: bytes) -> str:
    return key.decode("utf-8", errors="backslashreplace")


class LMDBSource:
    """One sample per key of an LMDB environment (value layouts in the module docstring)."""

    def __init__(self, path: str, options: IngestOptions) -> None:
        self.path = path
        self.options = options
        self.image_format = check_image_format(options.image_format)
        self.skipped: list[tuple[str, str]] = []  # (where, reason), filled while iterating
        self.classes: list[str] | None = None
        with self._env() as env, env.begin() as txn:
            entries = env.stat()["entries"]
            meta = 0
            cursor = txn.cursor()
            # Metadata keys sort together (b"__" prefix): count them without a full scan.
            if cursor.set_range(b"__"):
                for key in cursor.iternext(keys=True, values=False):
                    if not key.startswith(b"__"):
                        break
                    meta += _is_meta(key)
            classes = txn.get(b"__classes__")
        self.count = entries - meta
        if classes is not None:
            try:
                names = json.loads(classes)
                if isinstance(names, list):
                    self.classes = [str(n) for n in names]
            except (UnicodeDecodeError, json.JSONDecodeError):
                log.warning("%s: ignoring __classes__, which is not a JSON list", path)

    def _env(self) -> Any:
        lmdb = _lmdb()
        try:
            return lmdb.open(
                self.path,
                readonly=True,
                lock=False,
                subdir=os.path.isdir(self.path),
                create=False,
                max_readers=1,
                max_dbs=0,
            )
        except lmdb.Error as e:
            raise ShardkitError(f"{self.path}: cannot open as LMDB ({e})") from None

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skipper = RecordSkipper(self.options, self.skipped)
        produced = 0
        with self._env() as env, env.begin(buffers=False) as txn:
            for number, (key, value) in enumerate(txn.cursor()):
                if _is_meta(key):
                    continue
                where = f"{self.path}: record {number} (key {_key_text(key)!r})"
                result = self._decode(value, where)
                if isinstance(result, str):
                    skipper.bad(result, produced, where)
                    continue
                ext, payload, label, extra = result
                meta: dict[str, Any] = {"source": self.path, "source_format": FORMAT, "source_id": _key_text(key)}
                if extra:
                    meta["meta"] = extra
                yield make_sample(produced, ext, payload, label, meta)
                produced += 1

    def _decode(self, value: bytes, where: str) -> tuple[str, bytes, int | None, dict[str, Any]] | str:
        """(ext, image bytes, label, extra metadata) or an error message."""
        if value[:4] == RECORD_MAGIC:
            return self._decode_record(value, where)
        if len(value) > 1 and value[0] == 0x80 and 2 <= value[1] <= 5:
            if not self.options.allow_pickle:
                raise ShardkitError(
                    f"{where}: the value is a Python pickle; unpickling runs code from the file, "
                    "so it is refused. Pass allow_pickle=True (--allow-pickle) only for a "
                    "source you trust"
                )
            return self._decode_pickle(value, where)
        result = image_payload(value, where)
        return result if isinstance(result, str) else (*result, None, {})

    @staticmethod
    def _decode_record(value: bytes, where: str) -> tuple[str, bytes, int | None, dict[str, Any]] | str:
        if len(value) < 8:
            return f"{where}: shardkit record shorter than its 8-byte header"
        (size,) = struct.unpack("<I", value[4:8])
        try:
            header = json.loads(value[8 : 8 + size])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{where}: shardkit record with a bad JSON header ({e})"
        if not isinstance(header, dict):
            return f"{where}: shardkit record header is not a JSON object"
        image = value[8 + size :]
        ext = header.pop("ext", None) or sniff_ext(image)
        if ext is None:
            return f"{where}: shardkit record without 'ext' whose image format is not recognised"
        label = header.pop("cls", header.pop("label", None))
        if label is not None and not isinstance(label, int):
            return f"{where}: label {label!r} is not an integer"
        return str(ext), image, label, header

    def _decode_pickle(self, value: bytes, where: str) -> tuple[str, bytes, int | None, dict[str, Any]] | str:
        try:
            obj = pickle.loads(value)  # noqa: S301 - only with allow_pickle
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad record
            return f"{where}: cannot unpickle the value ({type(e).__name__}: {e})"
        label: Any = None
        if isinstance(obj, dict):
            image = next((obj[k] for k in _IMAGE_FIELDS if k in obj), None)
            label = next((obj[k] for k in _LABEL_FIELDS if k in obj), None)
            if image is None:
                return (
                    f"{where}: pickled dict has no image field ({', '.join(_IMAGE_FIELDS)}); "
                    f"its keys: {sorted(map(str, obj))}"
                )
        elif isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 2:
            image = obj[0]
            label = obj[1] if len(obj) == 2 else None
        else:
            image = obj
        if label is not None:
            if isinstance(label, np.ndarray) and label.size == 1:
                label = label.item()
            if not isinstance(label, (int, np.integer)) or isinstance(label, bool):
                return f"{where}: pickled label {label!r} is not an integer"
            label = int(label)
        if isinstance(image, np.ndarray) and image.ndim in (2, 3):
            try:
                check_dense((1, *image.shape), image.dtype, self.image_format, where)
            except ShardkitError as e:
                return str(e)
            ext, payload = encode_array(image, self.image_format, self.options.quality)
            return ext, payload, label, {}
        if isinstance(image, np.ndarray) and image.ndim == 1 and image.dtype == np.uint8:
            image = image.tobytes()
        if not isinstance(image, (bytes, bytearray, memoryview)):
            return f"{where}: pickled image is a {type(image).__name__}, not bytes or a uint8 array"
        result = image_payload(bytes(image), where)
        return result if isinstance(result, str) else (*result, label, {})


def open_source(path: str, options: IngestOptions) -> LMDBSource:
    """Open an LMDB environment (folder or single file)."""
    if not os.path.exists(_data_file(path)):
        raise ShardkitError(f"{path}: not an LMDB environment (no data.mdb)")
    return LMDBSource(path, options)
