"""Migration sources: every format round-trips images, labels and ids; bad input fails
with an error naming the source and the record."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import sqlite3
import struct
import tarfile
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from shardkit.errors import ShardkitError
from shardkit.ingest import IngestOptions, _module, detect_format, open_source
from shardkit.ingest import tfrecord as tfr
from shardkit.ingest.protobuf import parse_example
from shardkit.writing.writer import ShardWriter
from tests.tfrecord_writer import enc_varint, encode_example, frame_record, reference_crc32c, write_tfrecord

N = 200


# -- synthetic data ---------------------------------------------------------------------------


def _photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Photo-like pixels: smooth colour gradients plus sensor-like noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, c = rng.uniform(0.5, 3.0, 3)
    base = np.stack([np.sin(x / w * a * 3 + c), np.cos(y / h * b * 3), np.sin((x + y) / (w + h) * 5)], -1)
    img = (base * 0.5 + 0.5) * rng.uniform(120, 255, 3) + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    jpegs = [_jpeg(_photo(rng, int(rng.integers(32, 65)), int(rng.integers(32, 65)))) for _ in range(N)]
    dense = np.stack([_photo(rng, 40, 32) for _ in range(N)])
    labels = rng.integers(0, 10, N).tolist()
    return {"jpegs": jpegs, "dense": dense, "labels": labels, "ids": [f"img/{i:04d}.jpg" for i in range(N)]}


# -- writers: the test's own code, independent of shardkit --------------------------------------


def build_hdf5(tmp_path, data) -> tuple[str, IngestOptions]:
    h5py = pytest.importorskip("h5py")
    path = str(tmp_path / "set.h5")
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("images", (N,), dtype=h5py.vlen_dtype(np.uint8))
        for i, jpeg in enumerate(data["jpegs"]):
            ds[i] = np.frombuffer(jpeg, np.uint8)
        f.create_dataset("labels", data=np.array(data["labels"], np.int64))
        f.create_dataset("keys", data=np.array(data["ids"], dtype=h5py.string_dtype()))
    return path, IngestOptions()


def build_hdf5_strings(tmp_path, data) -> tuple[str, IngestOptions]:
    h5py = pytest.importorskip("h5py")
    path = str(tmp_path / "strings.hdf5")
    with h5py.File(path, "w") as f:
        grp = f.create_group("train")
        grp.create_dataset("jpeg", data=np.array(data["jpegs"]))  # fixed-length S, NUL padded
        grp.create_dataset("y", data=np.array(data["labels"], np.int32))
    return path, IngestOptions(images_key="train/jpeg", labels_key="train/y")


def build_npz(tmp_path, data) -> tuple[str, IngestOptions]:
    path = str(tmp_path / "set.npz")
    np.savez_compressed(path, images=data["dense"], labels=np.array(data["labels"]))
    return path, IngestOptions()


def build_lmdb(tmp_path, data) -> tuple[str, IngestOptions]:
    lmdb = pytest.importorskip("lmdb")
    from shardkit.ingest.lmdb_source import encode_record

    path = str(tmp_path / "set.lmdb")
    env = lmdb.open(path, map_size=64 << 20)
    with env.begin(write=True) as txn:
        for i, (jpeg, label) in enumerate(zip(data["jpegs"], data["labels"])):
            txn.put(data["ids"][i].encode(), encode_record(jpeg, label))
        txn.put(b"__classes__", json.dumps([f"c{i}" for i in range(10)]).encode())
        txn.put(b"__len__", pickle.dumps(N))  # written by common conversion scripts
    env.close()
    return path, IngestOptions()


def build_sqlite(tmp_path, data) -> tuple[str, IngestOptions]:
    path = str(tmp_path / "set.db")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE samples (key TEXT, image BLOB, label INTEGER)")
        conn.executemany("INSERT INTO samples VALUES (?, ?, ?)", zip(data["ids"], data["jpegs"], data["labels"]))
    conn.close()
    return path, IngestOptions()


def build_tfrecord(tmp_path, data) -> tuple[str, IngestOptions]:
    path = str(tmp_path / "set.tfrecord")
    write_tfrecord(
        path,
        (
            {"image/encoded": j, "image/class/label": lab, "image/filename": i}
            for j, lab, i in zip(data["jpegs"], data["labels"], data["ids"])
        ),
    )
    return path, IngestOptions()


def build_binary(tmp_path, data) -> tuple[str, IngestOptions]:
    path = str(tmp_path / "set.bin")
    offset = 0
    with open(path, "wb") as blob, open(path + ".idx", "w") as index:
        index.write("# offset length label id\n")
        for jpeg, label, ident in zip(data["jpegs"], data["labels"], data["ids"]):
            blob.write(jpeg)
            index.write(f"{offset} {len(jpeg)} {label} {ident}\n")
            offset += len(jpeg)
    return path, IngestOptions()


BUILDERS: dict[str, tuple[str, Callable]] = {
    "hdf5": ("hdf5", build_hdf5),
    "hdf5-strings": ("hdf5", build_hdf5_strings),
    "npz-dense": ("numpy", build_npz),
    "lmdb": ("lmdb", build_lmdb),
    "sqlite": ("sqlite", build_sqlite),
    "tfrecord": ("tfrecord", build_tfrecord),
    "binary": ("binary", build_binary),
}


def _decoded(payload: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(payload)))


def _check(samples: list[dict], data, *, dense: bool = False, ids: bool = True) -> None:
    assert len(samples) == N
    assert len({s["__key__"] for s in samples}) == N
    assert all("." not in s["__key__"] and "/" not in s["__key__"] for s in samples)
    assert [s["cls"] for s in samples] == data["labels"]
    for i, s in enumerate(samples):
        if dense:
            np.testing.assert_array_equal(_decoded(s["png"]), data["dense"][i])
        else:
            assert s["jpg"] == data["jpegs"][i]
        if ids:
            assert s["json"]["source_id"] == data["ids"][i]


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_round_trip(tmp_path, data, name):
    fmt, build = BUILDERS[name]
    path, options = build(tmp_path, data)
    assert _module(fmt).detect(path)
    if not os.path.isdir(path):  # folders: the registry tries "folder" first (see report)
        assert detect_format(path) == fmt
    source = open_source(path, fmt=fmt, options=options)
    assert len(source) == N
    samples = list(source)
    _check(samples, data, dense=name == "npz-dense", ids=name not in ("hdf5-strings", "npz-dense", "tfrecord"))
    assert samples[0]["json"]["source_format"] == fmt
    assert samples[0]["json"]["source"].startswith(str(tmp_path))
    json.dumps([s["json"] for s in samples])  # JSON-able
    if not os.path.isdir(path):
        assert list(open_source(path, options=options))[5] == samples[5]  # detected format
    if name == "lmdb":
        assert source.classes == [f"c{i}" for i in range(10)]
    if name == "tfrecord":  # the source id is the record number; other features are kept
        assert samples[3]["json"]["source_id"] == 3
        assert samples[3]["json"]["features"] == {"image/filename": data["ids"][3]}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_convert_to_shards(tmp_path, data, name):
    fmt, build = BUILDERS[name]
    path, options = build(tmp_path, data)
    source = open_source(path, fmt=fmt, options=options)
    out = tmp_path / "shards"
    with ShardWriter(str(out), shard_size="40kB", classes=source.classes) as writer:
        for sample in source:
            writer.write(sample)
    shards = sorted(p for p in os.listdir(out) if p.endswith(".tar"))
    assert len(shards) > 1
    members: dict[str, bytes] = {}
    for shard in shards:
        with tarfile.open(out / shard) as tar:
            for info in tar:
                members[info.name] = tar.extractfile(info).read()
    keys = sorted({name.split(".", 1)[0] for name in members})
    assert len(keys) == N
    ext = "png" if name == "npz-dense" else "jpg"
    for i, key in enumerate(keys):
        assert int(members[f"{key}.cls"]) == data["labels"][i]
        meta = json.loads(members[f"{key}.json"])
        assert meta["source_format"] == fmt
        if ext == "jpg":
            assert members[f"{key}.jpg"] == data["jpegs"][i]
        else:
            np.testing.assert_array_equal(_decoded(members[f"{key}.png"]), data["dense"][i])


# -- format specifics -------------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["png", "npy", "jpg"])
def test_hdf5_dense(tmp_path, data, image_format):
    h5py = pytest.importorskip("h5py")
    path = str(tmp_path / "dense.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data["dense"], chunks=(16, 32, 40, 3))
        f.create_dataset("labels", data=np.array(data["labels"], np.uint8))
        f["labels"].attrs["classes"] = [f"k{i}" for i in range(10)]
    source = open_source(path, options=IngestOptions(image_format=image_format, quality=90))
    assert source.classes == [f"k{i}" for i in range(10)]
    samples = list(source)
    assert [s["cls"] for s in samples] == data["labels"]
    for i, s in enumerate(samples):
        assert image_format in s
        if image_format == "png":
            np.testing.assert_array_equal(_decoded(s["png"]), data["dense"][i])
        elif image_format == "npy":
            np.testing.assert_array_equal(np.load(io.BytesIO(s["npy"])), data["dense"][i])
        else:
            assert s["jpg"][:3] == b"\xff\xd8\xff"


def test_hdf5_group_and_opaque(tmp_path, data):
    h5py = pytest.importorskip("h5py")
    path = str(tmp_path / "group.h5")
    longest = max(map(len, data["jpegs"][:20]))
    with h5py.File(path, "w") as f:
        grp = f.create_group("images")
        for i in range(20):
            grp[f"n{i:03d}"] = np.void(data["jpegs"][i])  # one opaque scalar per image
            grp[f"n{i:03d}"].attrs["label"] = data["labels"][i]
        f["opaque"] = np.array([np.void(j.ljust(longest, b"\0")) for j in data["jpegs"][:20]])
    samples = list(open_source(path))
    assert [s["jpg"] for s in samples] == data["jpegs"][:20]
    assert [s["cls"] for s in samples] == data["labels"][:20]
    assert samples[4]["json"]["source_id"] == "n004"
    padded = list(open_source(path, options=IngestOptions(images_key="opaque")))
    assert [s["jpg"].rstrip(b"\0") for s in padded] == data["jpegs"][:20]
    assert "cls" not in padded[0]


def test_hdf5_lazy_open_and_pickle(tmp_path, data):
    path, options = build_hdf5(tmp_path, data)
    source = open_source(path, fmt="hdf5", options=options)
    clone = pickle.loads(pickle.dumps(source))  # handed to a worker process
    assert [s["jpg"] for s in clone][:3] == data["jpegs"][:3]


def test_numpy_variants(tmp_path, data):
    dense, labels = data["dense"], np.array(data["labels"])
    np.save(tmp_path / "x.npy", dense)
    np.save(tmp_path / "y.npy", labels)
    src = str(tmp_path / "x.npy")
    assert detect_format(src) == "numpy"
    samples = list(open_source(src, options=IngestOptions(labels=str(tmp_path / "y.npy"))))
    _check(samples, data, dense=True, ids=False)

    # uncompressed npz, images found as the only 4-D uint8 array, labels by name
    np.savez(tmp_path / "u.npz", pixels=dense, targets=labels)
    samples = list(open_source(str(tmp_path / "u.npz"), options=IngestOptions(labels_key="targets")))
    _check(samples, data, dense=True, ids=False)

    # channel-first raw memmap, npy output keeps the array layout
    chw = np.ascontiguousarray(dense.transpose(0, 3, 1, 2))
    mm = np.memmap(tmp_path / "raw.u8", dtype=np.uint8, mode="w+", shape=chw.shape)
    mm[:] = chw
    mm.flush()
    del mm
    opts = IngestOptions(shape=(-1, 3, 32, 40), dtype="uint8")
    source = open_source(str(tmp_path / "raw.u8"), fmt="numpy", options=opts)
    assert len(source) == N
    first = next(iter(source))
    np.testing.assert_array_equal(_decoded(first["png"]), dense[0])
    npy = next(
        iter(
            open_source(
                str(tmp_path / "raw.u8"),
                fmt="numpy",
                options=IngestOptions(shape=chw.shape, dtype="uint8", image_format="npy"),
            )
        )
    )
    np.testing.assert_array_equal(np.load(io.BytesIO(npy["npy"])), chw[0])


def test_lmdb_raw_values_and_pickles(tmp_path, data):
    lmdb = pytest.importorskip("lmdb")
    path = str(tmp_path / "single.mdb")
    env = lmdb.open(path, subdir=False, map_size=64 << 20)
    with env.begin(write=True) as txn:
        for i in range(5):
            txn.put(b"raw-%d" % i, data["jpegs"][i])
        txn.put(b"z-dict", pickle.dumps({"image": data["jpegs"][5], "label": np.int64(7)}))
        txn.put(b"z-tuple", pickle.dumps((data["jpegs"][6], 3)))
        txn.put(b"z-dense", pickle.dumps({"img": data["dense"][0], "target": 1}))
    env.close()
    assert detect_format(path) == "lmdb"
    with pytest.raises(ShardkitError) as err:
        list(open_source(path, fmt="lmdb"))
    message = str(err.value)
    assert path in message and "record 5 (key 'z-dense')" in message and "pickle" in message and "allow" in message

    samples = list(open_source(path, fmt="lmdb", options=IngestOptions(allow_pickle=True)))
    assert [s["jpg"] for s in samples[:5]] + [samples[6]["jpg"], samples[7]["jpg"]] == data["jpegs"][:7]
    assert "cls" not in samples[0]
    assert [s["cls"] for s in samples[5:]] == [1, 7, 3]  # key order: z-dense, z-dict, z-tuple
    np.testing.assert_array_equal(_decoded(samples[5]["png"]), data["dense"][0])
    assert samples[7]["json"]["source_id"] == "z-tuple"


def test_sqlite_text_labels_and_rowid(tmp_path, data):
    path = str(tmp_path / "t.sqlite")
    names = ["cat", "dog", "eel"]
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE meta (k TEXT, v TEXT)")
        conn.execute("CREATE TABLE pics (img BLOB, species TEXT)")
        conn.executemany(
            "INSERT INTO pics VALUES (?, ?)", [(j, names[lab % 3]) for j, lab in zip(data["jpegs"], data["labels"])]
        )
    conn.close()
    with pytest.raises(ShardkitError, match="pics"):  # two tables, none with an 'image' column
        open_source(path)
    source = open_source(path, options=IngestOptions(image_column="img", label_column="species"))
    assert source.classes == names
    samples = list(source)
    assert [s["cls"] for s in samples] == [lab % 3 for lab in data["labels"]]
    assert [s["json"]["source_id"] for s in samples[:3]] == [1, 2, 3]  # rowids


def test_tfrecord_crc_and_protobuf_details(tmp_path, data):
    # Known CRC-32C vectors (RFC 3720 / TensorFlow's crc32c tests).
    assert tfr.crc32c(b"123456789") == 0xE3069283
    assert tfr.crc32c(bytes(32)) == 0x8A9136AA
    assert tfr.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tfr.crc32c(bytes(range(32))) == 0x46DD794E
    big = os.urandom(300_000)
    assert tfr.crc32c(big) == reference_crc32c(big)
    assert tfr.crc32c(big[1000:], tfr.crc32c(big[:1000])) == tfr.crc32c(big)

    # Hand-built Example with an *unpacked* int64 label and an unpacked float.
    def ld(field: int, payload: bytes) -> bytes:
        return bytes([field << 3 | 2]) + enc_varint(len(payload)) + payload

    image = ld(1, ld(1, data["jpegs"][0]))  # Feature{bytes_list{value}}
    label = ld(3, bytes([1 << 3 | 0]) + enc_varint(5))  # Feature{int64_list{value: 5}} unpacked
    score = ld(2, bytes([1 << 3 | 5]) + struct.pack("<f", 0.5))  # Feature{float_list} unpacked
    entries = b"".join(ld(1, ld(1, k) + ld(2, v)) for k, v in ((b"image", image), (b"label", label), (b"score", score)))
    record = ld(1, entries)
    assert parse_example(record) == {"image": [data["jpegs"][0]], "label": [5], "score": [0.5]}
    assert parse_example(encode_example({"x": [-1, 2**40]})) == {"x": [-1, 2**40]}

    gz = str(tmp_path / "hand.tfrecord.gz")
    with gzip.open(gz, "wb") as f:
        f.write(frame_record(record) * 3)
    assert detect_format(gz) == "tfrecord"
    samples = list(open_source(gz))
    assert [s["cls"] for s in samples] == [5, 5, 5] and samples[2]["jpg"] == data["jpegs"][0]
    assert samples[0]["json"]["features"] == {"score": 0.5}


# -- bad input --------------------------------------------------------------------------------


def test_missing_dataset_table_column(tmp_path, data):
    path, _ = build_hdf5(tmp_path, data)
    with pytest.raises(ShardkitError) as err:
        open_source(path, fmt="hdf5", options=IngestOptions(images_key="pixels"))
    assert path in str(err.value) and "'pixels'" in str(err.value) and "images" in str(err.value)

    path, _ = build_sqlite(tmp_path, data)
    with pytest.raises(ShardkitError) as err:
        open_source(path, options=IngestOptions(table="photos"))
    assert path in str(err.value) and "'photos'" in str(err.value) and "samples" in str(err.value)
    with pytest.raises(ShardkitError) as err:
        open_source(path, options=IngestOptions(label_column="y"))
    assert path in str(err.value) and "'y'" in str(err.value) and "image, label" in str(err.value)

    path, _ = build_npz(tmp_path, data)
    with pytest.raises(ShardkitError, match="no array 'x'.*images"):
        open_source(path, options=IngestOptions(images_key="x"))
    with pytest.raises(ShardkitError, match="shape and dtype"):
        open_source(str(tmp_path / "set.db"), fmt="numpy")


def test_tfrecord_truncated_and_bad_crc(tmp_path, data):
    path, _ = build_tfrecord(tmp_path, data)
    blob = open(path, "rb").read()
    sizes = []
    offset = 0
    while offset < len(blob):
        (length,) = struct.unpack("<Q", blob[offset : offset + 8])
        sizes.append(offset)
        offset += 16 + length
    cut = str(tmp_path / "cut.tfrecord")
    with open(cut, "wb") as f:
        f.write(blob[: sizes[150] + 100])
    with pytest.raises(ShardkitError) as err:
        list(open_source(cut))
    assert cut in str(err.value) and "record 150" in str(err.value)
    assert f"byte offset {sizes[150]}" in str(err.value) and "truncated" in str(err.value)

    flipped = bytearray(blob)
    flipped[sizes[42] + 12 + 50] ^= 0x01
    bad = str(tmp_path / "bad.tfrecord")
    with open(bad, "wb") as f:
        f.write(flipped)
    with pytest.raises(ShardkitError) as err:
        list(open_source(bad))
    assert bad in str(err.value) and "record 42" in str(err.value) and "CRC" in str(err.value)
    assert f"byte offset {sizes[42]}" in str(err.value)

    not_tfrecord = str(tmp_path / "junk.tfrecord")
    with open(not_tfrecord, "wb") as f:
        f.write(os.urandom(64))
    with pytest.raises(ShardkitError, match="record 0 .*length CRC"):
        list(open_source(not_tfrecord, fmt="tfrecord"))


def test_tfrecord_folder_and_bad_protobuf(tmp_path, data):
    folder = tmp_path / "tfr"
    folder.mkdir()
    for k in range(2):
        write_tfrecord(
            str(folder / f"part-{k}.tfrec"),
            [{"image": data["jpegs"][k * 10 + i], "label": data["labels"][k * 10 + i]} for i in range(10)],
        )
    (folder / "part-0.tfrec.idx").write_text("0 100\n")  # sidecars (e.g. DALI's) are ignored
    assert tfr.detect(str(folder))
    source = open_source(str(folder), fmt="tfrecord")
    assert len(source) == 20
    samples = list(source)
    assert [s["jpg"] for s in samples] == data["jpegs"][:20]
    assert [s["cls"] for s in samples] == data["labels"][:20]
    assert samples[12]["json"]["source"].endswith("part-1.tfrec") and samples[12]["json"]["source_id"] == 2

    bad = str(tmp_path / "garbage.tfrecord")
    write_tfrecord(bad, [{"image": data["jpegs"][0]}, b"\x0a\xff\xff"])  # valid CRCs, bad protobuf
    with pytest.raises(ShardkitError, match=r"garbage.tfrecord: record 1 \(byte offset \d+\): malformed"):
        list(open_source(bad))
    with pytest.raises(ShardkitError, match="no image feature 'pixels'"):
        list(open_source(bad, options=IngestOptions(image_feature="pixels")))


def test_binary_index_errors(tmp_path, data):
    path, _ = build_binary(tmp_path, data)
    size = os.path.getsize(path)
    with open(path + ".idx", "a") as f:
        f.write(f"{size - 10} 20 1\n")
    with pytest.raises(ShardkitError) as err:
        open_source(path)
    assert f"{path}.idx: line {N + 2}" in str(err.value) and "does not fit" in str(err.value)
    with open(path + ".idx", "w") as f:
        f.write("0 abc 1\n")
    with pytest.raises(ShardkitError, match=r"\.idx: line 1: offset and length must be integers"):
        open_source(path, fmt="binary")


def test_unrecognised_records_skip_or_fail(tmp_path, data):
    path = str(tmp_path / "mixed.bin")
    with open(path, "wb") as f:
        f.write(data["jpegs"][0] + b"garbage!" + data["jpegs"][1])
    n0 = len(data["jpegs"][0])
    with open(path + ".index", "w") as f:
        f.write(f"0 {n0} 0\n{n0} 8 1\n{n0 + 8} {len(data['jpegs'][1])} 2\n")
    source = open_source(path, fmt="binary")
    assert [s["cls"] for s in source] == [0, 2]
    assert len(source.skipped) == 1 and "not a recognised image" in source.skipped[0][1]
    with pytest.raises(ShardkitError, match="line 2 .*not a recognised image"):
        list(open_source(path, fmt="binary", options=IngestOptions(strict=True)))


def test_missing_library_message():
    from shardkit.ingest import missing_library

    assert "shardkit[hdf5]" in str(missing_library("h5py", "hdf5"))
