"""Tests for shardkit.gpu.cuda: CPU behaviour always, CUDA behaviour when a GPU is present.

(Batch decoding on the GPU is tested in tests/test_gpu_decoders.py.)"""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict, namedtuple

import pytest
import torch

from shardkit.gpu.cuda import CudaPrefetcher, _to_device, cuda_available
from tests.helpers import pairs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")

Pair = namedtuple("Pair", "image label")


def _nested_batch() -> dict:
    return {
        "image": torch.arange(12, dtype=torch.uint8).reshape(3, 2, 2),
        "meta": [torch.ones(2), ("key", torch.zeros(1))],
        "pair": Pair(torch.tensor([1.5]), 3),
        "ordered": OrderedDict(a=torch.ones(1)),
        "name": "sample",
    }


def test_import_makes_no_cuda_call():
    code = "import torch, shardkit.gpu.cuda; print(torch.cuda.is_initialized())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "False"


def test_cuda_available_matches_torch():
    assert cuda_available() is torch.cuda.is_available()


def test_to_device_keeps_structure():
    batch = _nested_batch()
    moved = _to_device(batch, torch.device("cpu"))
    assert type(moved["pair"]) is Pair and moved["pair"].label == 3
    assert type(moved["ordered"]) is OrderedDict and type(moved["meta"][1]) is tuple
    assert moved["name"] == "sample" and moved["meta"][1][0] == "key"
    assert torch.equal(moved["image"], batch["image"])


@without_cuda
def test_prefetcher_passes_through_without_cuda():
    batches = [_nested_batch(), _nested_batch()]
    prefetcher = CudaPrefetcher(batches)
    assert prefetcher.device is None and len(prefetcher) == 2
    out = list(prefetcher)
    assert len(out) == 2 and all(a is b for a, b in pairs(out, batches))


@without_cuda
def test_prefetcher_prepares_batches_without_cuda():
    out = list(CudaPrefetcher([1, 2], prepare=lambda batch: batch * 10))
    assert out == [10, 20]


@without_cuda
def test_explicit_cuda_device_without_cuda_is_an_error():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        CudaPrefetcher([], device="cuda")


def test_non_cuda_device_rejected():
    with pytest.raises(ValueError, match="CUDA device"):
        CudaPrefetcher([], device="cpu")


@needs_cuda
def test_prefetcher_moves_nested_batches_in_order():
    batches = [
        {"x": torch.full((4, 4), float(i)).pin_memory(), "y": [torch.tensor([i])], "pair": Pair(torch.ones(2), i)}
        for i in range(5)
    ]
    out = list(CudaPrefetcher(batches))
    assert len(out) == 5
    for i, batch in enumerate(out):
        assert batch["x"].is_cuda and batch["y"][0].is_cuda and batch["pair"].image.is_cuda
        assert batch["x"].sum().item() == 16 * i and batch["pair"].label == i
    assert list(CudaPrefetcher([], device="cuda")) == []
    prepared = list(CudaPrefetcher([torch.ones(2)], device="cuda", prepare=lambda b: {"x": b * 2}))
    assert prepared[0]["x"].is_cuda and prepared[0]["x"].sum().item() == 4
