"""Hugging Face ``datasets`` and shardkit, both ways: a Parquet table ``datasets`` wrote (the
``Image`` feature, a ``ClassLabel``) written into shards by shardkit, and those shards loaded
back with ``load_dataset("webdataset", ...)``: keys, captions, labels, every column and the
pixels equal."""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import pytest
from PIL import Image

import shardkit
from shardkit.ingest import IngestOptions
from tests.helpers import pairs, tiny_jpeg

datasets = pytest.importorskip("datasets")

N = 30


def source_rows() -> dict[str, list]:
    return {
        "image": [tiny_jpeg(i, size=(40 + i, 30)) for i in range(N)],
        "caption": [f"a photo of thing {i}, «{'ü' * (i % 3)}»" if i != 2 else None for i in range(N)],
        "label": [i % 4 for i in range(N)],
        "aesthetic": [round(4 + i * 0.137, 3) for i in range(N)],
        "nsfw": [i % 7 == 0 for i in range(N)],
        "uid": [f"{i * 7919:08x}" for i in range(N)],
        "tags": [[f"t{i}", "photo"] for i in range(N)],
    }


@pytest.fixture(scope="module")
def hf_parquet(tmp_path_factory) -> str:
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["ant", "bee", "cat", "dog"]),
            "aesthetic": datasets.Value("float64"),
            "nsfw": datasets.Value("bool"),
            "uid": datasets.Value("string"),
            "tags": datasets.Sequence(datasets.Value("string")),
        }
    )
    path = str(tmp_path_factory.mktemp("hf") / "train-00000-of-00001.parquet")
    datasets.Dataset.from_dict(source_rows(), features=features).to_parquet(path)
    return path


def load_shards(folder: str, cache: str):
    files = sorted(glob.glob(os.path.join(folder, "*.tar")))
    return datasets.load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=cache)


def test_datasets_loads_what_shardkit_wrote_from_its_parquet(hf_parquet, tmp_path):
    out = str(tmp_path / "shards")
    result = shardkit.write(hf_parquet, out, shard_size="40kB", options=IngestOptions(key_column="uid"), workers=2)
    assert result.shards > 1 and result.samples == N and result.skipped == []
    assert result.columns == {
        "image": "image",
        "caption": "txt",
        "label": "cls, json",  # a ClassLabel's integers are the class indices...
        "aesthetic": "json",
        "nsfw": "json",
        "uid": "key",
        "tags": "json",
    }
    ds = load_shards(out, str(tmp_path / "cache"))
    rows = source_rows()
    assert len(ds) == N and set(ds.features) >= {"__key__", "jpg", "txt", "cls", "json"}
    assert ds["__key__"] == rows["uid"]
    assert ds["txt"] == [c if c is not None else "" for c in rows["caption"]]  # null caption: empty txt
    assert ds["cls"] == rows["label"]
    for i, meta in pairs(range(N), ds["json"]):
        assert meta == {
            "label": rows["label"][i],
            "aesthetic": rows["aesthetic"][i],
            "nsfw": rows["nsfw"][i],
            "tags": rows["tags"][i],
        }
    for i, image in pairs(range(N), ds["jpg"]):
        want = np.asarray(Image.open(io.BytesIO(rows["image"][i])).convert("RGB"))
        assert np.array_equal(np.asarray(image.convert("RGB")), want)
    # ...and the names live in the manifest
    manifest = shardkit_manifest(out)
    assert manifest.classes == ["ant", "bee", "cat", "dog"]


def shardkit_manifest(folder: str):
    from shardkit.format.index import Manifest

    with open(os.path.join(folder, "data.manifest.json")) as f:
        return Manifest.from_json(f.read())


def test_datasets_reads_several_images_per_sample(tmp_path):
    table = {
        "views": [[tiny_jpeg(i), tiny_jpeg(100 + i)] for i in range(6)],
        "text": [f"pair {i}" for i in range(6)],
    }
    features = datasets.Features({"views": datasets.Sequence(datasets.Image()), "text": datasets.Value("string")})
    path = str(tmp_path / "pairs.parquet")
    datasets.Dataset.from_dict(table, features=features).to_parquet(path)
    out = str(tmp_path / "shards")
    shardkit.write(path, out, workers=1)
    ds = load_shards(out, str(tmp_path / "cache"))
    assert set(ds.features) >= {"0.jpg", "1.jpg", "txt"}
    assert ds["txt"] == table["text"]
    for i, (first, second) in pairs(range(6), zip(ds["0.jpg"], ds["1.jpg"])):
        for image, data in ((first, table["views"][i][0]), (second, table["views"][i][1])):
            assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
