"""Fused crop decode (shardkit.decode.fuse.fuse_crop): same random draws as torchvision,
pixels close to decode-crop-resize, fallbacks, and the dataset wiring of decode_size="auto"."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms as v1
import torchvision.transforms.v2 as v2
from PIL import Image

from shardkit import ShardDataset
from shardkit.cli.synthetic import photo_like
from shardkit.decode.crop import RandomResizedCropDecode
from shardkit.decode.fields import decode_image, make_decoder
from shardkit.decode.fuse import FusedFieldDecoder, FusedSamplePipeline, fuse_crop
from tests.helpers import pairs

#: The PSNR (dB) every fused output keeps against decode -> crop -> resize with the same
#: crop, on photo-like JPEGs (BENCHMARKS.md states it; measured minimum is higher).
PSNR_BOUND = 35.0


def _jpeg(width: int, height: int, seed: int = 0, mode: str = "RGB", quality: int = 90) -> bytes:
    pixels = photo_like(np.random.default_rng(seed), width, height)
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _turned_jpeg(width: int, height: int, orientation: int) -> bytes:
    """A photo-like JPEG stored ``width`` x ``height`` with this EXIF orientation."""
    image = Image.open(io.BytesIO(_jpeg(width, height, seed=orientation)))
    exif = image.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def _rest(transform: dict) -> Any:
    """The per-field rest of a fused pipeline for "jpg" (none left: the identity)."""
    return transform.get("jpg", lambda image: image)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (max distance between empirical CDFs)."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


# ---------------------------------------------------------- crop parameters = torchvision's


@pytest.mark.parametrize("height, width", [(375, 500), (517, 333), (1127, 1501), (40, 900), (1, 1)])
def test_crop_params_are_torchvisions_draw_for_draw(height, width):
    ours = RandomResizedCropDecode(224)
    theirs = v2.RandomResizedCrop(224)
    probe = torch.empty(3, height, width, dtype=torch.uint8)
    for seed in range(100):
        torch.manual_seed(seed)
        params = ours.get_params(height, width)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        tv = theirs.make_params([probe])
        assert after_ours == torch.rand(1)  # same RNG consumption: later transforms see the same draws
        assert params == (tv["top"], tv["left"], tv["height"], tv["width"])
        torch.manual_seed(seed)
        assert params == v1.RandomResizedCrop.get_params(probe, [0.08, 1.0], [3 / 4, 4 / 3])


def test_crop_param_distribution_matches_torchvision():
    """KS test on area fraction and aspect ratio, independent seeds, fixed: cannot flake."""
    height, width, n = 375, 500, 3000
    ours = RandomResizedCropDecode(224)
    theirs = v2.RandomResizedCrop(224)
    probe = torch.empty(3, height, width, dtype=torch.uint8)
    torch.manual_seed(1)
    a = np.array([ours.get_params(height, width)[2:] for _ in range(n)], dtype=float)
    torch.manual_seed(2)
    b = np.array([(p["height"], p["width"]) for p in (theirs.make_params([probe]) for _ in range(n))], dtype=float)
    critical = 1.95 * math.sqrt(2 / n)  # alpha = 0.001
    for stat_of in (lambda hw: hw[:, 0] * hw[:, 1] / (height * width), lambda hw: hw[:, 1] / hw[:, 0]):
        assert _ks_statistic(stat_of(a), stat_of(b)) < critical


# ------------------------------------------------------------------------ pixel fidelity


@pytest.mark.parametrize("width, height", [(500, 375), (333, 517), (1501, 1127), (2003, 1601)])
def test_fused_output_close_to_decode_crop_resize(width, height):
    aug = v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()])
    decoder, transform = fuse_crop(make_decoder("torch"), {"jpg": aug})
    data = _jpeg(width, height, seed=width)
    full = decode_image(data, "torch")
    worst = math.inf
    for seed in range(8):
        torch.manual_seed(seed)
        reference = aug(full)
        torch.manual_seed(seed)
        fused = _rest(transform)(decoder({"jpg": data})["jpg"])
        assert fused.shape == reference.shape == (3, 224, 224) and fused.dtype == torch.uint8
        worst = min(worst, _psnr(fused, reference))
    assert worst >= PSNR_BOUND
    if min(width, height) < 448:  # no crop can be halved and stay >= 224: bit-exact
        assert worst == math.inf


@pytest.mark.parametrize("width, height", [(400, 300), (1501, 1127)])
def test_fused_pil_mode_close_to_torchvision_on_pil(width, height):
    aug = v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()])
    decoder, transform = fuse_crop(make_decoder("pil"), {"jpg": aug})
    data = _jpeg(width, height, seed=1)
    for seed in range(4):
        torch.manual_seed(seed)
        reference = torch.from_numpy(np.array(aug(decode_image(data, "pil"))))
        torch.manual_seed(seed)
        fused = _rest(transform)(decoder({"jpg": data})["jpg"])
        assert isinstance(fused, Image.Image) and fused.size == (224, 224)
        assert _psnr(torch.from_numpy(np.array(fused)), reference) >= PSNR_BOUND


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs(mode):
    data = _jpeg(1203, 901, seed=3, mode=mode)
    crop = RandomResizedCropDecode(128)
    full = decode_image(data, "torch")
    for seed in range(6):
        torch.manual_seed(seed)
        top, left, h, w = crop.get_params(901, 1203)
        reference = v2.functional.resize(full[:, top : top + h, left : left + w], [128, 128], antialias=True)
        torch.manual_seed(seed)
        out = crop(data)
        assert out.shape == (3, 128, 128)
        assert _psnr(out, reference) >= PSNR_BOUND


def test_png_is_exact_and_every_mode_works():
    pixels = photo_like(np.random.default_rng(0), 300, 200)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    for mode in ("torch", "numpy", "pil"):
        torch.manual_seed(0)
        out = RandomResizedCropDecode(64, mode=mode)(buffer.getvalue())
        assert np.asarray(out if mode != "torch" else out.permute(1, 2, 0)).shape == (64, 64, 3)
    torch.manual_seed(0)
    top, left, h, w = RandomResizedCropDecode(64).get_params(200, 300)
    reference = v2.functional.resize(
        torch.from_numpy(pixels).permute(2, 0, 1)[:, top : top + h, left : left + w], [64, 64], antialias=True
    )
    torch.manual_seed(0)
    assert torch.equal(RandomResizedCropDecode(64)(buffer.getvalue()), reference)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "nearest-exact"])
@pytest.mark.parametrize("antialias", [True, False])
def test_every_mode_gives_torchvisions_resize_of_the_strided_crop(interpolation, antialias):
    """The crop is resized from a dense copy (torch's faster path): values must equal
    torchvision resizing the crop as a view, torch output dense CHW, numpy dense HWC."""
    pixels = photo_like(np.random.default_rng(1), 301, 203)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")  # lossless: the decode is exact
    mode_of = v2.InterpolationMode(interpolation)
    for size in (64, (203, 150), (37, 90)):
        crop = RandomResizedCropDecode(size, interpolation=mode_of, antialias=antialias)
        for seed in range(4):
            torch.manual_seed(seed)
            top, left, h, w = crop.get_params(203, 301)
            view = torch.from_numpy(pixels).permute(2, 0, 1)[:, top : top + h, left : left + w]
            reference = v2.functional.resize(view, list(crop.size), interpolation=mode_of, antialias=antialias)
            for mode in ("torch", "numpy"):
                torch.manual_seed(seed)
                out = RandomResizedCropDecode(size, interpolation=mode_of, antialias=antialias, mode=mode)(
                    buffer.getvalue()
                )
                if mode == "torch":
                    assert out.is_contiguous() and torch.equal(out, reference)
                else:
                    assert out.flags.c_contiguous and np.array_equal(out, reference.permute(1, 2, 0).numpy())


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("mode", ["torch", "pil"])
def test_fused_flip_draws_and_flips_like_torchvision(family, mode):
    """RandomResizedCrop + RandomHorizontalFlip(p), fused: the flip is drawn where
    torchvision draws it, the RNG is left where it would be, and the image is exactly the
    fused crop, mirrored when drawn so, and exactly the unfused pipeline's image (a PNG:
    the decode is exact; v1 and v2 round some tensor resizes differently, PIL its own)."""
    pixels = photo_like(np.random.default_rng(2), 180, 150)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    data = buffer.getvalue()
    T = v1 if family == "v1" else v2
    for p in (0.0, 0.3, 0.5, 1.0):
        aug = T.Compose([T.RandomResizedCrop(48), T.RandomHorizontalFlip(p)])
        decoder, rest = fuse_crop(make_decoder(mode), {"jpg": aug})
        assert rest == {} and decoder.crops["jpg"].hflip == p
        flips = 0
        for seed in range(12):
            torch.manual_seed(seed)
            reference = aug(decode_image(data, mode))
            after_reference = torch.rand(1)
            torch.manual_seed(seed)
            fused = decoder({"jpg": data})["jpg"]
            assert torch.equal(torch.rand(1), after_reference)
            torch.manual_seed(seed)
            RandomResizedCropDecode(48).get_params(150, 180)
            drawn = bool(torch.rand(1) < p)
            torch.manual_seed(seed)
            crop = np.asarray(RandomResizedCropDecode(48, mode=mode, api=family)(data))
            axis = 1 if mode == "pil" else 2  # HWC / CHW
            assert np.array_equal(np.asarray(fused), np.flip(crop, axis) if drawn else crop)
            flips += drawn
            assert np.array_equal(np.asarray(fused), np.asarray(reference))
            if mode == "torch":
                assert fused.is_contiguous()
        assert flips == {0.0: 0, 1.0: 12}.get(p, flips) and (p in (0.0, 1.0) or 0 < flips < 12)


def test_interpolation_is_honoured():
    data = _jpeg(180, 150)  # short side < 2 x 96: decoded at full size, so exact
    aug = v2.RandomResizedCrop(96, interpolation=v2.InterpolationMode.NEAREST)
    decoder, transform = fuse_crop(make_decoder("torch"), {"jpg": aug})
    assert transform == {}
    torch.manual_seed(5)
    reference = aug(decode_image(data, "torch"))
    torch.manual_seed(5)
    assert torch.equal(decoder({"jpg": data})["jpg"], reference)


# ------------------------------------------------------------------------ what is fused


def test_what_fuses_and_what_does_not():
    dec = make_decoder("torch")
    rrc = v2.RandomResizedCrop(32)
    fused, rest = fuse_crop(dec, {"jpg": v2.Compose([v2.ToImage(), rrc, v2.RandomHorizontalFlip(0.3)])})
    assert isinstance(fused, FusedFieldDecoder) and isinstance(rest["jpg"], v2.Compose)
    assert [type(t).__name__ for t in rest["jpg"].transforms] == ["ToImage"]  # the flip right after the crop fuses
    assert fused.crops["jpg"].hflip == 0.3
    fused, rest = fuse_crop(dec, v2.Compose([rrc, v2.RandomHorizontalFlip()]))
    assert isinstance(fused, FusedSamplePipeline) and rest is None and fused.crop.hflip == 0.5
    fused, rest = fuse_crop(dec, {"jpg": v1.Compose([v1.RandomResizedCrop(32), v1.RandomHorizontalFlip()])})
    assert isinstance(fused, FusedFieldDecoder) and rest == {}
    # Only a flip right after the crop, and only torchvision's own class, fuses.
    jitter_first = v2.Compose([rrc, v2.ColorJitter(0.1), v2.RandomHorizontalFlip()])
    fused, rest = fuse_crop(dec, {"jpg": jitter_first})
    assert fused.crops["jpg"].hflip is None
    assert [type(t).__name__ for t in rest["jpg"].transforms] == ["ColorJitter", "RandomHorizontalFlip"]

    class AlwaysFlip(v2.RandomHorizontalFlip):
        pass

    fused, rest = fuse_crop(dec, {"jpg": v2.Compose([rrc, AlwaysFlip()])})
    assert fused.crops["jpg"].hflip is None and type(rest["jpg"].transforms[0]) is AlwaysFlip
    not_fused = [
        {"jpg": v2.Compose([v2.RandomHorizontalFlip(), rrc])},  # a draw before the crop
        {"jpg": v2.Compose([v2.CenterCrop(32), rrc])},
        {"cls": lambda x: x, "jpg": rrc},  # another field's transform runs first
        {"json": rrc},
        {"jpg": lambda image: image},
        v2.Compose([v2.ColorJitter(0.1), rrc]),
    ]
    for transform in not_fused:
        assert fuse_crop(dec, transform) == (dec, transform)
    assert fuse_crop(lambda s: s, {"jpg": rrc})[1] == {"jpg": rrc}  # custom decoders are left alone
    numpy_decoder = make_decoder("numpy")  # torchvision leaves arrays alone: so must fusion
    assert fuse_crop(numpy_decoder, {"jpg": rrc}) == (numpy_decoder, {"jpg": rrc})
    assert isinstance(fuse_crop(make_decoder("pil"), {"jpg": rrc})[0], FusedFieldDecoder)


def test_sample_level_fuses_only_single_image_samples():
    aug = v2.Compose([v2.RandomResizedCrop(24), v2.RandomHorizontalFlip()])
    dec = make_decoder("torch")
    fused, _ = fuse_crop(dec, aug)
    one = {"__key__": "a", "jpg": _jpeg(44, 40), "cls": b"3"}  # < 2 x 24: full-size decode, exact
    two = dict(one, **{"seg.png": one["jpg"]})
    for sample in (one, two):
        torch.manual_seed(0)
        expected = aug(dec(sample))
        torch.manual_seed(0)
        got = fused(sample)
        assert list(got) == list(expected)
        assert all(
            torch.equal(got[k], expected[k]) if isinstance(got[k], torch.Tensor) else got[k] == expected[k] for k in got
        )


# ------------------------------------------------------------------- the dataset wiring


@pytest.mark.parametrize("sample_level", [False, True])
def test_dataset_auto_fuses_with_identical_stream(uneven_shards, sample_level):
    """Tiny images decode at full size, so fused and unfused runs give equal tensors,
    flips included: the random draws line up sample for sample."""
    aug = v2.Compose([v2.RandomResizedCrop(24), v2.RandomHorizontalFlip()])  # 48x32 images: never scaled

    def run(decode_size):
        transform = aug if sample_level else {"jpg": aug}
        ds = ShardDataset(
            uneven_shards,
            decode="torch",
            decode_size=decode_size,
            transform=transform,
            fields="jpg cls",
            shuffle=8,
            seed=3,
        )
        torch.manual_seed(0)
        return list(ds), ds

    plain, _ = run(None)
    fused, ds = run("auto")
    assert ds.fuse_crop and len(plain) == len(fused) == 64
    for (a, la), (b, lb) in pairs(plain, fused):
        assert la == lb and torch.equal(a, b)
    pipeline = ds.pipeline(lambda e: None)
    assert isinstance(pipeline.decoder, FusedSamplePipeline if sample_level else FusedFieldDecoder)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fused_crop_applies_exif_orientation_like_the_unfused_decoder(orientation):
    # The fused path used to crop the stored pixels of a rotated phone photo: sideways,
    # although exif_orientation=True (the default) turns them upright without fusion.
    data = _turned_jpeg(1203, 901, orientation)
    aug = v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()])
    decoder, transform = fuse_crop(make_decoder("torch"), {"jpg": aug})
    upright = decode_image(data, "torch")
    assert upright.shape[1:] == ((1203, 901) if orientation >= 5 else (901, 1203))
    for seed in range(4):
        torch.manual_seed(seed)
        reference = aug(upright)
        torch.manual_seed(seed)
        fused = _rest(transform)(decoder({"jpg": data})["jpg"])
        assert _psnr(fused, reference) >= PSNR_BOUND
    # exif_orientation=False keeps the stored pixels on both paths.
    stored_decoder, stored_transform = fuse_crop(make_decoder("torch", exif_orientation=False), {"jpg": aug})
    stored = decode_image(data, "torch", exif_orientation=False)
    torch.manual_seed(0)
    reference = aug(stored)
    torch.manual_seed(0)
    assert _psnr(_rest(stored_transform)(stored_decoder({"jpg": data})["jpg"]), reference) >= PSNR_BOUND


@pytest.mark.timeout(240)
def test_resume_is_exact_with_the_fused_path(tmp_path):
    # Photo-sized JPEGs so crops are scaled and region-decoded; the fused decoder must not
    # change which samples a resumed epoch delivers, or their order.
    from shardkit import ShardLoader, ShardWriter
    from tests.helpers import keys_of, resumed_keys, stop_after

    with ShardWriter(str(tmp_path), shard_size="300KB") as writer:
        for i in range(24):
            writer.write({"__key__": f"{i:03d}", "jpg": _jpeg(900, 700, seed=i), "cls": i % 3})
    aug = v2.Compose([v2.RandomResizedCrop(96), v2.RandomHorizontalFlip()])

    def make(workers: int) -> ShardLoader:
        ds = ShardDataset(str(tmp_path), decode="torch", decode_size="auto", transform={"jpg": aug}, shuffle=5, seed=2)
        assert ds.fuse_crop
        return ShardLoader(ds, batch_size=4, num_workers=workers)

    def keys_and_shapes(batches) -> list[str]:
        out = []
        for batch in batches:
            assert batch["jpg"].shape[1:] == (3, 96, 96)
            out.append(batch)
        return keys_of(out)

    full = keys_and_shapes(make(2))
    before, state = stop_after(make(2), 2, keys=keys_and_shapes)
    assert before + resumed_keys(make(2), state, keys=keys_and_shapes) == full
    after = resumed_keys(make(1), state, keys=keys_and_shapes)
    assert sorted(before + after) == sorted(full) and len(full) == 24


# ------------------------------------------------- decode_size="exact": the unfused values


def _jpeg_subsampled(width: int, height: int, seed: int, subsampling: int, mode: str = "RGB") -> bytes:
    """A photo-like JPEG with PIL's chroma subsampling (0: 4:4:4, 1: 4:2:2, 2: 4:2:0)."""
    image = Image.fromarray(photo_like(np.random.default_rng(seed), width, height))
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, "JPEG", quality=88, subsampling=subsampling)
    return buffer.getvalue()


