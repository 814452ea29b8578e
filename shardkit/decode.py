"""Decode the fields of a sample dict: images, labels, text, JSON and ``.npy`` arrays.

A sample is ``{"__key__": ..., "__url__": ..., "jpg": b"...", "cls": b"3", ...}``.
:func:`make_decoder` returns a picklable callable that turns the raw bytes into Python
objects, picking the decoder from the last dot-part of each field name (``"seg.png"`` is
a PNG), as webdataset does.

Images
------
Every image comes out as 3-channel RGB uint8, whatever the backend:

- grayscale is replicated to three channels; alpha (RGBA, LA, palette transparency) is
  dropped, not composited onto a background (the colour values are kept as stored);
- palette images are expanded; CMYK/YCCK JPEGs are converted by PIL (Adobe inversion
  handled), for every output mode, so all modes agree;
- 16-bit images are scaled to 8 bits by ``>> 8`` (PIL's own ``convert`` would clip
  them at 255);
- EXIF orientation is not applied (same as webdataset, PIL and simplejpeg defaults).

Backends, chosen by measurement (``tools/bench_decoders.py``, one core, CPU time):
JPEG goes to simplejpeg (libjpeg-turbo) when it is installed: 1.4-1.5x PIL's speed and
~1.1x ``torchvision.io.decode_jpeg`` (1.3x PIL). PIL decodes everything else and is the
JPEG fallback (CMYK/YCCK, files strict libjpeg-turbo rejects, simplejpeg not installed).
torchvision.io is not used on the CPU path: it was within ~5% of PIL for PNG and WebP,
its decoders are deprecated since torchvision 0.29 (and warn), and it cannot do
reduced-size JPEG decoding, which PIL (``draft``) can.

Output modes: ``"pil"`` gives a ``PIL.Image`` in mode RGB, ``"numpy"`` an HWC uint8
array (C-contiguous, writable), ``"torch"`` a CHW uint8 tensor that is a *view* of the
HWC array (``permute(2, 0, 1)``, channels-last strides). No ``.contiguous()`` copy is
made: torchvision's uint8 resize is 1.5-3x faster on this layout than on contiguous
CHW, and ``default_collate`` copies into a contiguous batch anyway. Call
``.contiguous()`` yourself if a consumer needs it.

Safety: every image path reads the dimensions from the header first (tiny parsers for
JPEG SOFn, PNG IHDR and WebP VP8/VP8L/VP8X; PIL's lazy open for other formats) and
refuses images over ``max_pixels`` before any pixel memory is allocated.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
from PIL import Image

from .errors import SampleError
from .imageinfo import ImageHeader, guess_format_name as _guess_format_name, read_image_header

try:  # optional: the fastest JPEG decoder measured (see module docstring)
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

logger = logging.getLogger(__name__)

DecodeMode = Literal["pil", "numpy", "torch"]
DECODE_MODES: tuple[str, ...] = ("pil", "numpy", "torch")

#: Field extensions decoded as images, and the format name used in error messages.
IMAGE_FORMAT_NAMES: dict[str, str] = {
    "jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WebP",
    "ppm": "PNM", "pgm": "PNM", "pbm": "PNM", "pnm": "PNM",
    "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF",
}
IMAGE_EXTENSIONS = frozenset(IMAGE_FORMAT_NAMES)
INT_EXTENSIONS = frozenset({"cls", "cls2", "class", "count", "index", "inx"})
TEXT_EXTENSIONS = frozenset({"txt", "text"})
JSON_EXTENSIONS = frozenset({"json", "jsn"})
NPY_EXTENSIONS = frozenset({"npy"})
PICKLE_EXTENSIONS = frozenset({"pickle", "pyd", "pkl"})

_BYTES_TYPES = (bytes, bytearray, memoryview)


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise SampleError(
            f"image is {width}x{height} = {width * height} pixels, over the max_pixels "
            f"limit of {max_pixels} (decompression-bomb guard)")


def _default_max_pixels(max_pixels: int | None) -> int | None:
    """None means PIL's limit (Image.MAX_IMAGE_PIXELS, itself None when disabled)."""
    if max_pixels is None:
        return Image.MAX_IMAGE_PIXELS
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels!r}")
    return int(max_pixels)


