"""Encoded image bytes to RGB pixels: size guards, backend choice, mode conversion.

The image core of :func:`shardkit.decode.decode_image` and
:class:`shardkit.decode.crop.RandomResizedCropDecode`, with the guards :mod:`shardkit.gpu.cuda`
reuses. Every image comes out as 3-channel RGB uint8 by one pixel policy
(:func:`pil_to_rgb`, shared with ``shardkit write --resize``; the README's table lists
it), sized from its header and refused over ``max_pixels`` before any pixel memory is
allocated. JPEG goes to simplejpeg when installed, everything else (and the JPEGs it
rejects) to PIL; "torch" output is a CHW view of the HWC array (channels-last strides).
"""

from __future__ import annotations

import functools
import io
import logging
import re
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from PIL import Image

from ..errors import SampleError
from .imageinfo import ImageHeader, read_image_header

try:  # optional: the fastest JPEG decoder measured (see module docstring)
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

logger = logging.getLogger(__name__)

DecodeMode = Literal["pil", "numpy", "torch"]
DECODE_MODES: tuple[str, ...] = ("pil", "numpy", "torch")


def check_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is one of :data:`DECODE_MODES`."""
    if mode not in DECODE_MODES:
        raise ValueError(f"mode must be one of {DECODE_MODES}, got {mode!r}")


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """Raise SampleError when a ``width`` x ``height`` image is over ``max_pixels``."""
    if max_pixels is not None and width * height > max_pixels:
        raise SampleError(
            f"image is {width}x{height} = {width * height} pixels, over the max_pixels "
            f"limit of {max_pixels} (decompression-bomb guard)"
        )


def default_max_pixels(max_pixels: int | None) -> int | None:
    """None means PIL's limit (Image.MAX_IMAGE_PIXELS, itself None when disabled)."""
    if max_pixels is None:
        return Image.MAX_IMAGE_PIXELS
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels!r}")
    return int(max_pixels)


# ------------------------------------------------------------------ reduced-size JPEG