def _assert_same_as_unfused(aug: Any, data: bytes, mode: str, *, seeds: int, region: bool, **decoder_kw: Any) -> None:
    """The exact fused pipeline gives the unfused one's image and leaves the RNG where it does."""
    decoder, rest = fuse_crop(make_decoder(mode, **decoder_kw), {"jpg": aug}, region=region, reduce=False)
    assert isinstance(decoder, FusedFieldDecoder) and not decoder.crops["jpg"].reduce
    for seed in range(seeds):
        torch.manual_seed(seed)
        reference = aug(decode_image(data, mode, **decoder_kw))
        after_reference = torch.rand(1)
        torch.manual_seed(seed)
        fused = _rest(rest)(decoder({"jpg": data})["jpg"])
        assert torch.equal(torch.rand(1), after_reference)
        assert type(fused) is type(reference)
        assert np.array_equal(np.asarray(fused), np.asarray(reference)), (seed, mode, region)


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("mode", ["torch", "pil"])
@pytest.mark.parametrize("region", [True, False])
def test_exact_fusion_gives_the_unfused_pipelines_values(family, mode, region):
    """Large photos (crops that "auto" would decode at 1/2..1/8), every chroma
    subsampling, grayscale, odd sizes, a flip and a step after it: value for value the
    unfused pipeline, with the crop's region decoded (region=True) or the whole image."""
    T = v1 if family == "v1" else v2
    aug = T.Compose([T.RandomResizedCrop(160), T.RandomHorizontalFlip(), T.CenterCrop(150)])
    images = [
        _jpeg_subsampled(1501, 1127, seed=1, subsampling=2),
        _jpeg_subsampled(999, 1333, seed=2, subsampling=1),
        _jpeg_subsampled(641, 483, seed=3, subsampling=0),
        _jpeg_subsampled(517, 333, seed=4, subsampling=2, mode="L"),
        _jpeg_subsampled(170, 161, seed=5, subsampling=2),  # crops near the output size
    ]
    for data in images:
        _assert_same_as_unfused(aug, data, mode, seeds=6, region=region)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exact_fusion_turns_phone_photos_upright_like_the_unfused_decoder(orientation):
    aug = v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()])
    data = _turned_jpeg(1203, 901, orientation)
    for exif_orientation in (True, False):
        _assert_same_as_unfused(aug, data, "torch", seeds=4, region=True, exif_orientation=exif_orientation)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("antialias", [True, False])
