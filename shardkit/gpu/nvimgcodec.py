"""The nvImageCodec batch decoder, and which nvImageCodec versions may decode regions.

nvImageCodec 0.9.0 fails batched region-of-interest (ROI) JPEG decoding on ordinary,
in-bounds regions: NVIMGCODEC_STATUS_INTERNAL_ERROR on A100, GB200 and GB300, and a
SIGSEGV that ends the process on H100 and B200, where 0.8.0 works (NVIDIA/nvImageCodec
issue 55, open). An exception is retried on the CPU (:mod:`shardkit.gpu.batch_decoder`),
but a segfault cannot be caught, so region decoding runs only on versions before 0.9;
on others the backend decodes whole images and the stage crops them, with a warning that
names the alternatives. Importing this module imports no nvImageCodec.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import torch

from .batch_decoder import BatchDecoder, Decoded
from .recipe import Recipe
from .ship import EncodedImage

log = logging.getLogger(__name__)

#: Region decoding is allowed from the first version shardkit drives (0.3) up to, not
#: including, the first known-bad one (0.9.0, issue 55). A later release is allowed
#: once a GPU run (tools/gpu_check.sh) has shown it decodes regions correctly.
REGION_SAFE_VERSIONS = ((0, 3), (0, 9))

_ALTERNATIVES = (
    "For region decoding install nvImageCodec 0.8 (pip install 'shardkit[nvimgcodec-cu12]', "
    "or 'shardkit[nvimgcodec-cu13]' for a CUDA 13 PyTorch), or use decode_backend='torchcodec'"
)


def region_refusal(version: str) -> str | None:
    """None when nvImageCodec ``version`` may decode regions in batches, else why not."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return f"nvImageCodec version {version!r} is not one shardkit can check"
    parsed = (int(match[1]), int(match[2]))
    lowest, first_bad = REGION_SAFE_VERSIONS
    if parsed < lowest:
        return f"nvImageCodec {version} is older than region decoding support ({lowest[0]}.{lowest[1]})"
    if parsed < first_bad:
        return None
    if parsed[:2] == first_bad:
        return (
            f"nvImageCodec {version} fails batched region (ROI) JPEG decoding, with an internal error "
            "or a crash of the process on H100/B200 (NVIDIA/nvImageCodec issue 55)"
        )
    return f"nvImageCodec {version}: region (ROI) decoding has not been checked since 0.9.0 broke it (issue 55)"


class NvimgcodecBackend(BatchDecoder):
    """nvImageCodec: one batched decode of the batch's JPEGs on the GPU (hardware JPEG
    engines where the GPU has them), decoding only the RandomResizedCrop region when the
    recipe starts with one and the installed version is safe for it (:func:`region_refusal`;
    otherwise whole images, cropped by the stage). EXIF is ignored, as on the CPU path with
    ``exif_orientation=False``; photos to be turned go to the CPU decoder.

    nvImageCodec allocates the decoded images itself (not through torch's caching
    allocator), so each batch's images are kept alive until an event recorded after the
    last kernel that reads them has completed.
    """

    name = "nvimgcodec"

    def __init__(self, device: torch.device, max_pixels: int | None) -> None:
        from nvidia import nvimgcodec  # optional dependency: nvidia-nvimgcodec-cu12 / -cu13

        super().__init__(device, max_pixels)
        self.version = str(getattr(nvimgcodec, "__version__", "unknown"))
        refusal = region_refusal(self.version)
        self.regions = refusal is None
        if refusal is not None:
            log.warning("%s: decoding whole images and cropping after (slower). %s", refusal, _ALTERNATIVES)
        self._nv = nvimgcodec
        self._decoder = nvimgcodec.Decoder(device_id=device.index or 0)
        # 3-channel interleaved sRGB whatever the JPEG holds (grayscale too). ColorSpec.RGB
        # was renamed SRGB in nvImageCodec 0.6.
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

    def decode_batch(self, images: Sequence[EncodedImage], recipes: Sequence[Recipe]) -> list[Decoded | None]:
        # Release the images of earlier batches whose kernels have finished.
        self._keepalive = [(event, held) for event, held in self._keepalive if not event.query()]
        regions = [
            image.params[0] if self.regions and recipe.steps[0].kind == "rrc" else None
            for image, recipe in zip(images, recipes)
        ]
        sources = [self._source(image, region) for image, region in zip(images, regions)]
        stream = torch.cuda.current_stream(self.device)
        decoded = self._decoder.decode(sources, params=self._params, cuda_stream=stream.cuda_stream)
        out: list[Decoded | None] = []
        held = []
        for region, result in zip(regions, decoded):
            if result is None:  # this image failed: the CPU decoder takes it
                out.append(None)
                continue
            held.append(result)
            # DLPack hands torch the current stream, on which nvImageCodec orders its decode.
            out.append(Decoded(torch.from_dlpack(result).permute(2, 0, 1), cropped=region is not None))
        event = torch.cuda.Event()
        event.record(stream)  # recorded again after the stage's kernels: see finish()
        self._keepalive.append((event, held))
        return out

    def finish(self) -> None:
        """Called after the batch's kernels are queued: the held images live until they ran."""
        if self._keepalive:
            self._keepalive[-1][0].record(torch.cuda.current_stream(self.device))
