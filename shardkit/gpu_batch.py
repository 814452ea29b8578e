"""Decode and augment whole batches in the main process (on the GPU), fed by workers that only read.

``ShardLoader(ds, decode_device="cuda")`` splits the per-sample pipeline in two:

- **in the workers** (:class:`ShipTransform`): read the sample, decode the small fields
  (labels, JSON) as usual, and for each image field read the size from the header
  and draw the random parameters of the transform (RandomResizedCrop box, flip) with
  the same torch RNG calls as torchvision. The image itself stays encoded: the batch
  crosses the process boundary as :class:`EncodedImage` objects plus collated labels.
- **in the main process** (:class:`BatchStage`): decode the batch's JPEGs in one call
  (nvImageCodec, decoding only the crop region, when it is installed; else
  torchvision's nvjpeg batch decode), other formats and CMYK JPEGs on the CPU, then
  crop, resize and flip each image with the drawn parameters, stack, convert dtype,
  normalise and return a channels-last batch on the device.

The transform is taken over, not re-implemented: the dataset's torchvision pipeline is
read (:func:`parse_recipe`) and run through ``torchvision.transforms.v2.functional``
with the parameters the worker drew, so ``decode_device="cpu"`` gives the same pixels
as the ordinary worker path and is what CI tests on machines without a GPU.

Importing this module makes no CUDA call and imports neither torchvision nor any GPU
decoder; they load when a stage is built.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .dataset import Batching, ShardDataset
from .decode import IMAGE_EXTENSIONS, decode_image, make_decoder
from .errors import SampleError, ShardkitError
from .gpu import CudaPrefetcher, _cuda_device
from .imageinfo import read_image_header
from .mix import Mix
from .pipeline import SamplePipeline, collate, make_handler
from .pixels import check_pixels, default_max_pixels, exif_orientation_of

log = logging.getLogger(__name__)

DECODE_BACKENDS = ("auto", "cpu", "nvjpeg", "nvimgcodec")

SUPPORTED_TRANSFORMS = (
    "RandomResizedCrop (first size-changing step), Resize, CenterCrop, RandomHorizontalFlip, then optionally "
    "ToDtype(float dtype, scale=True) or ConvertImageDtype(float dtype) and Normalize; ToImage and "
    "ToPureTensor are accepted and do nothing (torchvision v1 or v2, nested Compose allowed)"
)


# ----------------------------------------------------------------------- the recipe


def _tv_classes(*names: str) -> tuple[Any, ...]:
    """The torchvision v1 and v2 classes with these names (v2 ones are not subclasses of v1)."""
    import torchvision.transforms as v1
    import torchvision.transforms.v2 as v2

    return tuple(getattr(module, name) for module in (v1, v2) for name in names if hasattr(module, name))


def _leaves(transform: Any) -> list[Any]:
    """The leaf transforms of ``transform``, nested Compose (v1 or v2) unrolled in order."""
    inner = getattr(transform, "transforms", None)
    if isinstance(transform, _tv_classes("Compose")) and inner is not None:
        return [leaf for t in inner for leaf in _leaves(t)]
    return [transform]


def _hw(size: Any) -> tuple[int, int] | None:
    """A torchvision size argument (int, [s] or (h, w)) as (h, w); None for [s]-style
    'shorter side' sizes, which give no fixed output size."""
    if isinstance(size, int):
        return None
    size = list(size)
    return (int(size[0]), int(size[1])) if len(size) == 2 else None


@dataclass(frozen=True)
class Step:
    """One geometric step of a recipe: ``kind`` is "rrc", "resize", "center_crop" or "flip"."""

    kind: str
    size: Any = None
    interpolation: Any = None
    antialias: Any = True
    max_size: int | None = None
    p: float = 0.5
    crop: Any = None  # "rrc": a RandomResizedCropDecode that draws the box like torchvision


@dataclass(frozen=True)
class Recipe:
    """What the batch stage does to one image field: geometric steps per image (their
    random parameters drawn in the worker), then dtype and normalisation per batch."""

    steps: tuple[Step, ...]
    out_hw: tuple[int, int]
    dtype: torch.dtype | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def output_spec(self) -> tuple[Any, ...]:
        return self.out_hw, self.dtype, self.mean, self.std

    def draw(self, height: int, width: int) -> tuple[Any, ...]:
        """The random parameters of every step for an image of this size, drawn in the
        order and with the torch RNG calls torchvision's transforms make."""
        params: list[Any] = []
        for step in self.steps:
            if step.kind == "rrc":
                params.append(step.crop.get_params(height, width))
            elif step.kind == "flip":
                # _RandomApplyTransform: skipped when torch.rand(1) >= p.
                params.append(bool(torch.rand(1) < step.p))
            else:
                params.append(None)
        return tuple(params)


