"""``shardkit show URL...``: pick samples, decode (and transform) them, draw a contact sheet.

Samples come through :class:`~shardkit.read.dataset.ShardDataset` (local, HTTP or S3,
compressed or not): its ``select=`` keeps the keys asked for, it decodes with
``decode="pil"`` (EXIF orientation applied, so phone photos stand upright) and applies
the ``--transform`` preset that ``shardkit doctor`` knows, seeded per sample by
:func:`tile_seed` so a sample shows the same crop whichever others are shown with it. A
sample the dataset cannot decode or transform reaches its error handler, which logs one
line and leaves a marked tile in its place. The drawing is :mod:`.sheet` (PNG) and
:mod:`.html` (a static page).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import zlib
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ShardkitError

# The CLI builds every subparser on each run: the drawing, decoding and torch imports
# (doctor's presets import torch) wait until ``show`` runs.
if TYPE_CHECKING:
    from PIL import Image

    from .sheet import Tile

log = logging.getLogger(__name__)

IMAGE_FIELDS = "jpg;jpeg;png;webp;ppm;pgm;pbm;pnm;bmp;tif;tiff;gif;npy"
DEFAULT_FIELDS = f"{IMAGE_FIELDS} cls;cls2;class txt;text;caption"


def tile_seed(seed: int, key: str) -> int:
    """The torch seed ``--transform`` draws a sample's randomness from: a function of
    ``--seed`` and the key only (stable across runs, processes and Python versions)."""
    return zlib.crc32(f"{seed}\0{key}".encode())


def to_pil(value: Any) -> Image.Image:
    """An RGB PIL image from a decoded image: PIL, HWC/HW numpy, or CHW torch tensor."""
    import numpy as np
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if hasattr(value, "permute") and hasattr(value, "numpy"):  # torch tensor, CHW
        value = value.detach().cpu()
        value = value.permute(1, 2, 0).numpy() if value.dim() == 3 else value.numpy()
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"not an image: array of shape {array.shape}")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and float(np.nanmax(array)) <= 1.0:
            array = array * 255.0
        array = np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


def _size(value: Any) -> str:
    from PIL import Image

    w, h = (value if isinstance(value, Image.Image) else to_pil(value)).size
    return f"{w}×{h}"


class SeededTransform:
    """A sample-dict transform that applies ``fn`` to the first present image field,
    with torch's global RNG seeded by :func:`tile_seed`, and records the size before."""

    def __init__(self, fn: Callable[[Any], Any] | None, image_fields: Sequence[str], seed: int) -> None:
        self.fn = fn
        self.image_fields = list(image_fields)
        self.seed = seed

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        field = next((f for f in self.image_fields if f in sample), None)
        if field is None:
            return sample
        sample = dict(sample)
        before = _size(sample[field])
        sample["__shown__"] = field
        if self.fn is None:
            sample["__sizes__"] = before
            return sample
        import torch

        torch.manual_seed(tile_seed(self.seed, str(sample.get("__key__"))))
        sample[field] = self.fn(sample[field])
        sample["__sizes__"] = f"{before}→{_size(sample[field])}"
        return sample


def _text(value: Any, classes: Sequence[str] | None) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str):
            return value
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).decode("utf-8", "replace")
        if isinstance(value, (dict, list)):
            return json.dumps(value, ensure_ascii=False)
        return str(value)
    if classes and 0 <= value < len(classes):
        return f"{classes[value]} ({value})"
    return f"label {value}"


def _json_value(value: Any) -> Any:
    import numpy as np
    from PIL import Image

    if isinstance(value, Image.Image):
        return f"image {value.width}×{value.height}"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{len(value)} bytes"
    if isinstance(value, np.ndarray):
        return f"array {'×'.join(map(str, value.shape))} {value.dtype}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a tensor
        return f"tensor {'×'.join(map(str, value.shape))} {value.dtype}"
    if isinstance(value, (str, int, float, bool, dict, list)) or value is None:
        return value
    return str(value)


