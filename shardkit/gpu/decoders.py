"""Batch decoders for the main-process GPU stage: TorchCodec, nvImageCodec, or the CPU.

:func:`make_backend` picks one (``decode_backend=``). Each decodes a list of
:class:`~shardkit.gpu.ship.EncodedImage` into CHW uint8 RGB tensors on the device:

- per image, what the decoder does not take (PNG, CMYK, a turned photo it would orient
  differently from shardkit's pixel policy) or gives no image for goes to shardkit's CPU
  decoder (``cpu_decoded``);
- a decoder that fails a whole batch (an exception from the library: one damaged file
  fails nvJPEG's batched call, a CUDA library error fails everything) has that batch
  decoded once more on the CPU, and the failure is counted (``batch_failures``,
  ``loader.stats()["decode_batch_failures"]``) instead of ending the training run.

No backend calls a deprecated decoder: ``"nvjpeg"`` is nvJPEG through TorchCodec, which
replaces torchvision.io's image decoding (deprecated since torchvision 0.29). Importing
this module makes no CUDA call and imports no GPU decoder.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Sequence

import torch

from ..errors import ShardkitError
from .batch_decoder import BatchDecoder, Decoded
from .nvimgcodec import NvimgcodecBackend
from .recipe import Recipe
from .ship import EncodedImage

log = logging.getLogger(__name__)

DECODE_BACKENDS = ("auto", "cpu", "torchcodec", "nvimgcodec", "nvjpeg")

__all__ = [
    "DECODE_BACKENDS",
    "BatchDecoder",
    "CpuBackend",
    "Decoded",
    "NvimgcodecBackend",
    "TorchcodecBackend",
    "make_backend",
]

_INSTALL = (
    "pip install 'shardkit[torchcodec]' (TorchCodec), or nvImageCodec: "
    "pip install 'shardkit[nvimgcodec-cu12]' ('shardkit[nvimgcodec-cu13]' for a CUDA 13 PyTorch)"
)


class CpuBackend(BatchDecoder):
    """Decode every image with shardkit's CPU decoder (the stand-in on machines without CUDA)."""

    name = "cpu"

    def takes(self, image: EncodedImage) -> bool:
        return False

    def decode_batch(self, images: Sequence[EncodedImage], recipes: Sequence[Recipe]) -> list[Decoded | None]:
        return [None] * len(images)


