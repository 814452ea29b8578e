"""Real-world images, faithfully: every format the writer stores decodes, one pixel policy
(reader and ``--resize`` agree), EXIF orientation, honest handlers (visible warnings,
nothing lost before a cut), only the requested fields decoded, errors that name the
source, webdataset's ``.gz`` member convention. The corpus is built here with PIL."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from shardkit import cli
from shardkit.decode.fields import make_decoder
from shardkit.decode.imageinfo import exif_orientation, probe_image, read_image_header
from shardkit.decode.pixels import orient_array
from shardkit.errors import SampleError, SkippedSampleWarning
from shardkit.ingest.files import IMAGE_SUFFIXES
from shardkit.loader import ShardLoader
from shardkit.read.dataset import ShardDataset
from shardkit.writing.writer import ShardWriter
from tests import bad_corpus
from tests.helpers import pairs, tiny_jpeg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rgb_image(width: int = 40, height: int = 24, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric RGB test picture (JPEG-friendly; every flip/rotation differs)."""
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    r = 255 * x * np.ones_like(y)
    g = 255 * y * np.ones_like(x)
    b = 255 * (1 - x) * (1 - y) * (0.5 + 0.5 * (seed % 2))
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decoded(data: bytes, ext: str, mode: str = "numpy", **kw) -> np.ndarray:
    out = make_decoder(mode, **kw)({"__key__": "k", "__url__": "u", ext: data})[ext]
    return np.asarray(out)


# ------------------------------------------------------------------ the pixel policy vs PIL