def make_tile(sample: dict[str, Any], slots: list[list[str]], classes: Sequence[str] | None) -> Tile:
    """The tile of a decoded (and transformed) sample."""
    from .sheet import Tile

    key = str(sample.get("__key__"))
    captions = []
    for slot in slots:
        field = next((f for f in slot if f in sample), None)
        if field is not None:
            captions.append(_text(sample[field], classes))
    shown = sample.get("__shown__")
    meta: dict[str, Any] = {"__key__": key, "__url__": sample.get("__url__")}
    for name, value in sample.items():
        if not name.startswith("__"):
            meta[name] = _json_value(value)
            if name in ("cls", "cls2", "class") and isinstance(value, int) and classes and 0 <= value < len(classes):
                meta[f"{name}_name"] = classes[value]
    return Tile(
        key=key,
        url=sample.get("__url__"),
        image=to_pil(sample[shown]) if shown is not None else None,
        caption="\n".join(captions),
        sizes=sample.get("__sizes__", ""),
        meta=meta,
    )


def failed_tile(error: Exception) -> Tile:
    """The marked tile of a sample the dataset could not decode or transform."""
    from .sheet import Tile

    key = getattr(error, "key", None) or getattr(error, "member", None) or "?"
    url = getattr(error, "url", None)
    reason = str(getattr(error, "reason", error))
    return Tile(
        key=str(key),
        url=url,
        error=reason,
        meta={"__key__": key, "__url__": url, "error": reason},
    )


def collect_tiles(
    urls: str | Sequence[str],
    *,
    count: int = 32,
    transform: str = "none",
    seed: int = 0,
    keys: Sequence[str] | None = None,
    fields: str = DEFAULT_FIELDS,
    shuffle: bool = False,
) -> tuple[list[Tile], list[str]]:
    """Up to ``count`` tiles from the shards (only ``keys`` when given, in that order,
    each once), and the keys asked for that the shards do not hold. ``fields``: the image
    field's alternatives, then one slot per caption line (e.g. ``"jpg;png cls txt"``)."""
    from ..decode.fields import IMAGE_EXTENSIONS
    from ..read.dataset import ShardDataset
    from ..read.pipeline import parse_fields
    from .doctor import make_transform

    if count < 1:
        raise ValueError("--count must be at least 1")
    slots = parse_fields(fields)
    image_fields, caption_slots = slots[0], slots[1:]
    unknown = [f for f in image_fields if f.rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS | {"npy"}]
    if unknown:
        raise ValueError(f"--fields: {', '.join(unknown)} is not an image field (the first slot is the image)")
    wanted = list(dict.fromkeys(keys)) if keys else None
    wanted_set = set(wanted or ())
    errors: list[Exception] = []

    def on_error(exc: Exception) -> None:
        errors.append(exc)

    source = urls if isinstance(urls, str) else urls[0] if len(urls) == 1 else list(urls)
    ds = ShardDataset(
        source,
        decode="pil",
        transform=SeededTransform(make_transform(transform), image_fields, seed),
        handler=on_error,
        select=(lambda s: s["__key__"] in wanted_set) if wanted else None,
        shuffle=bool(shuffle),
        seed=seed,
    )
    classes = ds.shards.manifest.classes if ds.shards.manifest is not None else None
    limit = min(count, len(wanted)) if wanted else count
    tiles: list[Tile] = []
    shown: set[str] = set()
    samples = iter(ds)
    # --transform seeds torch's global RNG per sample: the caller's RNG state is restored after.
    with _own_rng(transform != "none"), contextlib.closing(_with_errors(samples, errors)) as items:
        for item in items:
            if isinstance(item, Exception):
                log.warning("undecodable sample, drawn as a marked tile: %s", item)
                tile = failed_tile(item)
            else:
                tile = make_tile(item, caption_slots, classes)
            if wanted and (tile.key not in wanted_set or tile.key in shown):
                continue  # a read error outside the keys asked for (logged), or a repeated key
            tiles.append(tile)
            shown.add(tile.key)
            if len(tiles) >= limit:
                break
    if wanted:
        order = {k: i for i, k in enumerate(wanted)}
        tiles.sort(key=lambda t: order[t.key])
    missing = [k for k in wanted or () if k not in shown] if len(tiles) < limit else []
    return tiles, missing


def _own_rng(seeded: bool) -> contextlib.AbstractContextManager[Any]:
    if not seeded:
        return contextlib.nullcontext()
    import torch

    return torch.random.fork_rng(devices=[])


