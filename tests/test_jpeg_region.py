"""Region-only JPEG decoding (libjpeg-turbo 3 through ctypes) against whole-image decoders.

Oracles: simplejpeg (a separate libjpeg-turbo build) decoding the whole image at the same
DCT scale, and the fused crop's whole-image path (``region=False``).
"""

from __future__ import annotations

import ctypes.util
import io
import logging

import numpy as np
import pytest
import simplejpeg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from shardkit.cli.synthetic import photo_like
from shardkit.decode import jpeg_region
from shardkit.decode.crop import RandomResizedCropDecode
from shardkit.decode.jpeg_region import TurboJPEG, to_stored, to_upright, turbojpeg
from shardkit.decode.pixels import orient_array
from shardkit.errors import SampleError

needs_turbo = pytest.mark.skipif(turbojpeg() is None, reason=jpeg_region.region_support()[1])


def _jpeg(width: int, height: int, *, seed: int = 0, mode: str = "RGB", **save: object) -> bytes:
    image = Image.fromarray(photo_like(np.random.default_rng(seed), width, height))
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def _whole(data: bytes, scale: int, height: int, width: int) -> np.ndarray:
    if scale == 1:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // scale), min_width=-(-width // scale))


KINDS = {
    "4:4:4": {"subsampling": 0},
    "4:2:2": {"subsampling": 1},
    "4:2:0": {"subsampling": 2},
    "progressive 4:2:0": {"subsampling": 2, "progressive": True},
    "gray": {"mode": "L"},
}