def parse_recipe(transform: Any) -> Recipe:
    """Read a torchvision pipeline into a :class:`Recipe`, or raise ShardkitError naming
    the step that cannot be taken over and what is supported."""
    from torchvision.transforms import InterpolationMode

    from .crop_decode import RandomResizedCropDecode

    rrc, resize, center, flip = (
        _tv_classes(n) for n in ("RandomResizedCrop", "Resize", "CenterCrop", "RandomHorizontalFlip")
    )
    to_dtype, convert, normalize = (_tv_classes(n) for n in ("ToDtype", "ConvertImageDtype", "Normalize"))
    passthrough = _tv_classes("ToImage", "ToPureTensor")
    steps: list[Step] = []
    out_hw: tuple[int, int] | None = None
    dtype: torch.dtype | None = None
    mean = std = None
    leaf: Any
    for leaf in _leaves(transform):
        name = type(leaf).__name__
        geometric = isinstance(leaf, rrc + resize + center + flip)
        if geometric and dtype is not None:
            raise ShardkitError(
                f"decode_device: {name} comes after the dtype conversion; the batch stage runs "
                f"the geometric steps on uint8 first. Supported: {SUPPORTED_TRANSFORMS}"
            )
        if isinstance(leaf, rrc):
            if any(s.kind in ("resize", "center_crop") for s in steps):
                raise ShardkitError(
                    "decode_device: RandomResizedCrop must be the first size-changing step "
                    "(its box is drawn from the image header)"
                )
            interpolation = leaf.interpolation
            steps.append(
                Step(
                    "rrc",
                    size=tuple(leaf.size),
                    interpolation=interpolation,
                    antialias=getattr(leaf, "antialias", True),
                    crop=RandomResizedCropDecode(tuple(leaf.size), tuple(leaf.scale), tuple(leaf.ratio)),
                )
            )
            out_hw = (int(leaf.size[0]), int(leaf.size[-1]))
        elif isinstance(leaf, resize):
            if leaf.size is None:
                raise ShardkitError("decode_device: Resize(size=None, max_size=...) gives no fixed size")
            size = [leaf.size] if isinstance(leaf.size, int) else list(leaf.size)
            steps.append(
                Step(
                    "resize",
                    size=size,
                    interpolation=leaf.interpolation,
                    max_size=leaf.max_size,
                    antialias=getattr(leaf, "antialias", True),
                )
            )
            out_hw = _hw(size)
        elif isinstance(leaf, center):
            size = [leaf.size] if isinstance(leaf.size, int) else [int(v) for v in leaf.size]
            out_hw = (size[0], size[-1])
            steps.append(Step("center_crop", size=list(out_hw)))
        elif isinstance(leaf, flip):
            steps.append(Step("flip", p=float(leaf.p)))
        elif isinstance(leaf, to_dtype + convert):
            wanted = leaf.dtype
            if isinstance(leaf, to_dtype) and not getattr(leaf, "scale", False):
                raise ShardkitError("decode_device: ToDtype needs scale=True (uint8 -> [0, 1])")
            if not isinstance(wanted, torch.dtype) or not wanted.is_floating_point or dtype is not None:
                raise ShardkitError(
                    f"decode_device: {name}({wanted!r}) is not supported: one conversion to a "
                    "float dtype (torch.float32, torch.bfloat16, torch.float16)"
                )
            dtype = wanted
        elif isinstance(leaf, normalize):
            if dtype is None:
                raise ShardkitError(
                    "decode_device: Normalize needs a float image: put ToDtype(torch.float32, "
                    "scale=True) (or bfloat16/float16) before it"
                )
            mean, std = tuple(float(v) for v in leaf.mean), tuple(float(v) for v in leaf.std)
        elif isinstance(leaf, passthrough):
            continue
        else:
            raise ShardkitError(
                f"decode_device cannot take over {name} in the image transform. Supported: {SUPPORTED_TRANSFORMS}"
            )
    for step in steps:
        # torchvision keeps the mode as an InterpolationMode or (v2, recent) its string value.
        mode = step.interpolation
        if mode is not None and (
            not isinstance(mode, (str, InterpolationMode))
            or InterpolationMode(mode).value not in ("nearest", "nearest-exact", "bilinear", "bicubic")
        ):
            raise ShardkitError(f"decode_device: interpolation {mode!r} is not supported on tensors")
    if out_hw is None:
        raise ShardkitError(
            "decode_device: the image transform must end in a fixed size (RandomResizedCrop, "
            "CenterCrop or Resize((h, w))) so the batch can be stacked"
        )
    return Recipe(tuple(steps), out_hw, dtype, mean, std)


