"""The worker side of ``decode_device``: read, draw the transform's parameters, ship encoded bytes.

:class:`ShipTransform` replaces a dataset's transform in the workers: small fields are
decoded as usual, each image field stays encoded as an :class:`EncodedImage` carrying
its header size and the random parameters drawn with torchvision's RNG calls, so order
and resume stay exact. :func:`shipping_dataset` builds the shipping view of a
``ShardDataset`` or ``Mix`` through their public ``with_stages``/``with_parts``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

from ..decode.fields import IMAGE_EXTENSIONS, make_decoder
from ..decode.imageinfo import read_image_header
from ..decode.pixels import check_pixels, default_max_pixels, exif_orientation_of
from ..errors import SampleError, ShardkitError
from ..read.dataset import ShardDataset
from ..read.mix import Mix
from .recipe import Recipe, parse_recipe

# --------------------------------------------------------------- the worker side


class EncodedImage:
    """An image still encoded, with its header size and the transform parameters the
    worker drew; what crosses from a worker to the main process in place of pixels."""

    __slots__ = ("data", "height", "width", "batchable", "params", "recipe", "key", "url", "upright", "orientation")

    def __init__(
        self,
        data: bytes,
        height: int,
        width: int,
        batchable: bool,
        params: tuple[Any, ...],
        recipe: int,
        key: str | None = None,
        url: str | None = None,
        upright: bool = False,
        orientation: int = 1,
    ) -> None:
        self.data, self.height, self.width, self.batchable = data, height, width, batchable
        self.params, self.recipe, self.key, self.url = params, recipe, key, url
        self.upright = upright  # decode with the EXIF orientation applied (height/width are upright)
        self.orientation = orientation  # the EXIF orientation tag in the file (1: none or as stored)

    def __reduce__(self) -> tuple[Any, ...]:
        return EncodedImage, (
            self.data,
            self.height,
            self.width,
            self.batchable,
            self.params,
            self.recipe,
            self.key,
            self.url,
            self.upright,
            self.orientation,
        )

    def __repr__(self) -> str:
        return f"EncodedImage({len(self.data)} bytes, {self.width}x{self.height}, key={self.key!r})"


def encode_for_batch(
    data: bytes | bytearray | memoryview,
    recipe: Recipe,
    index: int,
    *,
    max_pixels: int | None,
    key: str | None = None,
    url: str | None = None,
    exif: bool = False,
) -> EncodedImage:
    """Read the size from the header, apply the pixel guard and draw ``recipe``'s parameters.

    ``batchable`` is True for baseline/progressive JPEGs with 1 or 3 components, the files
    the GPU decoders can take in a batch; everything else is decoded on the CPU in the main
    process. Which batchable images a decoder takes also depends on the EXIF orientation
    (``orientation``, ``upright``): see :meth:`shardkit.gpu.decoders.BatchDecoder.takes`.
    """
    data = bytes(data)
    header = read_image_header(data)
    if header is not None:
        height, width = header.height, header.width
        batchable = header.format == "JPEG" and header.components in (1, 3)
        orientation = header.orientation
    else:  # BMP, TIFF, PNM...: PIL's lazy open reads the header only
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                orientation = exif_orientation_of(image) if exif else 1
        except Exception as exc:
            raise SampleError(f"not a readable image: {exc}") from exc
        batchable = False
    check_pixels(width, height, max_pixels)
    # With exif (the dataset's exif_orientation), a turned photo is decoded upright, as on
    # the worker path (by a decoder that applies EXIF, else on the CPU), and its parameters
    # are drawn on the upright size.
    upright = exif and orientation != 1
    if upright and orientation in (5, 6, 7, 8):
        height, width = width, height
    params = recipe.draw(height, width)
    return EncodedImage(data, height, width, batchable, params, index, key, url, upright, orientation)


class ShipTransform:
    """The worker-side transform of the GPU path: image fields become EncodedImage (with
    drawn parameters), the other per-field callables of the dataset's transform still run,
    in the dataset's order (so the RNG is drawn in the same order as on the CPU path)."""

    def __init__(
        self,
        steps: Sequence[tuple[str | None, int | Callable[[Any], Any]]],
        recipes: Sequence[Recipe],
        max_pixels: int | None,
        offset: int = 0,
        exif: bool = False,
    ) -> None:
        self.exif = exif  # the dataset's exif_orientation
        self.steps = list(steps)  # (field or None for every image field, recipe index or callable)
        self.recipes = list(recipes)
        self.max_pixels = max_pixels
        self.offset = offset  # where this dataset's recipes start in the stage's list (Mix parts)

    def _encode(self, sample: dict, field: str, index: int) -> None:
        sample[field] = encode_for_batch(
            sample[field],
            self.recipes[index],
            self.offset + index,
            max_pixels=self.max_pixels,
            key=sample.get("__key__"),
            url=sample.get("__url__"),
            exif=self.exif,
        )

    def __call__(self, sample: dict) -> dict:
        for field, what in self.steps:
            if field is None:  # a whole-sample transform: it applies to the sample's image
                images = [
                    f
                    for f in sample
                    if not f.startswith("__")
                    and f.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS
                    and isinstance(sample[f], (bytes, bytearray, memoryview))
                ]
                if len(images) > 1:
                    raise SampleError(
                        f"decode_device with a whole-sample transform takes one image per sample, "
                        f"this one has {images}; use transform={{'{images[0]}': ...}}"
                    )
                for f in images:
                    self._encode(sample, f, what)  # type: ignore[arg-type]
            elif field in sample:
                if isinstance(what, int):
                    self._encode(sample, field, what)
                else:
                    sample[field] = what(sample[field])
        return sample


