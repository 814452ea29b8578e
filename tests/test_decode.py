"""Tests for shardkit.decode.fields, .pixels, .decode_size and .crop_decode: image backends, modes,
reduced-size decode, bomb guard, errors."""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
import torchvision.transforms as v1
import torchvision.transforms.v2 as v2
from PIL import Image
from torchvision.transforms.v2 import functional as tvf

from shardkit.decode import pixels
from shardkit.decode.crop import RandomResizedCropDecode
from shardkit.decode.fields import IMAGE_EXTENSIONS, decode_image, make_decoder
from shardkit.decode.imageinfo import read_image_header
from shardkit.decode.jpeg_region import turbojpeg
from shardkit.decode.pixels import dct_scale_for
from shardkit.decode.size import decode_size_for, rrc_safe_decode_size
from shardkit.errors import SampleError

MODES = ("pil", "numpy", "torch")


# ------------------------------------------------------------------------ helpers


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Photo-like HWC uint8: smooth colour gradients, a soft blob, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 180 + 30
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    image[..., 0] += 40 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.05 * height * width))
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def as_hwc(image) -> np.ndarray:
    """Any decoder output -> HWC uint8 numpy array, for comparisons."""
    if isinstance(image, Image.Image):
        return np.asarray(image)
    if isinstance(image, torch.Tensor):
        return image.permute(1, 2, 0).numpy()
    return np.asarray(image)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed-looking PNG whose IHDR claims a huge size."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """Patch the SOF0 frame header of a baseline JPEG to claim another size."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]


@pytest.fixture(params=["simplejpeg", "pil"])
def jpeg_backend(request, monkeypatch) -> str:
    """Run a test with simplejpeg, and again with it 'not installed' (PIL fallback)."""
    if request.param == "pil":
        monkeypatch.setattr(pixels, "_simplejpeg", None)
    elif pixels._simplejpeg is None:
        pytest.skip("simplejpeg not installed")
    return request.param


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return photo(48, 64)


@pytest.fixture(scope="module")
def jpeg(rgb) -> bytes:
    return encode(rgb, "JPEG", quality=92)


# ------------------------------------------------------------------- images: basics


@pytest.mark.parametrize("mode", MODES)
def test_output_type_shape_dtype_per_mode(jpeg, mode, jpeg_backend):
    out = make_decoder(mode)({"__key__": "k", "jpg": jpeg})["jpg"]
    if mode == "pil":
        assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (64, 48)
    elif mode == "numpy":
        assert isinstance(out, np.ndarray) and out.shape == (48, 64, 3) and out.dtype == np.uint8
        assert out.flags.writeable and out.flags.c_contiguous
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (3, 48, 64)
        assert out.dtype == torch.uint8
        # a CHW view of HWC memory (no copy), see the module docstring
        assert out.permute(1, 2, 0).is_contiguous()


@pytest.mark.parametrize("mode", MODES)
def test_jpeg_backends_agree_and_match_source(rgb, jpeg, mode, monkeypatch):
    fast = as_hwc(decode_image(jpeg, mode)).astype(int)
    monkeypatch.setattr(pixels, "_simplejpeg", None)
    reference = as_hwc(decode_image(jpeg, mode)).astype(int)
    assert np.abs(fast - reference).mean() < 1.0 and np.abs(fast - reference).max() <= 16
    assert np.abs(fast - rgb).mean() < 4  # really the encoded picture