@functools.lru_cache(maxsize=1)
def _probe_jpeg() -> bytes:
    """An 8x8 JPEG that a decoder must read before it is trusted with batches."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buffer, "JPEG")
    return buffer.getvalue()


class TorchcodecBackend(BatchDecoder):
    """TorchCodec's ``decode_jpeg``: on CUDA one batched nvJPEG call per batch (the GPU's
    hardware JPEG engines where it has them), on the CPU libjpeg-turbo per image.

    TorchCodec decodes to RGB uint8 (gray JPEGs too) and always applies the EXIF
    orientation, whereas shardkit applies it only with ``exif_orientation=True``: so a
    turned photo is given to TorchCodec only when the dataset wants it upright, and to
    the CPU decoder otherwise (see :meth:`BatchDecoder.takes`). Its outputs come from
    PyTorch's caching allocator on the current stream, so they need no keep-alive.

    ``name`` is what ``loader.stats()`` reports: ``"nvjpeg"`` when chosen by that name.
    Construction decodes a tiny JPEG on ``device``, so a TorchCodec that cannot run there
    (e.g. CUDA libraries built for another CUDA major version) fails when the loader is
    built, not in the first batch.
    """

    name = "torchcodec"
    applies_exif = True

    def __init__(self, device: torch.device, max_pixels: int | None, *, name: str = "torchcodec") -> None:
        from torchcodec.decoders import decode_jpeg  # optional dependency: pip install torchcodec

        super().__init__(device, max_pixels)
        self.name = name
        self._decode_jpeg = decode_jpeg
        probe = decode_jpeg([_probe_jpeg()], mode="RGB", device=device)
        if len(probe) != 1 or tuple(probe[0].shape) != (3, 8, 8) or probe[0].device != device:
            raise RuntimeError(f"TorchCodec decoded an 8x8 test JPEG to {[tuple(t.shape) for t in probe]}")

    def decode_batch(self, images: Sequence[EncodedImage], recipes: Sequence[Recipe]) -> list[Decoded | None]:
        decoded = self._decode_jpeg([image.data for image in images], mode="RGB", device=self.device)
        return [Decoded(tensor) for tensor in decoded]


def _torchcodec(device: torch.device, max_pixels: int | None, name: str) -> TorchcodecBackend:
    try:
        return TorchcodecBackend(device, max_pixels, name=name)
    except ImportError as exc:
        raise ShardkitError(
            f"decode_backend={name!r} decodes with TorchCodec, which is not installed: "
            f"pip install 'shardkit[torchcodec]' ({exc})"
        ) from exc
    except (RuntimeError, OSError) as exc:
        raise ShardkitError(f"decode_backend={name!r}: TorchCodec cannot decode on {device}: {exc}") from exc


def _auto_cuda(device: torch.device, max_pixels: int | None) -> BatchDecoder:
    """TorchCodec, else nvImageCodec, else a clear error (see :func:`make_backend`)."""
    reasons = []
    for name, build in (("torchcodec", TorchcodecBackend), ("nvimgcodec", NvimgcodecBackend)):
        try:
            return build(device, max_pixels)
        except ImportError:
            reasons.append(f"{name} is not installed")
        except (RuntimeError, OSError) as exc:  # e.g. built for another CUDA major version
            log.warning("%s cannot decode on %s (%s)", name, device, exc)
            reasons.append(f"{name} failed to start: {exc}")
    raise ShardkitError(
        f"decode_device={str(device)!r} needs a GPU JPEG decoder ({'; '.join(reasons)}): {_INSTALL}; "
        "or decode_backend='cpu' to decode in the main process on the CPU"
    )


def make_backend(backend: str | BatchDecoder, device: torch.device, max_pixels: int | None) -> BatchDecoder:
    """The decoder for ``backend``, or ShardkitError for one that cannot run here.

    - ``"auto"``: on CUDA, TorchCodec when installed and working, else nvImageCodec (with
      region decoding only on versions where it is safe, see
      :func:`shardkit.gpu.nvimgcodec.region_refusal`), else an error naming the installs;
      shardkit's CPU decoder on the CPU. TorchCodec comes first because no GPU run has
      measured the two yet: it is PyTorch's maintained successor of torchvision.io, has
      no known crash, and allocates through PyTorch; nvImageCodec's region decoding saves
      decode work but its newest release (0.9.0) crashes in exactly that path.
    - ``"torchcodec"`` (or ``"nvjpeg"``, its former name here): TorchCodec's batched
      nvJPEG decode, also on the CPU (libjpeg-turbo, as CI runs it).
    - ``"nvimgcodec"``: nvImageCodec, CUDA only.
    - ``"cpu"``: shardkit's CPU decoder (simplejpeg/PIL) in the main process.
    - a :class:`BatchDecoder` instance: used as is (its device must be ``device``).
    """
    if isinstance(backend, BatchDecoder):
        if backend.device != device:
            raise ShardkitError(
                f"decode_backend {backend.name!r} decodes on {backend.device}, but decode_device is {device}"
            )
        return backend
    if backend not in DECODE_BACKENDS:
        raise ShardkitError(f"decode_backend must be one of {DECODE_BACKENDS} or a BatchDecoder, got {backend!r}")
    if backend == "auto":
        return CpuBackend(device, max_pixels) if device.type != "cuda" else _auto_cuda(device, max_pixels)
    if backend == "cpu":
        return CpuBackend(device, max_pixels)
    if backend in ("torchcodec", "nvjpeg"):
        return _torchcodec(device, max_pixels, backend)
    if device.type != "cuda":
        raise ShardkitError("decode_backend='nvimgcodec' decodes on a CUDA device: use decode_device='cuda'")
    try:
        return NvimgcodecBackend(device, max_pixels)
    except ImportError as exc:
        raise ShardkitError(
            "decode_backend='nvimgcodec' needs nvImageCodec: pip install 'shardkit[nvimgcodec-cu12]' "
            f"('shardkit[nvimgcodec-cu13]' for a CUDA 13 PyTorch) ({exc})"
        ) from exc