def _takeover(dataset: ShardDataset, offset: int) -> tuple[ShipTransform, Callable[[dict], dict], list[Recipe]]:
    """The worker-side decoder and transform for ``dataset``, or ShardkitError."""
    if dataset.decode != "torch":
        raise ShardkitError(
            f"decode_device needs the dataset built with decode='torch' (got {dataset.decode!r}): "
            "the batch stage yields uint8/float tensors as decode='torch' does"
        )
    if dataset.decode_size is not None or dataset.fuse_crop:  # "exact" resolves to None but fuses on the CPU
        raise ShardkitError("decode_device decodes at full size (or only the crop region); drop decode_size")
    if dataset.replaced_stages:
        raise ShardkitError(
            f"decode_device takes over the dataset's decoder and transform, but its "
            f"{' and '.join(dataset.replaced_stages)} was replaced with with_stages(); give it the dataset "
            "as configured"
        )
    transform = dataset.transform
    recipes: list[Recipe] = []
    steps: list[tuple[str | None, int | Callable[[Any], Any]]] = []
    raw: dict[str, Callable[[bytes], Any]] = {}
    if isinstance(transform, Mapping):
        for field, fn in transform.items():
            if field.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                recipes.append(parse_recipe(fn))
                steps.append((field, len(recipes) - 1))
                raw[field] = bytes  # keep the field encoded: the stage decodes it
            else:
                steps.append((field, fn))
    elif transform is not None:
        recipes.append(parse_recipe(transform))
        steps.append((None, 0))
        raw = dict.fromkeys(IMAGE_EXTENSIONS, bytes)
    if not recipes:
        raise ShardkitError(
            "decode_device needs an image transform to take over, e.g. "
            "transform={'jpg': v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()])}"
        )
    max_pixels = default_max_pixels(None)
    decoder = make_decoder("torch", handlers=raw, allow_pickle=dataset.allow_pickle, max_pixels=max_pixels)
    return ShipTransform(steps, recipes, max_pixels, offset, exif=dataset.exif_orientation), decoder, recipes


def _shipping_part(dataset: ShardDataset, offset: int) -> tuple[ShardDataset, list[Recipe]]:
    transform, decoder, recipes = _takeover(dataset, offset)
    # A view: it shares the dataset's epoch, so set_epoch reaches the workers.
    return dataset.with_stages(decoder=decoder, transform=transform), recipes


def shipping_dataset(dataset: ShardDataset | Mix) -> tuple[Any, list[Recipe], list[Any]]:
    """A view of ``dataset`` (or of every part of a Mix) whose workers ship encoded images
    (see module docstring), the recipes the main-process stage runs, and the handler of
    the dataset each recipe came from. The original is never modified."""
    if isinstance(dataset, ShardDataset):
        clone, recipes = _shipping_part(dataset, 0)
        return clone, recipes, [dataset.handler] * len(recipes)
    parts: list[ShardDataset] = []
    recipes, handlers = [], []
    for part in dataset.datasets:
        shipping, own = _shipping_part(part, len(recipes))
        parts.append(shipping)
        recipes += own
        handlers += [part.handler] * len(own)
    return dataset.with_parts(parts), recipes, handlers
