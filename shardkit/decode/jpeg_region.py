"""Decode only a region of a JPEG, at a reduced DCT scale (libjpeg-turbo's TurboJPEG 3 API).

libjpeg-turbo 3.0 can decompress a cropping region (``tj3SetCroppingRegion``): rows
below the region are never decoded, rows above are entropy-decoded but not
transformed, and columns outside it skip the inverse DCT and colour conversion. The
fused RandomResizedCrop (:mod:`shardkit.decode.crop`) uses it to decode just the crop.

The library is optional. It is looked for, in order, inside the ``turbojpeg`` wheel
(``pip install 'shardkit[turbo]'``, which ships libjpeg-turbo 3 and needs no system
library or compiler) and as the system's ``libturbojpeg`` (conda-forge, Homebrew and
recent Linux distributions ship 3.x; Debian 12 and Ubuntu 24.04 ship 2.1, which has no
region decoding). Without it the fused crop decodes the whole image at the reduced
scale, as before; :func:`region_support` says which case applies and why.

The calls go through ``ctypes`` (no compiler needed) and release the GIL. TurboJPEG
reports every failure through return codes, so a corrupt file cannot take the process
down; warnings (a truncated or damaged stream) are treated as failures here, and the
caller falls back to the strict/lenient decoder chain of :mod:`shardkit.decode.pixels`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import re
import threading
from importlib import metadata
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_TJINIT_DECOMPRESS = 1
_TJPARAM_STOPONWARNING = 0
_TJPARAM_SUBSAMP = 4
_TJPARAM_JPEGWIDTH = 5
_TJPARAM_JPEGHEIGHT = 6
_TJPF_RGB = 0
# iMCU width and height in pixels per TJSAMP_* value (444, 422, 420, GRAY, 440, 411, 441).
_MCU_WIDTH = (8, 16, 16, 8, 8, 32, 8)
_MCU_HEIGHT = (8, 8, 16, 8, 16, 8, 32)
# libturbojpeg-1a2b3c4d.so.0.3.0, libturbojpeg.0.dylib, turbojpeg-1a2b.dll; not the binding's own module.
_LIBRARY_NAME = re.compile(r"(^|[/\\])(lib)?turbojpeg(-[0-9a-f]+)?\.(so(\.[0-9]+)*|([0-9]+\.)*dylib|dll)$")


class _ScalingFactor(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _Handle:
    """A TurboJPEG decompressor owned by one thread, destroyed with it."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        handle = lib.tj3Init(_TJINIT_DECOMPRESS)
        if not handle:
            raise MemoryError("tj3Init failed")
        # Warnings (damaged data) fail the call; the caller then falls back.
        lib.tj3Set(handle, _TJPARAM_STOPONWARNING, 1)
        self.lib, self.handle, self.pid = lib, int(handle), os.getpid()

    def __del__(self) -> None:
        if self.pid == os.getpid():  # a forked child's copy is not its own to free
            self.lib.tj3Destroy(self.handle)