# ------------------------------------------------------------------ reduced-size JPEG


def dct_scale_for(height: int, width: int, decode_size: int | None) -> int:
    """Largest JPEG DCT scale denominator (8, 4, 2 or 1) keeping the shorter side >= decode_size.

    libjpeg rounds scaled sizes up, so a side of ``n`` pixels decodes to ``ceil(n / s)``.
    Only powers of two are used: libjpeg-turbo's 3/8, 5/8, ... scales are not SIMD
    accelerated (measured slower than a full-size decode) and PIL cannot do them, so
    backends would disagree on the output size.
    """
    if not decode_size:
        return 1
    short = min(height, width)
    for scale in (8, 4, 2):
        if scale <= short and -(-short // scale) >= decode_size:
            return scale
    return 1


# ------------------------------------------------------------------------ image core

def _decode_rgb(data: bytes | bytearray, *, max_pixels: int | None, format_name: str = "image",
                scale_for: Callable[[int, int], int] | None = None) -> np.ndarray | Image.Image:
    """Decode to RGB: an HWC uint8 array (simplejpeg) or a PIL image in mode RGB (PIL).

    ``scale_for(height, width)`` is called once with the full size whenever it is known
    before decoding (RandomResizedCropDecode plans its crop there) and returns a DCT
    scale denominator, which only JPEGs honour. Raises SampleError (no location) on bad data.
    """
    header = read_image_header(data)
    if header is not None:
        _check_pixels(header.width, header.height, max_pixels)
    scale = scale_for(header.height, header.width) if header and scale_for else 1
    # simplejpeg for 1- and 3-channel JPEGs; CMYK/YCCK go to PIL so every mode agrees.
    if _simplejpeg is not None and header is not None and header.format == "JPEG" \
            and header.components in (1, 3):
        try:
            if scale == 1:
                return _simplejpeg.decode_jpeg(data, colorspace="RGB")
            return _simplejpeg.decode_jpeg(
                data, colorspace="RGB",
                min_height=-(-header.height // scale), min_width=-(-header.width // scale))
        except ValueError as exc:  # strict libjpeg-turbo rejects some files PIL reads
            logger.debug("simplejpeg could not decode (%s); falling back to PIL", exc)
    return _decode_rgb_pil(data, header=header, scale=scale, max_pixels=max_pixels,
                           format_name=format_name, scale_for=scale_for)


def _decode_rgb_pil(data: bytes | bytearray, *, header: ImageHeader | None, scale: int,
                    max_pixels: int | None, format_name: str,
                    scale_for: Callable[[int, int], int] | None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except Image.DecompressionBombError as exc:
        raise SampleError(f"{exc} (decompression-bomb guard)") from exc
    except Exception as exc:
        raise SampleError(f"not a valid {format_name}: {exc}") from exc
    if header is None:
        _check_pixels(image.width, image.height, max_pixels)
        if image.format == "JPEG" and scale_for is not None:
            scale = scale_for(image.height, image.width)
    if scale > 1 and image.format == "JPEG":
        # draft() picks the largest power of two <= min(W // w, H // h): ask for floor sizes.
        image.draft("RGB", (image.width // scale, image.height // scale))
    try:
        return _pil_to_rgb(image)
    except Exception as exc:
        raise SampleError(f"not a valid {format_name}: {exc}") from exc


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, scaling 16-bit data instead of clipping it."""
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.asarray(image).astype(np.uint32)
        gray = np.minimum(wide >> 8, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return image.convert("RGB")


def _to_mode(pixels: np.ndarray | Image.Image, mode: str) -> Any:
    """HWC array or RGB PIL image -> the requested output type, copying only when needed."""
    if isinstance(pixels, np.ndarray):
        if mode == "numpy":
            return pixels
        if mode == "torch":
            return torch.from_numpy(pixels).permute(2, 0, 1)  # view, see module docstring
        return Image.fromarray(pixels, "RGB")
    if mode == "pil":
        return pixels
    array = np.array(pixels)  # writable copy (np.asarray of a PIL image is read-only)
    return array if mode == "numpy" else torch.from_numpy(array).permute(2, 0, 1)


def _check_mode(mode: str) -> None:
    if mode not in DECODE_MODES:
        raise ValueError(f"mode must be one of {DECODE_MODES}, got {mode!r}")


def _check_size(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def decode_image(data: bytes | bytearray | memoryview, mode: DecodeMode = "torch", *,
                 decode_size: int | None = None, max_pixels: int | None = None,
                 format_name: str = "image") -> Any:
    """Decode one encoded image to RGB in ``mode`` ("pil", "numpy" or "torch").

    ``decode_size=S`` decodes JPEGs at the largest DCT scale (1/2, 1/4, 1/8) whose
    shorter side is still >= S; other formats decode at full size. ``max_pixels``
    defaults to ``PIL.Image.MAX_IMAGE_PIXELS``. Raises SampleError on bad data.
    """
    _check_mode(mode)
    _check_size("decode_size", decode_size)
    if isinstance(data, memoryview):
        data = data.tobytes()

    def scale_for(height: int, width: int) -> int:
        return dct_scale_for(height, width, decode_size)

    pixels = _decode_rgb(data, max_pixels=_default_max_pixels(max_pixels), format_name=format_name,
                         scale_for=scale_for if decode_size else None)
    return _to_mode(pixels, mode)


# ----------------------------------------------------------------- the sample decoder


def _preview(data: bytes | bytearray, limit: int = 40) -> str:
    shown = bytes(data[:limit])
    return repr(shown) + ("..." if len(data) > limit else "")


class SampleDecoder:
    """Decode every field of a sample dict; build it with :func:`make_decoder`.

    A plain object with plain attributes, so it pickles into DataLoader workers
    (fork or spawn) as long as the user ``handlers`` do.
    """

    def __init__(self, mode: DecodeMode = "pil", *, decode_size: int | None = None,
                 handlers: dict[str, Callable[[bytes], Any]] | None = None,
                 allow_pickle: bool = False, max_pixels: int | None = None) -> None:
        _check_mode(mode)
        _check_size("decode_size", decode_size)
        self.mode = mode
        self.decode_size = decode_size
        self.handlers = {key.lower(): handler for key, handler in (handlers or {}).items()}
        self.allow_pickle = allow_pickle
        # Resolved now, so spawned workers use the limit of the process that built this.
        self.max_pixels = _default_max_pixels(max_pixels)

    def __repr__(self) -> str:
        return (f"SampleDecoder(mode={self.mode!r}, decode_size={self.decode_size!r}, "
                f"handlers={sorted(self.handlers)!r}, allow_pickle={self.allow_pickle!r}, "
                f"max_pixels={self.max_pixels!r})")

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Return a new dict with every bytes field decoded; the input is not modified."""
        decoded: dict[str, Any] = {}
        for field, value in sample.items():
            if field.startswith("__") or not isinstance(value, _BYTES_TYPES):
                decoded[field] = value  # metadata, or already decoded upstream
                continue
            try:
                decoded[field] = self.decode_field(field, value)
            except SampleError as exc:
                raise self._located(sample, field, exc.reason) from exc
            except MemoryError:
                raise
            except Exception as exc:  # user handlers and library surprises
                raise self._located(sample, field, f"{type(exc).__name__}: {exc}") from exc
        return decoded

    @staticmethod
    def _located(sample: dict[str, Any], field: str, message: str) -> SampleError:
        key = sample.get("__key__")
        return SampleError(message, url=sample.get("__url__"), key=key,
                           member=f"{key}.{field}" if key is not None else field)

    def decode_field(self, field: str, data: bytes | bytearray | memoryview) -> Any:
        """Decode one field's bytes; raises SampleError without location on bad data.

        A user handler for the whole field name (``"seg.png"``) wins over one for its
        last dot-part (``"png"``), which wins over the built-in decoders.
        """
        field = field.lower()
        ext = field.rsplit(".", 1)[-1]
        if isinstance(data, memoryview):
            data = data.tobytes()
        handler = self.handlers.get(field, self.handlers.get(ext))
        if handler is not None:
            return handler(data)
        if ext in IMAGE_EXTENSIONS:
            return decode_image(data, self.mode, decode_size=self.decode_size,
                                max_pixels=self.max_pixels, format_name=IMAGE_FORMAT_NAMES[ext])
        if ext in INT_EXTENSIONS:
            try:
                return int(data)
            except ValueError:
                raise SampleError(f".{ext} is not an integer: {_preview(data)}") from None
        if ext in TEXT_EXTENSIONS:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SampleError(f".{ext} is not valid UTF-8 text: {exc}") from exc
        if ext in JSON_EXTENSIONS:
            try:
                return json.loads(data)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise SampleError(f"invalid JSON: {exc}") from exc
        if ext in NPY_EXTENSIONS:
            try:
                return np.load(io.BytesIO(data), allow_pickle=self.allow_pickle)
            except Exception as exc:
                raise SampleError(f"invalid .npy array: {exc}") from exc
        if ext in PICKLE_EXTENSIONS:
            if not self.allow_pickle:
                raise SampleError(
                    f".{ext} decoding needs allow_pickle=True (unpickling runs arbitrary "
                    "code: only enable it for shards you trust)")
            return pickle.loads(data)
        return data  # unknown extension: raw bytes


def make_decoder(mode: DecodeMode = "pil", *, decode_size: int | None = None,
                 handlers: dict[str, Callable[[bytes], Any]] | None = None,
                 allow_pickle: bool = False, max_pixels: int | None = None) -> SampleDecoder:
    """Return a picklable callable that decodes a sample dict.

    Args:
        mode: image output: ``"pil"`` (RGB ``PIL.Image``), ``"numpy"`` (HWC uint8) or
            ``"torch"`` (CHW uint8 tensor, a channels-last view; see module docstring).
        decode_size: decode JPEGs at the largest DCT scale (1/2, 1/4, 1/8) that keeps the
            shorter side >= this; see :func:`decode_size_for`. Other formats: full size.
        handlers: ``{extension or field name: callable(bytes) -> value}`` overriding or
            adding decoders. Use ``bytes`` as the handler to keep a field raw.
        allow_pickle: decode ``.pickle/.pyd/.pkl`` fields and object ``.npy`` arrays.
            Off by default, in which case a pickle field raises SampleError.
        max_pixels: refuse larger images (decompression-bomb guard, checked from the
            header before decoding). Default ``PIL.Image.MAX_IMAGE_PIXELS`` (~89M). PIL's
            own limit (2x its MAX_IMAGE_PIXELS) still applies to formats PIL decodes.

    Built-in decoders, by last dot-part of the field name: images (jpg jpeg png webp ppm
    pgm pbm pnm bmp tif tiff); cls/cls2/class/count/index/inx -> int; txt/text -> str;
    json/jsn -> parsed JSON; npy -> numpy array. Unknown extensions stay bytes, dunder
    keys (``__key__``, ``__url__``, ...) are untouched. Any failure raises
    :class:`~shardkit.errors.SampleError` naming the URL and member.
    """
    return SampleDecoder(mode, decode_size=decode_size, handlers=handlers,
                         allow_pickle=allow_pickle, max_pixels=max_pixels)


# ------------------------------------------------------------- decode size from transforms


def _transform_classes(*names: str) -> tuple[type, ...]:
    """The v1 and v2 torchvision classes with these names (v2 ones are not subclasses)."""
    import torchvision.transforms as v1
    import torchvision.transforms.v2 as v2

    return tuple(getattr(module, name) for module in (v1, v2) for name in names
                 if hasattr(module, name))


# Transforms that do not care about the pixel scale of their input: skipping over them
# keeps the first resize/crop decisive. Anything else (crops, blur, rotation, padding,
# unknown callables) works in pixel units of the full image, so we give up (None).
_SCALE_FREE_NAMES = (
    "RandomHorizontalFlip", "RandomVerticalFlip", "ColorJitter", "Grayscale",
    "RandomGrayscale", "Normalize", "ToTensor", "PILToTensor", "ToPILImage",
    "ConvertImageDtype", "ToImage", "ToDtype", "ToPureTensor", "RandomInvert",
    "RandomPosterize", "RandomSolarize", "RandomAutocontrast", "RandomEqualize",
    "RandomChannelPermutation", "RandomPhotometricDistort",
)


def _flatten_transforms(transform: Any) -> list[Any]:
    inner = getattr(transform, "transforms", None)
    if isinstance(transform, _transform_classes("Compose")) and inner is not None:
        return [leaf for t in inner for leaf in _flatten_transforms(t)]
    return [transform]


def _as_hw(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    size = list(size)
    return (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[0]), int(size[1]))


def rrc_safe_decode_size(size: int | tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> int:
    """Shorter side that guarantees every RandomResizedCrop crop has >= ``size`` pixels per side.

    A crop of area fraction ``a`` and aspect ``r`` of an image with area ``A >= m**2``
    (``m`` = shorter side) has shorter side ``sqrt(a * A * min(r, 1/r)) >=
    m * sqrt(a_min * min(r_min, 1/r_max))``, so ``m >= max(size) / sqrt(...)`` keeps even
    the smallest crop from being upsampled. For RRC(224) defaults this is 915.
    """
    out = max(_as_hw(size) or (1, 1))
    narrowest = min(ratio[0], 1 / ratio[1])
    return math.ceil(out / math.sqrt(scale[0] * narrowest))


def decode_size_for(transform: Any, *, approximate_rrc: bool = False) -> int | None:
    """Derive ``decode_size`` from a torchvision (v1 or v2) transform pipeline.

    Walks ``Compose`` (nested too), skips scale-free transforms (flips, colour, dtype,
    normalise) and looks at the first one that depends on pixel scale:

    - ``Resize(s)``: ``s`` (shorter side becomes ``s``; decoding it at >= ``s`` only
      moves part of the downscale into the DCT); ``Resize((h, w))``: ``max(h, w)``,
      which keeps both sides large enough; ``Resize(None, max_size=...)``: None.
    - ``RandomResizedCrop(size, scale, ratio)``: the crop can be as small as
      ``sqrt(scale[0])`` of the image, and downscaling *before* cropping would make such
      crops upsampled (blurrier) where the full-size path downsamples them. The default
      rule therefore returns :func:`rrc_safe_decode_size` (915 for RRC(224)), which never
      upsamples a crop the full-size path would not: exact, but it only helps for big
      images (shorter side >= 2 * 915). ``approximate_rrc=True`` returns ``max(size)``
      instead: much cheaper, but small crops lose resolution, which changes the training
      distribution, so it is opt-in. :class:`RandomResizedCropDecode` avoids the
      trade-off by choosing the DCT scale per crop.
    - ``CenterCrop``/``RandomCrop``/anything else first: None (they work in pixel units
      of the full image, so the decode size must not change).
    """
    rrc_classes = _transform_classes("RandomResizedCrop")
    resize_classes = _transform_classes("Resize")
    scale_free = _transform_classes(*_SCALE_FREE_NAMES)
    for step in _flatten_transforms(transform):
        if isinstance(step, rrc_classes):
            if approximate_rrc:
                return max(_as_hw(step.size) or (1, 1))
            return rrc_safe_decode_size(step.size, tuple(step.scale), tuple(step.ratio))
        if isinstance(step, resize_classes):
            hw = _as_hw(step.size)
            return max(hw) if hw else None
        if not isinstance(step, scale_free):
            return None
    return None


# --------------------------------------------------------- fused random-resized-crop decode


@dataclass(frozen=True)
class CropPlan:
    """A crop box in full-image pixels and the JPEG DCT scale to decode it at."""

    top: int
    left: int
    height: int
    width: int
    scale: int


class RandomResizedCropDecode:
    """Decode an image straight into a RandomResizedCrop, decoding JPEGs at reduced size.

    The crop box is drawn from the header dimensions with the same rule and the same
    torch RNG calls as ``torchvision.transforms.RandomResizedCrop.get_params`` (so
    ``torch.manual_seed`` and DataLoader worker seeding behave the same). The JPEG is
    then decoded at the largest DCT scale (1/2, 1/4, 1/8) at which the crop still has
    >= ``size`` pixels per side, so the output is never upsampled more than the
    full-size path would; the crop is then resized with antialiased bilinear filtering.
    Other formats are decoded at full size. Same ``max_pixels`` guard as
    :func:`decode_image`.

    Use it as an image handler::

        make_decoder("torch", handlers=dict.fromkeys(IMAGE_EXTENSIONS, RandomResizedCropDecode(224)))
    """

    def __init__(self, size: int | tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), *, mode: DecodeMode = "torch",
                 max_pixels: int | None = None) -> None:
        _check_mode(mode)
        hw = _as_hw(size)
        if hw is None or min(hw) < 1:
            raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], "
                             f"got scale={scale!r}, ratio={ratio!r}")
        self.size = hw
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.mode = mode
        self.max_pixels = _default_max_pixels(max_pixels)

    def __repr__(self) -> str:
        return (f"RandomResizedCropDecode(size={self.size}, scale={self.scale}, "
                f"ratio={self.ratio}, mode={self.mode!r})")

    def get_params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop_height, crop_width), as torchvision's RandomResizedCrop draws it."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            crop_w = int(round(math.sqrt(target_area * aspect)))
            crop_h = int(round(math.sqrt(target_area / aspect)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(torch.randint(0, height - crop_h + 1, size=(1,)).item())
                left = int(torch.randint(0, width - crop_w + 1, size=(1,)).item())
                return top, left, crop_h, crop_w
        # Fallback to a central crop with the aspect ratio clamped into range.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            crop_w, crop_h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            crop_w, crop_h = int(round(height * max(self.ratio))), height
        else:
            crop_w, crop_h = width, height
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def plan(self, height: int, width: int) -> CropPlan:
        """Draw a crop for an image of this size and the DCT scale to decode it at."""
        top, left, crop_h, crop_w = self.get_params(height, width)
        out_h, out_w = self.size
        for scale in (8, 4, 2):
            if crop_h >= scale * out_h and crop_w >= scale * out_w:
                break
        else:
            scale = 1
        return CropPlan(top, left, crop_h, crop_w, scale)

    def __call__(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode ``data`` and return the resized crop in ``self.mode``."""
        if isinstance(data, memoryview):
            data = data.tobytes()
        planned: list[tuple[CropPlan, int, int]] = []  # (plan, full height, full width)

        def scale_for(height: int, width: int) -> int:
            planned.append((self.plan(height, width), height, width))
            return planned[-1][0].scale

        pixels = _decode_rgb(data, max_pixels=self.max_pixels, scale_for=scale_for,
                             format_name=_guess_format_name(data))
        decoded_w, decoded_h = (pixels.size if isinstance(pixels, Image.Image)
                                else (pixels.shape[1], pixels.shape[0]))
        if planned:  # planned from the header: map the box into decoded pixels
            plan, full_h, full_w = planned[-1]
            ratio_y, ratio_x = decoded_h / full_h, decoded_w / full_w
        else:  # BMP, PNM, TIFF: the size is known only after decoding
            plan = self.plan(decoded_h, decoded_w)
            ratio_y = ratio_x = 1.0
        box = (plan.left * ratio_x, plan.top * ratio_y,
               (plan.left + plan.width) * ratio_x, (plan.top + plan.height) * ratio_y)
        return self._crop_resize(pixels, box)

    def _crop_resize(self, pixels: np.ndarray | Image.Image, box: tuple[float, ...]) -> Any:
        out_h, out_w = self.size
        if self.mode == "pil":
            image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels, "RGB")
            # resize(box=...) crops with sub-pixel precision and filters in one pass.
            return image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
        from torchvision.transforms.v2 import functional as tvf

        chw = _to_mode(pixels, "torch")
        left, top, right, bottom = (int(round(v)) for v in box)
        crop = chw[:, top:max(bottom, top + 1), left:max(right, left + 1)]
        resized = tvf.resize(crop, [out_h, out_w], antialias=True)
        if self.mode == "torch":
            return resized
        return np.ascontiguousarray(resized.permute(1, 2, 0).numpy())
