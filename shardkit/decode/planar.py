"""Channels-last pixels into planar (CHW) memory: the copy every NCHW batch needs.

Decoders give interleaved HWC pixels, and a contiguous NCHW batch (what torch's
default_collate gives) needs each image de-interleaved once. numpy's strided copy does
any layout. When OpenCV is installed (``pip install shardkit[opencv]``), its ``split``
(SIMD) does the common case -- a dense HWC array of 3 or 4 channels into dense planes --
several times faster, and ``flip`` mirrors each plane in place after it. The values are
the same either way; OpenCV's global settings (threads) are left as the user set them.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# dtypes cv2.split takes as numpy arrays (native byte order)
_OPENCV_DTYPES = frozenset(np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "int32", "float32", "float64"))


@functools.cache
def _opencv() -> Any:
    """The cv2 module, or None when it is not installed, does not import, or fails a
    one-off check of the calls used here (a half-removed install can import)."""
    try:
        import cv2

        probe = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
        planes = np.empty((3, 2, 5), dtype=np.uint8)
        _split(cv2, planes, probe, flip=True)
        if not np.array_equal(planes, probe[:, ::-1].transpose(2, 0, 1)):
            raise ValueError("split/flip gave other values than numpy")
    except Exception as e:  # noqa: BLE001 - a broken OpenCV install only costs speed
        if not isinstance(e, ImportError):
            log.warning("OpenCV is installed but unusable (%s: %s): planar copies use numpy", type(e).__name__, e)
        return None
    return cv2


def _split(cv2: Any, dst: np.ndarray, hwc: np.ndarray, *, flip: bool) -> None:
    """OpenCV's copy of dense ``hwc`` into dense ``dst``; raises where it did not write ``dst``."""
    planes = list(dst)
    written = cv2.split(hwc, planes)
    # split fills the arrays it is given when they fit; had it made new ones instead,
    # dst would be untouched: never rely on it silently.
    if len(written) != len(planes) or any(w is not p for w, p in zip(written, planes)):
        raise ValueError("cv2.split did not write into the planes given")
    if flip:  # in place, plane by plane: no scratch image to allocate
        for plane in planes:
            cv2.flip(plane, 1, plane)


def opencv_available() -> bool:
    """Whether :func:`to_planar` can use OpenCV."""
    return _opencv() is not None


def to_planar_numpy(dst: np.ndarray, hwc: np.ndarray, *, flip: bool = False) -> None:
    """Copy ``hwc`` (H, W, C, any strides) into ``dst`` (C, H, W); ``flip`` mirrors left-right."""
    np.copyto(dst, (hwc[:, ::-1] if flip else hwc).transpose(2, 0, 1))


def to_planar(dst: np.ndarray, hwc: np.ndarray, *, flip: bool = False) -> None:
    """Copy ``hwc`` (H, W, C) into ``dst`` (C, H, W); ``flip`` mirrors left-right.

    OpenCV does it where it can (``hwc`` dense, 3 or 4 channels, ``dst`` dense, a dtype it
    takes); numpy does the rest. Shapes that do not match raise as ``np.copyto`` does.
    """
    cv2 = _opencv()
    if (
        cv2 is None
        or hwc.ndim != 3
        or hwc.shape[2] not in (3, 4)
        or dst.shape != (hwc.shape[2], hwc.shape[0], hwc.shape[1])
        or hwc.dtype != dst.dtype
        or hwc.dtype not in _OPENCV_DTYPES
        or not hwc.flags.c_contiguous
        or not dst.flags.c_contiguous
        or hwc.size == 0
        or np.may_share_memory(dst, hwc)  # numpy copes with overlap, split does not
    ):
        to_planar_numpy(dst, hwc, flip=flip)
        return
    try:
        _split(cv2, dst, hwc, flip=flip)
    except Exception:  # noqa: BLE001 - cv2.error and the like: numpy writes every value again
        to_planar_numpy(dst, hwc, flip=flip)
