"""Decode the fields of a sample dict: images, labels, text, JSON and ``.npy`` arrays.

A sample is ``{"__key__": ..., "__url__": ..., "jpg": b"...", "cls": b"3", ...}``.
:func:`make_decoder` returns a picklable callable that turns the raw bytes into Python
objects, picking the decoder from the last dot-part of each field name (``"seg.png"`` is
a PNG), as webdataset does.

Images go through :mod:`shardkit.decode.pixels` (always RGB uint8; backends, output modes and
the decompression-bomb guard are described there). Related: :mod:`shardkit.decode.size`
derives ``decode_size`` from a transform pipeline, :mod:`shardkit.decode.crop` fuses
RandomResizedCrop into decoding.
"""

from __future__ import annotations

import io
import json
import pickle
import zlib
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from ..errors import SampleError
from .pixels import DecodeMode, check_mode, dct_scale_for, decode_rgb, default_max_pixels, to_mode

#: Field extensions decoded as images, and the format name used in error messages.
IMAGE_FORMAT_NAMES: dict[str, str] = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WebP",
    "ppm": "PNM",
    "pgm": "PNM",
    "pbm": "PNM",
    "pnm": "PNM",
    "bmp": "BMP",
    "tif": "TIFF",
    "tiff": "TIFF",
    "gif": "GIF",
}
IMAGE_EXTENSIONS = frozenset(IMAGE_FORMAT_NAMES)
INT_EXTENSIONS = frozenset({"cls", "cls2", "class", "count", "index", "inx"})
TEXT_EXTENSIONS = frozenset({"txt", "text"})
JSON_EXTENSIONS = frozenset({"json", "jsn"})
NPY_EXTENSIONS = frozenset({"npy"})
PICKLE_EXTENSIONS = frozenset({"pickle", "pyd", "pkl"})

_BYTES_TYPES = (bytes, bytearray, memoryview)


def _check_size(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def decode_image(
    data: bytes | bytearray | memoryview,
    mode: DecodeMode = "torch",
    *,
    decode_size: int | None = None,
    max_pixels: int | None = None,
    format_name: str = "image",
    exif_orientation: bool = True,
) -> Any:
    """Decode one encoded image to RGB in ``mode`` ("pil", "numpy" or "torch").

    ``decode_size=S`` decodes JPEGs at the largest DCT scale (1/2, 1/4, 1/8) whose
    shorter side is still >= S; other formats decode at full size. ``max_pixels``
    defaults to ``PIL.Image.MAX_IMAGE_PIXELS``. ``exif_orientation`` turns the pixels
    upright by the EXIF orientation tag (see :mod:`shardkit.decode.pixels`). Raises SampleError
    on bad data.
    """
    check_mode(mode)
    _check_size("decode_size", decode_size)
    if isinstance(data, memoryview):
        data = data.tobytes()

    def scale_for(height: int, width: int) -> int:
        return dct_scale_for(height, width, decode_size)

    pixels = decode_rgb(
        data,
        max_pixels=default_max_pixels(max_pixels),
        format_name=format_name,
        scale_for=scale_for if decode_size else None,
        exif=exif_orientation,
    )
    return to_mode(pixels, mode)


# ----------------------------------------------------------------- the sample decoder

#: Largest decompressed size of a ``.gz`` member (a gzip bomb guard): 1 GiB.
MAX_GUNZIP = 1 << 30


def _gunzip(data: bytes | bytearray, limit: int) -> bytes:
    """Decompress one gzip member, refusing more than ``limit`` bytes of output."""
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)  # gzip header and trailer
    try:
        out = decompressor.decompress(data, limit + 1)
    except zlib.error as exc:
        raise SampleError(f"not valid gzip data: {exc}") from None
    if len(out) > limit:
        raise SampleError(f".gz member decompresses to more than {limit} bytes (gzip-bomb guard)")
    if not decompressor.eof:
        raise SampleError("truncated gzip data")
    return out


def _preview(data: bytes | bytearray, limit: int = 40) -> str:
    shown = bytes(data[:limit])
    return repr(shown) + ("..." if len(data) > limit else "")


