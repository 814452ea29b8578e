"""Image files as a sample source: an ImageFolder tree or a list file; and the loading of
one image (read, real format, decode check, re-encode) that tables share.

- folder: ``SRC/<class>/**/<image>`` (labels = index of the class in sorted class names),
  or a flat folder of images (no labels).
- list: one ``path<TAB>label`` per line (label optional; ``#`` comments).
Tables of image paths with more columns (CSV, TSV, JSONL, Parquet) are
:mod:`shardkit.ingest.table`. Relative paths resolve against the list file's folder. Integer labels are used as
they are; label names become indices into their sorted set (recorded as classes).

Images are stored byte-for-byte as on disk, under the extension of their real format
(probed from magic bytes), unless re-encoding is asked for (resize / quality): then the
pixels go through the reader's pixel policy (:func:`shardkit.decode.pixels.pil_to_rgb`) and are
turned upright by their EXIF orientation before resizing. Files that are not images, or
do not fully decode (unless ``validate`` is off), are reported and skipped (or fatal
with ``strict``).
"""

from __future__ import annotations

import io
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..decode.check import check_image
from ..decode.imageinfo import probe_image
from ..decode.pixels import upright_rgb
from ..errors import ShardkitError
from ..threadmap import ordered_map
from . import IngestOptions
from .common import Warned, sniff_ext

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_PATH_COLUMNS = ("path", "file", "filename", "image", "img")
_LABEL_COLUMNS = ("label", "class", "cls", "target")


@dataclass(frozen=True)
class Entry:
    path: str  # absolute or cwd-relative path to read
    rel: str  # path as recorded in the sample's JSON
    label: int | None
    label_name: str | None


