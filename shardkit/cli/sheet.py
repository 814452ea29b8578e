"""Drawing a contact sheet with Pillow: tiles of images, each with its key and caption.

The layout is a grid of ``columns`` cells; each cell is a square image box of ``tile``
pixels (the image fitted inside, aspect kept, centred) above a caption box holding the
key line and up to :data:`CAPTION_LINES` wrapped caption lines. A sample that could not
be decoded gets a marked image box (:data:`MARK_FILL` with a cross) and its error as the
caption.

Captions are UTF-8 text in any script the fonts cover. :class:`CaptionFont` takes the
first font of :data:`FONT_FILES` that Pillow finds installed (DejaVu Sans on Debian, from
``fonts-dejavu-core``: Latin, Greek, Cyrillic, Armenian, Georgian, Hebrew, Arabic, many
symbols and some emoji in monochrome), then the others as per-character fallbacks (CJK
when Noto CJK or Droid Sans Fallback is installed), then Pillow's built-in font (Latin
only). A character no font has is drawn as a box, never an error.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

#: Caption fonts in order of preference; Pillow searches the system font folders.
FONT_FILES = (
    "DejaVuSans.ttf",
    "NotoSans-Regular.ttf",
    "NotoSansCJK-Regular.ttc",
    "NotoSansCJKsc-Regular.otf",
    "DroidSansFallbackFull.ttf",
    "wqy-microhei.ttc",
)
CAPTION_LINES = 3  # wrapped caption lines under the key line
FONT_SIZE = 13
GAP = 8  # pixels between cells and around the sheet
BACKGROUND = (255, 255, 255)
BOX_FILL = (236, 236, 236)  # the image box behind a fitted image that does not fill it
MARK_FILL = (150, 20, 20)  # the image box of an undecodable sample
MARK_INK = (255, 215, 215)
EMPTY_FILL = (190, 190, 190)  # a sample without an image field
TEXT = (20, 20, 20)
KEY_TEXT = (90, 90, 90)
ERROR_TEXT = (150, 20, 20)
_NOTDEF_PROBE = "\U0010fffd"  # a private-use code point no text font maps: its mask is .notdef's


@dataclass
class Tile:
    """One sample as shown: its image (RGB, after any transform) or why there is none."""

    key: str
    url: str | None = None
    image: Image.Image | None = None
    caption: str = ""  # label name and/or text, "\n" between paragraphs
    sizes: str = ""  # e.g. "640×480", or "640×480→224×224" after a transform; on the key line
    error: str | None = None  # undecodable: the reason
    meta: dict[str, Any] = field(default_factory=dict)  # the sample as JSON (the HTML page shows it)


@dataclass(frozen=True)
class Layout:
    """Where each tile goes on a sheet of ``count`` tiles in ``columns`` columns."""

    count: int
    columns: int
    tile: int
    line_height: int
    gap: int = GAP

    @property
    def rows(self) -> int:
        return math.ceil(self.count / self.columns)

    @property
    def caption_height(self) -> int:
        return (1 + CAPTION_LINES) * self.line_height + 4

    @property
    def cell_size(self) -> tuple[int, int]:
        return self.tile, self.tile + self.caption_height

    @property
    def size(self) -> tuple[int, int]:
        """The sheet's (width, height) in pixels."""
        w, h = self.cell_size
        return self.columns * (w + self.gap) + self.gap, self.rows * (h + self.gap) + self.gap

    def image_box(self, i: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of tile ``i``'s square image box."""
        w, h = self.cell_size
        x = self.gap + (i % self.columns) * (w + self.gap)
        y = self.gap + (i // self.columns) * (h + self.gap)
        return x, y, x + self.tile, y + self.tile

    def placed(self, i: int, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The box an image of ``image_size`` occupies in tile ``i`` (fitted, centred)."""
        left, top, _, _ = self.image_box(i)
        fw, fh = fit_size(image_size, self.tile)
        x, y = left + (self.tile - fw) // 2, top + (self.tile - fh) // 2
        return x, y, x + fw, y + fh


def make_layout(count: int, *, tile: int, columns: int | None = None, font: CaptionFont) -> Layout:
    """The grid for ``count`` tiles: ``columns`` wide (default up to 8)."""
    if count < 1:
        raise ValueError("a sheet needs at least one tile")
    columns = min(count, columns or 8)
    return Layout(count=count, columns=columns, tile=tile, line_height=font.line_height)


def fit_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """``size`` scaled to fit a ``side`` x ``side`` square, aspect kept."""
    w, h = size
    scale = side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def fitted(image: Image.Image, side: int) -> Image.Image:
    """``image`` resized to fit a ``side`` square: Lanczos, or nearest-neighbour when it
    grows by 2x or more (tiny images then show their real pixels, not a blur)."""
    size = fit_size(image.size, side)
    if size == image.size:
        return image
    grow = size[0] / image.size[0]
    resample = Image.Resampling.NEAREST if grow >= 2 else Image.Resampling.LANCZOS
    return image.resize(size, resample, reducing_gap=None if grow >= 1 else 3.0)


def marked_box(side: int, label: str, font: CaptionFont, *, fill: tuple[int, int, int] = MARK_FILL) -> Image.Image:
    """The square shown instead of an image: ``fill`` with a cross and ``label``."""
    box = Image.new("RGB", (side, side), fill)
    draw = ImageDraw.Draw(box)
    ink = MARK_INK if fill == MARK_FILL else TEXT
    inset = side // 6
    draw.line((inset, inset, side - inset, side - inset), fill=ink, width=max(2, side // 48))
    draw.line((inset, side - inset, side - inset, inset), fill=ink, width=max(2, side // 48))
    width = round(font.width(label))
    y = side - inset // 2 - font.line_height
    draw.rectangle((0, y - 2, side, y + font.line_height + 2), fill=fill)
    font.draw(draw, ((side - width) // 2, y), label, fill=ink)
    return box


def tile_picture(tile: Tile, side: int, font: CaptionFont) -> Image.Image:
    """What a tile shows in its image box: the fitted image or a marked square."""
    if tile.error is not None:
        return marked_box(side, "undecodable", font)
    if tile.image is None:
        return marked_box(side, "no image field", font, fill=EMPTY_FILL)
    return fitted(tile.image.convert("RGB"), side)


def draw_sheet(
    tiles: Sequence[Tile], *, tile: int = 192, columns: int | None = None, font: CaptionFont | None = None
) -> Image.Image:
    """A contact sheet of ``tiles`` in the grid :func:`make_layout` gives."""
    font = font or CaptionFont()
    layout = make_layout(len(tiles), tile=tile, columns=columns, font=font)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, t in enumerate(tiles):
        left, top, right, bottom = layout.image_box(i)
        draw.rectangle((left, top, right - 1, bottom - 1), fill=BOX_FILL)
        picture = tile_picture(t, layout.tile, font)
        sheet.paste(picture, layout.placed(i, picture.size)[:2])
        y = bottom + 2
        key_line = f"{t.key}  {t.sizes}" if t.sizes else t.key
        font.draw(draw, (left, y), font.wrap(key_line, layout.tile, 1)[0], fill=KEY_TEXT)
        text, colour = (t.error, ERROR_TEXT) if t.error is not None else (t.caption, TEXT)
        for n, line in enumerate(font.wrap(text, layout.tile, CAPTION_LINES), 1):
            font.draw(draw, (left, y + n * layout.line_height), line, fill=colour)
    return sheet


def _load(name: str, size: int) -> ImageFont.FreeTypeFont | None:
    try:
        return ImageFont.truetype(name, size)
    except OSError:
        return None


class CaptionFont:
    """Fonts for captions: the first of ``paths`` + :data:`FONT_FILES` found, the rest as
    per-character fallbacks, and a drawn box for a character none of them has."""

    def __init__(self, size: int = FONT_SIZE, *, paths: Sequence[str] = ()) -> None:
        fonts: list[Any] = []
        for path in paths:  # the user's own fonts must load
            try:
                fonts.append(ImageFont.truetype(path, size))
            except OSError as e:
                raise ValueError(f"cannot load font {path!r}: {e}") from None
        fonts.extend(f for f in (_load(name, size) for name in FONT_FILES) if f is not None)
        if not fonts:
            fonts.append(ImageFont.load_default(size))  # Pillow's own (Latin) font
        self.fonts = fonts
        self.size = size
        ascent, descent = fonts[0].getmetrics()
        self.ascent = ascent
        self.line_height = ascent + descent + 2
        self._notdef = [self._mask(f, _NOTDEF_PROBE) for f in fonts]
        self._which: dict[str, int | None] = {}

    @property
    def names(self) -> list[str]:
        """The fonts in use, e.g. ``["DejaVu Sans Book"]``."""
        return [" ".join(f.getname()) for f in self.fonts]

    @staticmethod
    def _mask(font: Any, ch: str) -> tuple[tuple[int, int], bytes]:
        mask = font.getmask(ch)
        return mask.size, bytes(mask)

    def font_for(self, ch: str) -> int | None:
        """Index of the first font with a glyph for ``ch``; None when none has one."""
        if ch not in self._which:
            found: int | None = None
            if ch.isspace():
                found = 0
            else:
                for i, f in enumerate(self.fonts):
                    if self._mask(f, ch) != self._notdef[i]:
                        found = i
                        break
            self._which[ch] = found
        return self._which[ch]

    def runs(self, text: str) -> list[tuple[int | None, str]]:
        """``text`` cut into runs drawn with one font each (None: draw a box per char).
        Marks and format characters (joiners, variation selectors) join the run before
        them, so the shaper places them; after a box (a missing base) they are dropped."""
        out: list[tuple[int | None, str]] = []
        for ch in text:
            if unicodedata.category(ch)[0] == "M" or unicodedata.category(ch) == "Cf":
                if out and out[-1][0] is not None:
                    out[-1] = (out[-1][0], out[-1][1] + ch)
                continue
            which = self.font_for(ch)
            if out and out[-1][0] == which:
                out[-1] = (which, out[-1][1] + ch)
            else:
                out.append((which, ch))
        return out

    def _box_width(self) -> int:
        return max(4, round(self.size * 0.6))

    def width(self, text: str) -> float:
        """Drawn width of one line of ``text`` in pixels."""
        total = 0.0
        for which, run in self.runs(text):
            if which is None:
                total += len(run) * (self._box_width() + 1)
            else:
                total += self.fonts[which].getlength(run)
        return total

    def draw(self, draw: ImageDraw.ImageDraw, xy: tuple[int, int], line: str, *, fill: tuple[int, ...]) -> None:
        """Draw one line with its top-left at ``xy`` (each run on the first font's baseline)."""
        x, top = float(xy[0]), xy[1]
        baseline = top + self.ascent
        for which, run in self.runs(line):
            if which is None:
                w = self._box_width()
                for _ in run:
                    draw.rectangle((x, baseline - round(self.size * 0.72), x + w - 1, baseline), outline=fill)
                    x += w + 1
            else:
                font = self.fonts[which]
                draw.text((x, baseline), run, font=font, fill=fill, anchor="ls")
                x += font.getlength(run)

    def wrap(self, text: str, width: int, max_lines: int) -> list[str]:
        """``text`` broken into at most ``max_lines`` lines of at most ``width`` pixels:
        at spaces where it can, inside a word (or unspaced script) where it must; "\\n"
        starts a new line; text past the last line ends in an ellipsis."""
        lines: list[str] = []
        for paragraph in text.replace("\t", " ").split("\n"):
            paragraph = "".join(ch for ch in paragraph if unicodedata.category(ch) != "Cc")
            line = ""
            for token in re.findall(r"\s+|\S+", paragraph):
                if len(lines) > max_lines:
                    break  # enough to know it overflows
                if self.width(line + token) <= width:
                    line += token
                    continue
                if line.strip():
                    lines.append(line.rstrip())
                line = "" if token.isspace() else token
                while self.width(line) > width and len(line) > 1:  # a word wider than a line
                    cut = len(line) - 1
                    while cut > 1 and self.width(line[:cut]) > width:
                        cut -= 1
                    lines.append(line[:cut])
                    line = line[cut:]
            lines.append(line.rstrip())
            if len(lines) > max_lines:
                break
        lines = [ln for ln in lines if ln] or [""]
        if len(lines) > max_lines:
            last = lines[max_lines - 1]
            while last and self.width(last + "…") > width:
                last = last[:-1]
            lines = lines[: max_lines - 1] + [last + "…"]
        return lines
