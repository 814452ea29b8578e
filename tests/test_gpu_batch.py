"""The main-process batch stage (shardkit.gpu.batch): on the CPU always, on CUDA when present.

The CPU tests run ``decode_device="cpu"``, the same plumbing as the GPU path (workers ship
encoded images and drawn parameters, the main process decodes and augments the batch)
with the CPU decoder, and compare it with the ordinary worker path under the same seeds.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from shardkit import ShardDataset, ShardLoader
from shardkit.errors import SampleError, ShardkitError
from shardkit.gpu.recipe import parse_recipe
from shardkit.gpu.ship import EncodedImage, encode_for_batch
from shardkit.read.mix import Mix
from shardkit.writing.writer import ShardWriter
from tests.helpers import keys_of, pairs, resumed_keys, stop_after, tiny_jpeg

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
needs_torchcodec = pytest.mark.skipif(importlib.util.find_spec("torchcodec") is None, reason="needs torchcodec")

AUG = v2.Compose([v2.RandomResizedCrop(24), v2.RandomHorizontalFlip()])


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((30 + i, 40, 3), i * 7 % 255, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _cmyk_jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(tiny_jpeg(i, size=(44, 36)))).convert("CMYK").save(buffer, "JPEG")
    return buffer.getvalue()


def _write(dest, count: int = 30, *, odd: bool = False, corrupt: int | None = None) -> str:
    """Shards of ``count`` JPEGs of varied sizes (``odd``: some PNGs and CMYK JPEGs too)."""
    with ShardWriter(str(dest), name="data", shard_size="1GB") as writer:
        for i in range(count):
            sample = {"__key__": f"s{i:06d}", "cls": i % 5}
            if odd and i % 7 == 3:
                sample["png"] = _png(i)
            elif odd and i % 7 == 5:
                sample["jpg"] = _cmyk_jpeg(i)
            else:
                data = tiny_jpeg(i, size=(40 + 3 * i, 30 + 2 * i))
                sample["jpg"] = data[: len(data) // 3] if i == corrupt else data
            writer.write(sample)
    return str(dest)


def _run(
    path: str, transform=AUG, *, workers: int = 0, batch: int = 8, handler: str = "raise", fields=None, **loader_kw
):
    """Every batch of one epoch, with every RNG seeded the same way, and the loader's stats."""
    ds = ShardDataset(
        path,
        decode="torch",
        transform={"jpg": transform, "png": transform},
        shuffle=8,
        seed=3,
        handler=handler,
        fields=fields,
    )
    loader = ShardLoader(
        ds, batch_size=batch, num_workers=workers, generator=torch.Generator().manual_seed(0), **loader_kw
    )
    torch.manual_seed(0)
    return list(loader), loader.stats()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("gpu_batch"))


@pytest.mark.parametrize("workers", [0, 2])
def test_cpu_stage_matches_the_worker_path(shards, workers):
    expected, _ = _run(shards, workers=workers)
    staged, stats = _run(shards, workers=workers, decode_device="cpu")
    assert stats["decode_backend"] == "cpu" and stats["decode_skipped"] == 0 and stats["stage_s"] > 0
    assert stats["cpu_decoded"] == 30
    assert stats["samples"] == 30 and stats["wait_s"] >= 0
    assert [b["__key__"] for b in staged] == [b["__key__"] for b in expected]
    for want, got in pairs(expected, staged):
        assert torch.equal(got["cls"], want["cls"])
        image = got["jpg"]
        assert image.dtype == torch.uint8 and image.shape == want["jpg"].shape == (len(want["cls"]), 3, 24, 24)
        assert image.is_contiguous(memory_format=torch.channels_last)
        # Same crop and flip parameters, same decoder and resize: the same pixels.
        assert (image.int() - want["jpg"].int()).abs().max().item() <= 1