def detect(src: str, fmt: str) -> bool:
    if fmt == "folder":
        return os.path.isdir(src)
    if fmt == "list":  # a .tsv with a header naming its columns is a table (tried first)
        return os.path.isfile(src) and src.lower().endswith((".txt", ".lst", ".list", ".tsv"))
    return False


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _folder_entries(src: str) -> tuple[list[Entry], list[str] | None]:
    subdirs = sorted(d.name for d in os.scandir(src) if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        names = sorted(n for n in os.listdir(src) if _is_image_name(n))
        return [Entry(os.path.join(src, n), n, None, None) for n in names], None
    stray = [n for n in os.listdir(src) if os.path.isfile(os.path.join(src, n)) and _is_image_name(n)]
    if stray:
        log.warning("%s: ignoring %d image(s) outside class folders (e.g. %s)", src, len(stray), stray[0])
    entries = []
    for label, cls in enumerate(subdirs):
        root = os.path.join(src, cls)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            for n in sorted(filenames):
                if _is_image_name(n):
                    path = os.path.join(dirpath, n)
                    entries.append(
                        Entry(
                            path,
                            path[len(src) + 1 :] if path.startswith(src + "/") else os.path.relpath(path, src),
                            label,
                            cls,
                        )
                    )
    return entries, subdirs


def _labelled(rows: list[tuple[str, str | None]], base: str, src: str) -> tuple[list[Entry], list[str] | None]:
    """Turn (path, label text) rows into entries; names -> sorted class indices."""
    labels = [lab for _, lab in rows if lab not in (None, "")]
    numeric = all(_is_int(lab) for lab in labels)
    classes = None if numeric else sorted(set(labels))  # type: ignore[type-var]
    index = {c: i for i, c in enumerate(classes or [])}
    entries = []
    for path, lab in rows:
        full = path if os.path.isabs(path) else os.path.join(base, path)
        if lab in (None, ""):
            label, name = None, None
        elif numeric:
            label, name = int(lab), None  # type: ignore[arg-type]
        else:
            label, name = index[lab], lab
        entries.append(Entry(full, path, label, name))
    if not entries:
        raise ShardkitError(f"{src}: lists no images")
    return entries, classes


def _is_int(text: Any) -> bool:
    try:
        int(text)
        return True
    except (TypeError, ValueError):
        return False


def _list_entries(src: str) -> tuple[list[Entry], list[str] | None]:
    rows: list[tuple[str, str | None]] = []
    with open(src, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) > 2:
                raise ShardkitError(f"{src}: line {lineno}: expected 'path<TAB>label', got {len(parts)} fields")
            rows.append((parts[0], parts[1].strip() if len(parts) == 2 else None))
    return _labelled(rows, os.path.dirname(os.path.abspath(src)), src)


def looks_truncated(ext: str, data: bytes) -> bool:
    """Cheap end-marker check: a JPEG without EOI or a PNG without IEND was cut short."""
    if ext == "jpg":
        return b"\xff\xd9" not in data[-64:]
    if ext == "png":
        return b"IEND" not in data[-16:]
    return False


def _reencode(data: bytes, max_side: int | None, quality: int | None) -> tuple[bytes, int, int]:
    """Decode with the reader's pixel policy (16-bit scaled, alpha dropped, first frame,
    ...), turn the pixels upright by the EXIF orientation, resize, encode as JPEG.

    The output carries no EXIF block, so no orientation tag can rotate it a second time.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = upright_rgb(img)
        if max_side and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=quality or 90, optimize=False)
        return out.getvalue(), img.width, img.height


class Prepared(NamedTuple):
    """An image ready to store: its extension (real format), bytes, size (None when the
    header does not say) and the decoder warning it decoded with, if any."""

    ext: str
    data: bytes
    width: int | None
    height: int | None
    warning: str | None


def prepare_image(
    data: bytes,
    *,
    validate: bool = True,
    max_pixels: int | None = None,
    strict: bool = False,
    resize: int | None = None,
    quality: int | None = None,
) -> Prepared | str:
    """Check and (when asked) re-encode one image; the reason it cannot be stored otherwise.

    The extension comes from the bytes, never from a file name. ``validate``: fully decoded
    (:func:`shardkit.decode.check.check_image`); a decoder warning the reader tolerates is
    returned with the image (``strict``: it is a reason to skip). ``resize``/``quality``:
    re-encoded as JPEG after the check.
    """
    info = probe_image(data)
    ext = info.ext if info is not None else sniff_ext(data)
    if ext is None:
        return "not a recognised image format"
    if looks_truncated(ext, data):
        return f"truncated {ext} (no end marker)"
    width, height = (info.width, info.height) if info is not None else (None, None)
    warning = None
    if validate:
        check = check_image(data, max_pixels=max_pixels)
        if check.problem:
            return check.problem
        if check.warning and strict:
            return f"decodes only with a warning: {check.warning}"
        warning = check.warning
    if resize or quality:
        try:
            data, width, height = _reencode(data, resize, quality)
        except Exception as e:  # PIL raises many types for corrupt data
            return f"cannot decode to re-encode: {e}"
        ext = "jpg"
    return Prepared(ext, data, width, height, warning)


@dataclass(frozen=True)
class ImageChecks:
    """How each image is checked and (when asked) re-encoded before it is stored: the
    arguments of :func:`prepare_image`, kept together for the writers' worker processes."""

    validate: bool = True
    max_pixels: int | None = None
    strict: bool = False
    resize: int | None = None
    quality: int | None = None

    @classmethod
    def of(cls, options: IngestOptions, *, resize: int | None, quality: int | None) -> ImageChecks:
        """The checks an ingest source's options and re-encoding settings ask for."""
        return cls(
            validate=options.validate,
            max_pixels=options.max_pixels,
            strict=options.strict,
            resize=resize,
            quality=quality,
        )

    def prepare(self, data: bytes) -> Prepared | str:
        """:func:`prepare_image` with these settings."""
        return prepare_image(
            data,
            validate=self.validate,
            max_pixels=self.max_pixels,
            strict=self.strict,
            resize=self.resize,
            quality=self.quality,
        )


@dataclass(frozen=True)
class EntryLoader:
    """Read one image file and build its sample, or say why it is skipped: ``(path, reason)``.

    With ``checks.validate`` every image is fully decoded (:func:`shardkit.decode.check.check_image`),
    so a file truncated in the middle, corrupt, in a codec PIL cannot read or over the pixel
    limit is skipped with its reason instead of being stored; one that decodes only with a
    warning the reader tolerates comes back as :class:`~shardkit.ingest.common.Warned`
    (``checks.strict``: skipped instead). Picklable: it runs in the writer's worker processes.
    """

    checks: ImageChecks = ImageChecks()

    def __call__(self, item: tuple[str, Entry]) -> dict[str, Any] | Warned | tuple[str, str]:
        key, entry = item
        try:
            with open(entry.path, "rb") as f:
                data = f.read()
        except OSError as e:
            return entry.path, f"cannot read: {e.strerror}"
        image = self.checks.prepare(data)
        if isinstance(image, str):
            return entry.path, image
        ext, data, width, height, warning = image
        meta: dict[str, Any] = {"path": entry.rel, "width": width, "height": height}
        sample: dict[str, Any] = {"__key__": key, ext: data}
        if entry.label is not None:
            sample["cls"] = entry.label
            meta["label"] = entry.label_name if entry.label_name is not None else entry.label
        sample["json"] = meta
        return Warned(sample, ((entry.path, f"{ext}: {warning}"),)) if warning else sample


class FileSource:
    """Samples from image files; iterate for sample dicts, in a deterministic order."""

    def __init__(
        self,
        src: str,
        fmt: str,
        options: IngestOptions,
        *,
        shuffle: bool = False,
        seed: int = 0,
        resize: int | None = None,
        quality: int | None = None,
    ) -> None:
        self.src = src
        if fmt == "folder":
            entries, self.classes = _folder_entries(src)
        else:
            entries, self.classes = _list_entries(src)
        if not entries:
            raise ShardkitError(f"{src}: found no image files")
        # Keys come from the source order, so shuffled output keeps stable keys.
        width = max(6, len(str(len(entries) - 1)))
        self.entries = [(f"{i:0{width}d}", e) for i, e in enumerate(entries)]
        if shuffle:
            random.Random(seed).shuffle(self.entries)
        self.options = options
        self.resize = resize
        self.quality = quality
        self.skipped: list[tuple[str, str]] = []  # (path, reason)
        self.warned: list[tuple[str, str]] = []  # (path, decoder warning): kept

    def __len__(self) -> int:
        return len(self.entries)

    def loader(self) -> EntryLoader:
        """The picklable per-file work (read, check, build the sample) for worker processes."""
        return EntryLoader(ImageChecks.of(self.options, resize=self.resize, quality=self.quality))

    def _load(self, item: tuple[str, Entry]) -> dict[str, Any] | Warned | tuple[str, str]:
        return self.loader()(item)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = max(1, self.options.workers)
        load = self.loader()
        if workers == 1:
            results: Iterator[Any] = map(load, self.entries)
        else:
            results = ordered_map(load, self.entries, workers, window=workers * 8)
        for result in results:
            if isinstance(result, tuple):
                path, reason = result
                if self.options.strict:
                    raise ShardkitError(f"{path}: {reason}")
                log.warning("skipping %s: %s", path, reason)
                self.skipped.append(result)
                continue
            if isinstance(result, Warned):
                log.info("%s: decoded with a warning: %s", *result.warnings[0])
                self.warned.extend(result.warnings)
                result = result.sample
            yield result


def open_source(src: str, fmt: str, options: IngestOptions, **kwargs: Any) -> FileSource:
    return FileSource(src, fmt, options, **kwargs)
