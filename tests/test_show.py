"""``shardkit show`` (contact sheet, HTML page) and doctor's stage-time chart, on real shards,
real nginx and real headless Chromium; pixels compared with what the shards decode to."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from shardkit import cli
from shardkit.cli.doctor import make_transform
from shardkit.cli.plot import BOUND_BAR, REFERENCE_BAR, STAGE_BAR, plot_stage_times
from shardkit.cli.sheet import MARK_FILL, CaptionFont, Layout, fitted, make_layout
from shardkit.cli.show import collect_tiles, tile_seed
from shardkit.writing.writer import ShardWriter
from tests.helpers import make_diagnosis, pairs
from tests.servers import run_nginx

CLASSES = ["cat", "dog", "fox"]
CAPTIONS = [
    "A red fox jumps over the lazy dog in a snowy forest at dawn, seen from far away",
    "一只在雪地里奔跑的红狐狸",  # Chinese
    "ثعلب أحمر يقفز فوق الكلب",  # Arabic (right to left, joined)
    "Рыжая лиса прыгает через ленивую собаку",  # Cyrillic
    "party 🎉😀👍🏽 👨‍👩‍👧 ok",  # emoji, skin tone, ZWJ sequence
    "हिन्दी पाठ · ภาษาไทย · e\u0301 \u200b\ue000",  # Devanagari, Thai, combining mark, format, private use
    "tab\there\nnew line\x07bell",  # control characters
    "词" * 400,  # one unbroken run, far longer than any tile
]
COUNT = 20


def blocks(i: int, size: tuple[int, int]) -> bytes:
    """A JPEG of 6x4 flat random colour blocks: survives any resize in the block means."""
    rng = np.random.default_rng(1000 + i)
    grid = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_photos(dest: str, *, broken: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    with ShardWriter(dest, name="data", shard_size="1GB", max_count=8, classes=CLASSES) as w:
        for i in range(COUNT):
            data = blocks(i, (96, 64) if i % 2 else (64, 96))
            w.write(
                {
                    "__key__": f"s{i:04d}",
                    "jpg": data[:300] if i in broken else data,
                    "cls": i % 3,
                    "txt": CAPTIONS[i % len(CAPTIONS)],
                    "json": {"i": i},
                }
            )
    return dest


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """Three shards (8 + 8 + 4 samples) with a manifest naming the classes."""
    return write_photos(str(tmp_path_factory.mktemp("photos") / "plain"))


def member(folder: str, key: str, ext: str) -> bytes:
    """A member's bytes straight from the tar files (not through shardkit)."""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(folder, name)) as tar:
                try:
                    f = tar.extractfile(f"{key}.{ext}")
                except KeyError:
                    continue
                assert f is not None
                return f.read()
    raise KeyError(key)


def decoded(folder: str, key: str) -> Image.Image:
    return Image.open(io.BytesIO(member(folder, key, "jpg"))).convert("RGB")


def coarse(image: Image.Image, size: tuple[int, int] = (6, 4)) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BOX), dtype=np.float64)


def diff(a: Image.Image, b: Image.Image, size: tuple[int, int] = (6, 4)) -> float:
    return float(np.abs(coarse(a, size) - coarse(b, size)).mean())


def show(*args: str) -> int:
    return cli.main(["show", *args])


def layout_for(count: int, *, tile: int, columns: int | None = None) -> Layout:
    return make_layout(count, tile=tile, columns=columns, font=CaptionFont())


# -- the sheet's geometry ---------------------------------------------------------------


def test_sheet_size_follows_count_and_layout(photos, tmp_path, capsys):
    out = str(tmp_path / "sheet.png")
    assert show(photos, "-o", out, "--count", "11", "--columns", "4", "--tile", "64", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"samples": 11, "undecodable": 0, "sheet": out, "missing": []}
    line = CaptionFont().line_height
    cell_h = 64 + 4 * line + 4  # image box, key line + 3 caption lines
    with Image.open(out) as sheet:
        assert sheet.size == (4 * (64 + 8) + 8, 3 * (cell_h + 8) + 8)  # 11 tiles: 4 + 4 + 3
        assert sheet.size == layout_for(11, tile=64, columns=4).size
    # the default: 32 asked, 20 there, 8 to a row -> 3 rows
    assert show(photos, "-o", out, "-q") == 0
    with Image.open(out) as sheet:
        assert sheet.size == layout_for(20, tile=192).size == (8 * 200 + 8, 3 * (192 + 4 * line + 4 + 8) + 8)
    # one tile, one column
    assert show(photos, "-o", out, "-q", "--count", "1") == 0
    with Image.open(out) as sheet:
        assert sheet.size == (192 + 16, 192 + 4 * line + 4 + 16)


