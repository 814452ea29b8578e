"""The GPU stage's batch decoders (shardkit.gpu.decoders, batch_decoder, nvimgcodec).

On the CPU: TorchCodec's CPU decode (the same library and API as its nvJPEG path on CUDA)
against shardkit's CPU decoder, which images each decoder takes by format and EXIF
orientation, the CPU retry of a batch a decoder fails and its counter in
``loader.stats()``, and the nvImageCodec version policy. On CUDA, when present: every
installed decoder against the CPU decoder.
"""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from shardkit import ShardDataset, ShardLoader
from shardkit.decode.fields import decode_image
from shardkit.errors import SampleError, ShardkitError
from shardkit.gpu.batch_decoder import BatchDecoder
from shardkit.gpu.decoders import CpuBackend, TorchcodecBackend, make_backend
from shardkit.gpu.nvimgcodec import region_refusal
from shardkit.gpu.recipe import parse_recipe
from shardkit.gpu.ship import encode_for_batch
from shardkit.writing.writer import ShardWriter
from tests.helpers import keys_of, pairs, tiny_jpeg

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_torchcodec = pytest.mark.skipif(importlib.util.find_spec("torchcodec") is None, reason="needs torchcodec")

CPU = torch.device("cpu")
AUG = v2.Compose([v2.RandomResizedCrop(24), v2.RandomHorizontalFlip()])