def test_exact_fusion_honours_interpolation_and_antialias(interpolation, antialias):
    aug = v2.RandomResizedCrop(200, interpolation=v2.InterpolationMode(interpolation), antialias=antialias)
    _assert_same_as_unfused(aug, _jpeg(1001, 757, seed=9), "torch", seeds=4, region=True)


def test_exact_crops_are_never_reduced_and_auto_ones_are():
    data = _jpeg(2003, 1601, seed=7)
    exact = RandomResizedCropDecode(224, reduce=False)
    auto = RandomResizedCropDecode(224)
    scales = set()
    for seed in range(30):
        torch.manual_seed(seed)
        assert exact.plan(1601, 2003).scale == 1
        torch.manual_seed(seed)
        scales.add(auto.plan(1601, 2003).scale)
    assert scales - {1}  # the same draws: "auto" halves some of them
    assert "reduce=False" in repr(exact) and "reduce" not in repr(auto)
    with pytest.raises(ValueError, match="api must be 'v1' or 'v2'"):
        RandomResizedCropDecode(224, api="v3")
    torch.manual_seed(0)
    assert exact(data).shape == (3, 224, 224)


@pytest.mark.parametrize("sample_level", [False, True])
def test_dataset_exact_gives_the_unfused_stream_through_a_loader(tmp_path, sample_level):
    """decode_size="exact" through ShardLoader workers: the same batches as decode_size=None,
    on photos large enough that "auto" would give other pixels."""
    from shardkit import ShardLoader, ShardWriter

    with ShardWriter(str(tmp_path), shard_size="400KB") as writer:
        for i in range(16):
            writer.write({"__key__": f"{i:03d}", "jpg": _jpeg(900 + i, 700 - i, seed=i), "cls": i % 3})
    aug = v2.Compose([v2.RandomResizedCrop(96), v2.RandomHorizontalFlip()])

    def run(decode_size: str | None) -> tuple[list[Any], ShardDataset]:
        ds = ShardDataset(
            str(tmp_path),
            decode="torch",
            decode_size=decode_size,
            transform=aug if sample_level else {"jpg": aug},
            fields="jpg cls",
            shuffle=5,
            seed=4,
        )
        torch.manual_seed(0)  # the workers' torch seeds come from the main process's RNG
        return list(ShardLoader(ds, batch_size=4, num_workers=2)), ds

    plain, _ = run(None)
    exact, ds = run("exact")
    assert ds.fuse_crop and ds.decoding.exact and ds.decode_size is None
    assert isinstance(ds.stages()[0], FusedSamplePipeline if sample_level else FusedFieldDecoder)
    assert len(plain) == len(exact) == 4
    for (a, la), (b, lb) in zip(plain, exact):
        assert torch.equal(la, lb) and torch.equal(a, b)
    auto, _ = run("auto")
    assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(plain, auto))  # the test can tell


