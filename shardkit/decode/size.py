"""Decode size from a torchvision transform pipeline: how small a JPEG may be decoded.

:func:`decode_size_for` walks the pipeline to the first transform that depends on pixel
scale and derives the ``decode_size`` for :func:`shardkit.decode.make_decoder`;
:func:`rrc_safe_decode_size` is the bound that keeps RandomResizedCrop exact.
torchvision is imported on first use only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def transform_classes(*names: str) -> tuple[Any, ...]:
    """The v1 and v2 torchvision classes with these names (v2 ones are not subclasses)."""
    import torchvision.transforms as v1
    import torchvision.transforms.v2 as v2

    return tuple(getattr(module, name) for module in (v1, v2) for name in names if hasattr(module, name))


# Transforms that do not care about the pixel scale of their input: skipping over them
# keeps the first resize/crop decisive. Anything else (crops, blur, rotation, padding,
# unknown callables) works in pixel units of the full image, so we give up (None).
_SCALE_FREE_NAMES = (
    "RandomHorizontalFlip",
    "RandomVerticalFlip",
    "ColorJitter",
    "Grayscale",
    "RandomGrayscale",
    "Normalize",
    "ToTensor",
    "PILToTensor",
    "ToPILImage",
    "ConvertImageDtype",
    "ToImage",
    "ToDtype",
    "ToPureTensor",
    "RandomInvert",
    "RandomPosterize",
    "RandomSolarize",
    "RandomAutocontrast",
    "RandomEqualize",
    "RandomChannelPermutation",
    "RandomPhotometricDistort",
)


def flatten_transforms(transform: Any) -> list[Any]:
    """The leaf transforms of ``transform``, nested ``Compose`` (v1 or v2) unrolled in order.

    Only torchvision's own ``Compose``: a subclass may run its steps otherwise, so it is a leaf."""
    inner = getattr(transform, "transforms", None)
    if type(transform) in transform_classes("Compose") and inner is not None:
        return [leaf for t in inner for leaf in flatten_transforms(t)]
    return [transform]


def as_hw(size: Any) -> tuple[int, int] | None:
    """A torchvision ``size`` argument (int, [s], (h, w) or None) as (height, width)."""
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    size = list(size)
    return (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[0]), int(size[1]))


def rrc_safe_decode_size(
    size: int | tuple[int, int], scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> int:
    """Shorter side that guarantees every RandomResizedCrop crop has >= ``size`` pixels per side.

    A crop of area fraction ``a`` and aspect ``r`` of an image with area ``A >= m**2``
    (``m`` = shorter side) has shorter side ``sqrt(a * A * min(r, 1/r)) >=
    m * sqrt(a_min * min(r_min, 1/r_max))``, so ``m >= max(size) / sqrt(...)`` keeps even
    the smallest crop from being upsampled. For RRC(224) defaults this is 915.
    """
    out = max(as_hw(size) or (1, 1))
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
      distribution, so it is opt-in. :class:`shardkit.decode.crop.RandomResizedCropDecode`
      avoids the trade-off by choosing the DCT scale per crop.
    - ``CenterCrop``/``RandomCrop``/anything else first: None (they work in pixel units
      of the full image, so the decode size must not change).
    """
    rrc_classes = transform_classes("RandomResizedCrop")
    resize_classes = transform_classes("Resize")
    scale_free = transform_classes(*_SCALE_FREE_NAMES)
    for step in flatten_transforms(transform):
        if isinstance(step, rrc_classes):
            if approximate_rrc:
                return max(as_hw(step.size) or (1, 1))
            return rrc_safe_decode_size(step.size, tuple(step.scale), tuple(step.ratio))
        if isinstance(step, resize_classes):
            hw = as_hw(step.size)
            return max(hw) if hw else None
        if not isinstance(step, scale_free):
            return None
    return None


def resolve_decode_size(decode_size: int | str | None, transform: Any) -> int | None:
    """A dataset's ``decode_size`` argument as an int or None: ``"auto"`` asks
    :func:`decode_size_for` of the transform (or of each per-field transform); ``"exact"``
    (a fused crop at full resolution) decodes everything else at full size too."""
    if decode_size == "exact":
        return None
    if decode_size == "auto":
        steps = list(transform.values()) if isinstance(transform, Mapping) else [transform]
        size = next((size for t in steps if (size := decode_size_for(t)) is not None), None)
        log.info("decode_size='auto' -> %s", size)
        return size
    if decode_size is not None and not isinstance(decode_size, int):
        raise ValueError(f"decode_size must be an int, 'auto', 'exact' or None, got {decode_size!r}")
    return decode_size
