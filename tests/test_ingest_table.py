"""CSV, TSV and JSONL tables written with ``shardkit.write`` and ``shardkit write``: every
column arrives (image, caption, label, the rest as typed JSON), keys are checked, and the
shards read back with tarfile and webdataset."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tarfile

import pytest

import shardkit
from shardkit.errors import ShardkitError
from shardkit.ingest import IngestOptions
from tests.helpers import CrashOn, digests, pairs, shard_members, tiny_jpeg

N = 12


def caption(i: int) -> str:
    return f'photo {i}, café 東京 "quoted"'


@pytest.fixture()
def table(tmp_path):
    """A folder of JPEGs and a CSV naming them: path, caption, aesthetic, label, note."""
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(N):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(tiny_jpeg(i))
        rows.append(
            {
                "path": f"img/{i}.jpg",
                "caption": caption(i),
                "aesthetic": f"{5 + i / 4}",
                "label": "cat" if i % 3 else "dog",
                "note": "" if i == 4 else f"00{i}",
            }
        )
    with open(tmp_path / "meta.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "shardkit.cli", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"shardkit {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def test_csv_keeps_every_column_and_says_where_each_went(table):
    proc = cli("write", str(table / "meta.csv"), str(table / "out"))
    assert "columns: path -> image, json; caption -> txt; aesthetic, note -> json; label -> cls, json" in proc.stdout
    got = shard_members(table / "out", "data")
    assert len(got) == N * 4
    for i in range(N):
        key = f"{i:06d}"
        assert got[f"{key}.jpg"] == tiny_jpeg(i)
        assert got[f"{key}.txt"].decode("utf-8") == caption(i)
        assert int(got[f"{key}.cls"]) == (1 if i % 3 == 0 else 0)  # classes: sorted names ["cat", "dog"]
        meta = json.loads(got[f"{key}.json"])
        assert meta == {
            "path": f"img/{i}.jpg",
            "aesthetic": 5 + i / 4,  # "5.0" is a float too
            "label": "cat" if i % 3 else "dog",
            "note": None if i == 4 else f"00{i}",  # empty is null; leading zeros stay text
        }
        assert type(meta["aesthetic"]) is float
    manifest = json.loads((table / "out" / "data.manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog"]
    summary = json.loads(cli("write", str(table / "meta.csv"), str(table / "again"), "--json").stdout)
    assert summary["columns"] == {
        "path": "image, json",
        "caption": "txt",
        "aesthetic": "json",
        "label": "cls, json",
        "note": "json",
    }
    assert summary["samples"] == N and summary["skipped"] == 0 and summary["notes"] == []


def test_webdataset_and_gnu_tar_read_what_a_table_wrote(table):
    import webdataset as wds

    shardkit.write(str(table / "meta.csv"), str(table / "out"), workers=1)
    shard = str(table / "out" / "data-000000.tar")
    got = list(wds.WebDataset(shard, shardshuffle=False).decode())
    assert [s["__key__"] for s in got] == [f"{i:06d}" for i in range(N)]
    for i, s in pairs(range(N), got):
        assert s["txt"] == caption(i) and s["json"]["path"] == f"img/{i}.jpg"
    listed = subprocess.run(["tar", "tf", shard], capture_output=True, text=True, check=True).stdout.split()
    assert listed == [f"{i:06d}.{ext}" for i in range(N) for ext in ("cls", "jpg", "json", "txt")]
    text = subprocess.run(["tar", "xOf", shard, "000003.txt"], capture_output=True, check=True).stdout
    assert text.decode("utf-8") == caption(3)


def test_tsv_with_a_header_and_jsonl_with_image_lists(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(tiny_jpeg(i))
        (tmp_path / f"{i}.png").write_bytes(tiny_png(i))
    tsv = tmp_path / "t.tsv"
    tsv.write_text("image\ttext\tclicks\n" + "".join(f"{i}.jpg\tcaption {i}\t{i * 10}\n" for i in range(4)))
    result = shardkit.write(str(tsv), str(tmp_path / "tsv"), workers=1)
    assert result.columns == {"image": "image, json", "text": "txt", "clicks": "json"}
    got = shard_members(tmp_path / "tsv", "data")
    assert got["000002.txt"] == b"caption 2" and json.loads(got["000002.json"]) == {"image": "2.jpg", "clicks": 20}
    jsonl = tmp_path / "t.jsonl"
    lines = [
        {"images": [f"{i}.jpg", f"{i}.png"], "caption": f"pair {i}", "meta": {"n": i, "tags": ["a"]}} for i in range(3)
    ]
    lines.append({"images": ["3.png"], "caption": "one", "extra": True})  # a key others lack is null there
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = shardkit.write(
        str(jsonl), str(tmp_path / "jsonl"), workers=1, options=IngestOptions(image_column="images")
    )
    assert result.samples == 4 and result.columns["images"] == "images (0.EXT, 1.EXT...), json"
    got = shard_members(tmp_path / "jsonl", "data")
    # each image under its real format's extension, in list order
    assert got["000001.0.jpg"] == tiny_jpeg(1) and got["000001.1.png"] == tiny_png(1)
    assert got["000003.0.png"] == tiny_png(3) and "000003.1.png" not in got
    assert json.loads(got["000000.json"]) == {
        "images": ["0.jpg", "0.png"],
        "meta": {"n": 0, "tags": ["a"]},
        "extra": None,
    }
    assert json.loads(got["000003.json"])["extra"] is True


def tiny_png(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8 + i, 6), (i * 20, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def test_key_column_names_the_samples_and_bad_keys_name_their_row(table):
    text = (table / "meta.csv").read_text().splitlines()
    keyed = ["id," + text[0]] + [f"sa_{i:04d}," + line for i, line in enumerate(text[1:])]
    (table / "keyed.csv").write_text("\n".join(keyed) + "\n")
    result = shardkit.write(str(table / "keyed.csv"), str(table / "out"), options=IngestOptions(key_column="id"))
    assert result.columns["id"] == "key"
    got = shard_members(table / "out", "data")
    assert sorted({n.split(".")[0] for n in got}) == [f"sa_{i:04d}" for i in range(N)]
    assert "id" not in json.loads(got["sa_0003.json"])
    repeated = keyed[:5] + [keyed[2]] + keyed[6:]
    (table / "repeat.csv").write_text("\n".join(repeated) + "\n")
    with pytest.raises(
        ShardkitError, match=r"repeat.csv: line 6: key 'sa_0001' \(column 'id'\) is also the key of .*line 3"
    ):
        shardkit.write(str(table / "repeat.csv"), str(table / "bad1"), options=IngestOptions(key_column="id"))
    dotted = keyed[:4] + ["img.7," + keyed[4].split(",", 1)[1]] + keyed[5:]
    (table / "dotted.csv").write_text("\n".join(dotted) + "\n")
    proc = cli("write", str(table / "dotted.csv"), str(table / "bad2"), "--key-column", "id", check=False)
    assert proc.returncode == 1 and "dotted.csv: line 5: key 'img.7' (column 'id') contains a dot" in proc.stderr
    assert not (table / "bad1").exists() and not (table / "bad2").exists()  # refused before writing


def test_columns_chooses_what_goes_to_json(table):
    proc = cli("write", str(table / "meta.csv"), str(table / "out"), "--columns", "aesthetic", "--json")
    summary = json.loads(proc.stdout)
    assert summary["columns"]["note"] == "left out (--columns)" and summary["columns"]["path"] == "image"
    assert json.loads(shard_members(table / "out", "data")["000001.json"]) == {"aesthetic": 5.25}
    cli("write", str(table / "meta.csv"), str(table / "none"), "--columns", "", "-q")
    got = shard_members(table / "none", "data")
    assert not [n for n in got if n.endswith(".json")] and len(got) == N * 3  # jpg, txt, cls


def test_caption_column_ambiguity_is_a_note_and_nothing_is_lost(tmp_path):
    (tmp_path / "a.jpg").write_bytes(tiny_jpeg(0))
    (tmp_path / "t.csv").write_text("file,caption,text\na.jpg,short,a longer text\n")
    result = shardkit.write(str(tmp_path / "t.csv"), str(tmp_path / "out"))
    assert result.columns == {"file": "image, json", "caption": "json", "text": "json"}
    assert result.notes == [
        "several columns could be the caption (caption, text): all kept in json; choose with --caption-column"
    ]
    assert json.loads(shard_members(tmp_path / "out", "data")["000000.json"]) == {
        "file": "a.jpg",
        "caption": "short",
        "text": "a longer text",
    }
    chosen = shardkit.write(
        str(tmp_path / "t.csv"), str(tmp_path / "out2"), options=IngestOptions(caption_column="text")
    )
    assert (
        chosen.columns["text"] == "txt" and shard_members(tmp_path / "out2", "data")["000000.txt"] == b"a longer text"
    )


def test_a_row_whose_image_does_not_decode_is_skipped_naming_it(table):
    (table / "img" / "5.jpg").write_bytes(tiny_jpeg(5)[:300])
    result = shardkit.write(str(table / "meta.csv"), str(table / "out"), workers=2)
    assert result.samples == N - 1 and len(result.skipped) == 1
    where, reason = result.skipped[0]
    assert where.startswith(f"{table / 'meta.csv'}: line 7 (") and where.endswith("5.jpg)")
    assert reason.startswith("column 'path': ")
    assert "000005.jpg" not in shard_members(table / "out", "data")
    with pytest.raises(ShardkitError, match=r"meta.csv: line 7 .*5.jpg\): column 'path': "):
        shardkit.write(str(table / "meta.csv"), str(table / "strict"), workers=2, strict=True)


def test_workers_parts_and_shuffle_give_the_same_samples(table):
    one = shardkit.write(str(table / "meta.csv"), str(table / "one"), shard_size="10kB", workers=1)
    two = shardkit.write(str(table / "meta.csv"), str(table / "two"), shard_size="10kB", workers=2)
    assert one.shards > 2 and one.samples == two.samples == N
    assert digests(table / "one") == digests(table / "two")
    from shardkit.writing.merge import merge_parts

    for i in (2, 0, 1):
        shardkit.write(str(table / "meta.csv"), str(table / "parts"), shard_size="10kB", part=f"{i}/3", workers=1)
    merge_parts(str(table / "parts"))
    whole, parts = shard_members(table / "one", "data"), shard_members(table / "parts", "data")
    assert len(whole) == len(parts) == N * 4 and whole == parts
    shuffled = shardkit.write(str(table / "meta.csv"), str(table / "shuffled"), shuffle=True, seed=3, workers=1)
    assert shuffled.samples == N
    got = shard_members(table / "shuffled", "data")
    assert got == whole  # the same keyed samples: keys follow the rows, not the order
    with tarfile.open(table / "shuffled" / "data-000000.tar") as tf:
        order = [m.name.split(".")[0] for m in tf.getmembers()][::4]
    assert order != sorted(order)


def test_a_killed_table_write_resumes_to_the_same_bytes(table):
    marker = table / "crash"
    reference = shardkit.write(
        str(table / "meta.csv"), str(table / "ref"), fn=CrashOn(str(marker), "000009"), shard_size="10kB"
    )
    marker.touch()
    out = str(table / "out")
    with pytest.raises(ShardkitError, match="simulated crash"):
        shardkit.write(str(table / "meta.csv"), out, fn=CrashOn(str(marker), "000009"), shard_size="10kB", workers=1)
    marker.unlink()
    resumed = shardkit.write(
        str(table / "meta.csv"), out, fn=CrashOn(str(marker), "000009"), shard_size="10kB", workers=2, resume=True
    )
    assert resumed.resumed_shards > 0 and resumed.samples == reference.samples == N
    assert digests(out) == digests(table / "ref")


def test_list_files_are_unchanged(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(tiny_jpeg(i))
    (tmp_path / "list.tsv").write_text("".join(f"{i}.jpg\t{i % 2}\n" for i in range(3)))  # no header: a list
    result = shardkit.write(str(tmp_path / "list.tsv"), str(tmp_path / "out"), workers=1)
    assert result.samples == 3 and result.columns == {}
    got = shard_members(tmp_path / "out", "data")
    assert int(got["000002.cls"]) == 0 and json.loads(got["000002.json"])["path"] == "2.jpg"


def test_the_summary_counts_images_kept_with_a_warning(table):
    data = tiny_jpeg(3)
    at = data.find(b"\xff\xda")
    (table / "img" / "3.jpg").write_bytes(data[:at] + b"\x12\x34" + data[at:])  # extraneous bytes before SOS
    proc = cli("write", str(table / "meta.csv"), str(table / "out"))
    assert "kept 1 image(s) that decode with a warning" in proc.stdout
    assert "meta.csv: line 5 (" in proc.stdout and "jpg: Corrupt JPEG data" in proc.stdout
    summary = json.loads(cli("write", str(table / "meta.csv"), str(table / "again"), "--json").stdout)
    assert summary["samples"] == N and summary["skipped"] == 0 and summary["warned"] == 1
    assert summary["warned_files"][0]["warning"].startswith("jpg: Corrupt JPEG data: 2 extraneous bytes")
    strict = cli("write", str(table / "meta.csv"), str(table / "strict"), "--strict", check=False)
    assert strict.returncode == 1 and "decodes only with a warning" in strict.stderr


def test_file_urls_are_paths_and_other_urls_are_refused(tmp_path):
    (tmp_path / "a.jpg").write_bytes(tiny_jpeg(0))
    (tmp_path / "local.csv").write_text(f"url,caption\nfile://{tmp_path / 'a.jpg'},here\n")
    result = shardkit.write(
        str(tmp_path / "local.csv"), str(tmp_path / "o1"), options=IngestOptions(image_column="url")
    )
    assert result.samples == 1 and shard_members(tmp_path / "o1", "data")["000000.jpg"] == tiny_jpeg(0)
    (tmp_path / "web.csv").write_text("url,caption\nhttps://example.com/a.jpg,there\n")
    with pytest.raises(ShardkitError, match=r"web.csv: line 2: column 'url' holds the URL 'https://example.com/a.jpg'"):
        shardkit.write(str(tmp_path / "web.csv"), str(tmp_path / "o2"))


def test_table_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "short.csv").write_text("path,caption\na.jpg,x\nb.jpg\n")
    with pytest.raises(ShardkitError, match=r"short.csv: line 3: 1 fields, the header has 2"):
        shardkit.write(str(tmp_path / "short.csv"), str(tmp_path / "o1"))
    (tmp_path / "bad.jsonl").write_text('{"path": "a.jpg"}\n[1, 2]\n')
    with pytest.raises(ShardkitError, match=r"bad.jsonl: line 2: a JSON list, not an object"):
        shardkit.write(str(tmp_path / "bad.jsonl"), str(tmp_path / "o2"))
    (tmp_path / "empty.csv").write_text("path,caption\n")
    with pytest.raises(ShardkitError, match=r"empty.csv: has no rows"):
        shardkit.write(str(tmp_path / "empty.csv"), str(tmp_path / "o3"))
    (tmp_path / "t.csv").write_text("path\na.jpg\n")
    with pytest.raises(ShardkitError, match=r"IngestOptions.table \(--table\) does not apply to csv"):
        shardkit.write(str(tmp_path / "t.csv"), str(tmp_path / "o4"), options=IngestOptions(table="x"))
    with pytest.raises(
        ShardkitError, match=r"IngestOptions.caption_column \(--caption-column\) does not apply to folder"
    ):
        shardkit.write(str(tmp_path), str(tmp_path / "o5"), options=IngestOptions(caption_column="x"))
