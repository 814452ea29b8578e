"""``shardkit.write``: the one entry point for writing (what ``shardkit write`` runs), on real
files and real worker processes; the shards are read back with ``tarfile``."""

from __future__ import annotations

import json
import os
import sqlite3
import tarfile

import pytest

import shardkit
from shardkit.errors import ShardkitError
from shardkit.format.index import Manifest
from tests.helpers import digests, tiny_jpeg


def members(folder) -> dict[str, bytes]:
    """Every member of every shard in ``folder``, in shard order (read with tarfile)."""
    manifest = Manifest.from_json(open(os.path.join(folder, "data.manifest.json")).read())
    out: dict[str, bytes] = {}
    for info in manifest.shards:
        with tarfile.open(os.path.join(folder, info.name)) as tf:
            for m in tf.getmembers():
                out[m.name] = tf.extractfile(m).read()
    return out


def caption(i: int):
    """The user function of these tests: item i -> one sample, two samples, or none."""
    if i % 5 == 4:
        return None
    if i % 5 == 3:
        return [{"jpg": tiny_jpeg(i), "txt": f"crop {j} of {i}"} for j in range(2)]
    return {"jpg": tiny_jpeg(i), "txt": f"photo {i}", "json": {"i": i, "score": i / 10}}


class BreakImage:
    """fn that returns a JPEG cut in the middle (end marker glued on) for one item."""

    def __init__(self, bad: int) -> None:
        self.bad = bad

    def __call__(self, i: int):
        data = tiny_jpeg(i, size=(96, 64))
        if i == self.bad:
            data = data[: len(data) // 2] + b"\xff\xd9"
        return {"jpg": data}


class FailAt:
    """fn that raises on item ``at`` while ``marker`` exists (a crash mid-write, then a fix)."""

    def __init__(self, marker: str, at: int) -> None:
        self.marker, self.at = marker, at

    def __call__(self, i: int):
        if i == self.at and os.path.exists(self.marker):
            raise RuntimeError("simulated crash")
        return [{"jpg": tiny_jpeg(i), "txt": f"{i}/{j}"} for j in range(3)]


def test_exports():
    from shardkit.storage.backend import SourceOptions
    from shardkit.writing.driver import WriteResult, write

    assert shardkit.write is write and shardkit.WriteResult is WriteResult
    assert shardkit.SourceOptions is SourceOptions
    assert {"write", "WriteResult", "SourceOptions"} <= set(shardkit.__all__)


def test_folder_input(image_folder, tmp_path):
    result = shardkit.write(image_folder, str(tmp_path / "out"), shard_size="40kB", workers=1)
    assert result.samples == 45 and result.shards >= 3 and result.skipped == [] and result.workers == 1
    manifest = Manifest.from_json((tmp_path / "out" / "data.manifest.json").read_text())
    assert manifest.complete and manifest.classes == ["class_00", "class_01", "class_02"]
    got = members(tmp_path / "out")
    jsons = sorted(n for n in got if n.endswith(".json"))
    assert len(jsons) == 45
    for name in jsons:
        key = name[: -len(".json")]
        meta = json.loads(got[name])
        assert got[f"{key}.jpg"] == open(os.path.join(image_folder, meta["path"]), "rb").read()
        assert manifest.classes[int(got[f"{key}.cls"])] == meta["path"].split("/")[0]


def test_items_with_fn_one_several_or_none(tmp_path):
    result = shardkit.write(range(20), str(tmp_path / "out"), fn=caption, shard_size="10kB", workers=1)
    # per 5 items: 3 single samples, 1 item giving 2, 1 dropped
    assert result.filtered == 4 and result.samples == 4 * (3 + 2) and result.skipped == []
    got = members(tmp_path / "out")
    keys = sorted({n.split(".", 1)[0] for n in got})
    expected = sorted(
        [f"{i:06d}" for i in range(20) if i % 5 < 3] + [f"{i:06d}_{j}" for i in range(20) if i % 5 == 3 for j in (0, 1)]
    )
    assert keys == expected
    assert got["000000.txt"] == b"photo 0" and got["000013_1.txt"] == b"crop 1 of 13"
    assert got["000002.jpg"] == tiny_jpeg(2) and got["000013_0.jpg"] == tiny_jpeg(13)
    assert json.loads(got["000012.json"]) == {"i": 12, "score": 1.2}
    assert "000004.txt" not in got and "000014.jpg" not in got


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_output_is_byte_identical_for_1_and_2_workers(tmp_path, start_method):
    one = shardkit.write(range(40), str(tmp_path / "one"), fn=caption, shard_size="12kB", workers=1)
    two = shardkit.write(
        range(40), str(tmp_path / "two"), fn=caption, shard_size="12kB", workers=2, start_method=start_method
    )
    assert one.workers == 1 and two.workers == 2 and one.samples == two.samples == 8 * 5
    a, b = digests(tmp_path / "one"), digests(tmp_path / "two")
    assert len(a) == len(b) > 6 and a == b


def test_a_function_that_does_not_pickle_is_refused_at_the_start(tmp_path):
    dest = tmp_path / "out"
    for method in ("spawn", "forkserver"):
        with pytest.raises(ShardkitError) as err:
            shardkit.write(range(10), str(dest), fn=lambda i: {"txt": str(i)}, workers=2, start_method=method)
        message = str(err.value)
        assert f"started with {method!r}" in message and "does not pickle" in message and "lambda" in message
        assert not dest.exists()  # refused before anything was written
    # In this process, or in forked workers, nothing is pickled: the lambda is fine.
    for workers, method in ((1, None), (2, "fork")):
        out = tmp_path / f"ok{workers}"
        result = shardkit.write(range(10), str(out), fn=lambda i: {"txt": str(i)}, workers=workers, start_method=method)
        assert result.samples == 10 and result.workers == workers
        assert members(out)["000007.txt"] == b"7"


def test_every_image_fn_returns_is_checked(tmp_path):
    result = shardkit.write(range(12), str(tmp_path / "out"), fn=BreakImage(5), workers=2)
    assert result.samples == 11 and len(result.skipped) == 1
    where, reason = result.skipped[0]
    assert where.startswith("input 000005") and reason.startswith("jpg: ") and "premature end" in reason.lower()
    assert "000005.jpg" not in members(tmp_path / "out")
    with pytest.raises(ShardkitError, match="input 000005.*jpg: "):
        shardkit.write(range(12), str(tmp_path / "strict"), fn=BreakImage(5), workers=2, strict=True)
    unchecked = shardkit.write(range(12), str(tmp_path / "trusted"), fn=BreakImage(5), validate=False)
    assert unchecked.samples == 12 and unchecked.skipped == []


def test_validate_false_honours_workers(tmp_path):
    samples = [{"__key__": f"k{i:03d}", "jpg": tiny_jpeg(i), "cls": i % 3} for i in range(30)]
    one = shardkit.write(samples, str(tmp_path / "one"), validate=False, shard_size="10kB")
    two = shardkit.write(samples, str(tmp_path / "two"), validate=False, shard_size="10kB", workers=2)
    assert one.workers == 1 and two.workers == 2  # nothing for workers to do: one unless asked for more
    assert one.samples == two.samples == 30 and digests(tmp_path / "one") == digests(tmp_path / "two")
    # A dataset format read in this process, its samples handed to the workers.
    db = sqlite3.connect(tmp_path / "t.sqlite")
    db.execute("create table pics(key text, image blob, label int)")
    db.executemany("insert into pics values(?,?,?)", [(s["__key__"], s["jpg"], s["cls"]) for s in samples])
    db.commit()
    db.close()
    src = str(tmp_path / "t.sqlite")
    default = shardkit.write(src, str(tmp_path / "db1"), validate=False, shard_size="10kB")
    asked = shardkit.write(src, str(tmp_path / "db2"), validate=False, shard_size="10kB", workers=2)
    assert default.workers == 1 and asked.workers == 2 and asked.samples == 30
    assert digests(tmp_path / "db1") == digests(tmp_path / "db2")


def test_parts_key_items_by_their_global_position(tmp_path):
    from shardkit.writing.merge import merge_parts

    single = shardkit.write(range(20), str(tmp_path / "one"), fn=caption, shard_size="10kB", workers=1)
    for i in (1, 0, 2):
        shardkit.write(range(20), str(tmp_path / "parts"), fn=caption, shard_size="10kB", part=f"{i}/3", workers=1)
    merged = merge_parts(str(tmp_path / "parts"))  # the one dataset with parts there
    assert merged.total_samples == single.samples == 20
    whole, parts = members(tmp_path / "one"), members(tmp_path / "parts")
    assert len(whole) == len(parts) and whole == parts


def test_a_crash_inside_an_input_resumes_to_the_same_bytes(tmp_path):
    """Each input gives 3 samples, so shard boundaries fall inside inputs; a resumed write
    must neither repeat nor lose the samples of the input a shard boundary cut."""
    marker = tmp_path / "crash"
    reference = shardkit.write(range(30), str(tmp_path / "ref"), fn=FailAt(str(marker), 24), shard_size="8kB")
    marker.touch()
    out = str(tmp_path / "out")
    with pytest.raises(ShardkitError, match="input 000024.*simulated crash"):
        # one process: the inputs before the crash are written before it surfaces
        shardkit.write(range(30), out, fn=FailAt(str(marker), 24), shard_size="8kB", workers=1)
    record = json.loads(open(os.path.join(out, "data.resume.json")).read())
    assert any(record["next_sample"]), "no shard boundary fell inside an input; make the shards smaller"
    marker.unlink()
    resumed = shardkit.write(range(30), out, fn=FailAt(str(marker), 24), shard_size="8kB", workers=2, resume=True)
    assert resumed.resumed_shards > 0 and resumed.samples == reference.samples == 90
    assert digests(out) == digests(tmp_path / "ref")


def test_fn_errors_name_the_input(tmp_path):
    with pytest.raises(ShardkitError, match=r"input 000000 \(0\): TypeError: fn returned a str"):
        shardkit.write(range(5), str(tmp_path / "a"), fn=str, workers=1)
    with pytest.raises(ShardkitError, match=r"input 000000 \(0\): TypeError: item 1 of fn's result is a int"):
        shardkit.write(range(5), str(tmp_path / "b"), fn=lambda i: [{"txt": "a"}, i], workers=1)
    with pytest.raises(ShardkitError, match=r"input 000000 \(1\): TypeError: without fn every input must be"):
        shardkit.write([1, 2], str(tmp_path / "c"), workers=1)


def test_contradicting_or_inapplicable_options_are_refused(image_folder, tmp_path):
    dest = str(tmp_path / "x")
    refused = [
        (dict(inputs=range(3), shuffle=True), "shuffle apply to a path input"),
        (dict(inputs=range(3), fmt="csv"), "fmt apply to a path input"),
        (dict(inputs=image_folder, seed=3), "seed is the seed of shuffle"),
        (dict(inputs=image_folder, resume=True, overwrite=True), "choose one"),
        (dict(inputs=image_folder, validate=False, max_pixels=10), "validate=False turns off"),
        (dict(inputs=image_folder, workers=0), "at least 1"),
        (dict(inputs=image_folder, options=shardkit_ingest_options(validate=False)), "pass validate to write"),
        (dict(inputs=image_folder, options=shardkit_ingest_options(workers=4)), "pass workers="),
        (dict(inputs=image_folder, classes=["a", "b", "c"]), "names its classes"),
    ]
    for kwargs, message in refused:
        with pytest.raises(ValueError, match=message):
            shardkit.write(kwargs.pop("inputs"), dest, **kwargs)
    with pytest.raises(ShardkitError, match=r"IngestOptions.table \(--table\) does not apply to folder"):
        shardkit.write(image_folder, dest, options=shardkit_ingest_options(table="pics"))
    assert not os.path.exists(dest)


def shardkit_ingest_options(**kwargs):
    from shardkit.ingest import IngestOptions

    return IngestOptions(**kwargs)


def junk_before_sos(i: int) -> bytes:
    """A real JPEG with two stray bytes before its scan: libjpeg-turbo warns
    ("extraneous bytes before marker") and the reader still decodes it."""
    data = tiny_jpeg(i)
    at = data.find(b"\xff\xda")
    return data[:at] + b"\x12\x34" + data[at:]


def warn_on_3(i: int):
    return {"jpg": junk_before_sos(i) if i == 3 else tiny_jpeg(i), "txt": str(i)}


@pytest.mark.parametrize("workers", [1, 2])
def test_images_that_decode_with_a_warning_are_kept_and_counted(tmp_path, workers):
    result = shardkit.write(range(6), str(tmp_path / "out"), fn=warn_on_3, workers=workers)
    assert result.samples == 6 and result.skipped == []
    assert len(result.warned) == 1
    where, warning = result.warned[0]
    assert where.startswith("input 000003") and warning.startswith("jpg: Corrupt JPEG data")
    assert members(tmp_path / "out")["000003.jpg"] == junk_before_sos(3)
    summary = result.as_dict()
    assert summary["warned"] == 1 and summary["warned_files"][0]["path"] == where
    # strict keeps its meaning: every problem is fatal, and a warning is one then.
    with pytest.raises(ShardkitError, match="input 000003.*jpg: decodes only with a warning"):
        shardkit.write(range(6), str(tmp_path / "strict"), fn=warn_on_3, workers=workers, strict=True)


def test_image_files_with_warnings_are_kept_and_counted(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(junk_before_sos(i) if i == 2 else tiny_jpeg(i))
    result = shardkit.write(str(folder), str(tmp_path / "out"), workers=2)
    assert result.samples == 4 and result.skipped == []
    assert [(os.path.basename(w), m.split(":")[0]) for w, m in result.warned] == [("2.jpg", "jpg")]
    with pytest.raises(ShardkitError, match=r"2\.jpg: decodes only with a warning"):
        shardkit.write(str(folder), str(tmp_path / "strict"), workers=2, strict=True)
