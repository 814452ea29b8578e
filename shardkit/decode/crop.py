"""RandomResizedCrop as a decoder: draw the crop from the header, decode JPEGs small.

:class:`RandomResizedCropDecode` is an image handler for :func:`shardkit.decode.make_decoder`.
Unlike a fixed ``decode_size`` (:mod:`shardkit.decode.size`) it picks the DCT scale per
crop, so small crops keep their resolution and large ones decode cheaply. Putting it in
place of a torchvision pipeline's first step is :mod:`shardkit.decode.fuse`'s job.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .imageinfo import guess_format_name, read_image_header
from .jpeg_region import to_stored, to_upright, turbojpeg
from .pixels import DecodeMode, check_mode, check_pixels, decode_rgb, default_max_pixels, orient_array, to_mode
from .planar import to_planar
from .size import as_hw


@functools.cache
def _pil_filters() -> dict[Any, Image.Resampling]:
    """torchvision interpolation modes -> PIL filters (built on first use: torchvision loads lazily)."""
    from torchvision.transforms import InterpolationMode as M

    return {
        M.NEAREST: Image.Resampling.NEAREST,
        M.NEAREST_EXACT: Image.Resampling.NEAREST,
        M.BILINEAR: Image.Resampling.BILINEAR,
        M.BICUBIC: Image.Resampling.BICUBIC,
        M.BOX: Image.Resampling.BOX,
        M.HAMMING: Image.Resampling.HAMMING,
        M.LANCZOS: Image.Resampling.LANCZOS,
    }


def _resize_function(api: str) -> Any:
    """torchvision's tensor resize of the family the replaced transform came from."""
    if api == "v1":
        from torchvision.transforms import functional as v1_functional

        return v1_functional.resize
    from torchvision.transforms.v2 import functional as v2_functional

    return v2_functional.resize


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
    full-size path would; the crop is then resized with the ``interpolation`` and
    ``antialias`` given (those of the replaced transform).
    With ``region=True`` (the default) and libjpeg-turbo 3 available
    (:mod:`shardkit.decode.jpeg_region`), only the crop's region is decoded, with the same pixels
    the whole-image decode at that scale has there. Other formats are decoded at full
    size. Same ``max_pixels`` guard as :func:`shardkit.decode.decode_image`.
    ``hflip=p`` also does what a following ``RandomHorizontalFlip(p)`` would (the same
    ``torch.rand(1)`` draw, after the crop's), mirroring in the copy the output needs anyway.

    ``reduce=False`` keeps every crop at full resolution (only the region is skipped): the
    output then has exactly the values of decode -> ``RandomResizedCrop`` (-> flip) with
    the same seed. ``api`` is the torchvision family whose resize the crop uses, that of the
    replaced transform (the two families round some tensor resizes differently).

    Use it as an image handler::

        make_decoder("torch", handlers=dict.fromkeys(IMAGE_EXTENSIONS, RandomResizedCropDecode(224)))
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        *,
        mode: DecodeMode = "torch",
        max_pixels: int | None = None,
        interpolation: Any = None,
        antialias: bool = True,
        exif: bool = False,
        region: bool = True,
        hflip: float | None = None,
        reduce: bool = True,
        api: str = "v2",
    ) -> None:
        check_mode(mode)
        if api not in ("v1", "v2"):
            raise ValueError(f"api must be 'v1' or 'v2' (torchvision.transforms or .v2), got {api!r}")
        hw = as_hw(size)
        if hw is None or min(hw) < 1:
            raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(
                f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got scale={scale!r}, ratio={ratio!r}"
            )
        if hflip is not None and not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1] or None, got {hflip!r}")
        self.size = hw
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        # torchvision takes the log in float32 on every draw; the same values, computed once.
        low, high = torch.log(torch.tensor(self.ratio)).tolist()
        self._log_ratio = (float(low), float(high))
        self.mode = mode
        self.max_pixels = default_max_pixels(max_pixels)
        # None = bilinear; otherwise a torchvision InterpolationMode (what the replaced
        # RandomResizedCrop used), honoured in every output mode.
        self.interpolation = interpolation
        self.antialias = bool(antialias)
        # Turn images upright by their EXIF orientation first, as the unfused decoder does
        # with exif_orientation=True: the crop is then drawn on the upright size.
        self.exif = bool(exif)
        # Decode only the crop's region of a JPEG when libjpeg-turbo 3 is there (jpeg_region).
        self.region = bool(region)
        # A RandomHorizontalFlip(p) that followed the crop, done in the crop's last copy.
        self.hflip = None if hflip is None else float(hflip)
        # False: no DCT scaling, so the pixels are those of the unfused pipeline.
        self.reduce = bool(reduce)
        self.api = api

    def __repr__(self) -> str:
        flip = "" if self.hflip is None else f", hflip={self.hflip}"
        crop = f"size={self.size}, scale={self.scale}, ratio={self.ratio}"
        exact = "" if self.reduce else ", reduce=False"
        return f"RandomResizedCropDecode({crop}, mode={self.mode!r}{flip}{exact})"

    def get_params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop_height, crop_width), as torchvision's RandomResizedCrop draws it."""
        area = height * width
        log_low, log_high = self._log_ratio
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_low, log_high)).item()
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
        for scale in (8, 4, 2) if self.reduce else ():
            if crop_h >= scale * out_h and crop_w >= scale * out_w:
                break
        else:
            scale = 1
        return CropPlan(top, left, crop_h, crop_w, scale)

    def __call__(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode ``data`` and return the resized crop in ``self.mode``.

        The crop is drawn before decoding; an image that then fails to decode puts the
        torch RNG back, so the samples after it get the draws they get without fusion
        (where the decoder fails before the transform draws anything)."""
        state = torch.get_rng_state()
        try:
            return self._decode_crop(data, state)
        except BaseException:
            torch.set_rng_state(state)
            raise

    def _decode_crop(self, data: bytes | bytearray | memoryview, state: torch.Tensor) -> Any:
        if not isinstance(data, bytes):
            data = bytes(data)
        header = read_image_header(data)
        plan: CropPlan | None = None
        if header is not None:
            check_pixels(header.width, header.height, self.max_pixels)
        # Plan the crop on the upright size before decoding where the header gives it: a
        # JPEG's (its orientation is parsed), or any when EXIF is ignored. PNG/WebP EXIF is
        # not parsed, so those are planned on the size the decoder turns them to.
        if header is not None and (header.format == "JPEG" or not self.exif):
            orientation = header.orientation if self.exif else 1
            upright = (header.width, header.height) if orientation in (5, 6, 7, 8) else (header.height, header.width)
            plan = self.plan(*upright)
            if header.format == "JPEG" and header.components in (1, 3):
                region = self._decode_region(data, plan, header.height, header.width, orientation)
                if region is not None:
                    return self._crop_resize(*region)
            full_h, full_w = upright

        def scale_for(height: int, width: int) -> int:  # PIL-only JPEGs our header parser could not read
            nonlocal plan, full_h, full_w
            if plan is None:
                plan, full_h, full_w = self.plan(height, width), height, width
            return plan.scale

        pixels = decode_rgb(
            data,
            max_pixels=self.max_pixels,
            # a PNG/WebP planned after decoding must not be planned on its stored size here;
            # at full resolution nothing is (PIL turns an image upright after that call)
            scale_for=scale_for if self.reduce and (header is None or header.format == "JPEG") else None,
            format_name=guess_format_name(data),
            exif=self.exif,
            header=header,
        )
        decoded_w, decoded_h = pixels.size if isinstance(pixels, Image.Image) else (pixels.shape[1], pixels.shape[0])
        if plan is not None and not self.reduce and (decoded_h, decoded_w) != (full_h, full_w):
            # PIL decoded it (CMYK, or after a failed region decode) and turned it by EXIF our
            # header parser did not read (XMP, an odd tag type): draw again on what the
            # unfused path sees, from the RNG state it would start from.
            torch.set_rng_state(state)
            plan = None
        if plan is None:  # BMP, PNM, TIFF, PNG/WebP with EXIF: the size is known only after decoding
            plan = self.plan(decoded_h, decoded_w)
            ratio_y = ratio_x = 1.0
        else:  # planned from the header: map the box into decoded pixels
            ratio_y, ratio_x = decoded_h / full_h, decoded_w / full_w
        box = (
            plan.left * ratio_x,
            plan.top * ratio_y,
            (plan.left + plan.width) * ratio_x,
            (plan.top + plan.height) * ratio_y,
        )
        return self._crop_resize(pixels, box)

    def _decode_region(
        self, data: bytes, plan: CropPlan, height: int, width: int, orientation: int
    ) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
        """(upright pixels of just the crop's region, the crop box in them), or None.

        ``height``/``width`` are the stored (unturned) size. The region is the crop box
        at the reduced scale widened to whole pixels, so its pixels are those the
        whole-image decode at that scale gives there, and the box is the same box.
        """
        library = turbojpeg() if self.region else None
        if library is None:
            return None
        scale = plan.scale
        scaled_h, scaled_w = -(-height // scale), -(-width // scale)
        ratio_y, ratio_x = scaled_h / height, scaled_w / width
        upright = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
        top, left, box_h, box_w = to_stored(orientation, (plan.top, plan.left, plan.height, plan.width), *upright)
        y0, x0 = top * ratio_y, left * ratio_x
        y1, x1 = (top + box_h) * ratio_y, (left + box_w) * ratio_x
        r_top, r_left = math.floor(y0), math.floor(x0)
        r_bottom, r_right = min(scaled_h, math.ceil(y1)), min(scaled_w, math.ceil(x1))
        pixels = library.decode_region(
            data, scale=scale, top=r_top, left=r_left, height=r_bottom - r_top, width=r_right - r_left
        )
        if pixels is None:
            return None
        box = (y0 - r_top, x0 - r_left, y1 - y0, x1 - x0)
        if orientation != 1:
            pixels = orient_array(pixels, orientation)
            box = to_upright(orientation, box, r_bottom - r_top, r_right - r_left)
        box_top, box_left, box_h, box_w = box
        return pixels, (box_left, box_top, box_left + box_w, box_top + box_h)

    def _crop_resize(self, pixels: np.ndarray | Image.Image, box: tuple[float, ...]) -> Any:
        from torchvision.transforms import InterpolationMode

        out_h, out_w = self.size
        interpolation = InterpolationMode(self.interpolation or InterpolationMode.BILINEAR)
        # torchvision's RandomHorizontalFlip draws torch.rand(1) per call, after the crop's draws.
        flip = self.hflip is not None and bool(torch.rand(1) < self.hflip)
        if self.mode == "pil":
            image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels, "RGB")
            pil_filter = _pil_filters().get(interpolation, Image.Resampling.BILINEAR)
            if all(float(v).is_integer() for v in box):  # torchvision's crop, then resize: the same pixels
                image = image.crop(tuple(int(v) for v in box)).resize((out_w, out_h), pil_filter)  # type: ignore[arg-type]  # a 4-tuple
            else:  # resize(box=...) crops with sub-pixel precision and filters in one pass
                image = image.resize((out_w, out_h), pil_filter, box=box)  # type: ignore[arg-type]  # a 4-tuple
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
        chw = to_mode(pixels, "torch")
        # floor(v + 0.5), not round(): it commutes with the region's integer offset.
        left, top, right, bottom = (math.floor(v + 0.5) for v in box)
        crop = chw[:, top : max(bottom, top + 1), left : max(right, left + 1)]
        if tuple(crop.shape[1:]) == (out_h, out_w):  # resize gives the crop back as it is
            resized = crop
        else:
            # torch resizes dense channels-last uint8 on its fast path (same values) and
            # gives channels-last back; a strided view takes a slower planar one.
            dense = crop.permute(1, 2, 0).contiguous().permute(2, 0, 1)
            resized = _resize_function(self.api)(
                dense, [out_h, out_w], interpolation=interpolation, antialias=self.antialias
            )
        hwc = resized.permute(1, 2, 0).numpy()
        if self.mode == "numpy":
            return np.ascontiguousarray(hwc[:, ::-1] if flip else hwc)
        # to_planar makes planar CHW from channels-last faster than torch's contiguous().
        out = torch.empty(resized.shape, dtype=resized.dtype)
        to_planar(out.numpy(), hwc, flip=flip)
        return out
