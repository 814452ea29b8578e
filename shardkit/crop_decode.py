"""RandomResizedCrop fused into decoding: draw the crop from the header, decode JPEGs small.

:class:`RandomResizedCropDecode` is an image handler for :func:`shardkit.decode.make_decoder`.
Unlike a fixed ``decode_size`` (:mod:`shardkit.decode_size`) it picks the DCT scale per
crop, so small crops keep their resolution and large ones decode cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .decode_size import as_hw
from .imageinfo import guess_format_name
from .pixels import DecodeMode, check_mode, decode_rgb, default_max_pixels, to_mode


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
    :func:`shardkit.decode.decode_image`.

    Use it as an image handler::

        make_decoder("torch", handlers=dict.fromkeys(IMAGE_EXTENSIONS, RandomResizedCropDecode(224)))
    """

    def __init__(self, size: int | tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), *, mode: DecodeMode = "torch",
                 max_pixels: int | None = None) -> None:
        check_mode(mode)
        hw = as_hw(size)
        if hw is None or min(hw) < 1:
            raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], "
                             f"got scale={scale!r}, ratio={ratio!r}")
        self.size = hw
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.mode = mode
        self.max_pixels = default_max_pixels(max_pixels)

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

        pixels = decode_rgb(data, max_pixels=self.max_pixels, scale_for=scale_for,
                            format_name=guess_format_name(data))
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

        chw = to_mode(pixels, "torch")
        left, top, right, bottom = (int(round(v)) for v in box)
        crop = chw[:, top:max(bottom, top + 1), left:max(right, left + 1)]
        resized = tvf.resize(crop, [out_h, out_w], antialias=True)
        if self.mode == "torch":
            return resized
        return np.ascontiguousarray(resized.permute(1, 2, 0).numpy())