def test_cpu_stage_normalised_bf16_and_tuples(shards):
    aug = v2.Compose(
        [
            v2.RandomResizedCrop(20, scale=(0.3, 1.0)),
            v2.RandomHorizontalFlip(p=0.3),
            v2.ToDtype(torch.bfloat16, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )

    def run(**kw):
        ds = ShardDataset(shards, decode="torch", transform={"jpg": aug}, fields="jpg cls")
        torch.manual_seed(1)
        return list(ShardLoader(ds, batch_size=16, num_workers=0, **kw))

    for (want_x, want_y), (got_x, got_y) in pairs(run(), run(decode_device="cpu")):
        assert got_x.dtype == torch.bfloat16 and got_x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got_y, want_y)
        assert (got_x.float() - want_x.float()).abs().max().item() < 0.05


def test_eval_transform_resize_center_crop(shards):
    aug = v2.Compose([v2.Resize(28), v2.CenterCrop(24), v2.ToDtype(torch.float32, scale=True)])
    expected, _ = _run(shards, aug)
    staged, _ = _run(shards, aug, decode_device="cpu")
    for want, got in pairs(expected, staged):
        assert got["jpg"].dtype == torch.float32
        assert torch.allclose(got["jpg"], want["jpg"], atol=1e-6)


def test_resume_is_exact(shards):
    def loader() -> ShardLoader:
        ds = ShardDataset(shards, decode="torch", transform={"jpg": AUG}, shuffle=8, seed=3)
        return ShardLoader(ds, batch_size=4, num_workers=2, decode_device="cpu")

    full = keys_of(loader())
    before, state = stop_after(loader(), 3)
    assert before == full[:12]
    assert resumed_keys(loader(), state) == full[12:]


@needs_torchcodec
def test_png_and_cmyk_fall_back_to_the_cpu_decoder(tmp_path):
    path = _write(tmp_path, 21, odd=True)
    expected, _ = _run(path, batch=7, fields="jpg;png cls")
    # "nvjpeg" is TorchCodec's batched decode_jpeg (nvJPEG on a GPU, libjpeg-turbo here), for the plain JPEGs only.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no deprecated torchvision.io decoder behind it
        staged, stats = _run(path, batch=7, fields="jpg;png cls", decode_device="cpu", decode_backend="nvjpeg")
    assert stats["decode_backend"] == "nvjpeg" and len(staged) == 3
    assert stats["decode_batch_failures"] == 0 and stats["decode_regions"] is False
    assert stats["cpu_decoded"] == 6  # the 3 PNGs and 3 CMYK JPEGs of 21 samples
    for (want_x, want_y), (got_x, got_y) in pairs(expected, staged):
        assert torch.equal(got_y, want_y) and got_x.shape == want_x.shape == (7, 3, 24, 24)
        assert (got_x.float() - want_x.float()).abs().mean().item() < 1.0


def _turned_jpeg(i: int, orientation: int) -> bytes:
    image = Image.open(io.BytesIO(tiny_jpeg(i, size=(44 + i, 30))))
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@needs_torchcodec
@pytest.mark.parametrize("exif_orientation", [True, False])
def test_exif_turned_photos_follow_the_datasets_exif_orientation(tmp_path, exif_orientation):
    # The shipping step drew crops on the stored size and nvImageCodec ignores EXIF, so a
    # turned phone photo came out sideways although the dataset asks for upright pixels;
    # TorchCodec ("nvjpeg") always applies EXIF, so it would turn photos the dataset wants as stored.
    with ShardWriter(str(tmp_path), name="data", shard_size="1GB") as writer:
        for i in range(16):
            writer.write({"__key__": f"s{i:06d}", "cls": i % 3, "jpg": _turned_jpeg(i, 1 + i % 8)})

    def run(**kw):
        ds = ShardDataset(
            str(tmp_path), decode="torch", transform={"jpg": AUG}, seed=3, exif_orientation=exif_orientation
        )
        loader = ShardLoader(ds, batch_size=4, num_workers=0, generator=torch.Generator().manual_seed(0), **kw)
        torch.manual_seed(0)
        return list(loader), loader.stats()

    expected, _ = run()
    staged, stats = run(decode_device="cpu", decode_backend="nvjpeg")
    # TorchCodec turns what must turn (orientations 2-8, 14 of 16); they go to the CPU decoder
    # when they must stay as stored. (The EXIF-ignoring routing: tests/test_gpu_decoders.py.)
    assert stats["cpu_decoded"] == (0 if exif_orientation else 14)
    for want, got in zip(expected, staged, strict=True):
        assert got["__key__"] == want["__key__"]
        assert (got["jpg"].float() - want["jpg"].float()).abs().mean().item() < 1.0


def test_encode_for_batch_marks_what_the_gpu_decoders_take():
    recipe = parse_recipe(AUG)
    plain = encode_for_batch(tiny_jpeg(1), recipe, 0, max_pixels=None, key="k")
    assert plain.batchable and (plain.width, plain.height) == (48, 32) and plain.key == "k"
    top, left, height, width = plain.params[0]
    assert 0 <= top <= 32 - height and 0 <= left <= 48 - width and isinstance(plain.params[1], bool)
    assert not encode_for_batch(_cmyk_jpeg(1), recipe, 0, max_pixels=None).batchable
    assert not encode_for_batch(_png(1), recipe, 0, max_pixels=None).batchable
    with pytest.raises(SampleError, match="max_pixels"):
        encode_for_batch(tiny_jpeg(1), recipe, 0, max_pixels=100)
    # Crosses process boundaries intact.
    import pickle

    copy = pickle.loads(pickle.dumps(plain))
    assert isinstance(copy, EncodedImage) and copy.data == plain.data and copy.params == plain.params


def test_params_are_drawn_like_torchvision():
    recipe = parse_recipe(AUG)
    rrc = AUG.transforms[0]
    image = torch.zeros(3, 37, 51, dtype=torch.uint8)
    for seed in range(20):
        torch.manual_seed(seed)
        box = rrc.make_params([image])
        flip = bool(torch.rand(1) < 0.5)  # what RandomHorizontalFlip draws next
        torch.manual_seed(seed)
        assert recipe.draw(37, 51) == ((box["top"], box["left"], box["height"], box["width"]), flip)


def test_decode_failure_goes_to_the_handler(tmp_path):
    path = _write(tmp_path, 12, corrupt=5)
    with pytest.raises(SampleError, match="s000005"):
        _run(path, decode_device="cpu")
    expected, _ = _run(path, handler="skip")
    staged, stats = _run(path, handler="skip", decode_device="cpu")
    assert stats["decode_skipped"] == 1
    assert sorted(keys_of(staged)) == sorted(keys_of(expected)) and "s000005" not in keys_of(staged)
    # The failed sample is dropped from every field of its batch, which is one shorter.
    sizes = [(len(b["__key__"]), len(b["cls"]), b["jpg"].shape[0]) for b in staged]
    assert sizes == [(7, 7, 7), (4, 4, 4)] or sizes == [(8, 8, 8), (3, 3, 3)]


def test_mix_parts_ship_too(tmp_path, shards):
    other = _write(tmp_path, 10)
    eval_aug = v2.Compose([v2.Resize(30), v2.CenterCrop(24)])

    def run(**kw):
        mix = Mix(
            [
                ShardDataset(shards, decode="torch", transform={"jpg": AUG}, shuffle=5),
                ShardDataset(other, decode="torch", transform={"jpg": eval_aug}, handler="skip"),
            ],
            weights=[2, 1],
            epoch_length=24,
            seed=1,
        )
        loader = ShardLoader(mix, batch_size=6, num_workers=2, generator=torch.Generator().manual_seed(0), **kw)
        torch.manual_seed(0)
        return list(loader), loader

    want, _ = run()
    got, loader = run(decode_device="cpu")
    assert all(type(part) is ShardDataset for part in loader.shard_dataset.datasets)  # the user's Mix is untouched
    assert [b["__key__"] for b in got] == [b["__key__"] for b in want] and len(got) == 4
    for a, b in pairs(want, got):
        assert torch.equal(a["cls"], b["cls"]) and (a["jpg"].int() - b["jpg"].int()).abs().max().item() <= 1


@pytest.mark.parametrize(
    "transform, message",
    [
        (v2.Compose([v2.RandomResizedCrop(24), v2.ColorJitter(0.2)]), "ColorJitter.*Supported: RandomResizedCrop"),
        (v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.RandomResizedCrop(24)]), "after the dtype"),
        (v2.Compose([v2.RandomResizedCrop(24), v2.Normalize([0.5] * 3, [0.5] * 3)]), "Normalize needs a float"),
        (v2.Compose([v2.Resize(24), v2.RandomHorizontalFlip()]), "fixed size"),
        (v2.Compose([v2.Resize(32), v2.RandomResizedCrop(24)]), "first size-changing"),
        (v2.Compose([v2.RandomResizedCrop(24), v2.ToDtype(torch.float32)]), "scale=True"),
        (v2.Compose([v2.RandomResizedCrop(24), v2.ToDtype(torch.int32, scale=True)]), "float dtype"),
    ],
)
def test_transforms_it_cannot_take_over_are_refused(shards, transform, message):
    ds = ShardDataset(shards, decode="torch", transform={"jpg": transform})
    with pytest.raises(ShardkitError, match=message):
        ShardLoader(ds, batch_size=4, num_workers=0, decode_device="cpu")