# --------------------------------------------------------------- the worker side


class EncodedImage:
    """An image still encoded, with its header size and the transform parameters the
    worker drew; what crosses from a worker to the main process in place of pixels."""

    __slots__ = ("data", "height", "width", "batchable", "params", "recipe", "key", "url", "upright")

    def __init__(
        self,
        data: bytes,
        height: int,
        width: int,
        batchable: bool,
        params: tuple[Any, ...],
        recipe: int,
        key: str | None = None,
        url: str | None = None,
        upright: bool = False,
    ) -> None:
        self.data, self.height, self.width, self.batchable = data, height, width, batchable
        self.params, self.recipe, self.key, self.url = params, recipe, key, url
        self.upright = upright  # decode with the EXIF orientation applied (height/width are upright)

    def __reduce__(self) -> tuple[Any, ...]:
        return EncodedImage, (
            self.data,
            self.height,
            self.width,
            self.batchable,
            self.params,
            self.recipe,
            self.key,
            self.url,
            self.upright,
        )

    def __repr__(self) -> str:
        return f"EncodedImage({len(self.data)} bytes, {self.width}x{self.height}, key={self.key!r})"


def encode_for_batch(
    data: bytes | bytearray | memoryview,
    recipe: Recipe,
    index: int,
    *,
    max_pixels: int | None,
    key: str | None = None,
    url: str | None = None,
    exif: bool = False,
) -> EncodedImage:
    """Read the size from the header, apply the pixel guard and draw ``recipe``'s parameters.

    ``batchable`` is True for baseline/progressive JPEGs with 1 or 3 components, which the
    GPU decoders take in a batch; everything else is decoded on the CPU in the main process.
    """
    data = bytes(data)
    header = read_image_header(data)
    if header is not None:
        height, width = header.height, header.width
        batchable = header.format == "JPEG" and header.components in (1, 3)
        orientation = header.orientation
    else:  # BMP, TIFF, PNM...: PIL's lazy open reads the header only
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                orientation = exif_orientation_of(image) if exif else 1
        except Exception as exc:
            raise SampleError(f"not a readable image: {exc}") from exc
        batchable = False
    check_pixels(width, height, max_pixels)
    # With exif (the dataset's exif_orientation), a turned photo is decoded upright on the
    # CPU, as on the worker path, and its parameters are drawn on the upright size.
    upright = exif and orientation != 1
    if upright:
        batchable = False
        if orientation in (5, 6, 7, 8):
            height, width = width, height
    return EncodedImage(data, height, width, batchable, recipe.draw(height, width), index, key, url, upright)


class ShipTransform:
    """The worker-side transform of the GPU path: image fields become EncodedImage (with
    drawn parameters), the other per-field callables of the dataset's transform still run,
    in the dataset's order (so the RNG is drawn in the same order as on the CPU path)."""

    def __init__(
        self,
        steps: Sequence[tuple[str | None, int | Callable[[Any], Any]]],
        recipes: Sequence[Recipe],
        max_pixels: int | None,
        offset: int = 0,
        exif: bool = False,
    ) -> None:
        self.exif = exif  # the dataset's exif_orientation
        self.steps = list(steps)  # (field or None for every image field, recipe index or callable)
        self.recipes = list(recipes)
        self.max_pixels = max_pixels
        self.offset = offset  # where this dataset's recipes start in the stage's list (Mix parts)

    def _encode(self, sample: dict, field: str, index: int) -> None:
        sample[field] = encode_for_batch(
            sample[field],
            self.recipes[index],
            self.offset + index,
            max_pixels=self.max_pixels,
            key=sample.get("__key__"),
            url=sample.get("__url__"),
            exif=self.exif,
        )

    def __call__(self, sample: dict) -> dict:
        for field, what in self.steps:
            if field is None:  # a whole-sample transform: it applies to the sample's image
                images = [
                    f
                    for f in sample
                    if not f.startswith("__")
                    and f.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS
                    and isinstance(sample[f], (bytes, bytearray, memoryview))
                ]
                if len(images) > 1:
                    raise SampleError(
                        f"decode_device with a whole-sample transform takes one image per sample, "
                        f"this one has {images}; use transform={{'{images[0]}': ...}}"
                    )
                for f in images:
                    self._encode(sample, f, what)  # type: ignore[arg-type]
            elif field in sample:
                if isinstance(what, int):
                    self._encode(sample, field, what)
                else:
                    sample[field] = what(sample[field])
        return sample


