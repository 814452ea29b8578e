"""Parallel, partitioned and resumable writing, and the writer's decode check (real processes,
real files, no mocks)."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from shardkit.cli.synthetic import make_image_folder
from shardkit.errors import ShardkitError, WorkerDied
from shardkit.format.index import Manifest
from shardkit.writing.driver import write_files, write_parallel
from tests.helpers import digests, shardkit_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """240 small JPEGs in 3 classes plus two files that must be skipped."""
    root = str(tmp_path_factory.mktemp("photos"))
    make_image_folder(root, count=240, classes=3, size=(120, 90), workers=2)
    good = open(os.path.join(root, "class_00", "img_000000.jpg"), "rb").read()
    with open(os.path.join(root, "class_01", "zz_cut.jpg"), "wb") as f:
        f.write(good[: len(good) // 2] + b"\xff\xd9")  # cut in the middle, end marker glued on
    with open(os.path.join(root, "class_02", "zz_text.jpg"), "w") as f:
        f.write("not an image")
    return root


def test_output_is_byte_identical_for_1_2_3_workers(photos, tmp_path):
    outs = []
    for workers in ("1", "2", "3"):
        out = tmp_path / f"w{workers}"
        summary = json.loads(
            shardkit_cli("write", photos, str(out), "--shard-size", "300kB", "--workers", workers, "--json").stdout
        )
        assert summary["samples"] == 240 and summary["skipped"] == 2 and summary["workers"] == int(workers)
        outs.append(digests(out))
    assert len(outs[0]) > 10 and outs[0] == outs[1] == outs[2]
    assert not any(n.endswith((".tmp", ".resume.json")) for n in outs[0])


def test_parts_in_any_order_merge_to_one_dataset(photos, tmp_path):
    import webdataset as wds

    from shardkit.read.dataset import ShardDataset

    order = [2, 0, 1]
    random.Random(1).shuffle(order)
    for dest, parts in ((tmp_path / "shuffled", order), (tmp_path / "ordered", [0, 1, 2])):
        for i in parts:
            shardkit_cli("write", photos, str(dest), "--shard-size", "300kB", "--part", f"{i}/3", "-q")
        merged = json.loads(shardkit_cli("merge", str(dest), "--json").stdout)
        assert merged["samples"] == 240
    assert digests(tmp_path / "shuffled") == digests(tmp_path / "ordered")
    dest = tmp_path / "ordered"
    assert shardkit_cli("verify", str(dest / "data.manifest.json")).returncode == 0
    manifest = Manifest.from_json((dest / "data.manifest.json").read_text())
    assert manifest.complete and manifest.classes == ["class_00", "class_01", "class_02"]
    assert [s.name for s in manifest.shards] == [f"data-{i:06d}.tar" for i in range(len(manifest.shards))]
    # The webdataset package reads the brace pattern, sample for sample: every input once, in order.
    pattern = merged["pattern"]
    keys, paths = [], []
    for sample in wds.WebDataset(pattern, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        assert sample["jpg"] == open(os.path.join(photos, meta["path"]), "rb").read()
        assert int(sample["cls"]) == manifest.classes.index(meta["path"].split("/")[0])
        keys.append(sample["__key__"])
        paths.append(meta["path"])
    assert keys == sorted(keys) and len(set(paths)) == 240
    assert [s["__key__"] for s in ShardDataset(str(dest / "data.manifest.json"))] == keys
    # Merging again is a no-op.
    assert json.loads(shardkit_cli("merge", str(dest), "--json").stdout)["samples"] == 240


def test_merge_names_missing_and_unfinished_parts(photos, tmp_path):
    shardkit_cli("write", photos, str(tmp_path), "--shard-size", "300kB", "--part", "0/3", "-q")
    proc = shardkit_cli("merge", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert b"part 1/3 is missing" in proc.stderr and b"part 2/3 is missing" in proc.stderr
    assert not (tmp_path / "data.manifest.json").exists() and (tmp_path / "data-part00000of00003-000000.tar").exists()
    # A part running (or killed) now is incomplete, and named as such.
    incomplete = Manifest(shards=[], name="data-part00001of00003", complete=False)
    (tmp_path / "data-part00001of00003.manifest.json").write_text(incomplete.to_json())
    proc = shardkit_cli("merge", str(tmp_path), check=False)
    assert b"part 1/3 is incomplete" in proc.stderr and b"part 2/3 is missing" in proc.stderr
    assert b"part 0/3" not in proc.stderr


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_killed_write_resumes_to_the_same_bytes(photos, tmp_path):
    shardkit_cli("write", photos, str(tmp_path / "ref"), "--shard-size", "100kB", "--workers", "2", "-q")
    reference = digests(tmp_path / "ref")
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "shardkit.cli",
        "write",
        photos,
        str(out),
        "--shard-size",
        "100kB",
        "--workers",
        "2",
        "-q",
    ]
    proc = subprocess.Popen(args, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (out / "data-000005.tar").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the write finished before it could be killed; make it bigger"
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # mid-write
    finally:
        proc.wait()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{w}") and _state(w) != "Z" for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and _state(w) != "Z"], "orphaned workers live on"
    left = digests(out)
    assert "data.resume.json" in left and len(left) < len(reference)
    for name, digest in left.items():
        if name.endswith((".tar", ".tar.idx")):  # complete-looking files are really complete
            assert digest == reference[name], name
    assert not Manifest.from_json((out / "data.manifest.json").read_text()).complete
    summary = json.loads(
        shardkit_cli("write", photos, str(out), "--shard-size", "100kB", "--workers", "2", "--resume", "--json").stdout
    )
    assert summary["resumed_shards"] >= 5 and summary["samples"] == 240
    assert digests(out) == reference
    # Resuming a complete write does nothing; other options are refused, not mixed in.
    shardkit_cli("write", photos, str(out), "--shard-size", "100kB", "--resume", "-q")
    assert digests(out) == reference


def test_resume_refuses_other_options(photos, tmp_path):
    out = tmp_path / "out"
    manifest = Manifest(shards=[], name="data", complete=False)
    out.mkdir()
    (out / "data.manifest.json").write_text(manifest.to_json())
    (out / "data.resume.json").write_text(json.dumps({"version": 1, "options": {"shard_size": 5}, "next_input": []}))
    proc = shardkit_cli("write", photos, str(out), "--resume", check=False)
    assert proc.returncode == 1 and b"used other options" in proc.stderr


def test_a_killed_worker_fails_the_write_naming_its_input(photos, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "shardkit.cli", "write", photos, str(out), "--shard-size", "100kB", "--workers", "2"]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (out / "data-000001.tar").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert f"worker process {workers[0]} was killed by signal 9".encode() in err
    assert photos.encode() in err  # the input it was on (or had next)
    reference = tmp_path / "ref"
    shardkit_cli("write", photos, str(reference), "--shard-size", "100kB", "-q")
    for name in os.listdir(out):
        if name.endswith(".tar"):
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name


class DiesOn:
    """Test-only work function: the worker process exits on one input, like a decoder crash."""

    def __init__(self, victim: str) -> None:
        self.victim = victim

    def __call__(self, item):
        from shardkit.ingest.files import EntryLoader

        if item[1].path.endswith(self.victim):
            os._exit(3)
        return EntryLoader()(item)


def test_a_worker_that_exits_names_the_input(photos, tmp_path):
    from shardkit.ingest.files import Entry

    paths = sorted(os.path.join(photos, "class_00", n) for n in os.listdir(os.path.join(photos, "class_00")))[:60]
    entries = [(f"{i:06d}", Entry(p, p, 0, None)) for i, p in enumerate(paths)]
    with pytest.raises(WorkerDied, match=r"exited with status 3 while reading .*img_000090\.jpg"):
        write_parallel(
            entries,
            DiesOn("img_000090.jpg"),
            str(tmp_path),
            total=len(entries),
            workers=2,
            shard_size="50kB",
            describe=lambda item: item[1].path,
        )
    manifest = Manifest.from_json((tmp_path / "data.manifest.json").read_text())
    assert not manifest.complete
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".tar")) == [s.name for s in manifest.shards]


def _bad_images(folder) -> dict[str, str]:
    """Files that look like images to a sniff but do not decode; name -> expected reason."""
    good = io.BytesIO()
    Image.effect_noise((160, 120), 40).convert("RGB").save(good, "JPEG", quality=90)
    data = good.getvalue()
    files = {
        "cut_middle.jpg": (data[: len(data) // 2] + b"\xff\xd9", "premature end of data segment"),
        "cut_end.jpg": (data[: len(data) // 2], "truncated jpg"),
        "notes.jpg": (b"plain text, not pixels", "not a recognised image format"),
    }
    broken = bytearray(data)
    broken[len(broken) // 2 : len(broken) // 2 + 400] = b"\xff" * 400  # corrupt entropy-coded data
    files["corrupt.jpg"] = (bytes(broken), "does not decode")
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    weird = bytearray(png.getvalue())
    weird[25] = 7  # an IHDR colour type no PNG decoder supports
    files["unsupported.png"] = (bytes(weird), "does not decode")
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # 400 Mpixels in ~50 kB
    files["bomb.png"] = (bomb.getvalue(), "decompression-bomb guard")
    for name, (payload, _) in files.items():
        (folder / name).write_bytes(payload)
    return {name: reason for name, (_, reason) in files.items()}


def test_only_decodable_images_are_written(photos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = sorted(os.listdir(os.path.join(photos, "class_00")))[:4]
    for name in good:
        (src / name).write_bytes(open(os.path.join(photos, "class_00", name), "rb").read())
    expected = _bad_images(src)
    proc = shardkit_cli("write", str(src), str(tmp_path / "out"), "--workers", "2", "--json")
    summary = json.loads(proc.stdout)
    assert summary["samples"] == 4 and summary["skipped"] == len(expected)
    reasons = {os.path.basename(s["path"]): s["reason"] for s in summary["skipped_files"]}
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reason in reasons[name], (name, reasons[name])
        assert name.encode() in proc.stderr  # each is named in the log too
    text = shardkit_cli("write", str(src), str(tmp_path / "out_text"), "--workers", "1").stdout.decode()
    assert f"skipped {len(expected)} file(s)" in text and "cut_middle.jpg" in text
    # --strict: fatal, naming the file; --no-validate: trusts the sniff (the cut file gets in)
    strict = shardkit_cli("write", str(src), str(tmp_path / "strict"), "--strict", check=False)
    assert strict.returncode == 1 and b"bomb.png: image is 20000x20000" in strict.stderr
    loose = json.loads(shardkit_cli("write", str(src), str(tmp_path / "loose"), "--no-validate", "--json").stdout)
    assert loose["samples"] == 4 + 4  # cut_middle, corrupt, unsupported and the bomb get in unchecked


def test_vanished_file_is_skipped_like_the_serial_writer(tmp_path):
    paths = []
    for i in range(12):
        path = tmp_path / f"{i:02d}.jpg"
        Image.effect_noise((64, 48), 30).convert("RGB").save(path, "JPEG")
        paths.append(str(path))
    paths.insert(5, str(tmp_path / "gone.jpg"))  # listed, but not there when read
    result = write_files(paths, str(tmp_path / "out"), workers=2, shard_size="20kB")
    assert result.samples == 12
    assert result.skipped == [(str(tmp_path / "gone.jpg"), "cannot read: No such file or directory")]
    with pytest.raises(ShardkitError, match="gone.jpg: cannot read"):
        write_files(paths, str(tmp_path / "strict"), workers=2, strict=True)


def test_migration_sources_are_decoded_by_the_workers(tmp_path):
    import sqlite3

    from tests.helpers import tiny_jpeg

    images = [tiny_jpeg(i) for i in range(30)]
    images[7] = images[7][: len(images[7]) // 2] + b"\xff\xd9"  # cut in the middle: sniffs fine
    db = sqlite3.connect(tmp_path / "t.sqlite")
    db.execute("create table pics(key text, image blob, label int)")
    db.executemany("insert into pics values(?,?,?)", [(f"k{i}", b, i % 3) for i, b in enumerate(images)])
    db.commit()
    db.close()
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        summary = json.loads(
            shardkit_cli(
                "write", str(tmp_path / "t.sqlite"), str(out), "--workers", workers, "--shard-size", "20kB", "--json"
            ).stdout
        )
        assert summary["samples"] == 29 and summary["skipped"] == 1
        assert "does not decode" in summary["skipped_files"][0]["reason"]
        outs.append(digests(out))
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_dask_engine_on_a_local_two_worker_cluster(photos, tmp_path):
    pytest.importorskip("distributed")
    from dask.distributed import Client

    from shardkit.writing.dask_engine import write_with_dask

    dask = [sys.executable, "-m", "dask"]  # the `dask` command of this environment
    scheduler_file = str(tmp_path / "scheduler.json")
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [
        subprocess.Popen(
            [
                *dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                scheduler_file,
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(scheduler_file) and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        *dask,
                        "worker",
                        "--scheduler-file",
                        scheduler_file,
                        "--host",
                        "127.0.0.1",
                        "--nworkers",
                        "1",
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                    ],
                    env=env,
                    stderr=subprocess.DEVNULL,
                )
            )
        with Client(scheduler_file=scheduler_file, timeout=30) as client:
            client.wait_for_workers(2, timeout=30)
            manifest, parts = write_with_dask(photos, str(tmp_path / "out"), parts=3, client=client, shard_size="300kB")
            ran_on = {w for w in client.run(os.getpid).values()}
        assert len(ran_on) == 2 and manifest.total_samples == 240 and len(parts) == 3
        assert sum(p["samples"] for p in parts) == 240
        shardkit_cli("write", photos, str(tmp_path / "cli"), "--shard-size", "300kB", "--part", "0/3", "-q")
        shardkit_cli("write", photos, str(tmp_path / "cli"), "--shard-size", "300kB", "--part", "1/3", "-q")
        shardkit_cli("write", photos, str(tmp_path / "cli"), "--shard-size", "300kB", "--part", "2/3", "-q")
        shardkit_cli("merge", str(tmp_path / "cli"), "-q")
        assert digests(tmp_path / "out") == digests(tmp_path / "cli")
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_part_slices_cover_every_input_once_and_bad_parts_are_refused(photos, tmp_path):
    from shardkit.writing.merge import parse_part, part_slice

    for total in (0, 1, 7, 240, 1001):
        for count in (1, 2, 3, 8):
            slices = [part_slice(total, i, count) for i in range(count)]
            assert [i for a, b in slices for i in range(a, b)] == list(range(total))
            assert max(b - a for a, b in slices) - min(b - a for a, b in slices) <= 1
    assert parse_part("2/8") == (2, 8)
    for bad in ("8/8", "-1/3", "1/0", "a/b", "3"):
        with pytest.raises(ValueError):
            parse_part(bad)
    usage = shardkit_cli("write", photos, str(tmp_path / "x"), "--part", "3/3", check=False)
    assert usage.returncode == 2 and b"0 <= I < N" in usage.stderr  # a usage error
    remote = shardkit_cli("write", photos, "s3://bucket/shards", "--part", "0/2", check=False)
    assert remote.returncode == 1 and b"shared-filesystem DEST" in remote.stderr
    assert b"shared-filesystem DEST" in shardkit_cli("merge", "s3://bucket/shards", check=False).stderr


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_python_api_same_bytes_with_every_start_method(photos, tmp_path, start_method):
    """fork is used only when the caller has no other thread; the others must agree."""
    paths = sorted(os.path.join(photos, "class_01", n) for n in os.listdir(os.path.join(photos, "class_01")))
    one = write_files(paths, str(tmp_path / "one"), labels=[1] * len(paths), workers=1, shard_size="100kB")
    two = write_files(
        paths, str(tmp_path / "two"), labels=[1] * len(paths), workers=2, shard_size="100kB", start_method=start_method
    )
    assert one.samples == two.samples == len(paths) - 1 and two.workers == 2
    assert [os.path.basename(p) for p, _ in two.skipped] == ["zz_cut.jpg"]
    assert digests(tmp_path / "one") == digests(tmp_path / "two")
