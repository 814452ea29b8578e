"""Parquet inputs, written by pyarrow and by Hugging Face ``datasets``: images as paths, bytes,
``Image`` structs or lists of them; folders and patterns of files; parts, resume and worker
counts; and a table larger than the memory the writing process may use."""

from __future__ import annotations

import datetime
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import shardkit
from shardkit.errors import ShardkitError
from shardkit.ingest import IngestOptions, detect_format
from tests.helpers import CrashOn, digests, pairs, shard_members, tiny_jpeg

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 24


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10 + i, 7), (i * 9 % 256, 40, 90)).save(buf, "PNG")
    return buf.getvalue()


def laion_like(n: int = N) -> dict[str, list]:
    """Columns as LAION/DataComp metadata has them, with the image bytes embedded."""
    return {
        "jpg": [tiny_jpeg(i) if i % 4 else png(i) for i in range(n)],
        "caption": [f"a photo of item {i} — ünïcode" if i != 5 else None for i in range(n)],
        "similarity": [0.25 + i / 100 if i != 7 else float("nan") for i in range(n)],
        "width": list(range(100, 100 + n)),
        "nsfw": [i % 9 == 0 for i in range(n)],
        "tags": [["a", f"t{i}"] for i in range(n)],
        "when": [datetime.datetime(2024, 1, 1) + datetime.timedelta(hours=i) for i in range(n)],
    }


@pytest.fixture()
def embedded(tmp_path) -> str:
    path = str(tmp_path / "laion.parquet")
    pq.write_table(pa.table(laion_like()), path, row_group_size=5)
    return path


def test_embedded_bytes_every_column_arrives(embedded, tmp_path):
    assert detect_format(embedded) == "parquet"
    result = shardkit.write(embedded, str(tmp_path / "out"), workers=1)
    assert result.samples == N and result.skipped == []
    assert result.columns == {
        "jpg": "image",
        "caption": "txt",
        "similarity": "json",
        "width": "json",
        "nsfw": "json",
        "tags": "json",
        "when": "json",
    }
    assert result.notes == [
        "column 'when' is stored in json as ISO 8601 text",
        "column 'similarity': 1 NaN or infinite value(s) stored as null (JSON has neither)",
        "1 row(s) have a null caption ('caption'): stored as an empty txt",
    ]
    got = shard_members(tmp_path / "out")
    columns = laion_like()
    for i in range(N):
        key = f"{i:06d}"
        ext = "jpg" if i % 4 else "png"  # each under its real format
        assert got[f"{key}.{ext}"] == columns["jpg"][i]
        assert got[f"{key}.txt"].decode() == (columns["caption"][i] or "")  # row 5's is null
        meta = json.loads(got[f"{key}.json"])
        assert meta == {
            "similarity": None if i == 7 else columns["similarity"][i],
            "width": 100 + i,
            "nsfw": i % 9 == 0,
            "tags": ["a", f"t{i}"],
            "when": columns["when"][i].isoformat(),
        }
        assert type(meta["width"]) is int and type(meta["nsfw"]) is bool


def test_paths_relative_to_the_table(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(6):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(tiny_jpeg(i))
    pq.write_table(
        pa.table({"image_path": [f"images/{i}.jpg" for i in range(6)], "text": [f"t{i}" for i in range(6)]}),
        tmp_path / "meta.parquet",
    )
    result = shardkit.write(str(tmp_path / "meta.parquet"), str(tmp_path / "out"), workers=1)
    assert result.columns == {"image_path": "image, json", "text": "txt"}
    got = shard_members(tmp_path / "out")
    assert got["000004.jpg"] == tiny_jpeg(4) and json.loads(got["000004.json"]) == {"image_path": "images/4.jpg"}


def test_hugging_face_image_struct_class_labels_and_image_lists(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = {
        "image": [tiny_jpeg(i) if i % 2 else png(i) for i in range(8)],
        "text": [f"caption {i}" for i in range(8)],
        "label": [i % 3 for i in range(8)],
        "views": [[tiny_jpeg(100 + i), png(i)] for i in range(8)],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["bird", "cat", "dog"]),
            "views": datasets.Sequence(datasets.Image()),
        }
    )
    path = str(tmp_path / "hf.parquet")
    datasets.Dataset.from_dict(data, features=features).to_parquet(path)
    assert pq.read_schema(path).field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    with pytest.raises(ShardkitError, match=r"several columns hold images \(image, views\)"):
        shardkit.write(path, str(tmp_path / "x"))
    single = shardkit.write(
        path, str(tmp_path / "single"), options=IngestOptions(image_column="image", columns=()), workers=1
    )
    assert single.columns == {"image": "image", "text": "txt", "label": "cls", "views": "left out (--columns)"}
    manifest = json.loads((tmp_path / "single" / "data.manifest.json").read_text())
    assert manifest["classes"] == ["bird", "cat", "dog"]  # from the ClassLabel feature
    got = shard_members(tmp_path / "single")
    assert got["000003.jpg"] == data["image"][3] and got["000002.png"] == data["image"][2]
    assert int(got["000005.cls"]) == 2 and got["000005.txt"] == b"caption 5"
    multi = shardkit.write(
        path, str(tmp_path / "multi"), options=IngestOptions(image_column="views", columns=("text",))
    )
    assert multi.columns["views"] == "images (0.EXT, 1.EXT...)"
    got = shard_members(tmp_path / "multi")
    assert got["000006.0.jpg"] == tiny_jpeg(106) and got["000006.1.png"] == png(6)
    assert json.loads(got["000006.json"]) == {"text": "caption 6"}