@pytest.mark.parametrize(
    "fmt, options",
    [
        ("PNG", {}),
        ("WEBP", {"lossless": True}),
        ("PPM", {}),
        ("BMP", {}),
        ("TIFF", {}),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_lossless_formats_decode_exactly(rgb, fmt, options, mode):
    out = decode_image(encode(rgb, fmt, **options), mode)
    np.testing.assert_array_equal(as_hwc(out), rgb)


def test_numpy_from_pil_path_is_writable(rgb):
    out = decode_image(encode(rgb, "PNG"), "numpy")
    out[0, 0, 0] = 1  # would raise on a read-only array
    assert decode_image(encode(rgb, "PNG"), "torch").permute(1, 2, 0).is_contiguous()


# ------------------------------------------------------------ images: colour handling


def _rgba(rgb: np.ndarray) -> np.ndarray:
    alpha = np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None, :, None]
    return np.concatenate([rgb, np.broadcast_to(alpha, rgb.shape[:2] + (1,))], axis=-1)


@pytest.mark.parametrize("mode", MODES)
def test_grayscale_alpha_palette_become_rgb(rgb, mode):
    gray = rgb[..., 1]
    cases = {
        "L": (Image.fromarray(gray), np.repeat(gray[..., None], 3, axis=-1)),
        "LA": (Image.fromarray(np.stack([gray, gray], -1), "LA"), np.repeat(gray[..., None], 3, axis=-1)),
        "RGBA": (Image.fromarray(_rgba(rgb), "RGBA"), rgb),  # alpha dropped, not composited
    }
    palette = Image.fromarray(rgb).quantize(16)
    cases["P"] = (palette, np.asarray(palette.convert("RGB")))
    for name, (image, expected) in cases.items():
        out = as_hwc(decode_image(encode(image, "PNG"), mode))
        assert out.shape == expected.shape, name
        np.testing.assert_array_equal(out, expected, err_msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_16bit_png_scaled_not_clipped(mode):
    wide = (np.arange(32 * 40, dtype=np.uint32).reshape(32, 40) * 51).astype(np.uint16)
    out = as_hwc(decode_image(encode(Image.fromarray(wide), "PNG"), mode))
    np.testing.assert_array_equal(out, np.repeat((wide >> 8).astype(np.uint8)[..., None], 3, -1))


def test_bilevel_pbm_is_0_or_255(rgb):
    bits = Image.fromarray(rgb[..., 0] > 128)
    out = as_hwc(decode_image(encode(bits, "PPM"), "numpy"))
    assert out.shape == (48, 64, 3) and set(np.unique(out)) == {0, 255}
    np.testing.assert_array_equal(out[..., 0] == 255, rgb[..., 0] > 128)


@pytest.mark.parametrize("mode", MODES)
def test_gray_and_cmyk_jpeg_identical_across_backends(rgb, mode, monkeypatch):
    gray = encode(Image.fromarray(rgb[..., 0]), "JPEG", quality=95)
    cmyk = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    fast = [as_hwc(decode_image(data, mode)) for data in (gray, cmyk)]
    monkeypatch.setattr(pixels, "_simplejpeg", None)
    slow = [as_hwc(decode_image(data, mode)) for data in (gray, cmyk)]
    for out in fast + slow:
        assert out.shape == (48, 64, 3)
    assert (fast[0][..., 0] == fast[0][..., 2]).all()  # gray replicated
    assert np.abs(fast[0].astype(int) - slow[0]).max() <= 2
    np.testing.assert_array_equal(fast[1], slow[1])  # CMYK always goes through PIL
    assert np.abs(fast[1].astype(int) - rgb).mean() < 6


# ------------------------------------------------------------------- header parsing


def test_read_image_header_for_each_variant(rgb):
    rgba = Image.fromarray(_rgba(rgb), "RGBA")
    cases = {
        "JPEG": encode(rgb, "JPEG"),
        "progressive": encode(rgb, "JPEG", progressive=True),
        "PNG": encode(rgb, "PNG"),
        "VP8": encode(rgb, "WEBP"),
        "VP8L": encode(rgb, "WEBP", lossless=True),
        "VP8X": encode(rgba, "WEBP"),
    }
    chunks = {cases[name][12:16] for name in ("VP8", "VP8L", "VP8X")}
    assert chunks == {b"VP8 ", b"VP8L", b"VP8X"}  # all three WebP layouts really covered
    for name, data in cases.items():
        header = read_image_header(data)
        assert header is not None and (header.width, header.height) == (64, 48), name
    assert read_image_header(encode(rgb, "JPEG")).components == 3
    assert read_image_header(encode(rgb, "PPM")) is None
    assert read_image_header(b"\xff\xd8\xff") is None  # truncated before the frame header


# ------------------------------------------------------------------- bomb guard


@pytest.mark.parametrize("mode", MODES)
def test_bomb_guard_png_header_claiming_huge_size(mode):
    data = png_claiming(100_000, 100_000)
    assert len(data) < 200
    with pytest.raises(SampleError, match="max_pixels") as info:
        make_decoder(mode)({"__key__": "bomb", "__url__": "s.tar", "png": data})
    assert info.value.member == "bomb.png" and info.value.url == "s.tar"
    assert "100000x100000" in str(info.value)


def test_bomb_guard_jpeg_and_webp_headers(jpeg, jpeg_backend, rgb):
    with pytest.raises(SampleError, match="max_pixels"):
        decode_image(jpeg_claiming(jpeg, 60_000, 60_000), "numpy")
    webp = bytearray(encode(Image.fromarray(_rgba(rgb), "RGBA"), "WEBP"))
    webp[24:30] = (2**24 - 1).to_bytes(3, "little") * 2  # VP8X canvas 16M x 16M
    with pytest.raises(SampleError, match="max_pixels"):
        decode_image(bytes(webp), "numpy")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "PPM", "BMP", "TIFF"])
