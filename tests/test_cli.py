"""The shardkit command line, run as a real subprocess on generated images."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile

import pytest

from shardkit.cli.synthetic import make_image_folder
from shardkit.format.index import Manifest


def shardkit(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "shardkit.cli", *args], capture_output=True, text=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"shardkit {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode()}")
    return proc


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("photos"))
    make_image_folder(root, count=300, classes=4, size=(200, 150), workers=2)
    return root


def test_write_image_folder_with_2mb_shards(photos, tmp_path):
    out1, out2 = tmp_path / "a", tmp_path / "b"
    proc = shardkit("write", photos, str(out1), "--shard-size", "2MB", "--json")
    summary = json.loads(proc.stdout)
    assert summary["samples"] == 300 and summary["shards"] >= 3 and summary["skipped"] == 0
    shardkit("write", photos, str(out2), "--shard-size", "2MB", "--workers", "1", "-q")
    manifest = Manifest.from_json((out1 / "data.manifest.json").read_text())
    assert manifest.classes == ["class_00", "class_01", "class_02", "class_03"]
    for info in manifest.shards:
        data = (out1 / info.name).read_bytes()
        assert len(data) <= 2_000_000
        assert data == (out2 / info.name).read_bytes()  # byte-identical re-run
        assert hashlib.sha256(data).hexdigest() == info.sha256
    assert (out1 / "data.manifest.json").read_bytes() == (out2 / "data.manifest.json").read_bytes()
    # labels match the source folders, images are byte-for-byte the source files
    first = out1 / manifest.shards[0].name
    with tarfile.open(first) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    meta = json.loads(members["000000.json"])
    assert members["000000.jpg"] == open(os.path.join(photos, meta["path"]), "rb").read()
    assert manifest.classes[int(members["000000.cls"])] == meta["path"].split("/")[0] == meta["label"]
    assert meta["width"] > 0 and meta["height"] > 0
    assert shardkit("verify", str(out1 / "data.manifest.json")).returncode == 0


def test_list_csv_jsonl_sources_and_real_format(tmp_path, photos):
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(photos) for f in fs)[:6]
    png = tmp_path / "really_a_png.jpg"
    from PIL import Image

    Image.new("RGB", (20, 10), "red").save(png, format="PNG")
    (tmp_path / "list.txt").write_text(
        "".join(f"{f}\t{'cat' if i % 2 else 'dog'}\n" for i, f in enumerate(files)) + f"{png.name}\tcat\n"
    )
    (tmp_path / "t.csv").write_text("path,label\n" + "".join(f"{f},{i}\n" for i, f in enumerate(files)))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"image": f, "class": 3}) + "\n" for f in files))
    for src, n in (("list.txt", 7), ("t.csv", 6), ("t.jsonl", 6)):
        out = tmp_path / ("out_" + src)
        summary = json.loads(shardkit("write", str(tmp_path / src), str(out), "--json").stdout)
        assert summary["samples"] == n
    with tarfile.open(tmp_path / "out_list.txt" / "data-000000.tar") as tf:
        names = tf.getnames()
    assert "000006.png" in names  # stored by real format, not by suffix
    manifest = Manifest.from_json((tmp_path / "out_list.txt" / "data.manifest.json").read_text())
    assert manifest.classes == ["cat", "dog"]


def test_corrupt_images_are_skipped_or_fatal_with_strict(tmp_path, photos):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    good = sorted(os.listdir(os.path.join(photos, "class_00")))[:3]
    for name in good:
        (src / name).write_bytes(open(os.path.join(photos, "class_00", name), "rb").read())
    (src / "broken.jpg").write_bytes((src / good[0]).read_bytes()[:500])
    (src / "notes.jpg").write_text("not an image")
    proc = shardkit("write", str(tmp_path / "src"), str(tmp_path / "out"), "--json")
    summary = json.loads(proc.stdout)
    assert summary["samples"] == 3 and summary["skipped"] == 2
    assert b"broken.jpg" in proc.stderr and b"notes.jpg" in proc.stderr
    strict = shardkit("write", str(tmp_path / "src"), str(tmp_path / "out2"), "--strict", check=False)
    assert strict.returncode == 1 and b"broken.jpg" in strict.stderr


def test_verify_detects_corruption(tmp_path, photos):
    out = tmp_path / "out"
    shardkit("write", photos, str(out), "--shard-size", "2MB", "-q")
    shard = out / "data-000001.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0x55  # inside an image payload: parses fine, sha256 differs
    shard.write_bytes(bytes(data))
    proc = shardkit("verify", str(out / "data.manifest.json"), "--json", check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and not report["ok"]
    assert any("sha256" in p["message"] and p["url"].endswith("data-000001.tar") for p in report["problems"])


def test_index_builds_sidecars_for_webdataset_shards(tmp_path):
    import webdataset as wds

    from tests.helpers import sample

    pattern = str(tmp_path / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=7, verbose=0) as sink:
        for i in range(20):
            s = sample(i, image=False)
            sink.write({"__key__": s["__key__"], "jpg": s["jpg"], "cls": s["cls"]})
    shardkit("index", str(tmp_path / "wds-{000000..000002}.tar"))
    manifest = Manifest.from_json((tmp_path / "wds.manifest.json").read_text())
    assert [s.samples for s in manifest.shards] == [7, 7, 6]
    from shardkit.read.dataset import ShardDataset

    ds = ShardDataset(str(tmp_path / "wds-{000000..000002}.tar"), world_size=3, rank=2, even=None)
    assert ds.counts == [7, 7, 6] and len(ds) == len(list(ds)) == 7
    assert shardkit("verify", str(tmp_path / "wds.manifest.json")).returncode == 0


def test_ls_cat_stats_and_usage_errors(tmp_path, photos):
    out = tmp_path / "out"
    shardkit("write", photos, str(out), "-q")
    rows = json.loads(shardkit("ls", str(out), "-n", "3", "--json").stdout)
    assert [r["key"] for r in rows] == ["000000", "000001", "000002"]
    jpg = shardkit("cat", str(out), "000002", "--field", "jpg").stdout
    meta = json.loads(shardkit("cat", str(out), "000002", "--field", "json").stdout)
    assert jpg == open(os.path.join(photos, meta["path"]), "rb").read()
    stats = json.loads(shardkit("stats", str(out), "--json").stdout)
    assert stats["samples"] == 300 and stats["labels"] == {"0": 75, "1": 75, "2": 75, "3": 75}
    assert shardkit("cat", str(out), "nope", check=False).returncode == 1
    assert shardkit("write", check=False).returncode == 2
    missing = shardkit("ls", str(tmp_path / "x-{0..3}.tar"), check=False)
    assert missing.returncode == 1 and b"do not exist" in missing.stderr


def test_write_detects_migration_formats(tmp_path):
    import sqlite3

    import h5py
    import numpy as np

    from shardkit.read.dataset import ShardDataset
    from tests.helpers import tiny_jpeg

    images = [tiny_jpeg(i) for i in range(12)]
    with h5py.File(tmp_path / "d.h5", "w") as f:
        data = f.create_dataset("images", (12,), dtype=h5py.vlen_dtype(np.uint8))
        for i, b in enumerate(images):
            data[i] = np.frombuffer(b, np.uint8)
        f["labels"] = np.arange(12) % 4
    db = sqlite3.connect(tmp_path / "t.sqlite")
    db.execute("create table pics(key text, image blob, label int)")
    db.executemany("insert into pics values(?,?,?)", [(f"k{i}", b, i % 3) for i, b in enumerate(images)])
    db.commit()
    db.close()
    for src, labels in (("d.h5", [i % 4 for i in range(12)]), ("t.sqlite", [i % 3 for i in range(12)])):
        out = tmp_path / ("out_" + src)
        assert json.loads(shardkit("write", str(tmp_path / src), str(out), "--json").stdout)["samples"] == 12
        samples = list(ShardDataset(str(out)))
        assert [s["jpg"] for s in samples] == images
        assert [int(s["cls"]) for s in samples] == labels
    bad = shardkit("write", str(tmp_path / "t.sqlite"), str(tmp_path / "x"), "--table", "nope", check=False)
    assert bad.returncode == 1 and b"nope" in bad.stderr and b"pics" in bad.stderr


def test_every_command_that_reads_shards_takes_several_paths(tmp_path, photos):
    out = tmp_path / "out"
    shardkit("write", photos, str(out), "--shard-size", "2MB", "-q")
    tars = sorted(str(p) for p in out.glob("*.tar"))  # what the shell makes of shards/*.tar
    assert len(tars) >= 3
    rows = json.loads(shardkit("ls", *tars, "-n", "300", "--json").stdout)
    assert len(rows) == 300 and {r["url"] for r in rows} == set(tars)
    last = rows[-1]
    jpg = shardkit("cat", *tars, last["key"], "--field", "jpg").stdout
    with tarfile.open(last["url"]) as tf:
        assert jpg == tf.extractfile(f"{last['key']}.jpg").read()
    stats = json.loads(shardkit("stats", *tars[:2], "--json").stdout)
    assert stats["shards"] == 2 and stats["samples"] == sum(1 for r in rows if r["url"] in tars[:2])
    assert json.loads(shardkit("verify", *tars, "--json").stdout)["samples"] == 300
    index = json.loads(shardkit("index", *tars, "--name", "again", "--json").stdout)
    assert index == {"shards": len(tars), "samples": 300} and (out / "again.manifest.json").exists()
    doctor = json.loads(
        shardkit(
            "doctor", *tars[:2], "--seconds", "0.5", "--workers", "0", "--batch", "8", "--transform", "none", "--json"
        ).stdout
    )
    assert doctor["images"] > 0


def test_usage_errors_exit_2(tmp_path, photos):
    out = str(tmp_path / "out")
    cases = [
        (("write", photos, out, "--workers", "0"), b"--workers: must be at least 1"),
        (("write", photos, out, "--part", "3/3"), b"0 <= I < N"),
        (("write", photos, out, "--part", "half"), b"I/N"),
        (("write", photos, out, "--shard-size", "12XB"), b"--shard-size"),
        (("write", photos, out, "--max-count", "0"), b"--max-count"),
        (("write", photos, out, "--quality", "101"), b"1 to 100"),
        (("write", photos, out, "--resume", "--overwrite"), b"not allowed with"),
        (("ls", out, "-n", "0"), b"-n: must be at least 1"),
        (("doctor", out, "--decode-size", "big"), b"auto, exact, none or a positive integer"),
        (("doctor", out, "--seconds", "0"), b"more than 0"),
        (("stats", out, "--quiet", "--json"), b"--quiet cannot be combined"),
        (("ls",), b"required"),
    ]
    for args, message in cases:
        proc = shardkit(*args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.returncode, proc.stderr)
    assert not os.path.exists(out)
    # Problems with the data (not the command line) still exit 1, naming what is wrong.
    flag = shardkit("write", photos, out, "--table", "pics", check=False)
    assert flag.returncode == 1 and b"--table) does not apply to folder sources" in flag.stderr


def test_merge_finds_the_name_of_the_parts(tmp_path, photos):
    dest = str(tmp_path / "shards")
    for i in (0, 1):
        shardkit("write", photos, dest, "--part", f"{i}/2", "--name", "d", "-q")
    merged = json.loads(shardkit("merge", dest, "--json").stdout)
    assert merged["samples"] == 300 and merged["manifest"].endswith("d.manifest.json")
    assert merged["pattern"].startswith(os.path.join(dest, "d-"))
    assert Manifest.from_json((tmp_path / "shards" / "d.manifest.json").read_text()).complete
    assert json.loads(shardkit("merge", dest, "--json").stdout)["samples"] == 300  # again: a no-op
    # Two sets of parts: both are named, and --name chooses.
    for name in ("a", "b"):
        shardkit("write", photos, dest, "--part", "0/1", "--name", name, "-q")
    two = shardkit("merge", dest, check=False)
    assert two.returncode == 1 and b"parts of 2 datasets: 'a' (of 1 parts), 'b' (of 1 parts)" in two.stderr
    missing = shardkit("merge", dest, "--name", "data", check=False)
    assert missing.returncode == 1 and b"no parts of 'data'" in missing.stderr and b"'a'" in missing.stderr
    assert json.loads(shardkit("merge", dest, "--name", "b", "--json").stdout)["samples"] == 300
    empty = tmp_path / "empty"
    empty.mkdir()
    none = shardkit("merge", str(empty), check=False)
    assert none.returncode == 1 and b"no parts to merge" in none.stderr


def test_every_flag_and_argument_has_help():
    import argparse

    from shardkit.cli.main import COMMANDS
    from shardkit.cli.parser import build_parser

    parser = build_parser()
    # argparse has no public accessor for a parser's actions; _actions is what its help formatter walks.
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert (
        set(commands)
        == set(COMMANDS)
        == {
            "write",
            "merge",
            "index",
            "ls",
            "cat",
            "verify",
            "stats",
            "demo",
            "doctor",
            "bench",
            "show",
            "companion",
        }
    )
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in commands.items()
        for action in sub._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []
    # --workers says which workers.
    workers = {
        name: action.help
        for name, sub in commands.items()
        for action in sub._actions
        if "--workers" in action.option_strings
    }
    assert set(workers) == {"write", "demo", "doctor", "companion"}
    assert "writer processes" in workers["write"] and "processes running --fn" in workers["companion"]
    assert "DataLoader worker" in workers["doctor"] and "DataLoader worker" in workers["demo"]
    assert "DataLoader workers" in commands["bench"].description