def test_exact_with_nothing_to_fuse_warns_and_decodes_whole(uneven_shards, caplog):
    with caplog.at_level("WARNING", logger="shardkit.read.stages"):
        ds = ShardDataset(uneven_shards, decode="torch", decode_size="exact", transform={"jpg": v2.ColorJitter()})
    assert not isinstance(ds.stages()[0], FusedFieldDecoder)
    assert "decode_size='exact'" in caplog.text and "has none that can be fused" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="shardkit.read.stages"):
        ShardDataset(uneven_shards, decode="torch", decode_size="exact", transform={"jpg": v2.RandomResizedCrop(8)})
    assert not caplog.text
    with pytest.raises(ValueError, match="decode_size applies to"):
        ShardDataset(uneven_shards, decode_size="exact")
    with pytest.raises(ValueError, match="'auto', 'exact' or None"):
        ShardDataset(uneven_shards, decode="torch", decode_size="exactly")


def _png(width: int, height: int, seed: int, *, orientation: int = 1, fmt: str = "PNG") -> bytes:
    image = Image.fromarray(photo_like(np.random.default_rng(seed), width, height))
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exact_fusion_turns_png_and_webp_upright_before_drawing_the_crop(fmt, orientation):
    # Only JPEG orientation is read from the header: a turned PNG used to be cropped by a
    # box drawn on its stored size, stretched over the upright pixels.
    aug = v2.Compose([v2.RandomResizedCrop(64), v2.RandomHorizontalFlip()])
    data = _png(161, 97, seed=orientation, orientation=orientation, fmt=fmt)
    for mode in ("torch", "pil"):
        for exif_orientation in (True, False):
            _assert_same_as_unfused(aug, data, mode, seeds=4, region=True, exif_orientation=exif_orientation)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_exact_fusion_reads_antialias_none_as_torchvision_does(family):
    T = v1 if family == "v1" else v2
    aug = T.RandomResizedCrop(96, antialias=None)  # False for tensors, in both families
    _assert_same_as_unfused(aug, _jpeg(700, 500, seed=3), "torch", seeds=4, region=True)