def test_max_pixels_applies_to_every_format(rgb, fmt):
    data = encode(rgb, fmt)
    with pytest.raises(SampleError, match="max_pixels"):
        decode_image(data, "torch", max_pixels=48 * 64 - 1)
    assert decode_image(data, "torch", max_pixels=48 * 64).shape == (3, 48, 64)
    with pytest.raises(SampleError, match="max_pixels"):
        RandomResizedCropDecode(16, max_pixels=100)(data)


def test_max_pixels_default_is_pils_limit():
    assert make_decoder().max_pixels == Image.MAX_IMAGE_PIXELS
    assert make_decoder(max_pixels=10).max_pixels == 10
    with pytest.raises(ValueError):
        make_decoder(max_pixels=0)


# ------------------------------------------------------------- reduced-size decoding


@pytest.mark.parametrize(
    "height, width, size, scale",
    [
        (320, 400, 40, 8),
        (320, 400, 41, 4),
        (320, 400, 80, 4),
        (320, 400, 81, 2),
        (320, 400, 160, 2),
        (320, 400, 161, 1),
        (320, 400, 1000, 1),
        (400, 320, 41, 4),
        (333, 501, 42, 8),
        (333, 501, 43, 4),
        (5, 7, 1, 4),
        (1, 1, 1, 1),
    ],
)
def test_dct_scale_for(height, width, size, scale):
    assert dct_scale_for(height, width, size) == scale
    assert dct_scale_for(height, width, None) == 1


@pytest.mark.parametrize("height, width", [(320, 400), (333, 501)])
@pytest.mark.parametrize("size", [40, 43, 81, 100, 170, 400])
@pytest.mark.parametrize("mode", MODES)
def test_decode_size_reduces_to_expected_dct_scale(height, width, size, mode, jpeg_backend):
    data = encode(photo(height, width, seed=1), "JPEG", quality=90)
    out = as_hwc(decode_image(data, mode, decode_size=size))
    scale = dct_scale_for(height, width, size)
    assert out.shape == (math.ceil(height / scale), math.ceil(width / scale), 3)
    if min(height, width) >= size:
        assert min(out.shape[:2]) >= size  # never below the requested shorter side
    if size <= min(height, width) // 2:
        assert scale > 1  # the case really reduces


def test_reduced_decode_looks_like_downscaled_image(jpeg_backend):
    source = photo(320, 400, seed=2)
    out = decode_image(encode(source, "JPEG", quality=95), "numpy", decode_size=80)
    assert out.shape == (80, 100, 3)
    reference = np.asarray(Image.fromarray(source).resize((100, 80), Image.Resampling.BOX))
    assert np.abs(out.astype(int) - reference).mean() < 3