def _policy(data: bytes) -> np.ndarray:
    """What PIL itself gives under the documented policy (first frame, alpha dropped,
    16-bit >> 8, palette expanded, 1-bit 0/255, CMYK by PIL)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode.startswith("I;16") or im.mode == "I":
            gray = (np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        if im.mode == "P":
            return np.asarray(im.convert("RGBA").convert("RGB"))
        return np.asarray(im.convert("RGB"))


def _odd_images() -> dict[str, tuple[str, bytes]]:
    """name -> (member extension, bytes)."""
    rgb = rgb_image()
    base = Image.fromarray(rgb)
    gray16 = (np.linspace(0, 65535, 40 * 24).reshape(24, 40)).astype(np.uint16)
    rgba = np.dstack([rgb, np.linspace(0, 255, 40 * 24).reshape(24, 40).astype(np.uint8)])
    palette_t = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t.info["transparency"] = 3
    frames = [Image.fromarray(rgb_image(seed=i) // (i + 1)) for i in range(3)]
    out = {
        "jpeg_baseline": ("jpg", encode(base, "JPEG", quality=90)),
        "jpeg_progressive": ("jpg", encode(base, "JPEG", quality=90, progressive=True)),
        "jpeg_gray": ("jpg", encode(base.convert("L"), "JPEG", quality=90)),
        "jpeg_cmyk": ("jpg", encode(base.convert("CMYK"), "JPEG", quality=90)),
        "png_rgb": ("png", encode(base, "PNG")),
        "png_16bit_gray": ("png", encode(Image.fromarray(gray16), "PNG")),
        "png_palette": ("png", encode(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG")),
        "png_palette_transparency": ("png", encode(palette_t, "PNG")),
        "png_1bit": ("png", encode(base.convert("1"), "PNG")),
        "png_gray_alpha": ("png", encode(Image.fromarray(rgba).convert("LA"), "PNG")),
        "png_rgba": ("png", encode(Image.fromarray(rgba, "RGBA"), "PNG")),
        "png_animated": ("png", encode(frames[0], "PNG", save_all=True, append_images=frames[1:])),
        "gif_animated": ("gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)),
        "webp_lossless": ("webp", encode(base, "WEBP", lossless=True)),
        "webp_rgba": ("webp", encode(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True)),
        "bmp": ("bmp", encode(base, "BMP")),
        "ppm": ("ppm", encode(base, "PPM")),
        "pgm": ("pgm", encode(base.convert("L"), "PPM")),
        "pbm": ("pbm", encode(base.convert("1"), "PPM")),
        "tiff_lzw": ("tiff", encode(base, "TIFF", compression="tiff_lzw")),
        "tiff_16bit": ("tiff", encode(Image.fromarray(gray16), "TIFF")),
        "tiff_cmyk": ("tiff", encode(base.convert("CMYK"), "TIFF")),
        "tiff_multipage": ("tiff", encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])),
    }
    try:
        out["webp_animated"] = (
            "webp",
            encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
        )
    except Exception:  # noqa: BLE001 - PIL built without animated WebP
        pass
    return out


ODD = _odd_images()
LOSSY = {"jpeg_baseline", "jpeg_progressive", "jpeg_gray", "jpeg_cmyk"}


@pytest.mark.parametrize("name", sorted(ODD))
@pytest.mark.parametrize("mode", ["numpy", "pil", "torch"])
def test_odd_images_follow_the_policy(name, mode):
    ext, data = ODD[name]
    got = decoded(data, ext, mode)
    if mode == "torch":
        got = got.transpose(1, 2, 0)
    want = _policy(data)
    assert got.shape == want.shape and got.dtype == np.uint8
    if name in LOSSY:  # simplejpeg and PIL may round a few values differently
        assert np.abs(got.astype(int) - want).max() <= 2, name
    else:
        assert np.array_equal(got, want), name


def test_policy_details():
    _, data = ODD["png_16bit_gray"]
    got = decoded(data, "png")
    gray16 = np.asarray(Image.open(io.BytesIO(data))).astype(np.int64)
    assert np.array_equal(got[:, :, 0], (gray16 >> 8).astype(np.uint8)) and got.max() == 255 and got.min() == 0
    assert set(np.unique(decoded(ODD["png_1bit"][1], "png"))) <= {0, 255}
    first = np.asarray(Image.open(io.BytesIO(ODD["gif_animated"][1])).convert("RGB"))
    assert np.array_equal(decoded(ODD["gif_animated"][1], "gif"), first)  # the first frame
    lab = Image.new("LAB", (4, 4), (255, 128, 128))  # L=100, a=b=0: white
    assert decoded(encode(lab, "TIFF"), "tiff").min() >= 250


def test_arithmetic_coded_jpeg():
    if shutil.which("cjpeg") is None:
        pytest.skip("no encoder for arithmetic-coded JPEG here (PIL cannot write one; cjpeg not installed)")
    ppm = encode(Image.fromarray(rgb_image()), "PPM")
    data = subprocess.run(["cjpeg", "-arithmetic"], input=ppm, capture_output=True, check=True).stdout
    assert decoded(data, "jpg").shape == (24, 40, 3)


def test_every_format_the_writer_stores_decodes():
    """Each image suffix the writer accepts maps (by magic) to an extension the reader decodes."""
    from shardkit.decode.fields import IMAGE_EXTENSIONS

    samples = {
        "jpg": ODD["jpeg_baseline"][1],
        "png": ODD["png_rgb"][1],
        "gif": ODD["gif_animated"][1],
        "webp": ODD["webp_lossless"][1],
        "bmp": ODD["bmp"][1],
        "tiff": ODD["tiff_lzw"][1],
        "ppm": ODD["ppm"][1],
        "pgm": ODD["pgm"][1],
        "pbm": ODD["pbm"][1],
    }
    stored = {probe_image(data).ext for data in samples.values()}
    assert stored <= IMAGE_EXTENSIONS
    assert {s.lstrip(".") for s in IMAGE_SUFFIXES} <= IMAGE_EXTENSIONS


# ------------------------------------------------------------------ EXIF orientation

_INVERSE = {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def oriented_jpeg(orientation: int, upright: np.ndarray, quality: int = 95) -> bytes:
    """A JPEG whose stored pixels, turned by its EXIF ``orientation``, show ``upright``."""
    stored = upright if orientation == 1 else orient_array(upright, _INVERSE[orientation])
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=quality, exif=exif.tobytes())


UPRIGHT = rgb_image(48, 32)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_array_matches_pil(orientation):
    image = Image.fromarray(UPRIGHT)
    exif = image.getexif()
    exif[0x0112] = orientation
    with Image.open(io.BytesIO(encode(image, "PNG", exif=exif.tobytes()))) as im:
        assert np.array_equal(orient_array(UPRIGHT, orientation), np.asarray(ImageOps.exif_transpose(im)))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["numpy", "torch"])
def test_exif_orientation_on_read(orientation, mode, monkeypatch):
    data = oriented_jpeg(orientation, UPRIGHT)
    assert read_image_header(data).orientation == orientation
    for backend in ("simplejpeg", "pil"):
        if backend == "pil":
            monkeypatch.setattr("shardkit.decode.pixels._simplejpeg", None)
        got = decoded(data, "jpg", mode)
        got = got.transpose(1, 2, 0) if mode == "torch" else got
        assert got.shape == UPRIGHT.shape
        assert np.abs(got.astype(int) - UPRIGHT).mean() < 3, (orientation, backend)
        raw = decoded(data, "jpg", mode, exif_orientation=False)
        stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert (raw.transpose(1, 2, 0) if mode == "torch" else raw).shape == stored.shape


def test_exif_orientation_in_png_and_dataset(tmp_path):
    image = Image.fromarray(orient_array(UPRIGHT, 8))  # stored rotated; tag 6 turns it back
    exif = image.getexif()
    exif[0x0112] = 6
    png = encode(image, "PNG", exif=exif.tobytes())
    assert np.array_equal(decoded(png, "png"), UPRIGHT)
    with ShardWriter(str(tmp_path), name="o") as w:
        w.write({"__key__": "a", "png": png, "jpg": oriented_jpeg(3, UPRIGHT)})
    url = str(tmp_path / "o-000000.tar")
    (sample,) = ShardDataset(url, decode="numpy")
    assert np.array_equal(sample["png"], UPRIGHT) and sample["jpg"].shape == UPRIGHT.shape
    (raw,) = ShardDataset(url, decode="numpy", exif_orientation=False)
    assert raw["png"].shape == (48, 32, 3)
    with pytest.raises(TypeError, match="exif_orientation"):
        ShardDataset(url, exif_orientation="yes")


def test_exif_parser_is_robust():
    assert exif_orientation(b"") == 1 and exif_orientation(b"II*\0\xff\xff\xff\xff") == 1
    assert exif_orientation(b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x09\0\0") == 1  # out of range
    assert exif_orientation(b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x06\0\0") == 6


def _write_folder(src, dest, *args: str) -> list[dict]:
    assert cli.main(["write", str(src), str(dest), "-q", *args]) == 0
    return list(ShardDataset(str(dest), decode="numpy", exif_orientation=False))


def test_resize_output_is_upright_for_all_orientations(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for o in range(1, 9):
        (src / f"o{o}.jpg").write_bytes(oriented_jpeg(o, UPRIGHT))
    samples = _write_folder(src, tmp_path / "out", "--resize", "24")
    want = np.asarray(Image.fromarray(UPRIGHT).resize((24, 16), Image.Resampling.BICUBIC)).astype(int)
    for sample in sorted(samples, key=lambda s: s["json"]["path"]):
        name = sample["json"]["path"]
        assert sample["jpg"].shape == (16, 24, 3), name
        assert np.abs(sample["jpg"].astype(int) - want).mean() < 12, name
        assert (sample["json"]["width"], sample["json"]["height"]) == (24, 16)
    # no orientation tag left to turn it again: reading with EXIF on gives the same pixels
    again = list(ShardDataset(str(tmp_path / "out"), decode="numpy"))
    assert all(np.array_equal(a["jpg"], b["jpg"]) for a, b in pairs(samples, again))


def test_16bit_reads_the_same_with_and_without_resize(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "deep.png").write_bytes(ODD["png_16bit_gray"][1])
    (src / "deep.tiff").write_bytes(ODD["tiff_16bit"][1])
    (src / "alpha.png").write_bytes(ODD["png_rgba"][1])
    (src / "pal.png").write_bytes(ODD["png_palette_transparency"][1])
    raw = {s["json"]["path"]: s for s in _write_folder(src, tmp_path / "raw")}
    resized = {s["json"]["path"]: s for s in _write_folder(src, tmp_path / "re", "--resize", "1000", "--quality", "95")}
    for name, sample in raw.items():
        a = next(v for k, v in sample.items() if not k.startswith("__") and k not in ("json", "cls"))
        b = resized[name]["jpg"]
        assert a.shape == b.shape
        # JPEG error only (16-bit was clipped to white before); the palette image has hard edges
        assert np.abs(a.astype(int) - b).mean() < (8 if name == "pal.png" else 3), name


# ------------------------------------------------------------------ handlers, fields, names


def _shard(path, samples: list[dict]) -> str:
    folder, name = os.path.split(str(path))
    with ShardWriter(folder, name=name) as w:
        for s in samples:
            w.write(s)
    return os.path.join(folder, f"{name}-000000.tar")


def test_only_requested_fields_are_decoded(tmp_path):
    good = tiny_jpeg(1)
    url = _shard(
        tmp_path / "f", [{"__key__": f"k{i}", "jpg": good, "bmp": b"BM not a bitmap", "cls": i} for i in range(3)]
    )
    got = list(ShardDataset(url, decode="numpy", fields="jpg cls"))
    assert [c for _, c in got] == [0, 1, 2]
    transformed = list(ShardDataset(url, decode="numpy", fields="jpg cls", transform=lambda s: {**s, "cls": s["bmp"]}))
    assert transformed[0][1] == b"BM not a bitmap"  # other fields reach the transform raw
    with pytest.raises(SampleError, match=r"member 'k0\.bmp'") as info:
        list(ShardDataset(url, decode="numpy"))
    assert url in str(info.value) and "BytesIO" not in str(info.value)


def test_decode_errors_name_url_and_member(tmp_path):
    url = _shard(
        tmp_path / "e",
        [
            {"__key__": "a", "png": b"\x89PNG\r\n\x1a\n garbage"},
            {"__key__": "b", "gif": b"GIF89a\x10\x00"},
            {"__key__": "c", "tiff": b"II*\0 broken"},
        ],
    )
    errors: list[Exception] = []
    list(ShardLoader(ShardDataset(url, decode="pil", handler=errors.append), batch_size=None, num_workers=0))
    assert [e.member for e in errors] == ["a.png", "b.gif", "c.tiff"]
    for e in errors:
        assert url in str(e) and repr(e.member) in str(e) and "BytesIO" not in str(e) and " at 0x" not in str(e)


def test_gz_members_are_decompressed_like_webdataset(tmp_path):
    import webdataset as wds

    url = _shard(
        tmp_path / "g",
        [{"__key__": "a", "txt.gz": gzip.compress(b"hello"), "json.gz": gzip.compress(b'{"x": 1}'), "cls": 1}],
    )
    (ours,) = ShardDataset(url, decode="pil")
    (theirs,) = wds.WebDataset(url, shardshuffle=False, empty_check=False).decode("pil")
    assert ours["txt.gz"] == theirs["txt.gz"] == "hello"
    assert ours["json.gz"] == theirs["json.gz"] == {"x": 1}
    bad = _shard(tmp_path / "h", [{"__key__": "b", "txt.gz": b"not gzip"}])
    with pytest.raises(SampleError, match=r"member 'b\.txt\.gz'.*gzip"):
        list(ShardDataset(bad, decode="pil"))


BROKEN = {
    "t0.jpg": tiny_jpeg(0)[:200],
    "t1.png": ODD["png_rgb"][1][:60],
    "t2.gif": ODD["gif_animated"][1][:40],
    "t3.bmp": b"BM" + bytes(20),
    "t4.png": bad_corpus.png_bomb(),
    "t5.webp": b"RIFF\x10\0\0\0WEBPVP8 junk",
}


@pytest.fixture
def broken_shard(tmp_path) -> str:
    samples = [{"__key__": "ok0", "jpg": tiny_jpeg(2), "cls": 0}]
    for name, data in BROKEN.items():
        key, ext = name.split(".")
        samples.append({"__key__": key, ext: data, "cls": 1})
    samples.append({"__key__": "ok1", "jpg": tiny_jpeg(3), "cls": 1, "json": b"{not json"})
    return _shard(tmp_path / "b", samples)


def test_verify_decode_names_every_bad_member(broken_shard, capsys):
    assert cli.main(["verify", broken_shard, "--decode", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    messages = [p["message"] for p in report["problems"]]
    for name in list(BROKEN) + ["ok1.json"]:
        assert sum(f"member {name!r}" in m for m in messages) == 1, (name, messages)
    assert len(messages) == len(BROKEN) + 1
    assert any("decompression-bomb" in m for m in messages)


@pytest.mark.slow  # a fresh interpreter importing torch: ~10 s on 2 busy cores
def test_warn_prints_one_line_per_skip_by_default(broken_shard):
    """In a fresh interpreter with no logging or warnings set-up."""
    code = (
        "import sys; from shardkit import ShardDataset, ShardLoader; "
        "ds = ShardDataset(sys.argv[1], decode='pil', handler='warn'); "
        "print(len(list(ShardLoader(ds, batch_size=None, num_workers=0))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, broken_shard], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"  # ok0; every other sample has a bad member
    lines = [line for line in proc.stderr.splitlines() if "SkippedSampleWarning" in line]
    assert len(lines) == len(BROKEN) + 1, proc.stderr
    for name in list(BROKEN) + ["ok1.json"]:
        assert sum(f"member {name!r}" in line and broken_shard in line for line in lines) == 1, name


def test_warn_and_skip_in_process(broken_shard, recwarn):
    got = list(ShardLoader(ShardDataset(broken_shard, decode="pil", handler="warn"), batch_size=None, num_workers=0))
    assert [s["__key__"] for s in got] == ["ok0"]
    assert len([w for w in recwarn if w.category is SkippedSampleWarning]) == len(BROKEN) + 1
    recwarn.clear()
    assert len(list(ShardDataset(broken_shard, decode="pil", handler="skip"))) == 1
    assert not [w for w in recwarn if w.category is SkippedSampleWarning]


# ------------------------------------------------------------------ a shard cut mid-member


def _cut_shard(folder, keep_index: bool) -> tuple[str, list[str]]:
    """Two shards: six samples, cut inside sample 3's jpg payload; then z0..z2 intact."""
    folder.mkdir()
    with ShardWriter(str(folder), name="c") as w:
        for i in range(6):
            w.write({"__key__": f"s{i}", "cls": i, "jpg": tiny_jpeg(i)})
        w.next_shard()
        for i in range(3):
            w.write({"__key__": f"z{i}", "cls": i})
    path = str(folder / "c-000000.tar")
    with open(path, "rb") as f:
        data = f.read()
    from shardkit.format.tar import iter_member_tuples

    members = list(iter_member_tuples(io.BytesIO(data)))
    jpg3 = next(m for m in members if m[0] == "s3.jpg")
    with open(path, "wb") as f:
        f.write(data[: jpg3[2] + 512 + 300])
    if not keep_index:
        os.remove(path + ".idx")
    return path, ["s0", "s1", "s2"]


