"""Image format and size from the first bytes of a file, without decoding.

Used by ``shardkit write`` (real format, width/height) and by the decoders (the
decompression-bomb guard checks the size before any pixel memory is allocated).

``shardkit write`` names each image member by its real format (a PNG saved as
``x.jpg`` is stored as ``KEY.png``) and records width/height; these parsers do that
for a small fraction of what PIL's ``Image.open`` costs per file (see BENCHMARKS.md).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple


class ImageInfo(NamedTuple):
    ext: str  # canonical member extension: jpg, png, webp, gif, bmp, tiff, ppm, ...
    width: int | None
    height: int | None


@dataclass(frozen=True)
class ImageHeader:
    """What the first bytes of an image say: format, size and (JPEG only) channel count
    and EXIF orientation (1 = as stored, also when there is no EXIF block)."""

    format: str
    width: int
    height: int
    components: int | None = None
    orientation: int = 1


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


def read_image_header(data: bytes | bytearray) -> ImageHeader | None:
    """Return the size of a JPEG, PNG or WebP image from its header, without decoding.

    Returns None for other formats and for headers that cannot be parsed (the caller then
    falls back to PIL's lazy open, which also reads only the header).
    """
    if data[:2] == b"\xff\xd8":
        return _jpeg_header(data)
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width = int.from_bytes(data[16:20], "big")
        height = int.from_bytes(data[20:24], "big")
        return ImageHeader("PNG", width, height)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_header(data)
    return None


def _jpeg_header(data: bytes | bytearray) -> ImageHeader | None:
    """Walk the JPEG marker segments up to the first SOFn; None if there is none.

    On the way, an APP1 ``Exif`` segment gives the orientation (almost free: the walk
    passes it anyway, and simplejpeg, which ignores EXIF, needs it from somewhere)."""
    pos, end = 2, len(data)
    orientation = 1
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in _JPEG_SOF_MARKERS:
            if pos + 10 > end:
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            if height == 0:  # height given later by a DNL marker: let PIL deal with it
                return None
            return ImageHeader("JPEG", width, height, components=data[pos + 9], orientation=orientation)
        if marker in (0xDA, 0xD9):  # scan data or end of image before any frame header
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and orientation == 1 and data[pos + 4 : pos + 10] == b"Exif\0\0":
            orientation = exif_orientation(bytes(data[pos + 10 : pos + 2 + length]))
        pos += 2 + length
    return None


_ORIENTATION_TAG = 0x0112


def exif_orientation(tiff: bytes) -> int:
    """The orientation (1..8) in an EXIF block (a TIFF structure: byte order, IFD0);
    1 when it is absent, malformed or out of range."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    ifd = struct.unpack_from(order + "I", tiff, 4)[0]
    if ifd + 2 > len(tiff):
        return 1
    count = struct.unpack_from(order + "H", tiff, ifd)[0]
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind = struct.unpack_from(order + "HH", tiff, entry)
        if tag == _ORIENTATION_TAG:
            value = struct.unpack_from(order + "H", tiff, entry + 8)[0] if kind == 3 else 1  # SHORT
            return value if 1 <= value <= 8 else 1
    return 1


def _webp_header(data: bytes | bytearray) -> ImageHeader | None:
    """Size from the first WebP chunk: lossy VP8, lossless VP8L or extended VP8X."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
    elif chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
    else:
        return None
    return ImageHeader("WEBP", width, height)


def guess_format_name(data: bytes | bytearray) -> str:
    """Format name for error messages when the field extension does not say."""
    if data[:2] == b"\xff\xd8":
        return "JPEG"
    if data[:8] == _PNG_SIGNATURE:
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return "image"


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    fields: list[int] = []
    for line in data[2:256].split(b"\n"):
        line = line.split(b"#", 1)[0]
        for token in line.split():
            if not token.isdigit():
                return None
            fields.append(int(token))
            if len(fields) == 2:
                return fields[0], fields[1]
    return None


def probe_image(data: bytes) -> ImageInfo | None:
    """Format and (when parseable) size of encoded image bytes; None if not an image."""
    head = data[:32]
    size: tuple[int, int] | None = None
    if head[:3] == b"\xff\xd8\xff" or head[:8] == _PNG_SIGNATURE or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        ext = "jpg" if head[:2] == b"\xff\xd8" else "png" if head[:4] == b"\x89PNG" else "webp"
        header = read_image_header(data)
        size = (header.width, header.height) if header is not None else None
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        ext = "gif"
        if len(data) >= 10:
            size = struct.unpack("<HH", data[6:10])
    elif head[:2] == b"BM" and len(data) >= 26:
        ext = "bmp"
        w, h = struct.unpack("<ii", data[18:26])
        size = (w, abs(h))
    elif head[:4] in (b"II*\0", b"MM\0*"):
        ext = "tiff"
    elif head[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6") and len(head) > 2 and head[2:3].isspace():
        ext = {b"P1": "pbm", b"P4": "pbm", b"P2": "pgm", b"P5": "pgm"}.get(head[:2], "ppm")
        size = _pnm_size(data)
    else:
        return None
    if size is None:
        return ImageInfo(ext, None, None)
    return ImageInfo(ext, int(size[0]), int(size[1]))