def test_decode_size_leaves_other_formats_full_size():
    source = photo(320, 400)
    for fmt in ("PNG", "WEBP", "PPM"):
        assert decode_image(encode(source, fmt), "numpy", decode_size=40).shape == (320, 400, 3)


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "field, data, message",
    [
        ("jpg", b"", "not a valid JPEG"),
        ("jpg", b"\xff\xd8\xff\xe0 garbage", "not a valid JPEG"),
        ("png", b"\x89PNG\r\n\x1a\n" + b"\0" * 10, "not a valid PNG"),
        ("webp", b"RIFF\0\0\0\0WEBPjunk", "not a valid WebP"),
        ("cls", b"abc", ".cls is not an integer: b'abc'"),
        ("cls", b"", ".cls is not an integer: b''"),
        ("json", b"{not json", "invalid JSON"),
        ("json", b"\xff\xfe\xfa", "invalid JSON"),
        ("txt", b"\xff\xfe\xfa", "not valid UTF-8"),
        ("npy", b"\x93NUMPY broken", "invalid .npy"),
    ],
)
def test_bad_fields_raise_located_sample_error(field, data, message, jpeg_backend):
    sample = {"__key__": "k1", "__url__": "shard-0.tar", field: data}
    with pytest.raises(SampleError) as info:
        make_decoder("torch")(sample)
    error = info.value
    assert message in error.reason
    assert (error.url, error.key, error.member) == ("shard-0.tar", "k1", f"k1.{field}")
    assert str(error).startswith("shard-0.tar, member 'k1." + field + "': ")