class SampleDecoder:
    """Decode every field of a sample dict; build it with :func:`make_decoder`.

    A plain object with plain attributes, so it pickles into DataLoader workers
    (fork or spawn) as long as the user ``handlers`` do.
    """

    def __init__(
        self,
        mode: DecodeMode = "pil",
        *,
        decode_size: int | None = None,
        handlers: dict[str, Callable[[bytes], Any]] | None = None,
        allow_pickle: bool = False,
        max_pixels: int | None = None,
        exif_orientation: bool = True,
    ) -> None:
        check_mode(mode)
        _check_size("decode_size", decode_size)
        if not isinstance(exif_orientation, bool):
            raise TypeError(f"exif_orientation must be True or False, got {exif_orientation!r}")
        self.exif_orientation = exif_orientation
        self.mode = mode
        self.decode_size = decode_size
        self.handlers = {key.lower(): handler for key, handler in (handlers or {}).items()}
        self.allow_pickle = allow_pickle
        self.max_gunzip = MAX_GUNZIP
        # Resolved now, so spawned workers use the limit of the process that built this.
        self.max_pixels = default_max_pixels(max_pixels)

    def __repr__(self) -> str:
        return (
            f"SampleDecoder(mode={self.mode!r}, decode_size={self.decode_size!r}, "
            f"handlers={sorted(self.handlers)!r}, allow_pickle={self.allow_pickle!r}, "
            f"max_pixels={self.max_pixels!r}, exif_orientation={self.exif_orientation!r})"
        )

    def __call__(self, sample: dict[str, Any], *, only: Collection[str] | None = None) -> dict[str, Any]:
        """Return a new dict with every bytes field decoded (with ``only``, just those
        fields; the others stay raw bytes); the input is not modified."""
        decoded: dict[str, Any] = {}
        for field, value in sample.items():
            if (
                field.startswith("__")
                or not isinstance(value, _BYTES_TYPES)
                or (only is not None and field not in only)
            ):
                decoded[field] = value  # metadata, already decoded upstream, or not wanted
                continue
            try:
                decoded[field] = self.decode_field(field, value)
            except SampleError as exc:
                raise self._located(sample, field, exc.reason) from exc
            except MemoryError:
                raise
            except Exception as exc:  # user handlers and library surprises
                raise self._located(sample, field, f"{type(exc).__name__}: {exc}") from exc
        return decoded

    @staticmethod
    def _located(sample: dict[str, Any], field: str, message: str) -> SampleError:
        key = sample.get("__key__")
        return SampleError(
            message, url=sample.get("__url__"), key=key, member=f"{key}.{field}" if key is not None else field
        )

    def decode_field(self, field: str, data: bytes | bytearray | memoryview) -> Any:
        """Decode one field's bytes; raises SampleError without location on bad data.

        A user handler for the whole field name (``"seg.png"``) wins over one for its
        last dot-part (``"png"``), which wins over the built-in decoders.
        """
        field = field.lower()
        ext = field.rsplit(".", 1)[-1]
        if not isinstance(data, bytes):
            data = bytes(data)
        handler = self.handlers.get(field, self.handlers.get(ext))
        if handler is not None:
            return handler(data)
        if ext == "gz" and "." in field:
            # webdataset's convention: "txt.gz", "json.gz", "npy.gz" are gzip-compressed
            # members, decoded as what they hold once decompressed.
            return self.decode_field(field[:-3], _gunzip(data, self.max_gunzip))
        if ext in IMAGE_EXTENSIONS:
            return decode_image(
                data,
                self.mode,
                decode_size=self.decode_size,
                max_pixels=self.max_pixels,
                format_name=IMAGE_FORMAT_NAMES[ext],
                exif_orientation=self.exif_orientation,
            )
        if ext in INT_EXTENSIONS:
            try:
                return int(data)
            except ValueError:
                raise SampleError(f".{ext} is not an integer: {_preview(data)}") from None
        if ext in TEXT_EXTENSIONS:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SampleError(f".{ext} is not valid UTF-8 text: {exc}") from exc
        if ext in JSON_EXTENSIONS:
            try:
                return json.loads(data)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise SampleError(f"invalid JSON: {exc}") from exc
        if ext in NPY_EXTENSIONS:
            try:
                return np.load(io.BytesIO(data), allow_pickle=self.allow_pickle)
            except Exception as exc:
                raise SampleError(f"invalid .npy array: {exc}") from exc
        if ext in PICKLE_EXTENSIONS:
            if not self.allow_pickle:
                raise SampleError(
                    f".{ext} decoding needs allow_pickle=True (unpickling runs arbitrary "
                    "code: only enable it for shards you trust)"
                )
            return pickle.loads(data)
        return data  # unknown extension: raw bytes


def make_decoder(
    mode: DecodeMode = "pil",
    *,
    decode_size: int | None = None,
    handlers: dict[str, Callable[[bytes], Any]] | None = None,
    allow_pickle: bool = False,
    max_pixels: int | None = None,
    exif_orientation: bool = True,
) -> SampleDecoder:
    """Return a picklable callable that decodes a sample dict.

    Args:
        mode: image output: ``"pil"`` (RGB ``PIL.Image``), ``"numpy"`` (HWC uint8) or
            ``"torch"`` (CHW uint8 tensor, a channels-last view; see :mod:`shardkit.decode.pixels`).
        decode_size: decode JPEGs at the largest DCT scale (1/2, 1/4, 1/8) that keeps the
            shorter side >= this; see :func:`shardkit.decode.size.decode_size_for`. Other formats: full size.
        handlers: ``{extension or field name: callable(bytes) -> value}`` overriding or
            adding decoders. Use ``bytes`` as the handler to keep a field raw.
        allow_pickle: decode ``.pickle/.pyd/.pkl`` fields and object ``.npy`` arrays.
            Off by default, in which case a pickle field raises SampleError.
        max_pixels: refuse larger images (decompression-bomb guard, checked from the
            header before decoding). Default ``PIL.Image.MAX_IMAGE_PIXELS`` (~89M). PIL's
            own limit (2x its MAX_IMAGE_PIXELS) still applies to formats PIL decodes.
        exif_orientation: rotate/flip images upright by their EXIF orientation tag (on by
            default: a photo reads as it is shown; almost free, as the JPEG header walk
            finds the tag). False gives the stored pixels, as webdataset, PIL and
            torchvision do by default.

    Built-in decoders, by last dot-part of the field name: images (jpg jpeg png webp ppm
    pgm pbm pnm bmp tif tiff gif; multi-frame files give their first frame, pixels by
    the policy in :mod:`shardkit.decode.pixels`); cls/cls2/class/count/index/inx -> int;
    txt/text -> str; json/jsn -> parsed JSON; npy -> numpy array; ``X.gz`` is
    decompressed and decoded as ``X`` (webdataset's convention). Unknown extensions stay bytes, dunder
    keys (``__key__``, ``__url__``, ...) are untouched. Any failure raises
    :class:`~shardkit.errors.SampleError` naming the URL and member.
    """
    return SampleDecoder(
        mode,
        decode_size=decode_size,
        handlers=handlers,
        allow_pickle=allow_pickle,
        max_pixels=max_pixels,
        exif_orientation=exif_orientation,
    )