@needs_turbo
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("width, height", [(640, 480), (501, 377), (1501, 1127)])
def test_region_pixels_equal_the_whole_image_decode(kind, width, height):
    # Every edge case of the window: boxes starting on and off iMCU boundaries, touching
    # the right and bottom borders, one pixel wide.
    options = dict(KINDS[kind])
    data = _jpeg(width, height, seed=width, **options)  # type: ignore[arg-type]
    rng = np.random.default_rng(height)
    library = turbojpeg()
    assert library is not None
    for scale in (1, 2, 4, 8):
        whole = _whole(data, scale, height, width)
        scaled_h, scaled_w = whole.shape[:2]
        boxes = [(0, 0, scaled_h, scaled_w), (0, 16 // scale, 5, 1), (scaled_h - 1, scaled_w - 1, 1, 1)]
        for _ in range(25):
            top, left = int(rng.integers(0, scaled_h)), int(rng.integers(0, scaled_w))
            h, w = int(rng.integers(1, scaled_h - top + 1)), int(rng.integers(1, scaled_w - left + 1))
            boxes.append((top, left, h, w))
        for top, left, h, w in boxes:
            region = library.decode_region(data, scale=scale, top=top, left=left, height=h, width=w)
            assert region is not None and region.shape == (h, w, 3)
            expected = whole[top : top + h, left : left + w]
            np.testing.assert_array_equal(region, expected, err_msg=f"{scale=} {top, left, h, w}")


@needs_turbo
def test_region_outside_the_image_is_refused():
    data = _jpeg(64, 48)
    library = turbojpeg()
    assert library is not None
    with pytest.raises(ValueError, match="outside the 32x24 scaled image"):
        library.decode_region(data, scale=2, top=0, left=0, height=25, width=8)


@needs_turbo
def test_damaged_or_unsupported_data_gives_none():
    library = turbojpeg()
    assert library is not None
    data = _jpeg(320, 240)
    cut = data[: len(data) // 2] + b"\xff\xd9"  # cut mid-scan, end marker appended
    assert library.decode_region(cut, scale=1, top=0, left=0, height=200, width=100) is None
    assert library.decode_region(b"\xff\xd8not a jpeg", scale=1, top=0, left=0, height=1, width=1) is None


@needs_turbo
def test_a_failed_decode_does_not_spoil_the_next():
    # Some failures (a bad Huffman table, a header cut short) leave libjpeg-turbo's
    # decompressor failing every later image: the thread then starts a fresh one.
    library = turbojpeg()
    assert library is not None
    good = _jpeg(320, 240)
    bad_table = good.replace(b"\xff\xc4", b"\xff\xc4\x00\x03", 1)
    header_only = good[:300] + b"\xff\xd9"
    for bad in (bad_table, header_only):
        assert library.decode_region(bad, scale=1, top=0, left=0, height=8, width=8) is None
        region = library.decode_region(good, scale=1, top=16, left=16, height=40, width=60)
        assert region is not None
        assert np.array_equal(region, simplejpeg.decode_jpeg(good, colorspace="RGB")[16:56, 16:76])


@needs_turbo
def test_a_cut_file_is_decoded_or_refused_as_the_whole_image_path_does():
    # Cut in half with no end marker: a crop in the intact top would decode by region, but
    # the whole-image decoders refuse the file, so the fused crop must too. A refused
    # image also puts the random draws back, as if the crop had never been drawn.
    data = _jpeg(640, 480)
    cut = data[: len(data) // 2]
    outcomes = []
    for seed in range(6):
        for region in (True, False):
            torch.manual_seed(seed)
            expected_next = torch.rand(1)
            torch.manual_seed(seed)
            try:
                out = RandomResizedCropDecode(32, scale=(0.005, 0.02), region=region)(cut)
            except SampleError:
                outcomes.append((seed, region, "refused"))
                assert torch.equal(torch.rand(1), expected_next)
            else:
                outcomes.append((seed, region, out))
    for (_, _, a), (_, _, b) in zip(outcomes[::2], outcomes[1::2]):
        assert (isinstance(a, str) and a == b) or (not isinstance(a, str) and torch.equal(a, b))
    assert any(isinstance(o, str) for _, _, o in outcomes)


@needs_turbo
@pytest.mark.parametrize("damage", ["cut", "cmyk"])
def test_fused_crop_falls_back_to_the_whole_image_path(damage):
    # A cut file (PIL decodes what is there) and CMYK (PIL converts) go the old way,
    # with the same random draws: identical outputs with and without region decoding.
    data = _jpeg(700, 500, mode="CMYK") if damage == "cmyk" else _jpeg(700, 500)
    if damage == "cut":
        data = data[: len(data) * 2 // 3] + b"\xff\xd9"
    for seed in range(4):
        torch.manual_seed(seed)
        region = RandomResizedCropDecode(160)(data)
        torch.manual_seed(seed)
        whole = RandomResizedCropDecode(160, region=False)(data)
        assert torch.equal(region, whole)


@needs_turbo
@pytest.mark.parametrize("mode", ["torch", "numpy", "pil"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_fused_region_equals_fused_whole_image_for_every_orientation(orientation, mode):
    image = Image.open(io.BytesIO(_jpeg(1203, 901, seed=orientation, subsampling=2)))
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    data = buffer.getvalue()
    for seed in range(6):
        outputs = []
        for region in (True, False):
            torch.manual_seed(seed)
            out = RandomResizedCropDecode(224, mode=mode, exif=True, region=region)(data)
            outputs.append(np.asarray(out))
        if mode == "pil":
            # PIL resizes a sub-pixel box: offset by the region's corner, its filter
            # windows round differently now and then (measured: at most 4 levels, mean
            # difference under 0.25 per image).
            difference = np.abs(outputs[0].astype(int) - outputs[1])
            assert difference.max() <= 6 and difference.mean() < 0.5
        else:
            np.testing.assert_array_equal(outputs[0], outputs[1])


@settings(max_examples=200, deadline=None)
@given(
    orientation=st.integers(1, 8),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    data=st.data(),
)
def test_box_mapping_matches_orient_array(orientation, height, width, data):
    stored = np.arange(height * width * 3, dtype=np.int64).reshape(height, width, 3)
    upright = orient_array(stored, orientation)
    up_h, up_w = upright.shape[:2]
    top = data.draw(st.integers(0, up_h - 1))
    left = data.draw(st.integers(0, up_w - 1))
    h = data.draw(st.integers(1, up_h - top))
    w = data.draw(st.integers(1, up_w - left))
    s_top, s_left, s_h, s_w = (int(v) for v in to_stored(orientation, (top, left, h, w), up_h, up_w))
    piece = stored[s_top : s_top + s_h, s_left : s_left + s_w]
    np.testing.assert_array_equal(orient_array(piece, orientation), upright[top : top + h, left : left + w])
    assert to_upright(orientation, (s_top, s_left, s_h, s_w), height, width) == (top, left, h, w)


def test_a_library_without_the_turbojpeg3_api_is_refused():
    path = ctypes.util.find_library("jpeg")  # plain libjpeg: no TurboJPEG API at all
    if path is None:
        pytest.skip("no libjpeg on this machine")
    with pytest.raises(OSError, match="libjpeg-turbo >= 3.0"):
        TurboJPEG(path)


@needs_turbo
def test_the_turbo_extra_is_found_and_the_library_works_in_threads():
    assert jpeg_region.region_support()[0]
    data = _jpeg(400, 300)
    library = turbojpeg()
    assert library is not None
    whole = simplejpeg.decode_jpeg(data, colorspace="RGB")
    from concurrent.futures import ThreadPoolExecutor

    def decode(i: int) -> bool:
        out = library.decode_region(data, scale=1, top=i, left=i, height=100, width=120)
        return out is not None and np.array_equal(out, whole[i : i + 100, i : i + 120])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(decode, range(64)))


def test_missing_library_is_said_once_and_the_fused_crop_still_works(monkeypatch, caplog):
    # Simulate a machine without any libturbojpeg 3: nothing bundled, nothing on the system.
    monkeypatch.setattr(jpeg_region, "_bundled_libraries", lambda: [])
    monkeypatch.setattr(jpeg_region.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(jpeg_region, "_logged", False)
    jpeg_region._load.cache_clear()
    try:
        assert jpeg_region.turbojpeg() is None
        with caplog.at_level(logging.INFO, logger="shardkit.decode.jpeg_region"):
            jpeg_region.log_region_support()
            jpeg_region.log_region_support()
        lines = [r.getMessage() for r in caplog.records if r.name == "shardkit.decode.jpeg_region"]
        assert len(lines) == 1 and "pip install 'shardkit[turbo]'" in lines[0]
        data = _jpeg(900, 700)
        torch.manual_seed(0)
        assert RandomResizedCropDecode(224)(data).shape == (3, 224, 224)
    finally:
        jpeg_region._load.cache_clear()