@pytest.mark.parametrize("bad", [["--count", "0"], ["--columns", "0"], ["--tile", "8"], ["--transform", "rrc999"]])
def test_bad_options_refused(photos, tmp_path, bad, capsys):
    assert show(photos, "-o", str(tmp_path / "x.png"), *bad) == 1
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_count_below_select_refused(photos, tmp_path, capsys):
    assert show(photos, "-o", str(tmp_path / "x.png"), "--select", "s0001", "s0002", "--count", "1") == 1
    assert "--count 1 is fewer than the 2 keys of --select" in capsys.readouterr().err


# -- pixels: each tile is its sample -----------------------------------------------------


@pytest.mark.parametrize("tile", [128, 192])  # Lanczos (x1.33) and nearest (x2)
def test_tiles_show_the_decoded_pixels(photos, tmp_path, tile):
    out = str(tmp_path / "sheet.png")
    assert show(photos, "-o", out, "-q", "--count", "8", "--columns", "3", "--tile", str(tile)) == 0
    layout = layout_for(8, tile=tile, columns=3)
    sheet = Image.open(out).convert("RGB")
    keys = [f"s{i:04d}" for i in range(8)]
    for i, key in enumerate(keys):
        want = decoded(photos, key)
        box = layout.placed(i, fitted(want, tile).size)
        got = sheet.crop(box)
        assert diff(got, want) < 4, (key, diff(got, want))
        other = decoded(photos, keys[(i + 2) % 8])  # same shape, other sample: far off
        assert diff(got, other) > 30, key
    # the letterbox around a landscape image is the box colour, not image pixels
    left, top, right, _ = layout.image_box(1)
    assert sheet.getpixel((left + tile // 2, top + 1)) == (236, 236, 236)


def test_tiles_after_a_seeded_transform(photos, tmp_path):
    out = str(tmp_path / "sheet.png")
    args = ["-o", out, "-q", "--count", "6", "--tile", "112", "--transform", "rrc224+flip", "--seed", "7"]
    torch.manual_seed(99)
    state = torch.get_rng_state()
    assert show(photos, *args) == 0
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    layout = layout_for(6, tile=112)
    sheet = Image.open(out).convert("RGB")
    fn = make_transform("rrc224+flip")
    for i in range(6):
        key = f"s{i:04d}"
        torch.manual_seed(tile_seed(7, key))
        want = fn(decoded(photos, key))
        assert want.size == (224, 224)
        got = sheet.crop(layout.placed(i, (224, 224)))
        assert got.size == (112, 112)
        assert diff(got, want, (8, 8)) < 6, (key, diff(got, want, (8, 8)))
        torch.manual_seed(tile_seed(8, key))  # another seed draws another crop
        assert diff(got, fn(decoded(photos, key)), (8, 8)) > 10, key
    # the same sample gets the same crop when shown alone (per-key seeding)
    alone = str(tmp_path / "alone.png")
    assert show(photos, *[a if a != out else alone for a in args], "--select", "s0003") == 0
    one = Image.open(alone).convert("RGB").crop(layout_for(1, tile=112).placed(0, (224, 224)))
    assert diff(one, sheet.crop(layout.placed(3, (224, 224))), (16, 16)) < 1


def test_collect_tiles_captions_label_names_and_sizes(photos):
    tiles, missing = collect_tiles(photos, count=4)
    assert missing == []
    for i, tile in pairs(range(4), tiles):
        assert tile.key == f"s{i:04d}"
        assert tile.caption.split("\n") == [f"{CLASSES[i % 3]} ({i % 3})", CAPTIONS[i]]
        assert tile.sizes == ("96×64" if i % 2 else "64×96")
        assert tile.meta["cls_name"] == CLASSES[i % 3] and tile.meta["json"] == {"i": i}
        assert tile.meta["jpg"] == f"image {tile.sizes}" and tile.meta["__url__"].endswith(".tar")
    tiles, _ = collect_tiles(photos, count=2, fields="jpg txt", transform="resize256+center224")
    assert [t.caption for t in tiles] == CAPTIONS[:2]
    assert [t.sizes for t in tiles] == ["64×96→224×224", "96×64→224×224"]
    with pytest.raises(ValueError, match="txt is not an image field"):
        collect_tiles(photos, fields="txt jpg")


def test_phone_photos_stand_upright(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 is shown as the camera meant it."""
    from PIL import ImageOps

    stored = Image.open(io.BytesIO(blocks(0, (96, 64))))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    with ShardWriter(str(tmp_path), name="data") as w:
        w.write({"__key__": "phone", "jpg": buf.getvalue()})
    tiles, _ = collect_tiles(str(tmp_path), count=1)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB")
    assert upright.size == (64, 96) and tiles[0].sizes == "64×96"
    assert diff(tiles[0].image, upright, (4, 6)) < 4 and diff(tiles[0].image, stored.resize((64, 96)), (4, 6)) > 30


def test_select_keys_in_order_and_missing(photos, tmp_path, caplog, capsys):
    tiles, missing = collect_tiles(photos, keys=["s0017", "s0002", "nope", "s0017"])
    assert [t.key for t in tiles] == ["s0017", "s0002"] and missing == ["nope"]
    caplog.set_level(logging.WARNING, logger="shardkit")
    assert show(photos, "-o", str(tmp_path / "s.png"), "--select", "s0009", "gone", "--json") == 1
    assert json.loads(capsys.readouterr().out)["missing"] == ["gone"]
    assert any("'gone' not found" in r.getMessage() for r in caplog.records)


def test_shuffle_is_seeded(photos):
    first = [t.key for t in collect_tiles(photos, count=20, shuffle=True, seed=3)[0]]
    again = [t.key for t in collect_tiles(photos, count=20, shuffle=True, seed=3)[0]]
    other = [t.key for t in collect_tiles(photos, count=20, shuffle=True, seed=4)[0]]
    assert first == again and sorted(first) == [f"s{i:04d}" for i in range(20)]
    assert first != sorted(first) and other != first


# -- captions in many scripts ----------------------------------------------------------


def test_captions_in_many_scripts_render(photos, tmp_path):
    out = str(tmp_path / "sheet.png")
    assert show(photos, "-o", out, "-q", "--count", str(len(CAPTIONS)), "--fields", "jpg txt", "--tile", "96") == 0
    layout = layout_for(len(CAPTIONS), tile=96)
    sheet = np.asarray(Image.open(out).convert("RGB"))
    for i in range(len(CAPTIONS)):
        left, _, right, bottom = layout.image_box(i)
        caption = sheet[bottom + 2 + layout.line_height : bottom + layout.caption_height, left:right]
        assert (caption.min(axis=2) < 128).sum() > 20, f"no ink in caption {i}"


def test_caption_font_boxes_and_wrapping():
    font = CaptionFont()
    assert font.font_for("\ue000") is None  # private use: no font has it -> a box
    assert font.font_for(" ") == 0
    if any("DejaVu" in n for n in font.names):  # Debian's fonts-dejavu-core
        assert all(font.font_for(ch) is not None for ch in "AЖΩعא€")
    # a missing glyph is a drawn box, not an error and not nothing
    image = Image.new("RGB", (40, 30), (255, 255, 255))
    font.draw(ImageDraw.Draw(image), (2, 2), "\ue000", fill=(0, 0, 0))
    ink = np.argwhere(np.asarray(image).min(axis=2) < 128)
    assert len(ink) > 10
    top, lft = ink.min(axis=0)
    bot, rgt = ink.max(axis=0)
    assert (rgt - lft) >= 5 and (bot - top) >= 5
    assert np.asarray(image)[(top + bot) // 2, (lft + rgt) // 2].min() > 200  # hollow: an outline
    # wrapping: lines fit, the overflow ends in an ellipsis, explicit newlines break
    for text in CAPTIONS:
        lines = font.wrap(text, 120, 3)
        assert 1 <= len(lines) <= 3 and all(font.width(line) <= 120 for line in lines), text
    assert font.wrap("词" * 400, 120, 3)[-1].endswith("…")
    assert font.wrap("one\ntwo", 500, 3) == ["one", "two"]
    assert font.runs("e\u0301x") == [(0, "e\u0301x")]  # the mark stays with its base
    assert font.runs("\ue000\u0301a") == [(None, "\ue000"), (0, "a")]  # a mark on a box is dropped
    with pytest.raises(ValueError, match="cannot load font"):
        CaptionFont(paths=["/nonexistent/font.ttf"])


# -- an undecodable sample -------------------------------------------------------------


def test_undecodable_sample_gets_a_marked_tile_and_a_log_line(tmp_path):
    folder = write_photos(str(tmp_path / "broken"), broken={2})
    out = str(tmp_path / "sheet.png")
    proc = subprocess.run(
        [sys.executable, "-m", "shardkit.cli", "show", folder, "-o", out, "--count", "5", "--tile", "64"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr  # problems found
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "WARNING" in lines[0] and "s0002.jpg" in lines[0], proc.stderr
    assert "1 undecodable sample(s)" in proc.stdout
    layout = layout_for(5, tile=64)
    sheet = Image.open(out).convert("RGB")
    assert sheet.size == layout.size  # the broken sample holds its place: still 5 tiles
    left, top, right, bottom = layout.image_box(2)
    assert sheet.getpixel((left + 3, top + 30)) == MARK_FILL
    assert sheet.getpixel((right - 3, top + 30)) == MARK_FILL
    for i in (0, 1, 3, 4):  # the others are their samples
        want = decoded(folder, f"s{i:04d}")
        assert diff(sheet.crop(layout.placed(i, fitted(want, 64).size)), want) < 6
    tiles, _ = collect_tiles(folder, count=5)
    assert [t.error is not None for t in tiles] == [False, False, True, False, False]
    assert "not a valid JPEG" in (tiles[2].error or "") and tiles[2].key == "s0002"


# -- remote and compressed shards ---------------------------------------------------------


def test_http_and_gzip_shards_through_nginx(photos, tmp_path, capsys, monkeypatch):
    root = tmp_path / "www"
    shutil.copytree(photos, root / "plain")
    (root / "gz").mkdir()
    for name in sorted(os.listdir(photos)):
        if name.endswith(".tar"):
            data = (root / "plain" / name).read_bytes()
            (root / "gz" / (name + ".gz")).write_bytes(gzip.compress(data))
    assert cli.main(["index", "--quiet", str(root / "gz" / "data-{000000..000002}.tar.gz")]) == 0
    local = collect_tiles(photos, count=12, transform="rrc224", seed=5)[0]
    with run_nginx(str(root)) as server:
        for url in (f"{server.url}plain/data.manifest.json", f"{server.url}gz/"):
            tiles, missing = collect_tiles(url, count=12, transform="rrc224", seed=5)
            assert missing == []
            for want, got in pairs(local, tiles):
                caption = want.caption
                if "/gz/" in url:  # `shardkit index` wrote that manifest: no class names in it
                    caption = re.sub(r"^\w+ \((\d)\)", r"label \1", caption)
                    assert caption.startswith("label ")
                assert (got.key, got.caption, got.sizes) == (want.key, caption, want.sizes)
                assert np.array_equal(np.asarray(got.image), np.asarray(want.image)), got.key
                assert got.meta["__url__"].startswith(server.url)
        monkeypatch.chdir(tmp_path)
        assert show(f"{server.url}gz/", "--html", "page", "--count", "3", "--json") == 0
        assert json.loads(capsys.readouterr().out) == {
            "samples": 3,
            "undecodable": 0,
            "html": os.path.join("page", "index.html"),
            "missing": [],
        }
        assert not (tmp_path / "sheet.png").exists()  # --html alone writes no sheet
        assert len(os.listdir(tmp_path / "page" / "thumbs")) == 3


def test_s3_shards(photos, s3_server):
    client = s3_server.client()
    for name in sorted(os.listdir(photos)):
        client.upload_file(os.path.join(photos, name), s3_server.bucket, f"show/{name}")
    local = collect_tiles(photos, count=10, transform="rrc224+flip", seed=2)[0]
    remote, missing = collect_tiles(f"s3://{s3_server.bucket}/show/", count=10, transform="rrc224+flip", seed=2)
    assert missing == []
    for want, got in pairs(local, remote):
        assert (got.key, got.caption, got.sizes) == (want.key, want.caption, want.sizes)
        assert np.array_equal(np.asarray(got.image), np.asarray(want.image)), got.key


# -- the HTML page -------------------------------------------------------------------------


def test_html_page_contents(photos, tmp_path):
    from shardkit.cli.html import write_html

    tiles, _ = collect_tiles(photos, count=5)
    tiles[1].error = "not a valid JPEG: <script>alert(1)</script>"
    path = write_html(tiles, str(tmp_path / "page"), title="t & <b>")
    text = open(path, encoding="utf-8").read()
    assert text.count('<figure class="sample') == 5 and text.count('class="sample bad"') == 1
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)" in text
    assert "t &amp; &lt;b&gt;" in text and CAPTIONS[2] in text and CAPTIONS[1] in text
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert srcs == [f"thumbs/{i:05d}.jpg" for i in range(5)]
    for src in srcs:  # beside the page, relative: opens from file:// anywhere
        with Image.open(tmp_path / "page" / src) as thumb:
            assert max(thumb.size) == 256
    assert "&quot;cls_name&quot;: &quot;cat&quot;" in text  # the sample's JSON, escaped


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def chromium(tmp_path, url: str, *args: str) -> tuple[str, list[str]]:
    """Run headless Chromium on ``url``: its stdout and the page's console lines."""
    profile = tmp_path / f"profile-{len(os.listdir(tmp_path))}"
    proc = subprocess.run(
        [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", *args, url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium)")
def test_html_page_in_headless_chromium(tmp_path):
    folder = write_photos(str(tmp_path / "data"), broken={1})
    page = tmp_path / "page"
    assert show(folder, "--html", str(page), "--count", "12", "-q") == 1  # one undecodable
    url = (page / "index.html").as_uri()
    # the console check sees errors: a page that logs one and throws is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><p>x</p><script>console.error('oops'); nope();</script>")
    _, console = chromium(tmp_path, bad.as_uri(), "--dump-dom")
    assert any("oops" in line for line in console) and any("Uncaught" in line for line in console)

    dom, console = chromium(tmp_path, url, "--dump-dom")
    assert console == []
    assert len(re.findall(r'<figure class="sample', dom)) == 12
    assert '<span id="count">12 of 12 samples</span>' in dom  # the page's script ran
    assert 'data-shown="12"' in dom and dom.count(" hidden=") == 0
    dom, console = chromium(tmp_path, url + "#key=s000", "--dump-dom")  # the key filter
    assert console == [] and '<span id="count">10 of 12 samples</span>' in dom
    assert len(re.findall(r'<figure class="sample[^"]*" data-key="s001\d" id="s\d+" hidden=""', dom)) == 2

    shot = tmp_path / "shot.png"
    _, console = chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1200,900")
    assert console == []
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    # the thumbnails loaded: the undecodable sample's red square is on screen
    assert (np.abs(pixels - np.array(MARK_FILL)).max(axis=1) < 12).sum() > 5000


# -- doctor's chart -------------------------------------------------------------------------


def test_plot_bars_proportional(tmp_path):
    path = str(tmp_path / "doctor.png")
    d = make_diagnosis()
    bars = plot_stage_times(d, path)
    want = [
        ("read/io", 0.3),
        ("decode", 2.1),
        ("transform", 0.9),
        ("collate", 0.0),
        ("other", 0.15),
        ("handoff", 0.4),
        ("main process (CPU)", 0.35),
        ("decode + transform in the loader", 3.0),
        ("decode + transform, 1 core alone", 2.7),
        ("CPU, all processes", 4.25),
    ]
    image = np.asarray(Image.open(path).convert("RGB"))
    longest = max(v for _, v in want)
    measured = {}
    for (label, value), bar in pairs(want, bars):
        assert bar.label == label and bar.value == pytest.approx(value)
        left, top, right, bottom = bar.box
        row = image[(top + bottom) // 2]
        run = 0  # the bar's colour from its left edge, measured on the picture
        while left + run < row.shape[0] and tuple(row[left + run]) == bar.colour:
            run += 1
        measured[label] = run
        assert run == right - left, label
    for label, value in want:
        assert measured[label] == pytest.approx(value / longest * measured["CPU, all processes"], abs=1.0), label
    colours = {b.label: b.colour for b in bars}
    assert colours["decode"] == BOUND_BAR and colours["read/io"] == STAGE_BAR
    assert colours["decode + transform, 1 core alone"] == REFERENCE_BAR
    assert measured["collate"] == 0
    # an io-bound run marks read/io; a transfer-bound run marks no stage
    marked = {b.label for b in plot_stage_times(make_diagnosis(bound="io"), path) if b.colour == BOUND_BAR}
    assert marked == {"read/io"}
    assert not [b for b in plot_stage_times(make_diagnosis(bound="transfer"), path) if b.colour == BOUND_BAR]


def test_show_is_registered_in_the_cli(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["show", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--count", "--transform", "--seed", "--select", "--fields", "--html", "-o", "--json"):
        assert option in out