class TurboJPEG:
    """A loaded libturbojpeg with the TurboJPEG 3 API; one decompressor per thread."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        if not hasattr(lib, "tj3SetCroppingRegion"):
            raise OSError(f"{path} has no TurboJPEG 3 API (libjpeg-turbo >= 3.0 is needed for region decoding)")
        self.path = path
        lib.tj3Init.restype = ctypes.c_void_p
        lib.tj3Init.argtypes = [ctypes.c_int]
        lib.tj3Destroy.argtypes = [ctypes.c_void_p]
        lib.tj3Set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.tj3Get.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.tj3DecompressHeader.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.tj3SetScalingFactor.argtypes = [ctypes.c_void_p, _ScalingFactor]
        lib.tj3SetCroppingRegion.argtypes = [ctypes.c_void_p, _Region]
        lib.tj3Decompress8.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.tj3GetErrorStr.restype = ctypes.c_char_p
        lib.tj3GetErrorStr.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"TurboJPEG({self.path!r})"

    def _handle(self) -> int:
        """This thread's decompressor (a fresh one after fork: handles are not shared)."""
        owned = getattr(self._local, "handle", None)
        if owned is None or owned.pid != os.getpid():
            owned = self._local.handle = _Handle(self._lib)
        return owned.handle

    def decode_region(
        self, data: bytes, *, scale: int, top: int, left: int, height: int, width: int
    ) -> np.ndarray | None:
        """RGB pixels of a region of the image decoded at 1/``scale`` (an HWC uint8 view).

        The region is given in the *scaled* image's pixels and must lie inside it.
        Returns None when libjpeg-turbo cannot decode the data strictly (damaged, CMYK,
        12-bit, unusual subsampling), or when the data does not end with the end-of-image
        marker: decode it another way. A truncated JPEG whose region lies before the cut
        would decode here, though the whole-image decoders refuse it; data after the marker
        (phone makers' trailers) only costs the faster path.
        """
        if not data.endswith(b"\xff\xd9"):
            return None
        lib, handle = self._lib, self._handle()
        size = len(data)
        if lib.tj3DecompressHeader(handle, data, size) != 0:
            return self._failed(handle)
        subsamp = lib.tj3Get(handle, _TJPARAM_SUBSAMP)
        if not 0 <= subsamp < len(_MCU_WIDTH):
            return None  # TurboJPEG cannot crop unusual subsampling
        full_w, full_h = lib.tj3Get(handle, _TJPARAM_JPEGWIDTH), lib.tj3Get(handle, _TJPARAM_JPEGHEIGHT)
        scaled_w, scaled_h = -(-full_w // scale), -(-full_h // scale)
        if top < 0 or left < 0 or height < 1 or width < 1 or top + height > scaled_h or left + width > scaled_w:
            raise ValueError(f"region {left},{top} {width}x{height} is outside the {scaled_w}x{scaled_h} scaled image")
        # The window's left edge must fall on a (scaled) iMCU boundary. It reaches one iMCU
        # past the region's right and bottom edges, and left of a region that starts on a
        # boundary: the chroma upsampler reads a neighbour there, and without it the edge
        # pixels would differ from those of a whole-image decode.
        mcu_w = max(1, -(-_MCU_WIDTH[subsamp] // scale))
        mcu_h = max(1, -(-_MCU_HEIGHT[subsamp] // scale))
        x0 = max(0, left - (left % mcu_w or mcu_w))
        x1 = min(scaled_w, left + width + mcu_w)
        y1 = min(scaled_h, top + height + mcu_h)
        if lib.tj3SetScalingFactor(handle, _ScalingFactor(1, scale)) != 0:
            return self._failed(handle)
        if lib.tj3SetCroppingRegion(handle, _Region(x0, top, x1 - x0, y1 - top)) != 0:
            return self._failed(handle)
        out = np.empty((y1 - top, x1 - x0, 3), np.uint8)
        if lib.tj3Decompress8(handle, data, size, out.ctypes.data, 0, _TJPF_RGB) != 0:
            return self._failed(handle)
        return out[:height, left - x0 : left - x0 + width]

    def _failed(self, handle: int) -> np.ndarray | None:
        """Log why libjpeg-turbo failed; None (the caller decodes another way).

        The thread's decompressor is dropped: after some failures (a bad Huffman table,
        data cut inside the header) it fails every later image too."""
        reason = self._lib.tj3GetErrorStr(handle).decode(errors="replace")
        logger.debug("libjpeg-turbo region decode failed: %s", reason)
        self._local.handle = None
        return None


def _bundled_libraries() -> list[str]:
    """libturbojpeg files shipped inside the ``turbojpeg`` wheel (the ``turbo`` extra)."""
    try:
        files = metadata.files("turbojpeg") or []
        dist = metadata.distribution("turbojpeg")
    except metadata.PackageNotFoundError:
        return []
    return [str(Path(str(dist.locate_file(f)))) for f in files if _LIBRARY_NAME.search(str(f))]


@functools.cache
def _load() -> tuple[TurboJPEG | None, str]:
    """(the library or None, a sentence saying what was found); once per process."""
    tried: list[str] = []
    system = ctypes.util.find_library("turbojpeg")
    for path in [*_bundled_libraries(), *([system] if system else [])]:
        try:
            return TurboJPEG(path), f"libjpeg-turbo region decoding from {path}"
        except OSError as exc:
            tried.append(str(exc))
    found = "; ".join(tried) if tried else "no libturbojpeg found"
    return None, (
        f"{found}: fused crops decode the whole JPEG at the reduced scale. "
        "pip install 'shardkit[turbo]' (or a libjpeg-turbo >= 3.0) to decode only the crop"
    )


def turbojpeg() -> TurboJPEG | None:
    """The process's TurboJPEG 3 library, or None when there is none."""
    return _load()[0]


def region_support() -> tuple[bool, str]:
    """(whether region decoding is available, what was found or is missing)."""
    lib, message = _load()
    return lib is not None, message


_logged = False


def log_region_support() -> None:
    """Say once per process whether fused crops decode only the crop region."""
    global _logged
    if not _logged:
        _logged = True
        available, message = region_support()
        logger.log(logging.DEBUG if available else logging.INFO, "%s", message)


# ------------------------------------------------------------------ EXIF geometry


def to_stored(
    orientation: int, box: tuple[float, float, float, float], height: int, width: int
) -> tuple[float, float, float, float]:
    """Map a (top, left, height, width) box on the upright image to the stored image.

    ``height``/``width`` are the upright image's; the orientation is EXIF's (1-8), whose
    turn :func:`shardkit.decode.pixels.orient_array` applies.
    """
    top, left, h, w = box
    if orientation in (5, 6, 7, 8):
        stored_h, stored_w = width, height
    else:
        stored_h, stored_w = height, width
    if orientation == 2:
        return top, stored_w - left - w, h, w
    if orientation == 3:
        return stored_h - top - h, stored_w - left - w, h, w
    if orientation == 4:
        return stored_h - top - h, left, h, w
    if orientation == 5:
        return left, top, w, h
    if orientation == 6:
        return stored_h - left - w, top, w, h
    if orientation == 7:
        return stored_h - left - w, stored_w - top - h, w, h
    if orientation == 8:
        return left, stored_w - top - h, w, h
    return box


def to_upright(
    orientation: int, box: tuple[float, float, float, float], height: int, width: int
) -> tuple[float, float, float, float]:
    """The inverse of :func:`to_stored`: a box on the stored image (of this size) to upright."""
    top, left, h, w = box
    if orientation == 5:
        return left, top, w, h
    if orientation == 6:  # the inverse of a clockwise turn is the counter-clockwise one
        return left, height - top - h, w, h
    if orientation == 7:
        return width - left - w, height - top - h, w, h
    if orientation == 8:
        return width - left - w, top, w, h
    return to_stored(orientation, box, height, width)  # 1-4 undo themselves
