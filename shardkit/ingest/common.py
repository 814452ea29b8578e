"""Helpers shared by the migration sources: image sniffing, sample layout, dense arrays."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..decode.imageinfo import probe_image
from ..errors import ShardkitError
from . import IngestOptions

log = logging.getLogger(__name__)
_CHUNK_BYTES = 64 << 20  # rows read at once: bounded memory, few calls


@dataclass(frozen=True)
class Warned:
    """A sample (or list of samples) kept although an image decoded only with a decoder
    warning the reader tolerates (:mod:`shardkit.decode.check`), with ``(where, warning)``
    for each such image: what loaders and the writer's workers return so that the write
    can count and list them apart from the skipped inputs."""

    sample: Any
    warnings: tuple[tuple[str, str], ...]


def sniff_ext(data: bytes | memoryview) -> str | None:
    """Member extension for encoded image bytes (``jpg``, ``png``, ..., ``npy``) or None."""
    head = bytes(data[:64])
    info = probe_image(head)
    if info is not None:
        return info.ext
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "avif"
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
            return "heic"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        return "jp2"
    if head[:2] == b"\xff\x0a" or head[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "jxl"
    return None


def make_sample(index: int, ext: str, payload: bytes, label: int | None, meta: dict[str, Any]) -> dict[str, Any]:
    """A sample dict: running zero-padded key (no dots, no slashes), image, cls, json."""
    sample: dict[str, Any] = {"__key__": f"{index:09d}", ext: payload, "json": meta}
    if label is not None:
        sample["cls"] = int(label)
    return sample


class RecordSkipper:
    """Skip-or-raise policy for a record whose bytes are not a recognisable image.

    With ``options.strict`` every bad record is an error. Otherwise it is logged and
    appended to ``sink`` (the source's ``skipped`` list of ``(where, reason)``, as the
    file sources keep it), except when nothing good has been read yet: then the whole
    source is most likely in a layout we do not understand, and skipping everything
    would silently produce an empty dataset.
    """

    def __init__(self, options: IngestOptions, sink: list[tuple[str, str]]) -> None:
        self.strict = options.strict
        self.sink = sink

    def bad(self, message: str, produced: int, where: str) -> None:
        """Raise or record ``message`` (which starts with ``where``)."""
        if self.strict or produced == 0:
            raise ShardkitError(message)
        prefix = where + ": "
        self.sink.append((where, message[len(prefix) :] if message.startswith(prefix) else message))
        log.warning("skipping %s", message)


def image_payload(data: bytes, where: str) -> tuple[str, bytes] | str:
    """``(ext, data)`` for image bytes, or an error message naming ``where``."""
    ext = sniff_ext(data)
    if ext is None:
        return f"{where}: not a recognised image format (first bytes {bytes(data[:12]).hex(' ')}, {len(data)} bytes)"
    return ext, data


def class_names(labels: set[str]) -> list[str] | None:
    """Class names when text labels are not all integers, else None (labels are ints)."""
    try:
        for label in labels:
            int(label)
    except ValueError:
        return sorted(labels)
    return None


def check_image_format(image_format: str) -> str:
    """Normalise and validate ``options.image_format``."""
    fmt = image_format.lower()
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in ("png", "jpg", "npy"):
        raise ShardkitError(f"image format {image_format!r}: choose png (lossless), npy (raw) or jpg (lossy)")
    return fmt


def channels_first(shape: tuple[int, ...]) -> bool:
    """Whether an (N, ...) image array is laid out (N, C, H, W)."""
    return len(shape) == 4 and shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4)


def check_dense(shape: tuple[int, ...], dtype: np.dtype, image_format: str, where: str) -> None:
    """Raise unless an (N, ...) array of this shape/dtype can be stored as ``image_format``."""
    if len(shape) not in (3, 4):
        raise ShardkitError(
            f"{where}: array of shape {shape} is not a stack of images; "
            "expected (N, H, W), (N, H, W, C) or (N, C, H, W)"
        )
    channels = 1 if len(shape) == 3 else (shape[1] if channels_first(shape) else shape[3])
    if image_format == "npy":
        return
    if channels not in (1, 3, 4):
        raise ShardkitError(
            f"{where}: images with {channels} channels cannot be stored as {image_format}; use image format npy"
        )
    if dtype != np.uint8:
        raise ShardkitError(
            f"{where}: {dtype} pixels cannot be stored as {image_format} without "
            "losing values; use image format npy (or convert to uint8 first)"
        )
    if image_format == "jpg" and channels == 4:
        raise ShardkitError(f"{where}: JPEG has no alpha channel; use png or npy")


def encode_array(image: np.ndarray, image_format: str, quality: int = 95) -> tuple[str, bytes]:
    """``(ext, bytes)`` for one dense image: lossless PNG, raw .npy, or JPEG if asked.

    ``image`` is (H, W), (H, W, C) or channel-first (C, H, W) (as sliced from an array that
    :func:`channels_first` recognised). Callers validate with :func:`check_dense` first.
    """
    if image_format == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
        return "npy", buf.getvalue()
    from PIL import Image

    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[2] not in (1, 3, 4):
        image = image.transpose(1, 2, 0)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    picture = Image.fromarray(np.ascontiguousarray(image))
    buf = io.BytesIO()
    if image_format == "png":
        picture.save(buf, format="PNG")
    else:
        picture.save(buf, format="JPEG", quality=quality)
    return image_format, buf.getvalue()


def chunk_rows(shape: tuple[int, ...], itemsize: int) -> int:
    """Rows per read so that one chunk stays around 64 MB."""
    row = itemsize * int(np.prod(shape[1:], dtype=np.int64)) or 1
    return max(1, min(4096, _CHUNK_BYTES // row))


def to_labels(values: np.ndarray, count: int, where: str) -> np.ndarray:
    """A 1-D int64 label array of length ``count`` (errors name ``where``)."""
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise ShardkitError(f"{where}: labels must be one integer per image, got shape {values.shape}")
    if len(values) != count:
        raise ShardkitError(f"{where}: {len(values)} labels for {count} images")
    if values.dtype.kind == "f" and np.all(np.mod(values, 1) == 0):
        values = values.astype(np.int64)
    if values.dtype.kind not in "iub":
        raise ShardkitError(f"{where}: labels must be integers, got {values.dtype}")
    return values.astype(np.int64)


def json_id(value: Any) -> Any:
    """A JSON-able source id from an array element (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return value