def dct_scale_for(height: int, width: int, decode_size: int | None) -> int:
    """Largest JPEG DCT scale denominator (8, 4, 2 or 1) keeping the shorter side >= decode_size.

    libjpeg rounds scaled sizes up, so a side of ``n`` pixels decodes to ``ceil(n / s)``.
    Only powers of two are used: libjpeg-turbo's 3/8, 5/8, ... scales are not SIMD
    accelerated (measured slower than a full-size decode) and PIL cannot do them, so
    backends would disagree on the output size.
    """
    if not decode_size:
        return 1
    short = min(height, width)
    for scale in (8, 4, 2):
        if scale <= short and -(-short // scale) >= decode_size:
            return scale
    return 1


# ------------------------------------------------------------------------ image core


def decode_rgb(
    data: bytes | bytearray,
    *,
    max_pixels: int | None,
    format_name: str = "image",
    scale_for: Callable[[int, int], int] | None = None,
    exif: bool = False,
    header: ImageHeader | None | Literal["unread"] = "unread",
) -> np.ndarray | Image.Image:
    """Decode to RGB: an HWC uint8 array (simplejpeg) or a PIL image in mode RGB (PIL).

    ``scale_for(height, width)`` is called once with the full size whenever it is known
    before decoding (RandomResizedCropDecode plans its crop there) and returns a DCT
    scale denominator, which only JPEGs honour. ``exif=True`` applies the EXIF
    orientation (the size given to ``scale_for`` is then the stored, unrotated one).
    ``header``: what :func:`read_image_header` gave, when the caller has read it already.
    Raises SampleError (no location) on bad data.
    """
    if header == "unread":
        header = read_image_header(data)
    if header is not None:
        check_pixels(header.width, header.height, max_pixels)
    scale = scale_for(header.height, header.width) if header and scale_for else 1
    # simplejpeg for 1- and 3-channel JPEGs; CMYK/YCCK go to PIL so every mode agrees.
    if _simplejpeg is not None and header is not None and header.format == "JPEG" and header.components in (1, 3):
        try:
            if scale == 1:
                pixels = _simplejpeg.decode_jpeg(data, colorspace="RGB")
            else:
                pixels = _simplejpeg.decode_jpeg(
                    data, colorspace="RGB", min_height=-(-header.height // scale), min_width=-(-header.width // scale)
                )
            # simplejpeg ignores EXIF; the header parser read the orientation on its way.
            return orient_array(pixels, header.orientation) if exif else pixels
        except ValueError as exc:  # strict libjpeg-turbo rejects some files PIL reads
            logger.debug("simplejpeg could not decode (%s); falling back to PIL", exc)
    return _decode_rgb_pil(
        data, header=header, scale=scale, max_pixels=max_pixels, format_name=format_name, scale_for=scale_for, exif=exif
    )


def _reason(exc: BaseException) -> str:
    """PIL's message without the repr of our in-memory buffer (``<_io.BytesIO object at 0x...>``)."""
    return _BUFFER_REPR.sub("data", str(exc))


_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _decode_rgb_pil(
    data: bytes | bytearray,
    *,
    header: ImageHeader | None,
    scale: int,
    max_pixels: int | None,
    format_name: str,
    scale_for: Callable[[int, int], int] | None,
    exif: bool = False,
) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except Image.DecompressionBombError as exc:
        raise SampleError(f"{_reason(exc)} (decompression-bomb guard)") from exc
    except Exception as exc:
        raise SampleError(f"not a valid {format_name}: {_reason(exc)}") from exc
    if header is None:
        check_pixels(image.width, image.height, max_pixels)
        if image.format == "JPEG" and scale_for is not None:
            scale = scale_for(image.height, image.width)
    if scale > 1 and image.format == "JPEG":
        # draft() picks the largest power of two <= min(W // w, H // h): ask for floor sizes.
        image.draft("RGB", (image.width // scale, image.height // scale))
    try:
        return upright_rgb(image) if exif else pil_to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise SampleError(f"{_reason(exc)} (decompression-bomb guard)") from exc
    except Exception as exc:
        raise SampleError(f"not a valid {format_name}: {_reason(exc)}") from exc


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """The pixel policy (module docstring): any PIL mode to 8-bit RGB, first frame only.

    Used by the decoders and by the writer's re-encode, so both agree.
    """
    mode = image.mode
    if mode == "RGB":
        image.load()
        return image
    if mode.startswith("I;16") or mode == "I":
        wide = np.asarray(image).astype(np.int64)
        gray = np.clip(wide >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        gray = np.clip(np.rint(np.nan_to_num(np.asarray(image, dtype=np.float64))), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "LAB":
        from PIL import ImageCms

        converted = ImageCms.applyTransform(image, _lab_to_srgb())
        assert converted is not None  # None only with inPlace=True
        return converted
    if mode == "P" and isinstance(image.info.get("transparency"), bytes):
        # Same colours as convert("RGB"), without PIL's warning about byte transparency.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


@functools.lru_cache(maxsize=1)
def _lab_to_srgb() -> Any:
    from PIL import ImageCms  # LittleCMS, only for the rare LAB image

    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")


# EXIF orientation -> the PIL transpose that makes the image upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation_of(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8) of an opened PIL image; 1 when absent or invalid."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not fail the image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_rgb(image: Image.Image) -> Image.Image:
    """:func:`pil_to_rgb`, then the EXIF orientation applied (pixels upright, tag consumed)."""
    rgb = pil_to_rgb(image)  # first: it loads the pixels, and a corrupt file must fail here
    orientation = exif_orientation_of(image)
    return rgb.transpose(_TRANSPOSE[orientation]) if orientation != 1 else rgb


def orient_array(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an HWC array (a contiguous copy unless it is 1)."""
    if orientation == 1 or orientation not in _TRANSPOSE:
        return pixels
    if orientation == 2:
        out = pixels[:, ::-1]
    elif orientation == 3:
        out = pixels[::-1, ::-1]
    elif orientation == 4:
        out = pixels[::-1]
    elif orientation == 5:
        out = pixels.transpose(1, 0, 2)
    elif orientation == 6:
        out = np.rot90(pixels, -1)
    elif orientation == 7:
        out = np.rot90(pixels, 2).transpose(1, 0, 2)
    else:
        out = np.rot90(pixels, 1)
    return np.ascontiguousarray(out)


def to_mode(pixels: np.ndarray | Image.Image, mode: str) -> Any:
    """HWC array or RGB PIL image -> the requested output type, copying only when needed."""
    import torch  # here, not at the top: the writer's re-encode uses this module without torch

    if isinstance(pixels, np.ndarray):
        if mode == "numpy":
            return pixels
        if mode == "torch":
            return torch.from_numpy(pixels).permute(2, 0, 1)  # view, see module docstring
        return Image.fromarray(pixels, "RGB")
    if mode == "pil":
        return pixels
    array = np.array(pixels)  # writable copy (np.asarray of a PIL image is read-only)
    return array if mode == "numpy" else torch.from_numpy(array).permute(2, 0, 1)