class _ShippingDataset(ShardDataset):
    """The user's dataset with the worker pipeline swapped for the shipping one.

    Built by :func:`shipping_dataset` from the user's dataset's attributes (never
    modifying it); it shares the epoch counter, so ``set_epoch`` reaches both.
    """

    _ship_decoder: Callable[[dict], dict]
    _ship_transform: ShipTransform

    def pipeline(self, handler: Callable[[Exception], None]) -> SamplePipeline:
        pipe = super().pipeline(handler)  # keeps the dataset's select, fields and handler
        pipe.decoder = self._ship_decoder
        pipe.transform = self._ship_transform
        return pipe


def _takeover(dataset: ShardDataset, offset: int) -> tuple[ShipTransform, Callable[[dict], dict], list[Recipe]]:
    """The worker-side decoder and transform for ``dataset``, or ShardkitError."""
    if dataset.decode != "torch":
        raise ShardkitError(
            f"decode_device needs the dataset built with decode='torch' (got {dataset.decode!r}): "
            "the batch stage yields uint8/float tensors as decode='torch' does"
        )
    if dataset.decode_size is not None:
        raise ShardkitError("decode_device decodes at full size (or only the crop region); drop decode_size")
    transform = dataset.transform
    recipes: list[Recipe] = []
    steps: list[tuple[str | None, int | Callable[[Any], Any]]] = []
    raw: dict[str, Callable[[bytes], Any]] = {}
    if isinstance(transform, Mapping):
        for field, fn in transform.items():
            if field.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                recipes.append(parse_recipe(fn))
                steps.append((field, len(recipes) - 1))
                raw[field] = bytes  # keep the field encoded: the stage decodes it
            else:
                steps.append((field, fn))
    elif transform is not None:
        recipes.append(parse_recipe(transform))
        steps.append((None, 0))
        raw = dict.fromkeys(IMAGE_EXTENSIONS, bytes)
    if not recipes:
        raise ShardkitError(
            "decode_device needs an image transform to take over, e.g. "
            "transform={'jpg': v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()])}"
        )
    max_pixels = default_max_pixels(None)
    decoder = make_decoder("torch", handlers=raw, allow_pickle=dataset.allow_pickle, max_pixels=max_pixels)
    return ShipTransform(steps, recipes, max_pixels, offset, exif=dataset.exif_orientation), decoder, recipes


def _shipping_part(dataset: ShardDataset, offset: int) -> tuple[ShardDataset, list[Recipe]]:
    transform, decoder, recipes = _takeover(dataset, offset)
    clone = object.__new__(_ShippingDataset)
    clone.__dict__.update(dataset.__dict__)  # shares the epoch Value: set_epoch reaches the workers
    clone._ship_decoder = decoder
    clone._ship_transform = transform
    return clone, recipes


def shipping_dataset(dataset: ShardDataset | Mix) -> tuple[Any, list[Recipe], list[Any]]:
    """A view of ``dataset`` (or of every part of a Mix) whose workers ship encoded images
    (see module docstring), the recipes the main-process stage runs, and the handler of
    the dataset each recipe came from. The original is never modified."""
    if isinstance(dataset, ShardDataset):
        clone, recipes = _shipping_part(dataset, 0)
        return clone, recipes, [dataset.handler] * len(recipes)
    parts: list[ShardDataset] = []
    recipes, handlers = [], []
    for part in dataset.datasets:
        shipping, own = _shipping_part(part, len(recipes))
        parts.append(shipping)
        recipes += own
        handlers += [part.handler] * len(own)
    mix = object.__new__(type(dataset))
    mix.__dict__.update(dataset.__dict__)  # the Mix's own epoch Value is shared likewise
    mix.datasets = parts
    return mix, recipes, handlers


# ------------------------------------------------------------ decoding backends


def _decode_cpu(image: EncodedImage, device: torch.device, max_pixels: int | None) -> torch.Tensor:
    """shardkit's CPU decoder (simplejpeg/PIL), moved to ``device``."""
    return decode_image(image.data, "torch", max_pixels=max_pixels, exif_orientation=image.upright).to(device)


class _Decoded:
    """Per image: the CHW uint8 tensor, or the error; ``cropped`` when the decoder
    already applied the first RandomResizedCrop box (region decoding)."""

    __slots__ = ("tensor", "error", "cropped")

    def __init__(
        self, tensor: torch.Tensor | None = None, error: Exception | None = None, cropped: bool = False
    ) -> None:
        self.tensor, self.error, self.cropped = tensor, error, cropped