def test_toimage_before_the_crop_keeps_tensor_resizing_on_pil_decodes():
    aug = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(96), v2.RandomHorizontalFlip()])
    data = _jpeg(700, 500, seed=4)
    _assert_same_as_unfused(aug, data, "pil", seeds=4, region=True)
    decoder, _ = fuse_crop(make_decoder("pil"), {"jpg": aug}, reduce=False)
    assert decoder.crops["jpg"].mode == "torch"


def test_subclasses_of_the_crop_are_not_fused():
    class Centred(v2.RandomResizedCrop):
        def make_params(self, flat_inputs):
            params = super().make_params(flat_inputs)
            return {**params, "top": 0, "left": 0}

    for aug in (Centred(64), v2.Compose([Centred(64), v2.RandomHorizontalFlip()])):
        decoder, rest = fuse_crop(make_decoder("torch"), {"jpg": aug}, reduce=False)
        assert not isinstance(decoder, FusedFieldDecoder) and rest == {"jpg": aug}


def test_a_v1_crop_is_not_fused_at_sample_level_where_it_fails_unfused():
    aug = v1.Compose([v1.RandomResizedCrop(64)])
    decoder, rest = fuse_crop(make_decoder("torch"), aug, reduce=False)
    assert not isinstance(decoder, FusedSamplePipeline) and rest is aug
    with pytest.raises(TypeError):  # what it does unfused, and so fused
        aug({"jpg": decode_image(_jpeg(100, 80), "torch")})