def _encode(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def _photo(i: int, size: tuple[int, int] = (44, 30)) -> Image.Image:
    return Image.open(io.BytesIO(tiny_jpeg(i, size=size)))


def _turned(i: int, orientation: int) -> bytes:
    image = _photo(i, (44 + i, 30))
    exif = image.getexif()
    exif[0x0112] = orientation
    return _encode(image, quality=95, exif=exif.tobytes())


def _odd_images() -> dict[str, bytes]:
    """One of each kind the decoders route differently."""
    photo = _photo(1, (64, 48))
    return {
        "rgb": tiny_jpeg(2, size=(56, 40)),
        "gray": _encode(photo.convert("L")),
        "progressive": _encode(photo, progressive=True, quality=90),
        "cmyk": _encode(photo.convert("CMYK")),
        "png": _encode(photo, "PNG"),
    }


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    d = (a.cpu().int() - b.cpu().int()).abs()
    return d.float().mean().item(), int(d.max().item())


# ----------------------------------------------------------- TorchCodec vs shardkit


@needs_torchcodec
def test_torchcodec_decodes_jpegs_as_shardkit_does():
    from torchcodec.decoders import decode_jpeg

    images = _odd_images()
    for name in ("rgb", "gray", "progressive", "cmyk"):
        got = decode_jpeg(images[name], device="cpu")  # defaults: RGB, uint8
        mean, worst = _diff(got, decode_image(images[name], "torch"))
        assert got.shape[0] == 3 and mean < 0.5 and worst <= 3, (name, mean, worst)


@needs_torchcodec
@pytest.mark.parametrize("orientation", range(1, 9))
def test_torchcodec_always_applies_the_exif_orientation(orientation):
    from torchcodec.decoders import decode_jpeg

    data = _turned(3, orientation)
    got = decode_jpeg(data, device="cpu")
    upright = decode_image(data, "torch", exif_orientation=True)
    stored = decode_image(data, "torch", exif_orientation=False)
    assert _diff(got, upright)[1] <= 3
    # Which is why shardkit gives it a turned photo only when the dataset wants it upright.
    assert (got.shape != stored.shape or _diff(got, stored)[1] > 3) == (orientation != 1)


# ------------------------------------------------------------------- routing


def test_decoders_take_what_they_decode_as_shardkits_pixel_policy_wants():
    recipe = parse_recipe(AUG)
    ignores_exif = BatchDecoder(CPU, None)  # nvImageCodec's rule
    applies_exif = BatchDecoder(CPU, None)
    applies_exif.applies_exif = True  # TorchCodec's rule
    for exif in (True, False):
        turned = [encode_for_batch(_turned(i, 1 + i % 8), recipe, 0, max_pixels=None, exif=exif) for i in range(16)]
        # Orientations 2-8 are 14 of the 16 photos: they must turn only with exif_orientation=True.
        assert sum(not ignores_exif.takes(e) for e in turned) == (14 if exif else 0)
        assert sum(not applies_exif.takes(e) for e in turned) == (0 if exif else 14)
        odd = {k: encode_for_batch(v, recipe, 0, max_pixels=None, exif=exif) for k, v in _odd_images().items()}
        for decoder in (ignores_exif, applies_exif):
            assert [decoder.takes(odd[k]) for k in ("rgb", "gray", "progressive", "cmyk", "png")] == [
                True,
                True,
                True,
                False,
                False,
            ]
        assert not any(CpuBackend(CPU, None).takes(e) for e in turned + list(odd.values()))


def test_the_pixel_guard_runs_before_any_decoder():
    recipe = parse_recipe(AUG)
    with pytest.raises(SampleError, match="max_pixels"):
        encode_for_batch(tiny_jpeg(1, size=(56, 40)), recipe, 0, max_pixels=1000)
    shipped = encode_for_batch(tiny_jpeg(1, size=(56, 40)), recipe, 0, max_pixels=None)
    (result,) = CpuBackend(CPU, 1000).decode([shipped], [recipe])
    assert result.tensor is None and "max_pixels" in str(result.error)


# ------------------------------------------------------- the stage with TorchCodec


def _write(dest, count: int, *, exif: bool = False, odd: bool = False, corrupt: int | None = None) -> str:
    odd_images = _odd_images()
    with ShardWriter(str(dest), name="data", shard_size="1GB") as writer:
        for i in range(count):
            if exif:
                data = _turned(i, 1 + i % 8)
            elif odd and i % 5 == 4:
                data = odd_images[("gray", "cmyk", "png", "progressive")[i // 5 % 4]]
            else:
                data = tiny_jpeg(i, size=(40 + 3 * i, 30 + 2 * i))
            if i == corrupt:
                data = data[: len(data) // 3]
            writer.write({"__key__": f"s{i:06d}", "cls": i % 5, "png" if data[:4] == b"\x89PNG" else "jpg": data})
    return str(dest)


def _run(path: str, *, exif: bool = True, handler: str = "raise", passes: int = 1, fields="jpg;png cls", **loader_kw):
    ds = ShardDataset(
        path,
        decode="torch",
        transform={"jpg": AUG, "png": AUG},
        shuffle=8,
        seed=3,
        handler=handler,
        exif_orientation=exif,
        fields=fields,
    )
    loader = ShardLoader(ds, batch_size=8, num_workers=0, generator=torch.Generator().manual_seed(0), **loader_kw)
    out = []
    for _ in range(passes):
        loader.set_epoch(0)
        torch.manual_seed(0)
        out.append((list(loader), loader.stats()))
    return out if passes > 1 else out[0]


def _same_batches(want: list, got: list) -> None:
    """Same labels, same shapes, pixels within 1 (tuple batches, or dict batches of jpg and cls)."""
    for a, b in pairs(want, got):
        if isinstance(a, dict):
            a, b = (a["jpg"], a["cls"]), (b["jpg"], b["cls"])
        (want_x, want_y), (got_x, got_y) = a, b
        assert torch.equal(want_y, got_y) and want_x.shape == got_x.shape
        assert (want_x.int() - got_x.int()).abs().max().item() <= 1


@needs_torchcodec
@pytest.mark.parametrize("exif", [True, False])
def test_torchcodec_stage_gives_the_worker_paths_pixels(tmp_path, exif):
    turned = _write(tmp_path / "turned", 16, exif=True)
    expected, _ = _run(turned, exif=exif)
    staged, stats = _run(turned, exif=exif, decode_device="cpu", decode_backend="torchcodec")
    assert stats["decode_backend"] == "torchcodec" and stats["decode_batch_failures"] == 0
    assert stats["cpu_decoded"] == (0 if exif else 14)  # photos to keep as stored go to the CPU decoder
    _same_batches(expected, staged)
    odd = _write(tmp_path / "odd", 20, odd=True)
    expected, _ = _run(odd, exif=exif)
    staged, stats = _run(odd, exif=exif, decode_device="cpu", decode_backend="torchcodec")
    assert stats["cpu_decoded"] == 2  # one CMYK JPEG, one PNG; gray and progressive JPEGs are TorchCodec's
    _same_batches(expected, staged)


@needs_torchcodec
def test_a_damaged_jpeg_fails_the_torchcodec_batch_which_the_cpu_decodes_again(tmp_path):
    path = _write(tmp_path, 24, corrupt=5)
    expected, _ = _run(path, handler="skip", fields=None, decode_device="cpu")
    staged, stats = _run(path, handler="skip", fields=None, decode_device="cpu", decode_backend="torchcodec")
    # TorchCodec's batched decode_jpeg raises for the whole batch; the CPU decodes its 8
    # images again, the damaged one goes to the handler, the other 7 are delivered.
    assert stats["decode_batch_failures"] == 1 and stats["cpu_decoded"] == 8 and stats["decode_skipped"] == 1
    assert keys_of(staged) == keys_of(expected) and "s000005" not in keys_of(staged)
    _same_batches(expected, staged)


class FailingTorchcodec(TorchcodecBackend):
    """A test double for a GPU decoder whose library fails whole batches (CUDA errors,
    NVIMGCODEC_STATUS_INTERNAL_ERROR): TorchCodec that raises for its first ``failures``
    batches the way such a library call does, then decodes as usual."""

    def __init__(self, device: torch.device, failures: int) -> None:
        super().__init__(device, None)
        self.failures = failures

    def decode_batch(self, images, recipes):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("nvjpegDecodeBatched: NVJPEG_STATUS_EXECUTION_FAILED (test double)")
        return super().decode_batch(images, recipes)


@needs_torchcodec
def test_a_batch_the_decoder_fails_is_decoded_once_more_on_the_cpu_and_counted(tmp_path):
    path = _write(tmp_path, 30)
    expected, _ = _run(path, decode_device="cpu")
    backend = FailingTorchcodec(CPU, failures=2)
    (first, first_stats), (second, second_stats) = _run(path, decode_device="cpu", decode_backend=backend, passes=2)
    assert first_stats["decode_backend"] == "torchcodec"
    assert first_stats["decode_batch_failures"] == 2 and first_stats["cpu_decoded"] == 16  # two batches of 8
    assert second_stats["decode_batch_failures"] == 0 and second_stats["cpu_decoded"] == 0  # counted per pass
    assert first_stats["decode_skipped"] == second_stats["decode_skipped"] == 0
    _same_batches(expected, first)
    _same_batches(expected, second)


# ------------------------------------------------------------- choosing one


def test_make_backend_names_and_instances(tmp_path):
    assert type(make_backend("auto", CPU, None)) is CpuBackend and type(make_backend("cpu", CPU, None)) is CpuBackend
    with pytest.raises(ShardkitError, match="decodes on a CUDA device"):
        make_backend("nvimgcodec", CPU, None)
    with pytest.raises(ShardkitError, match="must be one of"):
        make_backend("dali", CPU, None)
    if importlib.util.find_spec("torchcodec") is not None:
        assert make_backend("torchcodec", CPU, None).name == "torchcodec"
        assert make_backend("nvjpeg", CPU, None).name == "nvjpeg"  # the same TorchCodec nvJPEG path, old name
    path = _write(tmp_path, 8)
    ds = ShardDataset(path, decode="torch", transform={"jpg": AUG})
    mine = CpuBackend(CPU, None)
    loader = ShardLoader(ds, batch_size=4, num_workers=0, decode_device="cpu", decode_backend=mine)
    assert sum(len(batch["cls"]) for batch in loader) == 8 and mine.cpu_decoded == 8
    elsewhere = CpuBackend(torch.device("cuda"), None)  # makes no CUDA call
    with pytest.raises(ShardkitError, match="decodes on cuda"):
        ShardLoader(ds, batch_size=4, num_workers=0, decode_device="cpu", decode_backend=elsewhere)
    with pytest.raises(ShardkitError, match="only applies with decode_device"):
        ShardLoader(ds, batch_size=4, num_workers=0, decode_backend=mine)


# ------------------------------------------------------ nvImageCodec versions


@pytest.mark.parametrize(
    "version, allowed, reason",
    [
        ("0.8.0", True, None),
        ("0.8.0.22", True, None),  # the PyPI wheel's four-part version
        ("0.7.0", True, None),
        ("0.3.0", True, None),
        ("0.9.0", False, "issue 55"),
        ("0.9.0.20", False, "crash of the process"),
        ("0.9.1", False, "issue 55"),
        ("0.10.0", False, "not been checked"),
        ("1.0", False, "not been checked"),
        ("0.2.0", False, "older than region"),
        ("unknown", False, "not one shardkit can check"),
    ],
)
def test_nvimgcodec_decodes_regions_only_on_versions_where_it_is_safe(version, allowed, reason):
    refusal = region_refusal(version)
    assert (refusal is None) == allowed
    if reason is not None:
        assert refusal is not None and reason in refusal and version in refusal


def test_the_installed_nvimgcodec_version_is_one_the_policy_reads():
    nvimgcodec = pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec is not installed")
    version = nvimgcodec.__version__
    refusal = region_refusal(version)
    assert refusal is None or "not one shardkit can check" not in refusal
    major, minor = (int(part) for part in version.split(".")[:2])
    assert (refusal is None) == (major == 0 and 3 <= minor <= 8)


# ---------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("name", ["torchcodec", "nvimgcodec"])
def test_every_installed_gpu_decoder_matches_the_cpu_decoder(name):
    if importlib.util.find_spec("torchcodec" if name == "torchcodec" else "nvidia.nvimgcodec") is None:
        pytest.skip(f"{name} is not installed")
    recipe = parse_recipe(v2.Compose([v2.Resize(32), v2.CenterCrop(24)]))  # whole images, no region
    device = torch.device("cuda", torch.cuda.current_device())
    backend = make_backend(name, device, None)
    images = _odd_images()
    shipped = [encode_for_batch(data, recipe, 0, max_pixels=None) for data in images.values()]
    results = backend.decode(shipped, [recipe] * len(shipped))
    assert backend.batch_failures == 0 and backend.cpu_decoded == 2  # CMYK and PNG
    for (name_, data), result in pairs(list(images.items()), results):
        assert result.tensor is not None and result.tensor.is_cuda and not result.cropped
        mean, _ = _diff(result.tensor, decode_image(data, "torch"))
        assert mean < 2.0, (name, name_, mean)
    backend.finish()
    torch.cuda.synchronize()
