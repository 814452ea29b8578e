"""shardkit doctor: per-stage timing through the loader names the real bottleneck."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from shardkit import ShardDataset, ShardLoader, ShardWriter
from shardkit.cli.doctor import diagnose, format_report
from shardkit.cli.main import main
from shardkit.cli.profiling import STAGES, profiled
from shardkit.cli.synthetic import photo_like
from shardkit.decode.jpeg_region import region_support


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory) -> str:
    """12 large photo-like JPEGs (2400x1800): decoding dwarfs everything else."""
    dest = tmp_path_factory.mktemp("big")
    pixels = photo_like(np.random.default_rng(0), 2400, 1800)
    with ShardWriter(str(dest), shard_size="1GB") as writer:
        for i in range(12):
            buffer = io.BytesIO()
            Image.fromarray(np.roll(pixels, 97 * i, axis=1)).save(buffer, "JPEG", quality=95)
            writer.write({"__key__": f"{i:04d}", "jpg": buffer.getvalue(), "cls": i % 3})
    return str(dest)


def _corner(image):
    return image[:, :64, :64]


def test_doctor_names_decode_on_huge_images_with_no_workers(big_shards):
    d = diagnose(big_shards, transform=_corner, workers=0, batch_size=2, decode_size=None, seconds=1.0)
    assert d.bound == "decode"
    assert d.stage_ms["decode"] > 2 * max(d.stage_ms[s] for s in STAGES if s != "decode")
    assert any("num_workers" in a for a in d.advice) and any("decode_size='auto'" in a for a in d.advice)
    assert any("decode_size='exact'" in a and "the same values" in a for a in d.advice)
    assert d.worker_cpu_ms > 0 and d.reference_ms > 0 and d.images >= 2 and not d.exact_crop


def test_doctor_says_when_crops_are_fused_at_full_resolution(big_shards):
    from torchvision.transforms import v2

    kw = dict(transform=v2.RandomResizedCrop(64), workers=0, batch_size=2, seconds=0.5)
    d = diagnose(big_shards, decode_size="exact", **kw)
    assert d.fused and d.exact_crop and d.decode_size == "exact"
    assert "fused crop decode at full resolution" in format_report(d)
    assert not any("decode_size=" in a for a in d.advice)
    auto = diagnose(big_shards, decode_size="auto", **kw)
    assert auto.fused and not auto.exact_crop and "at full resolution" not in format_report(auto)


def test_doctor_names_a_slow_transform(big_shards):
    def slow(image):
        time.sleep(0.3)
        return image[:, :8, :8]

    d = diagnose(big_shards, transform=slow, workers=0, batch_size=2, decode_size="auto", seconds=0.5)
    assert d.bound == "transform"


def test_doctor_cli_json(big_shards, capsys):
    assert (
        main(
            [
                "doctor",
                big_shards,
                "--workers",
                "1",
                "--batch",
                "2",
                "--seconds",
                "0.5",
                "--transform",
                "rrc224+flip",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["region_decode"] is region_support()[0]
    assert data["fused"] is True and data["bound"] in ("decode", "transform", "io", "collate", "overhead", "transfer")
    assert set(data["stage_ms"]) == set(STAGES) and data["cpu_ms_per_image"] > 0
    assert data["exact_crop"] is False
    assert main(["doctor", big_shards, "--transform", "sharpen", "--seconds", "0.5"]) == 1
    capsys.readouterr()
    args = ["doctor", big_shards, "--workers", "0", "--batch", "2", "--seconds", "0.5", "--json"]
    assert main([*args, "--transform", "rrc224+flip", "--decode-size", "exact"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert exact["decode_size"] == "exact" and exact["fused"] is True and exact["exact_crop"] is True


def test_doctor_plot_draws_the_stage_chart(big_shards, tmp_path):
    from PIL import Image

    chart = tmp_path / "doctor.png"
    args = ["doctor", big_shards, "--workers", "1", "--batch", "2", "--seconds", "0.5", "--plot", str(chart), "-q"]
    assert main(args) == 0
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 100


def test_worker_cpu_is_counted_when_the_data_runs_out(big_shards):
    # 12 images, 2 workers, batches of 2: the data runs out long before 30 s and the
    # DataLoader joins its workers, whose CPU then shows only in getrusage's children.
    d = diagnose(big_shards, transform=_corner, workers=2, batch_size=2, decode_size=None, seconds=30.0)
    assert d.images < 12 and d.seconds < 30
    # Each image costs a full 2400x1800 decode in a worker: far more than the main process.
    assert d.worker_cpu_ms > 0.5 * d.reference_ms
    assert d.worker_cpu_ms > 5 * d.main_cpu_ms
    # The same loop in 2 processes at once costs about what it costs alone (not a tenth, not 10x).
    assert 0.5 * d.reference_ms < d.parallel_reference_ms < 3 * d.reference_ms


def test_doctor_reports_the_parallel_reference_and_batch_memory(uneven_shards):
    d = diagnose(uneven_shards, transform=_corner, workers=2, batch_size=2, decode_size=None, seconds=30.0)
    assert d.parallel_reference_ms > 0 and d.reference_ms > 0
    # 2 workers x 16 batches of 2, the first of each not counted; the rings fill, then are reused.
    assert d.memory_reused + d.memory_fresh == d.images // 2 and d.memory_reused > d.memory_fresh
    report = format_report(d)
    assert "2 processes at once" in report and f"{d.memory_reused} batches in reused memory" in report
    alone = diagnose(uneven_shards, transform=_corner, workers=0, batch_size=2, decode_size=None, seconds=0.2)
    assert alone.parallel_reference_ms == 0 and alone.memory_reused == alone.memory_fresh == 0
    assert "at once" not in format_report(alone)


def test_profiled_counters_reach_loader_stats(uneven_shards):
    ds = profiled(ShardDataset(uneven_shards, decode="torch", fields="jpg cls"))
    loader = ShardLoader(ds, batch_size=8, num_workers=2)
    assert sum(len(b[1]) for b in loader) == 64
    stats = loader.stats()
    assert all(stats[f"{s}_us"] >= 0 for s in STAGES) and stats["decode_us"] > 0 and stats["read_us"] > 0


@pytest.mark.parametrize("with_opencv", [False, True])
@pytest.mark.parametrize("cv2_installed", [False, True])
def test_doctor_names_the_opencv_extra_when_numpy_splits_the_planes(with_opencv, cv2_installed, monkeypatch):
    import sys

    from shardkit.cli.doctor import conclude
    from tests.helpers import make_diagnosis

    if not cv2_installed:
        monkeypatch.setitem(sys.modules, "cv2", None)  # find_spec("cv2") is None
    else:
        pytest.importorskip("cv2")

    stage_ms = dict.fromkeys(STAGES, 0.05) | {"decode": 1.0}
    diagnosis = make_diagnosis(
        images=1000,
        seconds=1.0,
        stage_ms=stage_ms,
        worker_cpu_ms=1.2,
        main_cpu_ms=0.02,
        wait_fraction=0.5,
        reference_ms=1.1,
        decode_size=None,
        fused=False,
        bound="",
        planar_opencv=with_opencv,
    )
    _, advice = conclude(diagnosis)
    planes = [line for line in advice if "NCHW planes" in line]
    assert len(planes) == (0 if with_opencv else 1)
    if planes:  # never advise a second OpenCV wheel beside a broken one
        assert ("shardkit[opencv]" in planes[0]) is not cv2_installed
        assert ("cv2 is unusable" in planes[0]) is cv2_installed


def test_doctor_json_says_who_splits_the_planes(big_shards, capsys):
    from shardkit.decode.planar import opencv_available

    args = ["doctor", big_shards, "--workers", "1", "--batch", "2", "--seconds", "0.3", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["planar_opencv"] is opencv_available()
