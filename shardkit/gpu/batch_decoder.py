"""What every batch decoder of the GPU stage shares: which images it takes, the CPU
fallback per image, and the CPU retry of a batch the decoder failed as a whole.

A decoder subclasses :class:`BatchDecoder` and implements :meth:`~BatchDecoder.decode_batch`
(and, if its EXIF handling differs, sets ``applies_exif``); :meth:`~BatchDecoder.decode`
is what the batch stage calls. ``ShardLoader(decode_backend=...)`` also takes an
instance, which is how a decoder shardkit does not ship plugs in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..decode.fields import decode_image
from ..errors import SampleError
from .recipe import Recipe
from .ship import EncodedImage

log = logging.getLogger(__name__)


class Decoded:
    """Per image: the CHW uint8 RGB tensor, or the error; ``cropped`` when the decoder
    already applied the first RandomResizedCrop box (region decoding)."""

    __slots__ = ("tensor", "error", "cropped")

    def __init__(
        self, tensor: torch.Tensor | None = None, error: Exception | None = None, cropped: bool = False
    ) -> None:
        self.tensor, self.error, self.cropped = tensor, error, cropped


class BatchDecoder:
    """Decode a batch of shipped images on ``device``, the CPU decoder as the safety net.

    ``cpu_decoded`` counts the images shardkit's CPU decoder decoded (the ones the decoder
    does not take, gave no image for, or was retried on); ``batch_failures`` the batches
    the decoder failed as a whole (each retried once on the CPU). ``regions`` is True when
    the decoder decodes only the first RandomResizedCrop box.
    """

    name = "base"
    #: The decoder turns images by their EXIF orientation (TorchCodec), or ignores it (nvImageCodec here).
    applies_exif = False
    regions = False

    def __init__(self, device: torch.device, max_pixels: int | None) -> None:
        self.device, self.max_pixels = device, max_pixels
        self.cpu_decoded = 0
        self.batch_failures = 0

    def reset_counts(self) -> None:
        """Start the counters over (the loader does at each new pass)."""
        self.cpu_decoded = self.batch_failures = 0

    def takes(self, image: EncodedImage) -> bool:
        """Whether :meth:`decode_batch` gets ``image``: a baseline/progressive 1- or
        3-component JPEG whose pixels the decoder gives as shardkit's pixel policy wants
        them. shardkit turns a photo by its EXIF orientation only with
        ``exif_orientation=True`` (``image.upright``): a decoder that ignores EXIF takes
        every JPEG except those to be turned; one that always applies it takes the ones to
        be turned and those with no orientation to apply."""
        if not image.batchable:
            return False
        if self.applies_exif:
            return image.upright or image.orientation == 1
        return not image.upright

    def decode_batch(self, images: Sequence[EncodedImage], recipes: Sequence[Recipe]) -> Sequence[Decoded | None]:
        """Decode ``images`` (all taken) in one go; ``recipes[i]`` is image i's recipe.
        None for an image sends it to the CPU decoder; an exception fails the batch."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called after the stage has queued its kernels on the batch's images."""

    def decode(self, images: Sequence[EncodedImage], recipes: Sequence[Recipe]) -> list[Decoded]:
        """One result per image, in order: the decoder's where it took the image and gave
        one, the CPU decoder's otherwise, and the CPU decoder's for all when the decoder
        failed the batch."""
        picked = [i for i, image in enumerate(images) if self.takes(image)]
        out: list[Decoded | None] = [None] * len(images)
        if picked:
            try:
                results = list(self.decode_batch([images[i] for i in picked], [recipes[i] for i in picked]))
                if len(results) != len(picked):
                    raise RuntimeError(f"returned {len(results)} images for {len(picked)}")
            except torch.cuda.OutOfMemoryError:
                raise  # the device's problem: a CPU retry would run out of it too when copying
            except Exception as exc:  # the library failed the batch: nothing of it is kept
                self.batch_failures += 1
                level = logging.WARNING if self.batch_failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "decode_backend %r failed a batch of %d images (%s: %s); decoding it on the CPU "
                    "(loader.stats()['decode_batch_failures'] counts these)",
                    self.name,
                    len(picked),
                    type(exc).__name__,
                    exc,
                )
            else:
                for i, result in zip(picked, results):
                    out[i] = result
        return [d if d is not None else self.fallback(image) for d, image in zip(out, images)]

    def fallback(self, image: EncodedImage) -> Decoded:
        """shardkit's CPU decoder (simplejpeg/PIL) for one image, moved to the device."""
        self.cpu_decoded += 1
        try:
            tensor = decode_image(image.data, "torch", max_pixels=self.max_pixels, exif_orientation=image.upright)
        except SampleError as exc:
            return Decoded(error=exc)
        return Decoded(tensor.to(self.device))
