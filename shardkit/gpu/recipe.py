"""Which torchvision transform a GPU batch stage can take over, read into a :class:`Recipe`.

:func:`parse_recipe` reads a dataset's transform (v1 or v2, nested ``Compose``) into the
steps the main-process stage (:mod:`shardkit.gpu.batch`) runs with the parameters the
workers drew (:mod:`shardkit.gpu.ship`). Imports no torchvision until a recipe is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..decode.size import flatten_transforms, transform_classes
from ..errors import ShardkitError

SUPPORTED_TRANSFORMS = (
    "RandomResizedCrop (first size-changing step), Resize, CenterCrop, RandomHorizontalFlip, then optionally "
    "ToDtype(float dtype, scale=True) or ConvertImageDtype(float dtype) and Normalize; ToImage and "
    "ToPureTensor are accepted and do nothing (torchvision v1 or v2, nested Compose allowed)"
)

# ----------------------------------------------------------------------- the recipe


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

    from ..decode.crop import RandomResizedCropDecode

    rrc, resize, center, flip = (
        transform_classes(n) for n in ("RandomResizedCrop", "Resize", "CenterCrop", "RandomHorizontalFlip")
    )
    to_dtype, convert, normalize = (transform_classes(n) for n in ("ToDtype", "ConvertImageDtype", "Normalize"))
    passthrough = transform_classes("ToImage", "ToPureTensor")
    steps: list[Step] = []
    out_hw: tuple[int, int] | None = None
    dtype: torch.dtype | None = None
    mean = std = None
    leaf: Any
    for leaf in flatten_transforms(transform):
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
