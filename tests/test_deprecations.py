"""The decode paths call no deprecated API (torchvision 0.29 deprecates torchvision.io
image decoding in favour of TorchCodec): run them in a fresh interpreter where a
DeprecationWarning is an error, so nothing earlier in the session can hide one. The GPU
stage runs with decode_device="cpu" (the same plumbing and decoders, TorchCodec on the
CPU) everywhere and with decode_device="cuda" where there is a GPU; and no shardkit
module imports torchvision.io at all."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import io, sys, tempfile
    import numpy as np
    from PIL import Image
    from torchvision.transforms import v2
    from shardkit import ShardDataset, ShardLoader, ShardWriter
    from shardkit.decode.crop import RandomResizedCropDecode
    from shardkit.decode.fields import decode_image, make_decoder

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    images = {}
    for name, image, fmt in [("jpg", rgb, "JPEG"), ("gray.jpg", rgb.convert("L"), "JPEG"),
                             ("cmyk.jpg", rgb.convert("CMYK"), "JPEG"), ("png", rgb, "PNG"),
                             ("webp", rgb, "WEBP"), ("bmp", rgb, "BMP"), ("tif", rgb, "TIFF")]:
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        images[name] = buffer.getvalue()
    for mode in ("pil", "numpy", "torch"):
        for name, data in images.items():
            decode_image(data, mode)
            decode_image(data, mode, decode_size=16)
            RandomResizedCropDecode(16, mode=mode)(data)
        make_decoder(mode)({"__key__": "k", **images, "cls": b"1"})
    with tempfile.TemporaryDirectory() as tmp:
        with ShardWriter(tmp, shard_size="1GB") as writer:
            for i in range(8):
                writer.write({"__key__": f"{i:04d}", "jpg": images["jpg"], "cls": i})
        aug = v2.Compose([v2.RandomResizedCrop(24), v2.RandomHorizontalFlip()])
        for transform in ({"jpg": aug}, aug):
            ds = ShardDataset(tmp, decode="torch", decode_size="auto", transform=transform, fields="jpg cls")
            assert sum(len(b[1]) for b in ShardLoader(ds, batch_size=4, num_workers=0)) == 8
    print("clean")
""")


def test_default_decode_paths_raise_no_deprecation_warning():
    proc = _run_strict(SCRIPT)
    assert proc.returncode == 0 and proc.stdout.strip() == "clean", proc.stderr[-3000:]


GPU_SCRIPT = textwrap.dedent("""
    import importlib.util, io, tempfile
    import numpy as np, torch
    from PIL import Image
    from torchvision.transforms import v2
    import shardkit.gpu, shardkit.gpu.batch, shardkit.gpu.batch_decoder, shardkit.gpu.cuda
    import shardkit.gpu.decoders, shardkit.gpu.nvimgcodec, shardkit.gpu.recipe, shardkit.gpu.ship
    from shardkit import ShardDataset, ShardLoader, ShardWriter

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    turned = rgb.getexif()
    turned[0x0112] = 6
    images = []
    for image, kw in [(rgb, {}), (rgb.convert("L"), {}), (rgb.convert("CMYK"), {}), (rgb, {"exif": turned.tobytes()}),
                      (rgb, {"progressive": True})]:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", **kw)
        images.append(buffer.getvalue())
    backends = ["auto", "cpu"]
    if importlib.util.find_spec("torchcodec") is not None:
        backends += ["torchcodec", "nvjpeg"]
    places = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ran = []
    with tempfile.TemporaryDirectory() as tmp:
        with ShardWriter(tmp, shard_size="1GB") as writer:
            for i in range(10):
                writer.write({"__key__": f"{i:04d}", "jpg": images[i % len(images)], "cls": i})
        aug = v2.Compose([v2.RandomResizedCrop(24), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
        for place in places:
            nvimgcodec = place == "cuda" and importlib.util.find_spec("nvidia.nvimgcodec") is not None
            for name in backends + (["nvimgcodec"] if nvimgcodec else []):
                for exif in (True, False):
                    ds = ShardDataset(tmp, decode="torch", transform={"jpg": aug}, exif_orientation=exif)
                    loader = ShardLoader(ds, batch_size=4, num_workers=0, decode_device=place, decode_backend=name)
                    assert sum(len(b["cls"]) for b in loader) == 10
                    assert name == "auto" or loader.stats()["decode_backend"] == name
                ran.append(f"{place}:{name}")
    print("clean", " ".join(ran))
""")


def _run_strict(script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=240,
    )


def test_gpu_stage_raises_no_deprecation_warning():
    import importlib.util

    import torch

    proc = _run_strict(GPU_SCRIPT)
    assert proc.returncode == 0 and proc.stdout.startswith("clean"), proc.stderr[-3000:]
    # Every backend ran on the CPU; on a GPU machine every one on CUDA too (nvImageCodec where installed).
    names = ["auto", "cpu"] + (["torchcodec", "nvjpeg"] if importlib.util.find_spec("torchcodec") else [])
    expected = [f"cpu:{name}" for name in names]
    if torch.cuda.is_available():
        expected += [f"cuda:{name}" for name in names]
        expected += ["cuda:nvimgcodec"] if importlib.util.find_spec("nvidia.nvimgcodec") else []
    assert proc.stdout.split()[1:] == expected


def test_no_shardkit_module_imports_torchvision_io():
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "shardkit")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                else:
                    continue
                if any(m == "torchvision.io" or m.startswith("torchvision.io.") for m in modules):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not offenders, f"torchvision.io's decoders are deprecated (use TorchCodec): {offenders}"
