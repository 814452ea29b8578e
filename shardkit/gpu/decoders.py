"""Batch decoders for the main-process GPU stage: nvImageCodec, torchvision's nvjpeg, or the CPU.

:func:`make_backend` picks one (``decode_backend=``); each decodes a list of
:class:`~shardkit.gpu.ship.EncodedImage` into CHW uint8 tensors on the device, sending
what it cannot decode (PNG, CMYK, damaged files) to shardkit's CPU decoder per image.
Importing this module makes no CUDA call and imports no GPU decoder.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..decode.fields import decode_image
from ..errors import SampleError, ShardkitError
from .recipe import Recipe
from .ship import EncodedImage

log = logging.getLogger(__name__)

DECODE_BACKENDS = ("auto", "cpu", "nvjpeg", "nvimgcodec")


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
