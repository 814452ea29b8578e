"""Encoded image bytes to RGB pixels: size guards, backend choice, mode conversion.

The image core shared by :func:`shardkit.decode.decode_image` (the sample decoder) and
:class:`shardkit.crop_decode.RandomResizedCropDecode` (the fused crop), and the guards
:mod:`shardkit.gpu` reuses.

Every image comes out as 3-channel RGB uint8, whatever the backend:

- grayscale is replicated to three channels; alpha (RGBA, LA, palette transparency) is
  dropped, not composited onto a background (the colour values are kept as stored);
- palette images are expanded; CMYK/YCCK JPEGs are converted by PIL (Adobe inversion
  handled), for every output mode, so all modes agree;
- 16-bit images are scaled to 8 bits by ``>> 8`` (PIL's own ``convert`` would clip
  them at 255);
- EXIF orientation is not applied (same as webdataset, PIL and simplejpeg defaults).

Backends, chosen by measurement (``tools/bench_decoders.py``, one core, CPU time; the
figures are in BENCHMARKS.md): JPEG goes to simplejpeg (libjpeg-turbo) when it is
installed, the fastest of simplejpeg, PIL and ``torchvision.io.decode_jpeg``. PIL
decodes everything else and is the JPEG fallback (CMYK/YCCK, files strict libjpeg-turbo
rejects, simplejpeg not installed). torchvision.io is not used on the CPU path: it was
about as fast as PIL for PNG and WebP, its decoders are deprecated since torchvision 0.29
(and warn), and it cannot do reduced-size JPEG decoding, which PIL (``draft``) can.

Output modes: ``"pil"`` gives a ``PIL.Image`` in mode RGB, ``"numpy"`` an HWC uint8
array (C-contiguous, writable), ``"torch"`` a CHW uint8 tensor that is a *view* of the
HWC array (``permute(2, 0, 1)``, channels-last strides). No ``.contiguous()`` copy is
made: torchvision's uint8 resize is faster on this layout than on contiguous CHW (see
BENCHMARKS.md), and ``default_collate`` copies into a contiguous batch anyway. Call
``.contiguous()`` yourself if a consumer needs it.

Safety: every image path reads the dimensions from the header first (tiny parsers for
JPEG SOFn, PNG IHDR and WebP VP8/VP8L/VP8X; PIL's lazy open for other formats) and
refuses images over ``max_pixels`` before any pixel memory is allocated.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Callable, Literal

import numpy as np
import torch
from PIL import Image

from .errors import SampleError
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
            f"limit of {max_pixels} (decompression-bomb guard)")


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

def decode_rgb(data: bytes | bytearray, *, max_pixels: int | None, format_name: str = "image",
               scale_for: Callable[[int, int], int] | None = None) -> np.ndarray | Image.Image:
    """Decode to RGB: an HWC uint8 array (simplejpeg) or a PIL image in mode RGB (PIL).

    ``scale_for(height, width)`` is called once with the full size whenever it is known
    before decoding (RandomResizedCropDecode plans its crop there) and returns a DCT
    scale denominator, which only JPEGs honour. Raises SampleError (no location) on bad data.
    """
    header = read_image_header(data)
    if header is not None:
        check_pixels(header.width, header.height, max_pixels)
    scale = scale_for(header.height, header.width) if header and scale_for else 1
    # simplejpeg for 1- and 3-channel JPEGs; CMYK/YCCK go to PIL so every mode agrees.
    if _simplejpeg is not None and header is not None and header.format == "JPEG" \
            and header.components in (1, 3):
        try:
            if scale == 1:
                return _simplejpeg.decode_jpeg(data, colorspace="RGB")
            return _simplejpeg.decode_jpeg(
                data, colorspace="RGB",
                min_height=-(-header.height // scale), min_width=-(-header.width // scale))
        except ValueError as exc:  # strict libjpeg-turbo rejects some files PIL reads
            logger.debug("simplejpeg could not decode (%s); falling back to PIL", exc)
    return _decode_rgb_pil(data, header=header, scale=scale, max_pixels=max_pixels,
                           format_name=format_name, scale_for=scale_for)


def _decode_rgb_pil(data: bytes | bytearray, *, header: ImageHeader | None, scale: int,
                    max_pixels: int | None, format_name: str,
                    scale_for: Callable[[int, int], int] | None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except Image.DecompressionBombError as exc:
        raise SampleError(f"{exc} (decompression-bomb guard)") from exc
    except Exception as exc:
        raise SampleError(f"not a valid {format_name}: {exc}") from exc
    if header is None:
        check_pixels(image.width, image.height, max_pixels)
        if image.format == "JPEG" and scale_for is not None:
            scale = scale_for(image.height, image.width)
    if scale > 1 and image.format == "JPEG":
        # draft() picks the largest power of two <= min(W // w, H // h): ask for floor sizes.
        image.draft("RGB", (image.width // scale, image.height // scale))
    try:
        return pil_to_rgb(image)
    except Exception as exc:
        raise SampleError(f"not a valid {format_name}: {exc}") from exc


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, scaling 16-bit data instead of clipping it."""
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.asarray(image).astype(np.uint32)
        gray = np.minimum(wide >> 8, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return image.convert("RGB")


def to_mode(pixels: np.ndarray | Image.Image, mode: str) -> Any:
    """HWC array or RGB PIL image -> the requested output type, copying only when needed."""
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
