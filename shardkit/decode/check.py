"""Does an image really decode? The writer's check that it only stores what readers can decode.

A header sniff or an end-marker check lets through files truncated in the middle,
corrupt entropy data, codecs PIL cannot decode (AVIF, HEIC, JPEG XL without plugins) and
decompression bombs. :func:`decode_problem` decodes every pixel, after the same
pixel-count guard the reader applies (``PIL.Image.MAX_IMAGE_PIXELS`` unless
``max_pixels`` is given), checked on the header before any pixel memory is allocated:

- JPEG (1 or 3 channels) with libjpeg-turbo in strict mode (simplejpeg, the reader's own
  JPEG decoder): any libjpeg warning ("premature end of data segment", "N extraneous
  bytes before marker", "bad Huffman code") rejects the file. PIL alone is not enough: it
  turns a premature end into a silently grey bottom, so a file cut in the middle with an
  end marker glued on passes. Every entropy-coded bit is decoded (that is where truncation
  and corruption show); the inverse DCT runs at 1/8 scale into grey, because IDCT and
  colour conversion cannot fail (CPU per 500x375 JPEG, tools/bench_write.py's images:
  1.8 ms this way, 2.5 ms full-size RGB, 3.1 ms PIL). Other JPEGs (CMYK/YCCK) and a missing simplejpeg fall back to PIL.
- everything else with PIL (``Image.open`` + ``load``), the reader's decoder for them.

Light on purpose (PIL only, no torch): it runs in every writer worker process.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
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


def decode_problem(data: bytes, *, max_pixels: int | None = None) -> str | None:
    """None when ``data`` decodes cleanly within the pixel limit, else why not."""
    limit = pixel_limit(max_pixels)
    header = read_image_header(data)
    if header is not None:
        problem = _over(header.width, header.height, limit)
        if problem:
            return problem
        if header.format == "JPEG" and header.components in (1, 3) and _simplejpeg is not None:
            try:
                _simplejpeg.decode_jpeg(data, colorspace="GRAY", min_factor=8, strict=True)
                return None
            except ValueError as e:
                message = str(e)
                if message.startswith(("Corrupt JPEG data", "Premature end")):
                    return f"does not decode: {message}"
                # Not about the data (a conversion libjpeg-turbo refuses...): PIL decides.
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


def sample_problem(sample: Mapping[str, Any], *, max_pixels: int | None = None) -> str | None:
    """The first image field of ``sample`` that does not decode, with the reason; None if all do."""
    for ext, value in sample.items():
        if ext.rsplit(".", 1)[-1].lower() in IMAGE_FIELDS and isinstance(value, (bytes, bytearray, memoryview)):
            problem = decode_problem(bytes(value), max_pixels=max_pixels)
            if problem:
                return f"{ext}: {problem}"
    return None