def test_exact_decodes_only_the_fields_asked_for(tmp_path):
    """With fields=, unfused decoding leaves other members as bytes (a .pkl needing
    allow_pickle, a broken PNG, a tensor v2 would crop too): so does the fused one."""
    from shardkit import ShardWriter

    arr = io.BytesIO()
    np.save(arr, np.zeros((2, 3), np.float32))
    with ShardWriter(str(tmp_path), shard_size="1GB") as writer:
        for i in range(3):
            writer.write(
                {
                    "__key__": f"{i:03d}",
                    "npy": arr.getvalue(),  # before the image: v2 would take the tensor for it
                    "jpg": _jpeg(300, 200, seed=i),
                    "cls": i,
                    "pkl": b"\x80\x04N.",
                    "seg.png": b"\x89PNG broken",
                }
            )
    aug = v2.Compose([v2.RandomResizedCrop(64), v2.RandomHorizontalFlip()])
    for transform in ({"jpg": aug}, aug):
        out = {}
        for decode_size in (None, "exact"):
            ds = ShardDataset(
                str(tmp_path), decode="torch", decode_size=decode_size, transform=transform, fields="jpg cls"
            )
            torch.manual_seed(0)
            out[decode_size] = list(ds)
        assert len(out[None]) == len(out["exact"]) == 3
        for (a, la), (b, lb) in zip(out[None], out["exact"]):
            assert la == lb and torch.equal(a, b)
    # Without fields= the sample-level pipeline meets the tensor v2 takes for the image
    # (the first plain tensor): the sample goes the unfused way, so the tensor is cropped.
    import pickle

    decoder, rest = fuse_crop(make_decoder("torch", allow_pickle=True), aug, reduce=False)
    assert isinstance(decoder, FusedSamplePipeline) and rest is None
    tensor = pickle.dumps(torch.zeros(3, 20, 30, dtype=torch.uint8))
    sample = {"__key__": "a", "aux.pkl": tensor, "jpg": _jpeg(300, 200), "cls": b"1"}
    torch.manual_seed(0)
    reference = aug(make_decoder("torch", allow_pickle=True)(sample))
    torch.manual_seed(0)
    fused = decoder(sample)
    assert reference["aux.pkl"].shape == (3, 64, 64) and reference["jpg"].shape == (3, 200, 300)
    assert all(torch.equal(fused[k], reference[k]) for k in ("aux.pkl", "jpg"))


