"""Several images per sample, end to end: a Parquet list column written as ``KEY.0.jpg``,
``KEY.1.png``...; the reader decodes each, ``fields="0.jpg 1.png txt"`` and a transform per
image work, and the GPU path (run on the CPU: the same shipping plumbing) ships each image
with its own transform or refuses, with a message, a transform it cannot apply per image."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import shardkit
from shardkit import ShardDataset, ShardLoader
from shardkit.errors import SampleError
from shardkit.ingest import IngestOptions
from tests.helpers import pairs, tiny_jpeg

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

N = 10
AUG = v2.Compose([v2.RandomResizedCrop(16), v2.RandomHorizontalFlip()])


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((20 + i, 24, 3), i * 11 % 256, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def views(i: int) -> list[bytes]:
    return [tiny_jpeg(i, size=(40, 30)), png(i)]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("multi")
    table = pa.table(
        {
            "views": [views(i) for i in range(N)],
            "caption": [f"two views of {i}" for i in range(N)],
            "id": [f"m{i:03d}" for i in range(N)],
        }
    )
    pq.write_table(table, root / "pairs.parquet", row_group_size=4)
    out = str(root / "shards")
    result = shardkit.write(str(root / "pairs.parquet"), out, options=IngestOptions(key_column="id"), workers=1)
    assert result.columns == {"views": "images (0.EXT, 1.EXT...)", "caption": "txt", "id": "key"}
    return out


def test_every_image_field_is_decoded_whatever_its_prefix(shards):
    got = list(ShardDataset(shards, decode="numpy", shuffle=False))
    assert [s["__key__"] for s in got] == [f"m{i:03d}" for i in range(N)]
    for i, sample in pairs(range(N), got):
        assert {"0.jpg", "1.png", "txt"} <= set(sample)
        assert np.array_equal(sample["0.jpg"], pixels(views(i)[0]))
        assert np.array_equal(sample["1.png"], pixels(views(i)[1]))
        assert sample["txt"] == f"two views of {i}"


def test_fields_and_a_transform_per_image(shards):
    ds = ShardDataset(
        shards,
        decode="torch",
        shuffle=False,
        transform={"0.jpg": v2.Resize((12, 12)), "1.png": v2.CenterCrop(8)},
        fields="0.jpg 1.png txt",
    )
    batches = list(ShardLoader(ds, batch_size=4, num_workers=0))
    assert [len(b[2]) for b in batches] == [4, 4, 2]
    first, second, captions = batches[0]
    assert first.shape == (4, 3, 12, 12) and second.shape == (4, 3, 8, 8)  # each image its own transform
    assert captions == [f"two views of {i}" for i in range(4)]
    want = torch.from_numpy(pixels(views(1)[1]).copy()).permute(2, 0, 1)
    assert torch.equal(second[1], v2.CenterCrop(8)(want))


def test_a_fused_crop_per_image(shards):
    """decode_size="auto" fuses the first per-field crop into decoding; the other image is
    decoded whole, then cropped: both come out at the crop's size."""
    ds = ShardDataset(shards, decode="torch", decode_size="auto", transform={"0.jpg": AUG, "1.png": AUG}, shuffle=False)
    got = list(ds)
    assert len(got) == N and all(s["0.jpg"].shape == s["1.png"].shape == (3, 16, 16) for s in got)


def test_the_gpu_path_ships_each_image_with_its_transform(shards):
    def run(**loader_kw):
        ds = ShardDataset(shards, decode="torch", shuffle=4, seed=1, transform={"0.jpg": AUG, "1.png": AUG})
        loader = ShardLoader(ds, batch_size=5, num_workers=0, generator=torch.Generator().manual_seed(0), **loader_kw)
        torch.manual_seed(0)
        return list(loader)

    expected, staged = run(), run(decode_device="cpu")
    for want, got in pairs(expected, staged):
        assert got["__key__"] == want["__key__"]
        for field in ("0.jpg", "1.png"):
            assert got[field].shape == want[field].shape == (5, 3, 16, 16)
            assert (got[field].int() - want[field].int()).abs().max().item() <= 1


def test_the_gpu_path_refuses_one_transform_for_several_images(shards):
    ds = ShardDataset(shards, decode="torch", transform=AUG)
    with pytest.raises(SampleError, match=r"one image per sample, this one has \['0.jpg', '1.png'\]; use transform="):
        list(ShardLoader(ds, batch_size=2, num_workers=0, decode_device="cpu"))