class CpuBackend:
    """Decode every image with shardkit's CPU decoder (the stand-in on machines without CUDA)."""

    name = "cpu"

    def __init__(self, device: torch.device, max_pixels: int | None) -> None:
        self.device, self.max_pixels = device, max_pixels
        self.cpu_decoded = 0  # images the CPU decoded (all of them here; the fallbacks for GPU backends)

    def decode(self, images: Sequence[EncodedImage], recipes: Sequence[Recipe]) -> list[_Decoded]:
        return [self.fallback(image) for image in images]

    def fallback(self, image: EncodedImage) -> _Decoded:
        self.cpu_decoded += 1
        try:
            return _Decoded(_decode_cpu(image, self.device, self.max_pixels))
        except SampleError as exc:
            return _Decoded(error=exc)


class NvjpegBackend(CpuBackend):
    """torchvision's batched ``decode_jpeg(device=...)`` (nvjpeg on CUDA) for the batch's
    JPEGs, the CPU decoder for the rest and for a batch nvjpeg rejects.

    torchvision.io decoding is deprecated since 0.29: its warning is silenced here because
    the user chose this path (nvImageCodec is preferred when installed); it is logged once.
    """

    name = "nvjpeg"
    _warned = False

    def decode(self, images: Sequence[EncodedImage], recipes: Sequence[Recipe]) -> list[_Decoded]:
        import torchvision.io as tvio

        out: list[_Decoded | None] = [None] * len(images)
        batch = [i for i, image in enumerate(images) if image.batchable]
        if batch:
            encoded = [torch.frombuffer(bytearray(images[i].data), dtype=torch.uint8) for i in batch]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    decoded = tvio.decode_jpeg(encoded, mode=tvio.ImageReadMode.RGB, device=self.device)
                for i, tensor in zip(batch, decoded):
                    out[i] = _Decoded(tensor)
            except RuntimeError as exc:  # one bad file fails the whole batch: the CPU decodes each
                log.debug("batched decode_jpeg failed (%s); decoding this batch on the CPU", exc)
            if not NvjpegBackend._warned:
                NvjpegBackend._warned = True
                log.info(
                    "decoding with torchvision.io.decode_jpeg (deprecated since torchvision 0.29); "
                    "install nvidia-nvimgcodec-cu12 for the preferred backend"
                )
        return [d if d is not None else self.fallback(image) for d, image in zip(out, images)]


class NvimgcodecBackend(CpuBackend):
    """nvImageCodec: one batched decode of the batch's JPEGs on the GPU (hardware JPEG
    engines where the GPU has them), decoding only the RandomResizedCrop region when the
    recipe starts with one. Images it cannot decode go to the CPU decoder.

    nvImageCodec allocates the decoded images itself (not through torch's caching
    allocator), so each batch's images are kept alive until an event recorded after the
    last kernel that reads them has completed.
    """

    name = "nvimgcodec"

    def __init__(self, device: torch.device, max_pixels: int | None) -> None:
        from nvidia import nvimgcodec  # optional dependency: nvidia-nvimgcodec-cu12

        super().__init__(device, max_pixels)
        self._nv = nvimgcodec
        self._decoder = nvimgcodec.Decoder(device_id=device.index or 0)
        # 3-channel interleaved sRGB whatever the JPEG holds (grayscale too); EXIF orientation is
        # ignored as on the CPU path. ColorSpec.RGB was renamed SRGB in nvImageCodec 0.6.
        color = getattr(nvimgcodec.ColorSpec, "SRGB", None) or nvimgcodec.ColorSpec.RGB
        extra = {"sample_format": nvimgcodec.SampleFormat.I_RGB} if hasattr(nvimgcodec, "SampleFormat") else {}
        self._params = nvimgcodec.DecodeParams(
            color_spec=color, allow_any_depth=False, apply_exif_orientation=False, **extra
        )
        self._keepalive: list[tuple[Any, list[Any]]] = []

    def _source(self, image: EncodedImage, region: tuple[int, int, int, int] | None) -> Any:
        nv = self._nv
        stream = nv.CodeStream(image.data)
        if region is None:
            return stream
        top, left, height, width = region
        roi = nv.Region(top, left, top + height, left + width)
        if hasattr(stream, "get_sub_code_stream"):  # nvImageCodec >= 0.6
            return stream.get_sub_code_stream(region=roi)
        return nv.DecodeSource(stream, region=roi)  # 0.3 - 0.5

    def decode(self, images: Sequence[EncodedImage], recipes: Sequence[Recipe]) -> list[_Decoded]:
        # Release the images of earlier batches whose kernels have finished.
        self._keepalive = [(event, held) for event, held in self._keepalive if not event.query()]
        out: list[_Decoded | None] = [None] * len(images)
        batch = [i for i, image in enumerate(images) if image.batchable]
        regions = [images[i].params[0] if recipes[images[i].recipe].steps[0].kind == "rrc" else None for i in batch]
        if batch:
            sources = [self._source(images[i], region) for i, region in zip(batch, regions)]
            stream = torch.cuda.current_stream(self.device)
            decoded = self._decoder.decode(sources, params=self._params, cuda_stream=stream.cuda_stream)
            held = []
            for i, region, result in zip(batch, regions, decoded):
                if result is None:
                    continue
                held.append(result)
                # DLPack hands torch the current stream, on which nvImageCodec orders its decode.
                tensor = torch.from_dlpack(result).permute(2, 0, 1)  # HWC -> CHW view
                out[i] = _Decoded(tensor, cropped=region is not None)
            event = torch.cuda.Event()
            event.record(stream)  # recorded again after the stage's kernels: see finish()
            self._keepalive.append((event, held))
        return [d if d is not None else self.fallback(image) for d, image in zip(out, images)]

    def finish(self) -> None:
        """Called after the batch's kernels are queued: the held images live until they ran."""
        if self._keepalive:
            self._keepalive[-1][0].record(torch.cuda.current_stream(self.device))