@pytest.mark.parametrize("fmt, field", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_image_raises(rgb, fmt, field, jpeg_backend):
    data = encode(rgb, fmt)
    with pytest.raises(SampleError, match=f"not a valid {fmt}"):
        make_decoder("numpy")({"__key__": "k", field: data[: len(data) // 2]})


def test_pickle_refused_without_allow_pickle():
    payload = pickle.dumps({"a": [1, 2]})
    for ext in ("pickle", "pyd", "pkl"):
        with pytest.raises(SampleError, match="allow_pickle=True"):
            make_decoder()({"__key__": "k", ext: payload})
    assert make_decoder(allow_pickle=True)({"__key__": "k", "pkl": payload})["pkl"] == {"a": [1, 2]}
    objects = io.BytesIO()
    np.save(objects, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError, match="invalid .npy"):
        make_decoder()({"__key__": "k", "npy": objects.getvalue()})


def test_user_handler_failure_is_wrapped():
    def explode(data: bytes) -> None:
        raise KeyError("boom")

    with pytest.raises(SampleError, match="KeyError") as info:
        make_decoder(handlers={"jpg": explode})({"__key__": "k", "jpg": b"x"})
    assert info.value.member == "k.jpg"


# ------------------------------------------------------------ other fields, dispatch


def test_scalar_fields_and_passthrough(rgb):
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    buffer = io.BytesIO()
    np.save(buffer, array)
    sample = {
        "__key__": "k",
        "__url__": "u.tar",
        "__local_path__": b"raw-dunder",
        "cls": b" 7\n",
        "txt": "héllo".encode(),
        "json": json.dumps({"a": [1]}).encode(),
        "npy": buffer.getvalue(),
        "seg.png": encode(rgb, "PNG"),
        "weird": b"\x00\x01",
        "already": 5,
        "view.cls": memoryview(b"12"),
    }
    original = dict(sample)
    out = make_decoder("numpy")(sample)
    assert sample == original  # input not modified
    assert out["__key__"] == "k" and out["__url__"] == "u.tar"
    assert out["__local_path__"] == b"raw-dunder"  # dunder keys are never decoded
    assert out["cls"] == 7 and out["view.cls"] == 12
    assert out["txt"] == "héllo" and out["json"] == {"a": [1]}
    np.testing.assert_array_equal(out["npy"], array)
    np.testing.assert_array_equal(out["seg.png"], rgb)  # last dot-part picks the decoder
    assert out["weird"] == b"\x00\x01" and out["already"] == 5


def test_handlers_override_add_and_keep_raw(jpeg, rgb):
    decoder = make_decoder(
        "torch",
        handlers={
            "jpg": len,
            "seg.png": bytes,
            "points": lambda data: data.decode().split(","),
        },
    )
    out = decoder({"__key__": "k", "jpg": jpeg, "seg.png": b"raw", "mask.png": encode(rgb, "PNG"), "points": b"1,2"})
    assert out["jpg"] == len(jpeg)  # overrides the image decoder
    assert out["seg.png"] == b"raw"  # whole-field handler beats the "png" default
    assert out["mask.png"].shape == (3, 48, 64)
    assert out["points"] == ["1", "2"]


def _count_bytes(data: bytes) -> int:
    return len(data)


@pytest.mark.parametrize("mode", MODES)
def test_decoder_survives_pickling(jpeg, mode):
    decoder = make_decoder(mode, decode_size=24, handlers={"bin": _count_bytes}, max_pixels=10**6)
    clone = pickle.loads(pickle.dumps(decoder))
    assert (clone.mode, clone.decode_size, clone.max_pixels) == (mode, 24, 10**6)
    sample = {"__key__": "k", "jpg": jpeg, "bin": b"abc"}
    expected, actual = decoder(sample), clone(sample)
    np.testing.assert_array_equal(as_hwc(actual["jpg"]), as_hwc(expected["jpg"]))
    assert as_hwc(actual["jpg"]).shape == (24, 32, 3) and actual["bin"] == 3


def test_invalid_arguments():
    with pytest.raises(ValueError, match="mode"):
        make_decoder("cv2")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="decode_size"):
            make_decoder(decode_size=bad)
    with pytest.raises(ValueError):
        RandomResizedCropDecode(224, scale=(0.5, 0.1))


# ---------------------------------------------------------------- decode_size_for


@pytest.mark.parametrize("T", [v1, v2], ids=["v1", "v2"])
def test_decode_size_for_pipelines(T):
    to_tensor = T.ToTensor() if T is v1 else T.ToImage()
    assert decode_size_for(T.Resize(256)) == 256
    assert decode_size_for(T.Compose([T.Resize(256), T.CenterCrop(224), to_tensor])) == 256
    assert decode_size_for(T.Resize((300, 200))) == 300
    nested = T.Compose([T.Compose([T.RandomHorizontalFlip(), T.ColorJitter(0.4)]), T.Resize(128)])
    assert decode_size_for(nested) == 128
    rrc = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), to_tensor])
    assert decode_size_for(rrc) == 915 == rrc_safe_decode_size(224)
    assert decode_size_for(rrc, approximate_rrc=True) == 224
    assert decode_size_for(T.RandomResizedCrop(224, scale=(0.25, 1), ratio=(1, 1))) == 448
    assert decode_size_for(T.Compose([T.CenterCrop(224), T.Resize(256)])) is None
    assert decode_size_for(T.Compose([T.GaussianBlur(5), T.Resize(256)])) is None
    assert decode_size_for(T.Compose([to_tensor, T.Normalize([0.5] * 3, [0.5] * 3)])) is None
    assert decode_size_for(lambda image: image) is None


def test_rrc_safe_size_keeps_smallest_crop_at_output_size():
    size, scale, ratio = 224, (0.08, 1.0), (3 / 4, 4 / 3)
    side = rrc_safe_decode_size(size, scale, ratio)
    area = side * side * scale[0]
    for aspect in ratio:  # the extreme crops of a square image of that side
        assert min(math.sqrt(area * aspect), math.sqrt(area / aspect)) >= size - 1e-6
    assert min(math.sqrt(area * ratio[0]), math.sqrt(area / ratio[1])) < size + 1


# ------------------------------------------------------------ RandomResizedCropDecode


