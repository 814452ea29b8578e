"""shardkit.decode.planar: HWC pixels into CHW memory, with OpenCV where it can and numpy otherwise."""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardkit.decode import planar
from shardkit.decode.planar import opencv_available, to_planar, to_planar_numpy
from shardkit.read.pipeline import collate

DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "float32", "float64", "float16", "bool", ">u2")


def _pixels(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return rng.integers(0, 2 if dtype == "bool" else 120, shape).astype(dtype)


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 37),
    w=st.integers(1, 37),
    c=st.sampled_from([1, 2, 3, 4, 5]),
    dtype=st.sampled_from(DTYPES),
    flip=st.booleans(),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_to_planar_is_the_transposed_copy(
    h: int, w: int, c: int, dtype: str, flip: bool, strided: bool, seed: int
) -> None:
    """Every layout, dtype and channel count gives exactly numpy's transposed (mirrored) copy."""
    rng = np.random.default_rng(seed)
    hwc = _pixels(rng, (h, w * 2 if strided else w, c), dtype)
    if strided:  # every other column: not dense, so numpy's path
        hwc = hwc[:, ::2]
    expected = np.ascontiguousarray((hwc[:, ::-1] if flip else hwc).transpose(2, 0, 1))
    dst = np.full((c, h, w), 7, dtype=dtype)
    to_planar(dst, hwc, flip=flip)
    np.testing.assert_array_equal(dst, expected)
    assert dst.dtype == expected.dtype
    fallback = np.zeros_like(dst)
    to_planar_numpy(fallback, hwc, flip=flip)
    np.testing.assert_array_equal(fallback, expected)


def test_opencv_fills_rows_of_a_batch_in_place() -> None:
    """The common case, 3 and 4 channels into rows of one batch: each row gets its image
    and nothing around it changes (OpenCV must write into the planes, not new arrays)."""
    pytest.importorskip("cv2")
    assert opencv_available()
    rng = np.random.default_rng(1)
    for c in (3, 4):
        images = [_pixels(rng, (224, 200, c), "uint8") for _ in range(3)]
        batch = np.full((5, c, 224, 200), 9, dtype=np.uint8)
        for row, image in enumerate(images, start=1):
            to_planar(batch[row], image, flip=row == 2)
        assert (batch[0] == 9).all() and (batch[4] == 9).all()
        np.testing.assert_array_equal(batch[1], images[0].transpose(2, 0, 1))
        np.testing.assert_array_equal(batch[2], images[1][:, ::-1].transpose(2, 0, 1))
        np.testing.assert_array_equal(batch[3], images[2].transpose(2, 0, 1))


def test_flip_leaves_the_source_alone() -> None:
    rng = np.random.default_rng(2)
    hwc = _pixels(rng, (16, 9, 3), "uint8")
    before = hwc.copy()
    to_planar(np.empty((3, 16, 9), np.uint8), hwc, flip=True)
    np.testing.assert_array_equal(hwc, before)


def test_a_shape_that_does_not_fit_raises() -> None:
    with pytest.raises(ValueError):
        to_planar(np.empty((3, 8, 8), np.uint8), np.zeros((8, 9, 3), np.uint8))


def test_collate_of_channels_last_images_equals_torch_stack() -> None:
    """The fallback collate de-interleaves through to_planar: the same batch torch.stack gives."""
    rng = np.random.default_rng(3)
    images = [torch.from_numpy(_pixels(rng, (31, 17, 3), "uint8")).permute(2, 0, 1) for _ in range(4)]
    out = collate(images)
    expected = torch.stack(images)
    assert out.is_contiguous() and torch.equal(out, expected)


def test_dense_three_and_four_channels_take_opencv(monkeypatch) -> None:
    """With OpenCV the common case never reaches numpy (else the fast path went away quietly)."""
    pytest.importorskip("cv2")

    def refuse(*args, **kwargs):
        raise AssertionError("numpy did a copy OpenCV should have done")

    monkeypatch.setattr(planar, "to_planar_numpy", refuse)
    rng = np.random.default_rng(4)
    for c, dtype, flip in ((3, "uint8", False), (4, "uint8", True), (3, "uint16", True), (3, "float32", False)):
        hwc = _pixels(rng, (33, 21, c), dtype)
        dst = np.empty((c, 33, 21), dtype=dtype)
        to_planar(dst, hwc, flip=flip)
        np.testing.assert_array_equal(dst, (hwc[:, ::-1] if flip else hwc).transpose(2, 0, 1))


def test_overlapping_memory_is_copied_as_numpy_copies_it() -> None:
    buffer = np.arange(48, dtype=np.uint8)
    expected = buffer.reshape(4, 4, 3).transpose(2, 0, 1).copy()
    to_planar(buffer.reshape(3, 4, 4), buffer.reshape(4, 4, 3))
    np.testing.assert_array_equal(buffer.reshape(3, 4, 4), expected)


class _SplitIntoNewArrays:
    """A cv2 whose split ignores the arrays it is given, as it does when they do not fit."""

    @staticmethod
    def split(image, planes):
        return tuple(np.ascontiguousarray(image[:, :, c]) for c in range(image.shape[2]))

    @staticmethod
    def flip(image, code, out):
        out[...] = image[:, ::-1]


class _SplitRaises(_SplitIntoNewArrays):
    @staticmethod
    def split(image, planes):
        planes[0][...] = 0  # a partial write, then the failure
        raise RuntimeError("cv2.error stand-in")


@pytest.mark.parametrize("fake", [_SplitIntoNewArrays, _SplitRaises])
@pytest.mark.parametrize("flip", [False, True])
def test_a_split_that_does_not_fill_the_planes_falls_back(monkeypatch, fake, flip) -> None:
    monkeypatch.setattr(planar, "_opencv", lambda: fake)
    hwc = _pixels(np.random.default_rng(5), (9, 7, 3), "uint8")
    dst = np.zeros((3, 9, 7), dtype=np.uint8)
    to_planar(dst, hwc, flip=flip)
    np.testing.assert_array_equal(dst, (hwc[:, ::-1] if flip else hwc).transpose(2, 0, 1))


def test_an_unusable_opencv_is_named_and_numpy_does_the_copies(monkeypatch, caplog) -> None:
    """A cv2 that imports but lacks what is used here (a half-removed install) is not used."""
    monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))
    planar._opencv.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="shardkit.decode.planar"):
            assert not opencv_available()
        assert "OpenCV is installed but unusable (AttributeError" in caplog.text
        hwc = _pixels(np.random.default_rng(6), (5, 6, 3), "uint8")
        dst = np.empty((3, 5, 6), dtype=np.uint8)
        to_planar(dst, hwc, flip=True)
        np.testing.assert_array_equal(dst, hwc[:, ::-1].transpose(2, 0, 1))
    finally:
        planar._opencv.cache_clear()