def _with_segments(data: bytes, *, xmp_orientation: int | None = None, junk: bool = False) -> bytes:
    """``data`` (a JPEG) with an XMP packet carrying an orientation, and stray bytes after
    it: what PIL reads and shardkit's header parser does not."""
    import struct

    extra = b""
    if xmp_orientation is not None:
        packet = (
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
            f'tiff:Orientation="{xmp_orientation}"/></rdf:RDF></x:xmpmeta>'
        ).encode()
        payload = b"http://ns.adobe.com/xap/1.0/\x00" + packet
        extra += b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    if junk:
        extra += b"\x00\x00"  # PIL and libjpeg skip bytes between segments; the header parser gives up
    return data[:2] + extra + data[2:]


def test_exact_fusion_draws_on_the_size_pil_turns_images_to():
    """JPEGs the unfused path decodes through PIL, turned by EXIF/XMP that shardkit's
    header parser does not read: the crop must be drawn on PIL's upright size."""
    cases = [
        _with_segments(_jpeg(401, 293, seed=1, mode="CMYK"), xmp_orientation=6),
        _with_segments(_turned_jpeg(401, 293, 6), xmp_orientation=6, junk=True),  # header unparsed
        _turned_jpeg(401, 293, 8),  # parsed: the region path
    ]
    aug = v2.Compose([v2.RandomResizedCrop(120), v2.RandomHorizontalFlip()])
    for data in cases:
        assert decode_image(data, "torch").shape == (3, 401, 293)  # PIL turned it
        for mode in ("torch", "pil"):
            _assert_same_as_unfused(aug, data, mode, seeds=6, region=True)