def _with_errors(samples: Iterator[Any], errors: list[Exception]) -> Generator[Any, None, None]:
    """The dataset's samples with the errors its handler saw, in stream order (the
    handler runs synchronously, just before the next sample comes out). Closing this
    closes the dataset's iterator, and with it any open shard stream."""
    try:
        for sample in samples:
            while errors:
                yield errors.pop(0)
            yield sample
        while errors:
            yield errors.pop(0)
    finally:
        close = getattr(samples, "close", None)
        if close is not None:
            close()


def cmd_show(args: argparse.Namespace) -> int:
    """Run ``shardkit show``."""
    from .sheet import CaptionFont, draw_sheet

    if args.tile < 32:
        raise ValueError("--tile must be at least 32 pixels")
    if args.columns is not None and args.columns < 1:
        raise ValueError("--columns must be at least 1")
    count = args.count if args.count is not None else len(args.select) if args.select else 32
    if args.select and count < len(set(args.select)):
        raise ValueError(f"--count {count} is fewer than the {len(set(args.select))} keys of --select")
    font = CaptionFont(paths=[args.font] if args.font else ())
    tiles, missing = collect_tiles(
        args.urls,
        count=count,
        transform=args.transform,
        seed=args.seed,
        keys=args.select,
        fields=args.fields,
        shuffle=args.shuffle,
    )
    for key in missing:
        log.warning("key %r not found in %s", key, " ".join(args.urls))
    if not tiles:
        raise ShardkitError(f"no samples to show from {' '.join(args.urls)}")
    output = args.output or (None if args.html else "sheet.png")
    written: dict[str, Any] = {"samples": len(tiles), "undecodable": sum(t.error is not None for t in tiles)}
    lines = []
    if output:
        sheet = draw_sheet(tiles, tile=args.tile, columns=args.columns, font=font)
        sheet.save(output)
        written["sheet"] = output
        lines.append(f"wrote {output}: {len(tiles)} samples, {sheet.width}×{sheet.height} px")
    if args.html:
        from .html import write_html

        page = write_html(tiles, args.html, title=" ".join(args.urls), font=font)
        written["html"] = page
        lines.append(f"wrote {page}: {len(tiles)} samples (open it in a browser; no server needed)")
    written["missing"] = missing
    if written["undecodable"]:
        lines.append(f"{written['undecodable']} undecodable sample(s): marked tiles")
    if args.json:
        sys.stdout.write(json.dumps(written, indent=1) + "\n")
    elif not args.quiet:
        sys.stdout.write("\n".join(lines) + "\n")
    return 1 if missing or written["undecodable"] else 0


def add_show_parser(subparsers: Any, *, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """Register ``shardkit show`` on the CLI's subparsers (``parents``: shared options)."""
    help = "draw a contact sheet (and/or a static HTML page) of samples: images, keys, labels, captions"
    p = subparsers.add_parser(
        "show",
        help=help,
        description=help,
        parents=list(parents),
        epilog="example: shardkit show shards/ -o sheet.png --count 32 --transform rrc224+flip\n"
        "exit codes: 0 ok, 1 undecodable samples or keys not found (or an error), 2 usage error",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("urls", nargs="+", metavar="URL", help="shards: pattern, folder, manifest, http(s):// or s3://")
    p.add_argument("-o", "--output", metavar="PNG", help="the contact sheet (default sheet.png, none with --html)")
    p.add_argument("--count", type=int, help="samples to show (default 32, or the keys of --select)")
    p.add_argument(
        "--transform",
        default="none",
        help="show the samples after this `shardkit doctor` preset, e.g. rrc224+flip (default none: as decoded)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --transform and --shuffle (default 0)")
    p.add_argument("--shuffle", action="store_true", help="shuffled shard order and a 1000-sample shuffle buffer")
    p.add_argument("--select", nargs="+", metavar="KEY", help="show these keys, in this order (after the URLs)")
    p.add_argument(
        "--fields",
        default=DEFAULT_FIELDS,
        help="the image field's alternatives, then a slot per caption line "
        f"(default {DEFAULT_FIELDS!r}; e.g. 'png cls txt')",
    )
    p.add_argument("--html", metavar="DIR", help="also write DIR/index.html: thumbnails, captions, JSON, key filter")
    p.add_argument("--tile", type=int, default=192, help="tile side in pixels (default 192)")
    p.add_argument("--columns", type=int, help="tiles per row (default: up to 8)")
    p.add_argument("--font", metavar="TTF", help="caption font tried before the built-in list (e.g. a CJK font)")
    p.set_defaults(func=cmd_show)
    return p
