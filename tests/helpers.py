"""Test data builders shared by the test modules (small, generated, deterministic)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from shardkit.cli.doctor import Diagnosis
from shardkit.writing.writer import ShardWriter


def tiny_jpeg(i: int, size: tuple[int, int] = (48, 32), quality: int = 85) -> bytes:
    """A small, distinct, photo-ish JPEG for sample i."""
    rng = np.random.default_rng(i)
    w, h = size
    y = np.linspace(0, 1, h)[:, None, None]
    x = np.linspace(0, 1, w)[None, :, None]
    base = rng.uniform(0, 255, 3)[None, None, :] * (0.5 + 0.5 * x) * (0.5 + 0.5 * y)
    img = np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample(i: int, *, label_count: int = 3, image: bool = True) -> dict:
    out: dict = {"__key__": f"s{i:06d}", "cls": i % label_count, "json": {"i": i}}
    out["jpg"] = tiny_jpeg(i) if image else os.urandom(16) + i.to_bytes(4, "little")
    return out


def make_shards(dest: str, counts: Sequence[int], *, name: str = "data", image: bool = False) -> list[str]:
    """Shards with exactly ``counts[i]`` samples each (0 allowed); keys s000000.. in order.

    Returns the shard paths. Index sidecars and a manifest are written beside them.
    """
    n = 0
    with ShardWriter(dest, name=name, shard_size="1GB") as writer:
        for count in counts:
            for _ in range(count):
                writer.write(sample(n, image=image))
                n += 1
            writer.next_shard(allow_empty=True)
    return [os.path.join(dest, s.name) for s in writer.shards]


def keys_of(items) -> list[str]:
    """Keys from samples or batches (dicts with a list of keys)."""
    out: list[str] = []
    for item in items:
        key = item["__key__"]
        out.extend(key if isinstance(key, list) else [key])
    return out


def stop_after(loader, k: int, keys=keys_of) -> tuple[list[str], dict]:
    """Take ``k`` batches from a fresh pass of ``loader`` (a ShardLoader or torchdata's
    StatefulDataLoader), then return their ``keys(...)`` and the ``state_dict()`` saved
    right there."""
    it = iter(loader)
    before = keys(next(it) for _ in range(k))
    state = loader.state_dict()
    del it
    return before, state


def resumed_keys(loader, state: dict, keys=keys_of) -> list[str]:
    """``keys(...)`` of the rest of the epoch after ``loader.load_state_dict(state)``."""
    loader.load_state_dict(state)
    return keys(loader)


def pairs(want, got) -> list[tuple]:
    """``zip(want, got)`` for comparing two results: fails when their lengths differ or when
    both are empty, so a comparison cannot pass on a result that never arrived."""
    want, got = list(want), list(got)
    assert len(want) == len(got), f"lengths differ: {len(want)} expected, {len(got)} got"
    assert want, "nothing to compare: both results are empty"
    return list(zip(want, got))


def digests(folder) -> dict[str, str]:
    """sha256 of every file in ``folder``, by name (temp or resume files left show up too)."""
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder))
    }


def shard_members(folder, name: str | None = None) -> dict[str, bytes]:
    """Every member of every shard in ``folder`` (those of dataset ``name`` only, when
    given), in shard name order, read with tarfile."""
    prefix = f"{name}-" if name is not None else ""
    out: dict[str, bytes] = {}
    for shard in sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".tar")):
        with tarfile.open(os.path.join(folder, shard)) as tf:
            for m in tf.getmembers():
                out[m.name] = tf.extractfile(m).read()
    return out


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shardkit_cli(*args: str, check: bool = True, text: bool = False) -> subprocess.CompletedProcess:
    """``python -m shardkit.cli ARGS`` run from the repository root, output captured
    (``text``: as str); with ``check`` a failure raises with its stderr."""
    proc = subprocess.run([sys.executable, "-m", "shardkit.cli", *args], capture_output=True, cwd=ROOT, text=text)
    if check and proc.returncode != 0:
        stderr = proc.stderr if text else proc.stderr.decode()
        raise AssertionError(f"shardkit {' '.join(args)} exited {proc.returncode}: {stderr}")
    return proc


class CrashOn:
    """fn over samples that raises on the one keyed ``key`` while ``marker`` exists (a
    write killed mid-way, then fixed); picklable for the writer's worker processes."""

    def __init__(self, marker: str, key: str) -> None:
        self.marker, self.key = marker, key

    def __call__(self, sample):
        if sample["__key__"] == self.key and os.path.exists(self.marker):
            raise RuntimeError("simulated crash")
        return sample


def make_diagnosis(**changes: Any) -> Diagnosis:
    """A :class:`~shardkit.cli.doctor.Diagnosis` of a plausible decode-bound 2-worker run,
    with ``changes`` applied (for the doctor's conclusions and its chart)."""
    values: dict[str, Any] = dict(
        images=6400,
        seconds=5.0,
        workers=2,
        threads=0,
        cores=2,
        stage_ms={"read": 0.3, "decode": 2.1, "transform": 0.9, "collate": 0.0, "other": 0.15, "handoff": 0.4},
        worker_cpu_ms=3.9,
        main_cpu_ms=0.35,
        wait_fraction=0.2,
        reference_ms=2.7,
        decode_size=224,
        fused=True,
        bound="decode",
    )
    values.update(changes)
    return Diagnosis(**values)