def make_backend(name: str, device: torch.device, max_pixels: int | None) -> CpuBackend:
    """The decoder for ``name`` ("auto": nvImageCodec on CUDA when importable, else nvjpeg;
    the CPU decoder on the CPU). Raises ShardkitError for a backend that cannot run."""
    if name not in DECODE_BACKENDS:
        raise ShardkitError(f"decode_backend must be one of {DECODE_BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            name = "cpu"
        else:
            try:
                return NvimgcodecBackend(device, max_pixels)
            except ImportError:
                log.info(
                    "nvImageCodec is not installed (pip install nvidia-nvimgcodec-cu12, or -cu13 for a "
                    "CUDA 13 PyTorch): decoding with torchvision's nvjpeg"
                )
            except (RuntimeError, OSError) as exc:  # e.g. a CUDA major version it was not built for
                log.warning("nvImageCodec failed to start (%s): decoding with torchvision's nvjpeg", exc)
            name = "nvjpeg"
    if name == "cpu":
        return CpuBackend(device, max_pixels)
    if name == "nvjpeg":
        return NvjpegBackend(device, max_pixels)
    if device.type != "cuda":
        raise ShardkitError("decode_backend='nvimgcodec' decodes on a CUDA device: use decode_device='cuda'")
    try:
        return NvimgcodecBackend(device, max_pixels)
    except ImportError as exc:
        raise ShardkitError(
            f"decode_backend='nvimgcodec' needs nvImageCodec: pip install nvidia-nvimgcodec-cu12 ({exc})"
        ) from exc


# ------------------------------------------------------------ the main-process stage


def _apply_steps(tensor: torch.Tensor, image: EncodedImage, recipe: Recipe, cropped: bool) -> torch.Tensor:
    """Run the recipe's geometric steps on one CHW uint8 image with the worker's parameters."""
    from torchvision.transforms.v2 import functional as tvf

    for n, (step, param) in enumerate(zip(recipe.steps, image.params)):
        if step.kind == "rrc":
            if n == 0 and cropped:  # the decoder returned just the box
                tensor = tvf.resize(tensor, list(step.size), interpolation=step.interpolation, antialias=step.antialias)
            else:
                top, left, height, width = param
                tensor = tvf.resized_crop(
                    tensor,
                    top,
                    left,
                    height,
                    width,
                    list(step.size),
                    interpolation=step.interpolation,
                    antialias=step.antialias,
                )
        elif step.kind == "resize":
            tensor = tvf.resize(
                tensor, step.size, interpolation=step.interpolation, max_size=step.max_size, antialias=step.antialias
            )
        elif step.kind == "center_crop":
            tensor = tvf.center_crop(tensor, step.size)
        elif step.kind == "flip" and param:
            tensor = tvf.horizontal_flip(tensor)
    return tensor


def _slots(batch: Any) -> bool:
    """True for a batch of ``fields`` tuples: a tuple, or the list DataLoader's
    default_convert makes of it in the main process. Its items are slots, not samples."""
    return (
        isinstance(batch, (list, tuple))
        and not hasattr(batch, "_fields")
        and not (batch and isinstance(batch[0], EncodedImage))
    )


def _keep(obj: Any, keep: list[int], n: int, *, top: bool = True) -> Any:
    """Drop from a collated batch of ``n`` samples every sample not in ``keep`` (all fields)."""
    if top and _slots(obj):
        return type(obj)(_keep(v, keep, n, top=False) for v in obj)
    if isinstance(obj, torch.Tensor) and obj.dim() > 0 and obj.shape[0] == n:
        return obj[torch.tensor(keep, dtype=torch.long, device=obj.device)]
    if isinstance(obj, list) and len(obj) == n:
        return [obj[i] for i in keep]
    if isinstance(obj, Mapping):
        return {k: _keep(v, keep, n, top=False) for k, v in obj.items()}
    return obj


class BatchStage:
    """Turn every list of :class:`EncodedImage` in a collated batch into one image tensor.

    Per image: decode (``backend``), then the recipe's geometric steps with the worker's
    parameters; per batch: stack, dtype conversion, normalisation, channels-last. A
    sample that fails to decode goes to ``handler``: "raise" raises SampleError naming
    its key, "skip"/"warn" drop it from the batch (every field), so that batch is one
    shorter. The stage draws no random numbers: the order and the parameters are the
    workers', so resume stays exact.
    """

    def __init__(
        self,
        recipes: Sequence[Recipe],
        device: torch.device,
        *,
        backend: str = "auto",
        handlers: Sequence[str | Callable[[Exception], Any]] | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.recipes = list(recipes)
        self.device = device
        self.max_pixels = default_max_pixels(max_pixels)
        self.backend = make_backend(backend, device, self.max_pixels)
        # One per recipe: a sample's handler is the one of the dataset (or Mix part) it came from.
        self.handlers = [make_handler(h) for h in (handlers or ["raise"] * len(self.recipes))]
        self.seconds = 0.0
        self.skipped = 0

    def __call__(self, batch: Any) -> Any:
        started = time.perf_counter()
        failed: set[int] = set()
        n = _batch_length(batch)
        out = self._walk(batch, failed)
        if failed:
            out = _keep(out, [i for i in range(n) if i not in failed], n)
        finish = getattr(self.backend, "finish", None)
        if finish is not None:
            finish()
        self.seconds += time.perf_counter() - started
        return out

    def _walk(self, obj: Any, failed: set[int], *, top: bool = True) -> Any:
        if isinstance(obj, list) and obj and all(isinstance(x, EncodedImage) for x in obj):
            return self.images(obj, failed)
        if isinstance(obj, Mapping):
            return {k: self._walk(v, failed, top=False) for k, v in obj.items()}
        if top and _slots(obj):
            return type(obj)(self._walk(v, failed, top=False) for v in obj)
        return obj

    def images(self, images: Sequence[EncodedImage], failed: set[int] | None = None) -> torch.Tensor:
        """One (N, C, H, W) channels-last tensor on the device from N encoded images;
        indices of images that failed (and the handler skipped) are added to ``failed``
        and hold zeros until the caller drops them."""
        failed = set() if failed is None else failed
        recipes = [self.recipes[image.recipe] for image in images]
        first = recipes[0]
        if any(r.output_spec() != first.output_spec() for r in recipes):
            raise SampleError(
                "decode_device: one batch slot holds images with different output sizes or dtypes "
                "(give every alternative field the same final size and dtype)"
            )
        height, width = first.out_hw
        out = torch.empty((len(images), 3, height, width), dtype=torch.uint8, device=self.device)
        for i, (image, recipe, decoded) in enumerate(zip(images, recipes, self.backend.decode(images, recipes))):
            error = decoded.error
            if error is None and decoded.tensor is not None:
                try:
                    out[i] = _apply_steps(decoded.tensor, image, recipe, decoded.cropped)
                except torch.cuda.OutOfMemoryError:
                    raise  # the device's problem, not this sample's: never skipped by the handler
                except (RuntimeError, ValueError) as exc:
                    error = SampleError(f"{type(exc).__name__}: {exc}")
            if error is not None:
                reason = error.reason if isinstance(error, SampleError) else str(error)
                self.handlers[image.recipe](SampleError(reason, url=image.url, key=image.key))  # "raise" raises
                failed.add(i)
                self.skipped += 1
                out[i].zero_()
        return finish_batch(out, first)


def finish_batch(batch: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """dtype conversion and normalisation as the recipe says, then channels-last memory."""
    from torchvision.transforms.v2 import functional as tvf

    if recipe.dtype is not None:
        batch = tvf.to_dtype(batch, recipe.dtype, scale=True)
    if recipe.mean is not None:
        batch = tvf.normalize(batch, list(recipe.mean), list(recipe.std or ()))
    return batch.contiguous(memory_format=torch.channels_last)


def _batch_length(batch: Any) -> int:
    """The number of samples in a collated batch (its first list of EncodedImage)."""
    if isinstance(batch, list) and batch and isinstance(batch[0], EncodedImage):
        return len(batch)
    values = batch.values() if isinstance(batch, Mapping) else batch if _slots(batch) else ()
    for value in values:
        n = _batch_length(value)
        if n:
            return n
    return 0


# ------------------------------------------------------------ the loader's device stage


def _resolve(device: str | torch.device | int | None, what: str) -> torch.device | None:
    """None, a CPU device or a CUDA device (checked: a clear error when CUDA is missing)."""
    if device is None:
        return None
    resolved = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ShardkitError(f"{what} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    try:
        return _cuda_device(resolved)
    except RuntimeError as exc:
        raise ShardkitError(f"ShardLoader({what}={str(device)!r}): {exc}") from exc


class DeviceStage:
    """What ShardLoader runs between the DataLoader and the training loop when
    ``device`` or ``decode_device`` is set: the batch stage, then (for CUDA) the copy
    of each batch one ahead on a side stream from pinned memory."""

    def __init__(self, target: torch.device, batch_stage: BatchStage | None, worker_dataset: Any) -> None:
        self.target = target
        self.batch_stage = batch_stage
        self.worker_dataset = worker_dataset  # what the DataLoader workers iterate

    @classmethod
    def build(
        cls,
        dataset: Any,
        batching: Batching,
        *,
        device: str | torch.device | int | None,
        decode_device: str | torch.device | int | None,
        decode_backend: str = "auto",
    ) -> DeviceStage | None:
        """Validate the loader's device options; None when neither is set."""
        target = _resolve(device, "device")
        decode_at = _resolve(decode_device, "decode_device")
        if decode_at is None:
            if decode_backend != "auto":
                raise ShardkitError("decode_backend only applies with decode_device='cuda' (or 'cpu')")
            return None if target is None or target.type == "cpu" else cls(target, None, dataset)
        if target is not None and target != decode_at and not (target.type == "cuda" and decode_at.type == "cpu"):
            raise ShardkitError(
                f"decode_device={str(decode_at)!r} yields batches on {decode_at}; device="
                f"{str(target)!r} would move them away again. Leave device unset"
            )
        if batching.batch_size is None:
            raise ShardkitError("decode_device decodes whole batches: set batch_size")
        if batching.collate_fn is not collate:
            raise ShardkitError("decode_device needs the default collate_fn (the workers collate encoded images)")
        worker_dataset, recipes, handlers = shipping_dataset(dataset)
        stage = BatchStage(recipes, decode_at, backend=decode_backend, handlers=handlers)
        return cls(target or decode_at, stage, worker_dataset)

    def wrap(self, pairs: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """``(batch, progress)`` pairs in, the same pairs with each batch staged (and on
        the device) out. The stage runs one batch ahead on CUDA; progress travels with
        its batch, so the loader records it only when the batch is handed out."""
        if self.batch_stage is not None:
            self.batch_stage.seconds, self.batch_stage.skipped = 0.0, 0
            self.batch_stage.backend.cpu_decoded = 0
        prepare = self._prepare if self.batch_stage is not None else None
        if self.target.type == "cuda":
            return iter(CudaPrefetcher(pairs, self.target, prepare=prepare))
        return map(self._prepare, pairs) if prepare is not None else iter(pairs)

    def _prepare(self, pair: tuple[Any, Any]) -> tuple[Any, Any]:
        item, progress = pair
        assert self.batch_stage is not None
        return self.batch_stage(item), progress

    def stats(self) -> dict[str, Any]:
        """``stage_s``: main-process seconds in the batch stage; ``decode_skipped``:
        samples dropped there by the handler; the decoder's name and ``cpu_decoded``, the
        images it left to the CPU decoder (non-JPEG, CMYK, rejected)."""
        if self.batch_stage is None:
            return {"device": str(self.target)}
        return {
            "device": str(self.target),
            "decode_backend": self.batch_stage.backend.name,
            "stage_s": self.batch_stage.seconds,
            "decode_skipped": self.batch_stage.skipped,
            "cpu_decoded": self.batch_stage.backend.cpu_decoded,
        }
