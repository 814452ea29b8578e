"""The default decode paths call no deprecated API (torchvision 0.29 deprecates
torchvision.io image decoding): run them in a fresh interpreter where a
DeprecationWarning is an error, so nothing earlier in the session can hide one."""

from __future__ import annotations

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
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", SCRIPT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "clean", proc.stderr[-3000:]
