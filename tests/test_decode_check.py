"""decode/check: the write check accepts what the reader decodes and rejects lost pixels.

Each odd JPEG is built here from a real encoder's output; the oracle for "the reader
decodes it" is shardkit's own decoder (simplejpeg, then PIL) and PIL itself.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shardkit.decode.check import check_image, check_sample, decode_problem, sample_problem
from shardkit.decode.fields import decode_image


def _jpeg(seed: int = 0, size: tuple[int, int] = (96, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _insert_before(data: bytes, marker: bytes, extra: bytes) -> bytes:
    at = data.find(marker)
    assert at > 0
    return data[:at] + extra + data[at:]


def junk_before_sos() -> bytes:
    return _insert_before(_jpeg(), b"\xff\xda", b"\x12\x34")


def ff00_before_dqt() -> bytes:
    return _insert_before(_jpeg(), b"\xff\xdb", b"\xff\x00")


def broken_icc() -> bytes:
    payload = b"ICC_PROFILE\x00" + bytes([3, 2]) + b"not-a-profile" * 4  # chunk 3 of 2
    data = _jpeg()
    return data[:2] + b"\xff\xe2" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def cut_with_end_marker() -> bytes:
    data = _jpeg()
    return data[: len(data) * 2 // 3] + b"\xff\xd9"


WARNED = {"junk before SOS": junk_before_sos, "FF00 before DQT": ff00_before_dqt, "broken ICC": broken_icc}


@pytest.mark.parametrize("name", sorted(WARNED))
def test_jpegs_with_warnings_are_kept_and_reported(name):
    data = WARNED[name]()
    # The reader decodes them: shardkit's decoder and PIL agree on the pixels.
    ours = np.asarray(decode_image(data, mode="numpy"))
    theirs = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert ours.shape == theirs.shape == (64, 96, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 2
    check = check_image(data)
    assert check.problem is None and check.warning and "Corrupt JPEG data" in check.warning
    assert decode_problem(data) is None
    assert decode_problem(data, strict=True).startswith("decodes only with a warning: Corrupt JPEG data")


def test_a_scan_cut_short_is_still_rejected():
    # PIL decodes this with a grey bottom, without a word; the check must not let it through.
    assert "premature end of data segment" in decode_problem(cut_with_end_marker())


def test_clean_images_pass_without_warning():
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    for data in (_jpeg(), png.getvalue()):
        assert check_image(data) == check_image(data).__class__()


def test_sample_check_names_fields_and_stops_at_the_first_problem():
    sample = {"__key__": "k", "0.jpg": junk_before_sos(), "1.jpg": _jpeg(1), "txt": b"caption"}
    check = check_sample(sample)
    assert check.problem is None and len(check.warnings) == 1 and check.warnings[0].startswith("0.jpg: ")
    bad = {**sample, "2.jpg": cut_with_end_marker()}
    assert sample_problem(bad).startswith("2.jpg: does not decode")
    assert sample_problem(sample, strict=True).startswith("0.jpg: decodes only with a warning")


def test_pixel_limit_applies_before_decoding():
    assert "over the limit of 100" in decode_problem(_jpeg(), max_pixels=100)