def test_subclassed_compose_and_truthy_antialias_are_taken_as_torchvision_takes_them():
    class Halved(v2.Compose):
        def forward(self, *inputs: Any) -> Any:
            return super().forward(*inputs)[..., ::2, ::2]

    aug = Halved([v2.RandomResizedCrop(64)])
    decoder, rest = fuse_crop(make_decoder("torch"), {"jpg": aug}, reduce=False)
    assert not isinstance(decoder, FusedFieldDecoder) and rest == {"jpg": aug}
    for antialias in (1, np.True_, 0):
        _assert_same_as_unfused(
            v2.RandomResizedCrop(96, antialias=antialias), _jpeg(700, 500, seed=2), "torch", seeds=2, region=True
        )


def test_sample_level_fusion_looks_inside_containers_for_tensors():
    import pickle

    aug = v2.Compose([v2.RandomResizedCrop(64), v2.RandomHorizontalFlip()])
    decoder, _ = fuse_crop(make_decoder("torch", allow_pickle=True), aug, reduce=False)
    nested = pickle.dumps({"masks": [torch.zeros(3, 20, 30, dtype=torch.uint8)]})
    sample = {"__key__": "a", "aux.pkl": nested, "jpg": _jpeg(300, 200), "cls": b"1"}
    torch.manual_seed(0)
    reference = aug(make_decoder("torch", allow_pickle=True)(sample))
    torch.manual_seed(0)
    fused = decoder(sample)
    assert reference["aux.pkl"]["masks"][0].shape == (3, 64, 64)  # v2 took the nested tensor
    assert torch.equal(fused["aux.pkl"]["masks"][0], reference["aux.pkl"]["masks"][0])
    assert torch.equal(fused["jpg"], reference["jpg"])