def test_loader_options_it_cannot_honour_are_refused(shards):
    ds = ShardDataset(shards, decode="torch", transform={"jpg": AUG})
    with pytest.raises(ShardkitError, match="set batch_size"):
        ShardLoader(ds, batch_size=None, num_workers=0, decode_device="cpu")
    with pytest.raises(ShardkitError, match="default collate_fn"):
        ShardLoader(ds, batch_size=4, num_workers=0, decode_device="cpu", collate_fn=list)
    with pytest.raises(ShardkitError, match="decode_backend must be one of"):
        ShardLoader(ds, batch_size=4, num_workers=0, decode_device="cpu", decode_backend="dali")
    with pytest.raises(ShardkitError, match="only applies with decode_device"):
        ShardLoader(ds, batch_size=4, num_workers=0, decode_backend="nvjpeg")
    with pytest.raises(ShardkitError, match="decodes on a CUDA device"):
        ShardLoader(ds, batch_size=4, num_workers=0, decode_device="cpu", decode_backend="nvimgcodec")
    with pytest.raises(ShardkitError, match="must be 'cpu', 'cuda'"):
        ShardLoader(ds, batch_size=4, num_workers=0, device="mps")
    for bad in (
        ShardDataset(shards, decode="pil", transform={"jpg": AUG}),
        ShardDataset(shards, decode="torch", decode_size=24, transform={"jpg": AUG}),
        ShardDataset(shards, decode="torch", decode_size="exact", transform={"jpg": AUG}),
        ShardDataset(shards, decode="torch"),
    ):
        with pytest.raises(ShardkitError, match="decode='torch'|decode_size|image transform to take over"):
            ShardLoader(bad, batch_size=4, num_workers=0, decode_device="cpu")
    # The plain loader is untouched by all this, and device="cpu" is the plain path.
    assert ShardLoader(ds, batch_size=4, num_workers=0, device="cpu")._device_stage is None


