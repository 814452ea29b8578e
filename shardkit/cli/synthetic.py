"""Synthetic photo-like images for the demo, the benchmarks and the tests.

Smooth colour gradients, a few soft blobs and sensor-like noise compress like photos
(JPEG ~50-60 KB at 500x375, quality 90), unlike flat colours or pure noise.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An HxWx3 uint8 image that compresses like a photograph."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), dtype=np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 80 * np.sin(3 * (a * x + b * y) + p * 6)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-90, 90, 3).astype(np.float32)
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def make_image_folder(
    root: str,
    *,
    count: int,
    classes: int = 10,
    size: tuple[int, int] = (500, 375),
    seed: int = 0,
    workers: int = 2,
    quality: int = 90,
) -> list[str]:
    """Write ``count`` JPEGs into ``root/class_XX/img_NNNNNN.jpg`` (ImageFolder layout)."""
    names = [f"class_{c:02d}" for c in range(classes)]
    for name in names:
        os.makedirs(os.path.join(root, name), exist_ok=True)

    def one(i: int) -> str:
        rng = np.random.default_rng([seed, i])
        w = int(size[0] * rng.uniform(0.8, 1.2))
        h = int(size[1] * rng.uniform(0.8, 1.2))
        path = os.path.join(root, names[i % classes], f"img_{i:06d}.jpg")
        with open(path, "wb") as f:
            f.write(encode(photo_like(rng, w, h), quality=quality))
        return path

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, range(count)))
