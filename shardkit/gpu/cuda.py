"""Optional GPU helpers: nvjpeg batch decoding and a CUDA prefetcher.

Importing this module makes no CUDA call, so it is safe on machines without a GPU and
before DataLoader workers fork. Every CUDA call happens inside a function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..decode.fields import decode_image
from ..decode.imageinfo import read_image_header
from ..decode.pixels import check_pixels, default_max_pixels
from ..errors import SampleError

logger = logging.getLogger(__name__)


def cuda_available() -> bool:
    """True when PyTorch can use a CUDA device."""
    return torch.cuda.is_available()


def cuda_device(device: str | torch.device | int | None) -> torch.device:
    """Resolve ``device`` to a CUDA device, or raise a clear error."""
    if isinstance(device, int):
        resolved = torch.device("cuda", device)
    else:
        resolved = torch.device("cuda" if device is None else device)
    if resolved.type != "cuda":
        raise ValueError(f"expected a CUDA device, got {device!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"CUDA device {str(resolved)!r} requested but CUDA is not available (no GPU, or a CPU-only PyTorch build)"
        )
    if resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def decode_images_cuda(
    images: Sequence[bytes], *, device: str | torch.device | None = None, max_pixels: int | None = None
) -> list[torch.Tensor]:
    """Decode encoded images to CHW uint8 RGB tensors on a CUDA device.

    JPEGs go to nvjpeg in one batched ``torchvision.io.decode_jpeg`` call; other formats,
    and JPEGs nvjpeg rejects (e.g. CMYK), are decoded on the CPU and copied over. Every
    header is checked against ``max_pixels`` (default PIL's limit) before anything is
    decoded, because nvjpeg has no such guard. Raises SampleError naming the batch index.
    """
    import torchvision.io as tvio  # deferred: only GPU users need it

    limit = default_max_pixels(max_pixels)
    jpeg_indices: list[int] = []
    for index, data in enumerate(images):
        header = read_image_header(data)
        try:
            if header is not None:
                check_pixels(header.width, header.height, limit)
        except SampleError as exc:
            raise SampleError(f"image {index} of the batch: {exc.reason}") from exc
        if header is not None and header.format == "JPEG" and header.components in (1, 3):
            jpeg_indices.append(index)
    target = cuda_device(device)

    decoded: list[torch.Tensor | None] = [None] * len(images)
    # nvjpeg wants 1-D uint8 CPU tensors; bytearray keeps torch.frombuffer from warning.
    encoded = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpeg_indices]
    if encoded:
        try:
            batch = tvio.decode_jpeg(encoded, mode=tvio.ImageReadMode.RGB, device=target)
            for index, tensor in zip(jpeg_indices, batch):
                decoded[index] = tensor
        except RuntimeError as exc:  # one bad file fails the whole batch: CPU below
            logger.debug("nvjpeg batch decode failed (%s); decoding on the CPU", exc)
    for index, data in enumerate(images):
        if decoded[index] is None:
            try:
                cpu = decode_image(data, "torch", max_pixels=limit)
            except SampleError as exc:
                raise SampleError(f"image {index} of the batch: {exc.reason}") from exc
            decoded[index] = cpu.to(target, non_blocking=False)
    return decoded  # type: ignore[return-value]


def _to_device(obj: Any, device: torch.device) -> Any:
    """Copy tensors nested in dicts/lists/tuples to ``device`` (async from pinned memory)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        moved = {key: _to_device(value, device) for key, value in obj.items()}
        if type(obj) is dict:
            return moved
        try:  # keep OrderedDict & co; types that cannot be built from a dict become dicts
            return type(obj)(moved)  # type: ignore[call-arg]  # a Mapping subclass built from a dict
        except TypeError:
            return moved
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(value, device) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(value, device) for value in obj)
    return obj


def _record_stream(obj: Any, stream: torch.cuda.Stream) -> None:
    """Tell the caching allocator the tensors are used on ``stream`` (not only the copy stream)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            _record_stream(value, stream)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _record_stream(value, stream)


class CudaPrefetcher:
    """Iterate over batches already on the GPU, copying the next one on a side stream.

    While the training step runs on batch ``i``, batch ``i + 1`` is copied host-to-device
    on a separate CUDA stream; before a batch is handed out, the current stream waits for
    that copy (``wait_stream``) and its tensors are ``record_stream``-ed so the allocator
    does not reuse their memory early. Tensors nested in dicts, lists and (named) tuples
    are moved; anything else is passed as is. Use ``DataLoader(pin_memory=True)``:
    copies from pageable memory are synchronous and overlap nothing.

    ``prepare(batch)``, when given, runs on each batch inside the side stream before the
    copy (ShardLoader's GPU decode stage), so its kernels overlap the caller's work too.

    Without CUDA: ``device=None`` means "the current CUDA device if there is one", and
    with no CUDA the prefetcher passes batches through unchanged (logged once), so the
    same training script runs on a CPU-only machine. An explicit CUDA ``device`` with no
    CUDA available raises RuntimeError at construction.
    """

    def __init__(
        self,
        iterable: Iterable[Any],
        device: str | torch.device | int | None = None,
        *,
        prepare: Callable[[Any], Any] | None = None,
    ) -> None:
        self.iterable = iterable
        self.prepare = prepare
        if device is None and not torch.cuda.is_available():
            logger.info("CudaPrefetcher: CUDA is not available, batches stay on the CPU")
            self.device: torch.device | None = None
        else:
            self.device = cuda_device(device)

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if self.device is None:
            yield from (self.iterable if self.prepare is None else map(self.prepare, self.iterable))
            return
        copy_stream = torch.cuda.Stream(self.device)
        batches = iter(self.iterable)

        device = self.device  # not None here; the closure below keeps the narrowing

        def start_copy() -> tuple[bool, Any]:
            try:
                batch = next(batches)
            except StopIteration:
                return False, None
            with torch.cuda.stream(copy_stream):
                if self.prepare is not None:  # e.g. a GPU decode: its kernels also run on the side stream
                    batch = self.prepare(batch)
                return True, _to_device(batch, device)

        has_next, pending = start_copy()
        while has_next:
            compute_stream = torch.cuda.current_stream(self.device)
            compute_stream.wait_stream(copy_stream)
            _record_stream(pending, compute_stream)
            ready = pending
            has_next, pending = start_copy()  # overlaps the caller's work on `ready`
            yield ready
