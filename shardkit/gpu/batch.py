"""Decode and augment whole batches in the main process (on the GPU), fed by workers that only read.

``ShardLoader(ds, decode_device="cuda")`` splits the per-sample pipeline in two:

- **in the workers** (:class:`shardkit.gpu.ship.ShipTransform`): read the sample, decode the small fields
  (labels, JSON) as usual, and for each image field read the size from the header
  and draw the random parameters of the transform (RandomResizedCrop box, flip) with
  the same torch RNG calls as torchvision. The image itself stays encoded: the batch
  crosses the process boundary as :class:`~shardkit.gpu.ship.EncodedImage` objects plus collated labels.
- **in the main process** (:class:`BatchStage`): decode the batch's JPEGs in one call
  (:mod:`shardkit.gpu.decoders`: nvImageCodec, decoding only the crop region, when it
  is installed; else torchvision's nvjpeg batch decode), other formats and CMYK JPEGs on the CPU, then
  crop, resize and flip each image with the drawn parameters, stack, convert dtype,
  normalise and return a channels-last batch on the device.

The transform is taken over, not re-implemented: the dataset's torchvision pipeline is
read (:func:`shardkit.gpu.recipe.parse_recipe`) and run through ``torchvision.transforms.v2.functional``
with the parameters the worker drew, so ``decode_device="cpu"`` gives the same pixels
as the ordinary worker path and is what CI tests on machines without a GPU.

Importing this module makes no CUDA call and imports neither torchvision nor any GPU
decoder; they load when a stage is built.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..decode.pixels import default_max_pixels
from ..errors import SampleError, ShardkitError
from ..read.base import Batching
from ..read.pipeline import collate, make_handler
from .cuda import CudaPrefetcher, cuda_device
from .decoders import make_backend
from .recipe import Recipe
from .ship import EncodedImage, shipping_dataset

# ------------------------------------------------------------ the main-process stage


def _apply_steps(tensor: torch.Tensor, image: EncodedImage, recipe: Recipe, cropped: bool) -> torch.Tensor:
    """Run the recipe's geometric steps on one CHW uint8 image with the worker's parameters."""
    from torchvision.transforms.v2 import functional as tvf

    for n, (step, param) in enumerate(zip(recipe.steps, image.params)):
        if step.kind == "rrc":
            if n == 0 and cropped:  # the decoder returned just the box
                tensor = tvf.resize(tensor, list(step.size), interpolation=step.interpolation, antialias=step.antialias)
            else:
                top, left, height, width = param
                tensor = tvf.resized_crop(
                    tensor,
                    top,
                    left,
                    height,
                    width,
                    list(step.size),
                    interpolation=step.interpolation,
                    antialias=step.antialias,
                )
        elif step.kind == "resize":
            tensor = tvf.resize(
                tensor, step.size, interpolation=step.interpolation, max_size=step.max_size, antialias=step.antialias
            )
        elif step.kind == "center_crop":
            tensor = tvf.center_crop(tensor, step.size)
        elif step.kind == "flip" and param:
            tensor = tvf.horizontal_flip(tensor)
    return tensor


def _slots(batch: Any) -> bool:
    """True for a batch of ``fields`` tuples: a tuple, or the list DataLoader's
    default_convert makes of it in the main process. Its items are slots, not samples."""
    return (
        isinstance(batch, (list, tuple))
        and not hasattr(batch, "_fields")
        and not (batch and isinstance(batch[0], EncodedImage))
    )


def _keep(obj: Any, keep: list[int], n: int, *, top: bool = True) -> Any:
    """Drop from a collated batch of ``n`` samples every sample not in ``keep`` (all fields)."""
    if top and _slots(obj):
        return type(obj)(_keep(v, keep, n, top=False) for v in obj)
    if isinstance(obj, torch.Tensor) and obj.dim() > 0 and obj.shape[0] == n:
        return obj[torch.tensor(keep, dtype=torch.long, device=obj.device)]
    if isinstance(obj, list) and len(obj) == n:
        return [obj[i] for i in keep]
    if isinstance(obj, Mapping):
        return {k: _keep(v, keep, n, top=False) for k, v in obj.items()}
    return obj


class BatchStage:
    """Turn every list of :class:`EncodedImage` in a collated batch into one image tensor.

    Per image: decode (``backend``), then the recipe's geometric steps with the worker's
    parameters; per batch: stack, dtype conversion, normalisation, channels-last. A
    sample that fails to decode goes to ``handler``: "raise" raises SampleError naming
    its key, "skip"/"warn" drop it from the batch (every field), so that batch is one
    shorter. The stage draws no random numbers: the order and the parameters are the
    workers', so resume stays exact.
    """

    def __init__(
        self,
        recipes: Sequence[Recipe],
        device: torch.device,
        *,
        backend: str = "auto",
        handlers: Sequence[str | Callable[[Exception], Any]] | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.recipes = list(recipes)
        self.device = device
        self.max_pixels = default_max_pixels(max_pixels)
        self.backend = make_backend(backend, device, self.max_pixels)
        # One per recipe: a sample's handler is the one of the dataset (or Mix part) it came from.
        self.handlers = [make_handler(h) for h in (handlers or ["raise"] * len(self.recipes))]
        self.seconds = 0.0
        self.skipped = 0

    def __call__(self, batch: Any) -> Any:
        started = time.perf_counter()
        failed: set[int] = set()
        n = _batch_length(batch)
        out = self._walk(batch, failed)
        if failed:
            out = _keep(out, [i for i in range(n) if i not in failed], n)
        finish = getattr(self.backend, "finish", None)
        if finish is not None:
            finish()
        self.seconds += time.perf_counter() - started
        return out

    def _walk(self, obj: Any, failed: set[int], *, top: bool = True) -> Any:
        if isinstance(obj, list) and obj and all(isinstance(x, EncodedImage) for x in obj):
            return self.images(obj, failed)
        if isinstance(obj, Mapping):
            return {k: self._walk(v, failed, top=False) for k, v in obj.items()}
        if top and _slots(obj):
            return type(obj)(self._walk(v, failed, top=False) for v in obj)
        return obj

    def images(self, images: Sequence[EncodedImage], failed: set[int] | None = None) -> torch.Tensor:
        """One (N, C, H, W) channels-last tensor on the device from N encoded images;
        indices of images that failed (and the handler skipped) are added to ``failed``
        and hold zeros until the caller drops them."""
        failed = set() if failed is None else failed
        recipes = [self.recipes[image.recipe] for image in images]
        first = recipes[0]
        if any(r.output_spec() != first.output_spec() for r in recipes):
            raise SampleError(
                "decode_device: one batch slot holds images with different output sizes or dtypes "
                "(give every alternative field the same final size and dtype)"
            )
        height, width = first.out_hw
        out = torch.empty((len(images), 3, height, width), dtype=torch.uint8, device=self.device)
        for i, (image, recipe, decoded) in enumerate(zip(images, recipes, self.backend.decode(images, recipes))):
            error = decoded.error
            if error is None and decoded.tensor is not None:
                try:
                    out[i] = _apply_steps(decoded.tensor, image, recipe, decoded.cropped)
                except torch.cuda.OutOfMemoryError:
                    raise  # the device's problem, not this sample's: never skipped by the handler
                except (RuntimeError, ValueError) as exc:
                    error = SampleError(f"{type(exc).__name__}: {exc}")
            if error is not None:
                reason = error.reason if isinstance(error, SampleError) else str(error)
                self.handlers[image.recipe](SampleError(reason, url=image.url, key=image.key))  # "raise" raises
                failed.add(i)
                self.skipped += 1
                out[i].zero_()
        return finish_batch(out, first)


def finish_batch(batch: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """dtype conversion and normalisation as the recipe says, then channels-last memory."""
    from torchvision.transforms.v2 import functional as tvf

    if recipe.dtype is not None:
        batch = tvf.to_dtype(batch, recipe.dtype, scale=True)
    if recipe.mean is not None:
        batch = tvf.normalize(batch, list(recipe.mean), list(recipe.std or ()))
    return batch.contiguous(memory_format=torch.channels_last)


def _batch_length(batch: Any) -> int:
    """The number of samples in a collated batch (its first list of EncodedImage)."""
    if isinstance(batch, list) and batch and isinstance(batch[0], EncodedImage):
        return len(batch)
    values = batch.values() if isinstance(batch, Mapping) else batch if _slots(batch) else ()
    for value in values:
        n = _batch_length(value)
        if n:
            return n
    return 0


# ------------------------------------------------------------ the loader's device stage


def _resolve(device: str | torch.device | int | None, what: str) -> torch.device | None:
    """None, a CPU device or a CUDA device (checked: a clear error when CUDA is missing)."""
    if device is None:
        return None
    resolved = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ShardkitError(f"{what} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    try:
        return cuda_device(resolved)
    except RuntimeError as exc:
        raise ShardkitError(f"ShardLoader({what}={str(device)!r}): {exc}") from exc


class DeviceStage:
    """What ShardLoader runs between the DataLoader and the training loop when
    ``device`` or ``decode_device`` is set: the batch stage, then (for CUDA) the copy
    of each batch one ahead on a side stream from pinned memory."""

    def __init__(self, target: torch.device, batch_stage: BatchStage | None, worker_dataset: Any) -> None:
        self.target = target
        self.batch_stage = batch_stage
        self.worker_dataset = worker_dataset  # what the DataLoader workers iterate

    @classmethod
    def build(
        cls,
        dataset: Any,
        batching: Batching,
        *,
        device: str | torch.device | int | None,
        decode_device: str | torch.device | int | None,
        decode_backend: str = "auto",
    ) -> DeviceStage | None:
        """Validate the loader's device options; None when neither is set."""
        target = _resolve(device, "device")
        decode_at = _resolve(decode_device, "decode_device")
        if decode_at is None:
            if decode_backend != "auto":
                raise ShardkitError("decode_backend only applies with decode_device='cuda' (or 'cpu')")
            return None if target is None or target.type == "cpu" else cls(target, None, dataset)
        if target is not None and target != decode_at and not (target.type == "cuda" and decode_at.type == "cpu"):
            raise ShardkitError(
                f"decode_device={str(decode_at)!r} yields batches on {decode_at}; device="
                f"{str(target)!r} would move them away again. Leave device unset"
            )
        if batching.batch_size is None:
            raise ShardkitError("decode_device decodes whole batches: set batch_size")
        if batching.collate_fn is not collate:
            raise ShardkitError("decode_device needs the default collate_fn (the workers collate encoded images)")
        worker_dataset, recipes, handlers = shipping_dataset(dataset)
        stage = BatchStage(recipes, decode_at, backend=decode_backend, handlers=handlers)
        return cls(target or decode_at, stage, worker_dataset)

    def wrap(self, pairs: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """``(batch, progress)`` pairs in, the same pairs with each batch staged (and on
        the device) out. The stage runs one batch ahead on CUDA; progress travels with
        its batch, so the loader records it only when the batch is handed out."""
        if self.batch_stage is not None:
            self.batch_stage.seconds, self.batch_stage.skipped = 0.0, 0
            self.batch_stage.backend.cpu_decoded = 0
        prepare = self._prepare if self.batch_stage is not None else None
        if self.target.type == "cuda":
            return iter(CudaPrefetcher(pairs, self.target, prepare=prepare))
        return map(self._prepare, pairs) if prepare is not None else iter(pairs)

    def _prepare(self, pair: tuple[Any, Any]) -> tuple[Any, Any]:
        item, progress = pair
        assert self.batch_stage is not None
        return self.batch_stage(item), progress

    def stats(self) -> dict[str, Any]:
        """``stage_s``: main-process seconds in the batch stage; ``decode_skipped``:
        samples dropped there by the handler; the decoder's name and ``cpu_decoded``, the
        images it left to the CPU decoder (non-JPEG, CMYK, rejected)."""
        if self.batch_stage is None:
            return {"device": str(self.target)}
        return {
            "device": str(self.target),
            "decode_backend": self.batch_stage.backend.name,
            "stage_s": self.batch_stage.seconds,
            "decode_skipped": self.batch_stage.skipped,
            "cpu_decoded": self.batch_stage.backend.cpu_decoded,
        }