def test_a_folder_in_the_hugging_face_layout_and_patterns(tmp_path):
    data = laion_like(20)
    table = pa.table({k: data[k] for k in ("jpg", "caption", "width")})
    (tmp_path / "ds" / "data").mkdir(parents=True)
    for i in range(3):
        pq.write_table(
            table.slice(i * 7, 7), tmp_path / "ds" / "data" / f"train-{i:05d}-of-00003.parquet", row_group_size=3
        )
    (tmp_path / "ds" / "README.md").write_text("---\ndataset_info: ...\n---\n")
    assert detect_format(str(tmp_path / "ds")) == "parquet"
    whole = shardkit.write(str(tmp_path / "ds"), str(tmp_path / "out"), workers=1)
    assert whole.samples == 20
    got = shard_members(tmp_path / "out")
    assert [json.loads(got[f"{i:06d}.json"])["width"] for i in range(20)] == list(range(100, 120))
    # a second split in the folder: refused, naming a pattern that picks one
    pq.write_table(table.slice(0, 4), tmp_path / "ds" / "data" / "test-00000-of-00001.parquet")
    with pytest.raises(
        ShardkitError, match=r"holds the splits test, train; write one at a time, e.g. '.*test-\*.parquet'"
    ):
        shardkit.write(str(tmp_path / "ds"), str(tmp_path / "mixed"))
    pattern = str(tmp_path / "ds" / "data" / "train-*.parquet")
    assert detect_format(pattern) == "parquet"
    again = shardkit.write(pattern, str(tmp_path / "pattern"), workers=1)
    assert again.samples == 20 and digests(tmp_path / "pattern") == digests(tmp_path / "out")
    other = pa.table({"jpg": data["jpg"][:2], "caption": data["caption"][:2]})
    pq.write_table(other, tmp_path / "ds" / "data" / "train-00003-of-00003.parquet")
    with pytest.raises(
        ShardkitError, match=r"train-00003-of-00003.parquet: its columns \(jpg: binary, caption: string\) differ"
    ):
        shardkit.write(pattern, str(tmp_path / "x"))


def test_row_windows_seek_across_row_groups_and_files(tmp_path):
    from shardkit.ingest.parquet import ParquetTable

    for i, size in enumerate((7, 0, 5, 11)):
        schema = pa.schema([("n", pa.int64()), ("s", pa.string())])
        table = pa.table({"n": list(range(100 * i, 100 * i + size)), "s": [f"r{j}" for j in range(size)]}, schema)
        pq.write_table(table, tmp_path / f"part-{i}.parquet", row_group_size=3)
    parquet = ParquetTable(str(tmp_path))
    everything = [row["n"] for _, row in parquet.rows()]
    assert len(parquet) == len(everything) == 23
    for start in range(0, 24, 2):
        for stop in (start, start + 1, start + 4, start + 9, None):
            got = [row["n"] for _, row in parquet.rows(start, stop)]
            assert got == everything[start:stop], (start, stop)
    where, row = next(parquet.rows(8, 9))
    assert where == "part-2.parquet: row 1" and row == {"n": 201, "s": "r1"}
    assert [r for _, r in parquet.rows(3, 5, columns=["s"])] == [{"s": "r3"}, {"s": "r4"}]


def test_workers_parts_and_resume_give_the_same_bytes(embedded, tmp_path):
    one = shardkit.write(embedded, str(tmp_path / "one"), shard_size="12kB", workers=1)
    two = shardkit.write(embedded, str(tmp_path / "two"), shard_size="12kB", workers=2)
    assert one.shards > 3 and one.samples == two.samples == N and one.workers == 1 and two.workers == 2
    assert digests(tmp_path / "one") == digests(tmp_path / "two")
    # Unchecked embedded images leave the workers nothing to do: one process unless asked.
    trusted = shardkit.write(embedded, str(tmp_path / "trusted"), shard_size="12kB", validate=False)
    assert trusted.workers == 1 and shard_members(tmp_path / "trusted") == shard_members(tmp_path / "one")
    from shardkit.writing.merge import merge_parts

    for i in (3, 0, 2, 1):
        shardkit.write(embedded, str(tmp_path / "parts"), shard_size="12kB", part=f"{i}/4", workers=1)
    merge_parts(str(tmp_path / "parts"))
    whole, parts = shard_members(tmp_path / "one"), shard_members(tmp_path / "parts")
    assert len(whole) == len(parts) and whole == parts
    marker = tmp_path / "crash"
    marker.touch()
    out = str(tmp_path / "resumed")
    with pytest.raises(ShardkitError, match="simulated crash"):
        shardkit.write(embedded, out, fn=CrashOn(str(marker), "000017"), shard_size="12kB", workers=1)
    marker.unlink()
    resumed = shardkit.write(embedded, out, fn=CrashOn(str(marker), "000017"), shard_size="12kB", resume=True)
    reference = shardkit.write(embedded, str(tmp_path / "ref"), fn=CrashOn(str(marker), "000017"), shard_size="12kB")
    assert resumed.resumed_shards > 0 and resumed.samples == reference.samples == N
    assert digests(out) == digests(tmp_path / "ref")


