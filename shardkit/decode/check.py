"""Does an image really decode? The writer's check that it only stores what readers can decode.

A header sniff or an end-marker check lets through files truncated in the middle,
corrupt entropy data, codecs PIL cannot decode (AVIF, HEIC, JPEG XL without plugins) and
decompression bombs. :func:`decode_problem` decodes every pixel, after the same
pixel-count guard the reader applies (``PIL.Image.MAX_IMAGE_PIXELS`` unless
``max_pixels`` is given), checked on the header before any pixel memory is allocated:

- JPEG (1 or 3 channels) with libjpeg-turbo in strict mode (simplejpeg, the reader's own
  JPEG decoder). A warning that means lost or corrupt entropy data ("premature end of
  data segment", "bad Huffman code", a marker where a restart marker belongs) rejects the
  file: PIL alone is not enough, it turns a premature end into a silently grey bottom, so
  a file cut in the middle with an end marker glued on would pass. Any other warning
  ("N extraneous bytes before marker", "bad ICC marker") is what real cameras and editors
  produce; the reader then decodes the file with PIL, so the check does the same and
  reports the file as *decoded with a warning* instead of rejecting it (``strict=True``
  rejects those too). Every entropy-coded bit is decoded; the inverse DCT runs at 1/8
  scale into grey, because IDCT and colour conversion cannot fail. Other JPEGs
  (CMYK/YCCK) and a missing simplejpeg fall back to PIL.
- everything else with PIL (``Image.open`` + ``load``), the reader's decoder for them.

Light on purpose (PIL only, no torch): it runs in every writer worker process.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .imageinfo import read_image_header

try:  # a declared dependency, but keep working (PIL only) without it
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

#: Field extensions holding encoded images (what ``shardkit write`` stores and readers decode).
IMAGE_FIELDS = frozenset(
    {
        "jpg",
        "jpeg",
        "png",
        "webp",
        "gif",
        "bmp",
        "tif",
        "tiff",
        "ppm",
        "pgm",
        "pbm",
        "pnm",
        "avif",
        "heic",
        "jp2",
        "jxl",
    }
)


def pixel_limit(max_pixels: int | None) -> int | None:
    """The limit in force: ``max_pixels``, else PIL's (None when disabled)."""
    if max_pixels is None:
        return Image.MAX_IMAGE_PIXELS
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels!r}")
    return int(max_pixels)


def _over(width: int, height: int, limit: int | None) -> str | None:
    if limit is not None and width * height > limit:
        return (
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limit} (decompression-bomb guard)"
        )
    return None


# libjpeg warnings that mean pixels were lost or invented: a truncated or corrupt scan.
_DATA_LOSS = re.compile(r"premature end|huffman|instead of RST|arithmetic code|bogus", re.IGNORECASE)


@dataclass(frozen=True)
class ImageCheck:
    """What the write check found for one encoded image."""

    problem: str | None = None  # readers cannot decode it (or its pixels are not all there)
    warning: str | None = None  # decodes, after a decoder warning the reader tolerates


def check_image(data: bytes, *, max_pixels: int | None = None) -> ImageCheck:
    """Decode ``data`` within the pixel limit the way the reader would (module docstring)."""
    limit = pixel_limit(max_pixels)
    header = read_image_header(data)
    warning = None
    if header is not None:
        problem = _over(header.width, header.height, limit)
        if problem:
            return ImageCheck(problem=problem)
    # A JPEG whose header our parser cannot follow (junk between segments) still goes
    # through libjpeg-turbo, for its warnings; CMYK/YCCK ones go to PIL.
    jpeg = header.format == "JPEG" and header.components in (1, 3) if header else data[:3] == b"\xff\xd8\xff"
    if jpeg and _simplejpeg is not None:
        try:
            if header is None:
                height, width, _, _ = _simplejpeg.decode_jpeg_header(data)
                problem = _over(width, height, limit)
                if problem:
                    return ImageCheck(problem=problem)
            _simplejpeg.decode_jpeg(data, colorspace="GRAY", min_factor=8, strict=True)
            return ImageCheck()
        except ValueError as e:
            message = str(e)
            if message.startswith(("Corrupt JPEG data", "Premature end")):
                if _DATA_LOSS.search(message):
                    return ImageCheck(problem=f"does not decode: {message}")
                warning = message  # the reader falls back to PIL for this file: so do we
            # Otherwise not about the data (a conversion libjpeg-turbo refuses...): PIL decides.
    problem = _pil_problem(data, limit)
    return ImageCheck(problem=problem, warning=None if problem else warning)


def _pil_problem(data: bytes, limit: int | None) -> str | None:
    try:
        with warnings.catch_warnings():
            # We apply the limit ourselves, exactly; PIL would only warn between 1x and 2x.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                problem = _over(image.width, image.height, limit)
                if problem:
                    return problem
                image.load()
    except Image.DecompressionBombError as e:
        return f"{e} (decompression-bomb guard)"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad data
        text = str(e) or type(e).__name__
        if text.startswith("cannot identify image file"):
            return "does not decode: format not supported by PIL (unknown or unsupported codec)"
        return f"does not decode: {text}"
    return None


def decode_problem(data: bytes, *, max_pixels: int | None = None, strict: bool = False) -> str | None:
    """None when readers decode ``data`` within the pixel limit, else why not. ``strict``:
    a decoder warning is a problem too."""
    check = check_image(data, max_pixels=max_pixels)
    if check.problem is None and strict and check.warning:
        return f"decodes only with a warning: {check.warning}"
    return check.problem


@dataclass
class SampleCheck:
    """The write check of one sample: the first image field that fails, and the warnings of the rest."""

    problem: str | None = None
    warnings: list[str] = field(default_factory=list)


def check_sample(sample: Mapping[str, Any], *, max_pixels: int | None = None, strict: bool = False) -> SampleCheck:
    """Check every image field of ``sample``; problems and warnings name their field."""
    out = SampleCheck()
    for ext, value in sample.items():
        if ext.rsplit(".", 1)[-1].lower() in IMAGE_FIELDS and isinstance(value, (bytes, bytearray, memoryview)):
            check = check_image(bytes(value), max_pixels=max_pixels)
            if check.problem is None and strict and check.warning:
                check = ImageCheck(problem=f"decodes only with a warning: {check.warning}")
            if check.problem:
                out.problem = f"{ext}: {check.problem}"
                return out
            if check.warning:
                out.warnings.append(f"{ext}: {check.warning}")
    return out


def sample_problem(sample: Mapping[str, Any], *, max_pixels: int | None = None, strict: bool = False) -> str | None:
    """The first image field of ``sample`` that does not decode, with the reason; None if all do."""
    return check_sample(sample, max_pixels=max_pixels, strict=strict).problem
