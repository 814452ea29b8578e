"""``shardkit doctor --plot PNG``: where the loader's time goes, as a bar chart (Pillow only).

One horizontal bar per stage (ms per delivered image, summed over workers, as in the
doctor's report) and the main process's CPU, the stage that bounds the run in another
colour; below them, the loader's decode + transform time per image beside the same work
on one core alone (the reference), and the CPU per image of all processes. One scale
for every bar, so lengths compare directly. Headless: nothing but Pillow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from .profiling import STAGES
from .sheet import CaptionFont

if TYPE_CHECKING:
    from .doctor import Diagnosis

STAGE_BAR = (70, 120, 190)
BOUND_BAR = (220, 110, 30)  # the stage that bounds the run
REFERENCE_BAR = (90, 160, 90)
TOTAL_BAR = (150, 150, 150)
WIDTH = 960
LABEL_WIDTH = 300
BAR_SPACE = 520  # pixels for the longest bar
ROW = 26
BAR_HEIGHT = 16
_BOUND_STAGE = {"io": "read", "overhead": "other"}  # Diagnosis.bound -> the stage it names


@dataclass(frozen=True)
class Bar:
    """One drawn bar: its label, value (ms per image) and pixel box (left, top, right, bottom)."""

    label: str
    value: float
    colour: tuple[int, int, int]
    box: tuple[int, int, int, int]


def chart_rows(d: Diagnosis) -> list[list[tuple[str, float, tuple[int, int, int]]]]:
    """The bars, in two groups: per stage, then the loader against the one-core reference."""
    bound_stage = _BOUND_STAGE.get(d.bound, d.bound)
    names = {"read": "read/io"}
    stages = [
        (names.get(stage, stage), d.stage_ms.get(stage, 0.0), BOUND_BAR if stage == bound_stage else STAGE_BAR)
        for stage in STAGES
    ]
    stages.append(("main process (CPU)", d.main_cpu_ms, STAGE_BAR))
    loader_ms = d.stage_ms.get("decode", 0.0) + d.stage_ms.get("transform", 0.0)
    compare = [
        ("decode + transform in the loader", loader_ms, STAGE_BAR),
        ("decode + transform, 1 core alone", d.reference_ms, REFERENCE_BAR),
        ("CPU, all processes", d.worker_cpu_ms + d.main_cpu_ms, TOTAL_BAR),
    ]
    return [stages, compare]


def plot_stage_times(diagnosis: Diagnosis, path: str) -> list[Bar]:
    """Draw the chart of a doctor run to ``path`` (PNG, or any format Pillow writes by
    the extension) and return the bars drawn."""
    d = diagnosis
    font = CaptionFont(size=14)
    groups = chart_rows(d)
    scale_max = max((v for group in groups for _, v, _ in group), default=0.0) or 1.0
    per_px = BAR_SPACE / scale_max
    titles = [
        f"{d.rate:,.0f} img/s · {d.workers} workers × {d.threads} threads · {d.cores} cores · bound: {d.bound or '?'}",
        "wall-clock ms per image in each stage, summed over workers",
        "the loader against decode + transform alone on one core (CPU time)",
    ]
    top = 14 + 2 * font.line_height
    height = top + sum(len(g) for g in groups) * ROW + len(groups) * (font.line_height + 10) + 10
    image = Image.new("RGB", (WIDTH, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font.draw(draw, (12, 10), titles[0], fill=(20, 20, 20))
    bars: list[Bar] = []
    y = top
    for title, group in zip(titles[1:], groups):
        font.draw(draw, (12, y), title, fill=(90, 90, 90))
        y += font.line_height + 8
        draw.line((LABEL_WIDTH - 1, y - 4, LABEL_WIDTH - 1, y + len(group) * ROW - 2), fill=(120, 120, 120))
        for label, value, colour in group:
            font.draw(draw, (LABEL_WIDTH - 10 - round(font.width(label)), y), label, fill=(20, 20, 20))
            length = round(max(0.0, value) * per_px)
            box = (LABEL_WIDTH, y + (ROW - BAR_HEIGHT) // 2 - 3, LABEL_WIDTH + length, y + (ROW + BAR_HEIGHT) // 2 - 3)
            if length > 0:
                draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour)
            font.draw(draw, (box[2] + 8, y), f"{value:.2f} ms", fill=(20, 20, 20))
            bars.append(Bar(label, value, colour, box))
            y += ROW
        y += 2
    image.save(path)
    return bars