def test_whole_sample_transform_takes_one_image(tmp_path, shards):
    ds = ShardDataset(shards, decode="torch", transform=AUG, fields="jpg cls")
    torch.manual_seed(0)
    want = list(ShardLoader(ds, batch_size=8, num_workers=0))
    torch.manual_seed(0)
    got = list(ShardLoader(ds, batch_size=8, num_workers=0, decode_device="cpu"))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs(want, got))
    with ShardWriter(str(tmp_path), name="two", shard_size="1GB") as writer:
        writer.write({"__key__": "a", "jpg": tiny_jpeg(0), "png": _png(0)})
    two = ShardDataset(str(tmp_path), decode="torch", transform=AUG)
    with pytest.raises(SampleError, match="one image per sample"):
        list(ShardLoader(two, batch_size=1, num_workers=0, decode_device="cpu"))


@without_cuda
def test_cuda_options_without_cuda_fail_at_construction(shards):
    ds = ShardDataset(shards, decode="torch", transform={"jpg": AUG})
    for kw in ({"device": "cuda"}, {"decode_device": "cuda"}, {"decode_device": "cuda:0", "decode_backend": "nvjpeg"}):
        with pytest.raises(ShardkitError, match="CUDA is not available"):
            ShardLoader(ds, batch_size=4, num_workers=0, **kw)


def test_importing_costs_nothing():
    code = (
        "import sys, torch, shardkit.loader, shardkit.gpu.batch, shardkit.gpu.decoders; "
        "print(torch.cuda.is_initialized(), any(m.startswith('torchvision') for m in sys.modules), "
        "any('nvimgcodec' in m for m in sys.modules if not m.startswith('shardkit')), "
        "any(m.startswith('torchcodec') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "False", "False", "False"]


def test_default_path_prints_no_deprecation_warning(shards):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        _run(shards, decode_device="cpu")


# ------------------------------------------------------------------------------ CUDA


@needs_cuda
def test_device_cuda_delivers_the_same_batches_on_the_gpu(shards):
    expected, _ = _run(shards)
    moved, stats = _run(shards, device="cuda")
    assert stats["device"].startswith("cuda")
    for want, got in pairs(expected, moved):
        assert got["jpg"].is_cuda and got["cls"].is_cuda and got["__key__"] == want["__key__"]
        assert torch.equal(got["jpg"].cpu(), want["jpg"])


@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "torchcodec", "nvjpeg", "cpu"])
def test_decode_device_cuda_matches_the_cpu_stage(tmp_path, backend):
    path = _write(tmp_path, 21, odd=True)
    staged, stats = _run(path, batch=7, fields="jpg;png cls", decode_device="cuda", decode_backend=backend)
    expected, _ = _run(path, batch=7, fields="jpg;png cls", decode_device="cpu")
    for (want_x, want_y), (got_x, got_y) in pairs(expected, staged):
        assert got_x.is_cuda and got_y.is_cuda and torch.equal(got_y.cpu(), want_y)
        diff = (got_x.cpu().float() - want_x.float()).abs().mean().item()
        assert diff < 3.0, (stats["decode_backend"], diff)


@needs_cuda
def test_nvimgcodec_region_decode_matches_the_cpu_stage(shards):
    pytest.importorskip("nvidia.nvimgcodec")
    expected, _ = _run(shards, decode_device="cpu")
    from nvidia import nvimgcodec

    from shardkit.gpu.nvimgcodec import region_refusal

    staged, stats = _run(shards, decode_device="cuda", decode_backend="nvimgcodec")
    assert stats["decode_backend"] == "nvimgcodec" and stats["decode_batch_failures"] == 0
    # Region decoding only on versions where it is safe (0.9.0 crashes: NVIDIA/nvImageCodec issue 55).
    assert stats["decode_regions"] == (region_refusal(nvimgcodec.__version__) is None)
    for want, got in pairs(expected, staged):
        assert (got["jpg"].cpu().float() - want["jpg"].float()).abs().mean().item() < 3.0
