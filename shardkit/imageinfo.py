"""Image format and size from the first bytes of a file, without decoding.

``shardkit write`` names each image member by its real format (a PNG saved as
``x.jpg`` is stored as ``KEY.png``) and records width/height; PIL's ``Image.open``
costs ~50-100 us per file for that, these parsers a few microseconds.
"""

from __future__ import annotations

import struct
from typing import NamedTuple


class ImageInfo(NamedTuple):
    ext: str  # canonical member extension: jpg, png, webp, gif, bmp, tiff, ppm, ...
    width: int | None
    height: int | None


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF_MARKERS:
            if pos + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


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
    if head[:3] == b"\xff\xd8\xff":
        ext, size = "jpg", _jpeg_size(data)
    elif head[:8] == b"\x89PNG\r\n\x1a\n":
        ext = "png"
        if head[12:16] == b"IHDR" and len(data) >= 24:
            size = struct.unpack(">II", data[16:24])
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        ext, size = "webp", _webp_size(data)
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