def test_a_row_with_a_broken_image_is_skipped_naming_the_row(tmp_path):
    images = [tiny_jpeg(i) for i in range(6)]
    images[4] = images[4][: len(images[4]) // 2] + b"\xff\xd9"  # pixels lost, end marker glued on
    pq.write_table(
        pa.table({"jpg": images, "txt": [str(i) for i in range(6)]}), tmp_path / "t.parquet", row_group_size=4
    )
    result = shardkit.write(str(tmp_path / "t.parquet"), str(tmp_path / "out"), workers=2)
    assert result.samples == 5 and len(result.skipped) == 1
    where, reason = result.skipped[0]
    assert where == "t.parquet: row 4" and reason.startswith("column 'jpg': does not decode")


def test_shuffle_is_refused_and_a_missing_pyarrow_names_the_extra(embedded, tmp_path):
    with pytest.raises(ShardkitError, match=r"--shuffle holds a table in memory.*Parquet table is streamed"):
        shardkit.write(embedded, str(tmp_path / "x"), shuffle=True)
    # A child without pyarrow (a None entry in sys.modules makes its import fail).
    code = "import sys; sys.modules['pyarrow'] = None; import shardkit; "
    code += f"shardkit.write({embedded!r}, {str(tmp_path / 'y')!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert "reading parquet needs the 'pyarrow' package: pip install 'shardkit[parquet]'" in proc.stderr


# -- a table larger than the memory the writer may use -------------------------------------

CHILD = textwrap.dedent(
    """
    import resource, sys
    import pyarrow as pa
    import shardkit
    from shardkit.writing import driver  # everything the write imports, before the limit

    # pyarrow's default allocator (mimalloc) reserves address space up front, which the limit
    # counts at once and later allocations do not grow; the system allocator maps what it
    # uses, so the limit bounds Arrow's buffers as it bounds Python's.
    pa.set_memory_pool(pa.system_memory_pool())

    small, big, out, budget, mode = sys.argv[1:6]
    shardkit.write(small, out + "-warm", workers=2)  # starts the thread pools and workers once
    size = next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    limit = size + (int(budget) << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if mode == "write":
        result = shardkit.write(big, out, workers=2, shard_size="20MB")
        print("samples", result.samples, "skipped", len(result.skipped))
    else:
        with open(big, "rb") as f:
            print("bytes", len(f.read()))  # the whole table at once: must not fit
    """
)


def photo_pool(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def big_table(path: str, rows: int, pool: list[bytes]) -> None:
    """Uncompressed, no dictionary: the file is as large as its images (about 77 kB each)."""
    schema = pa.schema([("jpg", pa.binary()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema, compression="none", use_dictionary=False) as writer:
        for start in range(0, rows, 16):
            count = min(16, rows - start)
            writer.write_table(
                pa.table(
                    {
                        "jpg": [pool[(start + i) % len(pool)] for i in range(count)],
                        "caption": [f"row {start + i}" for i in range(count)],
                    },
                    schema=schema,
                )
            )


@pytest.mark.timeout(120)
def test_a_table_larger_than_the_memory_allowed_converts(tmp_path):
    pool = photo_pool(12)
    big, small = str(tmp_path / "big.parquet"), str(tmp_path / "small.parquet")
    big_table(big, 2000, pool)
    big_table(small, 20, pool)
    budget_mb = 64
    assert os.path.getsize(big) > 2 * (budget_mb << 20)  # about 155 MB
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def child(mode: str) -> subprocess.CompletedProcess:
        args = [sys.executable, str(script), small, big, str(tmp_path / mode), str(budget_mb), mode]
        return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=60)

    # The limit bites: holding the table's bytes at once fails under it...
    control = child("read")
    assert control.returncode != 0 and "MemoryError" in control.stderr and "bytes" not in control.stdout
    # ...and the conversion, a row group at a time, does not.
    proc = child("write")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["samples", "2000", "skipped", "0"]
    got = shard_members(tmp_path / "write")
    assert len(got) == 4000 and got["001999.txt"] == b"row 1999"
    for i, (name, data) in pairs(range(3), [(n, got[n]) for n in ("000000.jpg", "000013.jpg", "001999.jpg")]):
        assert data == pool[int(name[:6]) % len(pool)], i
