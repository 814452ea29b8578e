"""Fusing a torchvision pipeline's leading RandomResizedCrop into decoding.

:func:`fuse_crop` is what ``decode_size="auto"`` (and ``"exact"``) runs: it splits the transform
(:func:`split_crop`), puts a :class:`~shardkit.decode.crop.RandomResizedCropDecode` in
the decoder (:class:`FusedFieldDecoder` for a per-field transform,
:class:`FusedSamplePipeline` for a sample-level one) and returns the rest of the
pipeline. The same torch RNG calls are made per sample as without fusion.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import SampleError
from .crop import RandomResizedCropDecode
from .jpeg_region import log_region_support
from .pixels import DecodeMode
from .size import flatten_transforms, transform_classes

# Steps that may stand before the crop: no RNG, no pixel arithmetic, so running them after
# the fused crop gives the same result.
_MOVABLE_NAMES = ("ToImage", "ToPureTensor")
_BYTES = (bytes, bytearray, memoryview)
# What a v2 pipeline may transform as an image: tensors (plain or tv_tensors), PIL images, and
# arrays (ToImage converts them); a sample holding one besides its image is not fused.
_IMAGE_LIKE = (torch.Tensor, np.ndarray, Image.Image)


def split_crop(transform: Any, mode: DecodeMode) -> tuple[RandomResizedCropDecode, Any] | None:
    """Split ``transform`` into (a fused crop decoder, the rest of the pipeline), or None.

    Fusable: a torchvision (v1 or v2) ``RandomResizedCrop`` as the first leaf of a
    (nested) ``Compose``, or alone, optionally after ``ToImage``/``ToPureTensor`` (moved
    after the crop). A ``RandomHorizontalFlip`` right after the crop is fused too (the
    same draw, and the flip done in the crop's last copy). The rest is a ``Compose`` of
    the same family (None when empty).
    Anything else before the crop (flips, colour jitter, ...) draws random numbers or
    changes pixels, so the pipeline is left alone; so are subclasses, which may draw or
    crop differently.
    """
    leaves = flatten_transforms(transform)
    movable = transform_classes(*_MOVABLE_NAMES)
    rrc_classes = transform_classes("RandomResizedCrop")
    to_image = transform_classes("ToImage")
    for index, step in enumerate(leaves):
        if type(step) in movable:
            if type(step) in to_image:
                mode = "torch"  # the crop then sees a tensor, and resizes as tensors do, not as PIL does
            continue
        if type(step) not in rrc_classes:
            return None
        antialias = getattr(step, "antialias", True)
        crop = RandomResizedCropDecode(
            tuple(step.size),
            tuple(step.scale),
            tuple(step.ratio),
            mode=mode,
            interpolation=step.interpolation,
            antialias=False if antialias is None else bool(antialias),  # torchvision: None is False for tensors
            api="v2" if type(step).__module__.startswith("torchvision.transforms.v2") else "v1",
        )
        after = index + 1
        # Exactly torchvision's flip: a subclass may draw or flip differently.
        if after < len(leaves) and type(leaves[after]) in transform_classes("RandomHorizontalFlip"):
            crop.hflip = float(leaves[after].p)
            after += 1
        rest = leaves[:index] + leaves[after:]
        if not rest:
            return crop, None
        import torchvision.transforms as v1
        import torchvision.transforms.v2 as v2

        compose = (
            v2.Compose
            if type(transform).__module__.startswith("torchvision.transforms.v2")
            or type(step).__module__.startswith("torchvision.transforms.v2")
            else v1.Compose
        )
        return crop, compose(rest)
    return None


class FusedFieldDecoder:
    """A sample decoder whose named fields go through fused crop decoders.

    The fields are matched by exact name (a ``{"jpg": ...}`` transform does not touch
    ``"seg.jpg"``); every other field goes to ``base``. Picklable when ``base`` is.
    """

    def __init__(self, base: Any, crops: dict[str, RandomResizedCropDecode]) -> None:
        self.base = base
        self.crops = crops

    def __repr__(self) -> str:
        return f"FusedFieldDecoder({self.base!r}, {self.crops!r})"

    def __call__(self, sample: dict[str, Any], *, only: Collection[str] | None = None) -> dict[str, Any]:
        """As :class:`~shardkit.decode.fields.SampleDecoder` (``only``: just those fields)."""
        fused = {f: sample[f] for f in self.crops if isinstance(sample.get(f), _BYTES) and (only is None or f in only)}
        if not fused:
            return self.base(sample, only=only)
        out = self.base({k: v for k, v in sample.items() if k not in fused}, only=only)
        for field, data in fused.items():
            out[field] = _located_call(sample, field, self.crops[field], data)
        return {k: out[k] for k in sample if k in out} | {k: v for k, v in out.items() if k not in sample}


class FusedSamplePipeline:
    """Decode + a sample-level transform whose first step is a fusable crop.

    v2 transforms crop every image of a dict with one set of parameters; the crop is fused
    only when the sample has exactly one image field (the usual ``jpg``/``cls`` sample)
    and no other field decodes to something v2 could take for an image (a tensor, an
    array, a PIL image). Otherwise the sample is decoded and transformed as without
    fusion. Runs in place of the decoder, with no transform after it; ``only`` is as for
    :class:`~shardkit.decode.fields.SampleDecoder` (the other fields stay bytes).
    """

    def __init__(self, base: Any, crop: RandomResizedCropDecode, rest: Any, transform: Any) -> None:
        self.base = base
        self.crop = crop
        self.rest = rest
        self.transform = transform

    def __repr__(self) -> str:
        return f"FusedSamplePipeline({self.base!r}, {self.crop!r}, rest={self.rest!r})"

    def __call__(self, sample: dict[str, Any], *, only: Collection[str] | None = None) -> Any:
        from .fields import IMAGE_EXTENSIONS

        images = [
            k
            for k, v in sample.items()
            if not k.startswith("__")
            and isinstance(v, _BYTES)
            and k.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
            and (only is None or k in only)
        ]
        if len(images) != 1:
            return self.transform(self.base(sample, only=only))
        field = images[0]
        out = self.base({k: v for k, v in sample.items() if k != field}, only=only)
        if any(_holds_image_like(v) for k, v in out.items() if not k.startswith("__")):
            # v2 would crop (or, for a tensor before the image, take for the image) that field too
            return self.transform(self.base(sample, only=only))
        out[field] = _located_call(sample, field, self.crop, sample[field])
        out = {k: out[k] for k in sample if k in out}
        return out if self.rest is None else self.rest(out)


def _holds_image_like(value: Any) -> bool:
    """Whether ``value`` is, or holds in a list, tuple or dict, what v2 may transform as an image."""
    if isinstance(value, _IMAGE_LIKE):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_image_like(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_image_like(v) for v in value.values())
    return False


def _located_call(sample: dict[str, Any], field: str, fn: Any, data: Any) -> Any:
    """``fn(data)`` with failures raised as SampleError naming the sample and member,
    as the sample decoder names them."""
    try:
        return fn(data)
    except SampleError as exc:
        raise _located(sample, field, exc.reason) from exc
    except MemoryError:
        raise
    except Exception as exc:  # library surprises
        raise _located(sample, field, f"{type(exc).__name__}: {exc}") from exc


def _located(sample: dict[str, Any], field: str, message: str) -> SampleError:
    key = sample.get("__key__")
    return SampleError(
        message, url=sample.get("__url__"), key=key, member=f"{key}.{field}" if key is not None else field
    )


def fuse_crop(decoder: Any, transform: Any, *, region: bool = True, reduce: bool = True) -> tuple[Any, Any]:
    """(decoder, transform) with a leading RandomResizedCrop fused into decoding when possible.

    ``decoder`` must be a :class:`shardkit.decode.SampleDecoder` (anything else is
    returned unchanged). A per-field mapping is fused for its *first* entry only, so the
    random draws happen in the same order as without fusion (the mapping's transforms run
    in order after decoding, and decoding draws nothing). The same torch RNG calls are
    made per sample, so seeds, worker seeding and resume behave as without fusion; the
    pixels differ only by the reduced-size decode (see BENCHMARKS.md for the PSNR bound).
    ``reduce=False`` never reduces the scale: every value is then the unfused pipeline's
    (``decode_size="exact"``), and only the work outside the crop's region is saved.
    ``region=False`` decodes whole JPEGs even where libjpeg-turbo 3 could decode only the
    crop (what a machine without it does).
    """
    from .fields import IMAGE_EXTENSIONS, SampleDecoder

    # torchvision passes numpy arrays through untouched, so a crop fused there would change results.
    if not isinstance(decoder, SampleDecoder) or transform is None or decoder.mode == "numpy":
        return decoder, transform
    if isinstance(transform, Mapping):
        if not transform:
            return decoder, transform
        field, first = next(iter(transform.items()))
        if field.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS or field in decoder.handlers:
            return decoder, transform
        split = split_crop(first, decoder.mode)
    else:
        split = split_crop(transform, decoder.mode)
        if split is not None and split[0].api == "v1":
            return decoder, transform  # a v1 crop fails on a sample dict: fused, it would run
    if split is None:
        return decoder, transform
    crop, rest = split
    crop.max_pixels, crop.exif, crop.region = decoder.max_pixels, decoder.exif_orientation, region
    crop.reduce = reduce
    if region:
        log_region_support()
    if isinstance(transform, Mapping):
        rest_map = {k: (rest if k == field else fn) for k, fn in transform.items() if k != field or rest is not None}
        return FusedFieldDecoder(decoder, {field: crop}), rest_map
    return FusedSamplePipeline(decoder, crop, rest, transform), None