@pytest.mark.parametrize("counts", ["index", "manifest", "none"])
@pytest.mark.parametrize("handler", ["skip", "warn"])
def test_cut_shard_yields_every_complete_sample_before(tmp_path, counts, handler, recwarn):
    path, before = _cut_shard(tmp_path / "c", keep_index=counts == "index")
    if counts == "none":
        os.remove(str(tmp_path / "c" / "c.manifest.json"))
        os.remove(str(tmp_path / "c" / "c-000001.tar.idx"))
    dataset = ShardDataset(
        str(tmp_path / "c" / ("c-{000000..000001}.tar" if counts == "none" else "c.manifest.json")), handler=handler
    )
    assert dataset.counts == (None if counts == "none" else [6, 3])
    loader = ShardLoader(dataset, batch_size=None, num_workers=0)
    keys = [s["__key__"] for s in loader]
    assert keys == before + ["z0", "z1", "z2"]
    if counts != "none":
        assert loader.stats()["skipped"] == 3  # positions stay exact
    lines = [str(w.message) for w in recwarn if w.category is SkippedSampleWarning]
    if handler == "warn":
        assert len(lines) == 1 and path in lines[0] and "s3.jpg" in lines[0] and "truncated" in lines[0]
        assert ("skipped 3 samples" in lines[0]) if counts != "none" else ("rest of a shard" in lines[0])
    else:
        assert not lines


def test_cut_shard_two_workers(tmp_path):
    path, before = _cut_shard(tmp_path / "c", keep_index=False)
    loader = ShardLoader(
        ShardDataset(str(tmp_path / "c" / "c.manifest.json"), handler="skip"), batch_size=None, num_workers=2
    )
    assert sorted(s["__key__"] for s in loader) == before + ["z0", "z1", "z2"]