@pytest.mark.parametrize("height, width", [(480, 640), (640, 480), (100, 1000), (37, 41)])
def test_rrc_params_match_torchvision(height, width):
    crop = RandomResizedCropDecode(224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    fake_image = torch.empty(1, 1, 1).expand(3, height, width)
    for seed in range(20):
        torch.manual_seed(seed)
        ours = crop.get_params(height, width)
        torch.manual_seed(seed)
        assert ours == tuple(v1.RandomResizedCrop.get_params(fake_image, crop.scale, crop.ratio))


def test_rrc_plan_picks_scale_that_keeps_crop_at_size():
    crop = RandomResizedCropDecode(64)
    for seed in range(50):
        torch.manual_seed(seed)
        plan = crop.plan(1200, 1600)
        assert plan.height >= plan.scale * 64 and plan.width >= plan.scale * 64
        if plan.scale < 8:  # the next power of two would have been too small
            assert plan.height < 2 * plan.scale * 64 or plan.width < 2 * plan.scale * 64


class _RecordingSimplejpeg:
    """Stands in for the simplejpeg module and records the decoded shapes."""

    def __init__(self, real) -> None:
        self.real, self.shapes = real, []

    def decode_jpeg(self, *args, **kwargs):
        out = self.real.decode_jpeg(*args, **kwargs)
        self.shapes.append(out.shape)
        return out


@pytest.mark.parametrize("region", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_rrc_decode_reduced_matches_full_path(mode, region, monkeypatch):
    if pixels._simplejpeg is None:
        pytest.skip("simplejpeg not installed")
    if region and turbojpeg() is None:
        pytest.skip("no libjpeg-turbo 3 for region decoding")
    source = photo(768, 1024, seed=3)
    data = encode(source, "JPEG", quality=95)
    crop = RandomResizedCropDecode(48, scale=(0.5, 1.0), mode=mode, region=region)
    recorder = _RecordingSimplejpeg(pixels._simplejpeg)
    monkeypatch.setattr(pixels, "_simplejpeg", recorder)
    torch.manual_seed(0)
    plan = crop.plan(768, 1024)
    torch.manual_seed(0)
    out = crop(data)
    # Decoded at 1/8 only: the whole image by simplejpeg, or just the region by libjpeg-turbo 3.
    assert plan.scale == 8 and recorder.shapes == ([] if region else [(96, 128, 3)])
    full = torch.from_numpy(decode_image(data, "numpy")).permute(2, 0, 1)
    reference = tvf.resized_crop(full, plan.top, plan.left, plan.height, plan.width, [48, 48], antialias=True)
    result = as_hwc(out).astype(int)
    assert result.shape == (48, 48, 3)
    assert np.abs(result - reference.permute(1, 2, 0).numpy()).mean() < 3


def test_rrc_decode_full_size_formats_equal_torchvision():
    data = encode(photo(120, 160, seed=4), "PNG")
    crop = RandomResizedCropDecode((32, 40))
    torch.manual_seed(5)
    out = crop(data)
    torch.manual_seed(5)
    full = decode_image(data, "torch")
    params = (
        v2.RandomResizedCrop.get_params
        if hasattr(v2.RandomResizedCrop, "get_params")
        else v1.RandomResizedCrop.get_params
    )
    top, left, height, width = params(full, crop.scale, crop.ratio)
    expected = tvf.resized_crop(full, top, left, height, width, [32, 40], antialias=True)
    assert out.shape == (3, 32, 40)
    torch.testing.assert_close(out, expected, atol=1, rtol=0)


def test_rrc_decode_as_handler_and_pickle(jpeg):
    crop = RandomResizedCropDecode(16)
    decoder = make_decoder("torch", handlers=dict.fromkeys(IMAGE_EXTENSIONS, crop))
    decoder = pickle.loads(pickle.dumps(decoder))
    assert decoder({"__key__": "k", "jpg": jpeg})["jpg"].shape == (3, 16, 16)
    with pytest.raises(SampleError, match="not a valid JPEG") as info:
        decoder({"__key__": "k", "jpg": jpeg[:10]})
    assert info.value.member == "k.jpg"
