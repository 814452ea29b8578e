"""ShardMap (random access by position and key) and the version-2 index it reads keys from.

Every read is checked against a sequential read of the same shards (ShardDataset, and
the webdataset package), locally, through nginx and through S3 (SeaweedFS and moto).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from shardkit import ShardMap
from shardkit.cli import main as cli_main
from shardkit.errors import ShardFormatError, ShardkitError
from shardkit.format.index import decode_index, decode_index_keys, encode_index
from shardkit.read.dataset import ShardDataset
from tests.helpers import make_shards
from tests.servers import BUCKET

pytestmark = pytest.mark.timeout(180)

COUNTS = [7, 0, 12, 5]  # an empty shard in the middle: positions must skip it


def _content(sample: dict) -> dict:
    """A sample without its URL (which differs between local and remote copies)."""
    return {k: v for k, v in sample.items() if k != "__url__" and not k.startswith("__local")}


def _write_foreign(path: str, start: int, count: int) -> None:
    """A tar as other tools write it: pax long names, a directory, dotted extensions."""
    rng = np.random.default_rng(start)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("dir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for i in range(start, start + count):
            key = f"dir/{'long' * 40 if i % 3 == 0 else 'k'}{i:04d}"
            for ext, data in (("seg.png", rng.bytes(50 + i)), ("cls", str(i).encode()), ("bin", rng.bytes(700))):
                member = tarfile.TarInfo(f"{key}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, str]:
    """Folders of shards: ``v2`` (ShardWriter), ``v1`` (same, version-1 indexes, no
    manifest), ``foreign`` (tarfile-written, indexed by `shardkit index`)."""
    root = tmp_path_factory.mktemp("shardmap")
    v2 = str(root / "v2")
    make_shards(v2, COUNTS, image=True)
    v1 = str(root / "v1")
    shutil.copytree(v2, v1)
    os.remove(os.path.join(v1, "data.manifest.json"))
    for name in os.listdir(v1):
        if name.endswith(".idx"):
            path = os.path.join(v1, name)
            with open(path, "rb") as f:
                offsets = decode_index(f.read())
            with open(path, "wb") as f:
                f.write(encode_index(offsets))
    foreign = str(root / "foreign")
    os.makedirs(foreign)
    for n, (start, count) in enumerate([(0, 6), (6, 4)]):
        _write_foreign(os.path.join(foreign, f"wds-{n:06d}.tar"), start, count)
    assert cli_main(["index", "-q", os.path.join(foreign, "wds-{000000..000001}.tar")]) == 0
    return {"v2": v2, "v1": v1, "foreign": foreign}


def _sequential(url: str) -> list[dict]:
    return list(ShardDataset(url, decode=None))


# -- the index format ------------------------------------------------------------------


def test_index_v2_round_trip():
    offsets = [0, 1536, 4096, 9216]
    keys = ["a", "dir/b\u00e9", "x\udcff"]  # a non-UTF-8 tar name round-trips via surrogateescape
    data = encode_index(offsets, keys)
    assert data[:8] == b"SKIDX002"
    assert list(decode_index(data)) == offsets
    assert decode_index_keys(data) == keys
    empty = encode_index([1024], [])
    assert list(decode_index(empty)) == [1024] and decode_index_keys(empty) == []
    with pytest.raises(ValueError, match="NUL"):
        encode_index([0, 512], ["a\0b"])
    with pytest.raises(ValueError, match="keys"):
        encode_index([0, 512], ["a", "b"])


def test_index_v1_still_decodes():
    data = encode_index([0, 1536, 4096])
    assert data[:8] == b"SKIDX001"
    assert list(decode_index(data)) == [0, 1536, 4096]
    assert decode_index_keys(data) is None


@pytest.mark.parametrize("corrupt", ["truncated", "extra", "no_nul", "few_keys", "length"])
def test_corrupt_key_table_names_the_url(corrupt):
    good = encode_index([0, 1536, 4096], ["a", "b"])
    table_at = 16 + 8 * 3 + 8
    bad = {
        "truncated": good[:-1],
        "extra": good + b"x",
        "no_nul": good[:-1] + b"x",
        "few_keys": good[:table_at] + b"ab\0\0"[:2] + b"c\0",
        "length": good[: table_at - 8] + (999).to_bytes(8, "little") + good[table_at:],
    }[corrupt]
    with pytest.raises(ShardFormatError, match="https://host/x.tar.idx"):
        decode_index_keys(bad, url="https://host/x.tar.idx")


def test_writer_and_shardkit_index_write_keys(sets):
    for folder, pattern in (("v2", "data-{000000..000003}.tar"), ("foreign", "wds-{000000..000001}.tar")):
        for shard in ShardDataset(os.path.join(sets[folder], pattern)).urls:
            with open(shard + ".idx", "rb") as f:
                keys = decode_index_keys(f.read(), url=shard)
            assert keys == [s["__key__"] for s in ShardDataset(shard, decode=None)], shard


# -- local random access ---------------------------------------------------------------


@pytest.mark.parametrize("folder", ["v2", "v1", "foreign"])
def test_positions_equal_the_sequential_read(sets, folder):
    want = _sequential(sets[folder])
    m = ShardMap(sets[folder])
    assert len(m) == len(want) == (sum(COUNTS) if folder != "foreign" else 10)
    assert [m[i] for i in range(len(m))] == want
    assert [m[-i] for i in range(1, len(m) + 1)] == want[::-1]
    assert m[np.int64(3)] == want[3]
    for bad in (len(m), -len(m) - 1, 10**6):
        with pytest.raises(IndexError):
            m[bad]


@pytest.mark.parametrize("folder", ["v2", "foreign"])
def test_positions_equal_webdataset(sets, folder):
    import webdataset as wds

    m = ShardMap(sets[folder])
    theirs = list(wds.WebDataset(m.urls, shardshuffle=False, empty_check=False))
    assert len(theirs) == len(m)
    for i, sample in enumerate(theirs):
        assert _content(m[i]) == _content(sample), i


@pytest.mark.parametrize("folder", ["v2", "foreign"])
def test_get_every_key(sets, folder):
    m = ShardMap(sets[folder])
    for i, sample in enumerate(_sequential(sets[folder])):
        assert m.position(sample["__key__"]) == i
        assert m.get(sample["__key__"]) == sample
    assert m.get("no-such-key") is None and m.position("s999999") is None


def test_v1_index_falls_back_to_reading_keys_once(sets, caplog):
    want = _sequential(sets["v1"])
    m = ShardMap(sets["v1"])
    with caplog.at_level(logging.WARNING, logger="shardkit.read.shardmap"):
        assert m.get(want[5]["__key__"]) == want[5]
    assert "shardkit index" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="shardkit.read.shardmap"):
        for sample in want:
            assert m.get(sample["__key__"]) == sample
    assert caplog.text == ""  # the map was built once


def test_duplicate_keys_get_the_first(tmp_path):
    with tarfile.open(tmp_path / "dup-000000.tar", "w") as tar:
        for key, payload in (("a", b"1"), ("b", b"2"), ("a", b"3")):
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(payload))
    assert cli_main(["index", "-q", str(tmp_path / "dup-000000.tar")]) == 0
    m = ShardMap(str(tmp_path / "dup-000000.tar"))
    assert len(m) == 3 and m[2]["txt"] == b"3"
    assert m.get("a")["txt"] == b"1"


def test_decode_transform_fields_match_shard_dataset(sets):
    def scale(t: torch.Tensor) -> torch.Tensor:
        return t.float() / 255

    kw = dict(decode="torch", transform={"jpg": scale}, fields="jpg cls")
    want = list(ShardDataset(sets["v2"], **kw))
    m = ShardMap(sets["v2"], **kw)
    for i, (image, label) in enumerate(want):
        got = m[i]
        assert isinstance(got, tuple) and got[1] == label
        assert torch.equal(got[0], image)
    pil = ShardMap(sets["v2"], decode="pil", decode_size=16, transform=lambda s: {**s, "size": s["jpg"].size})
    sample = pil.get(_sequential(sets["v2"])[3]["__key__"])
    assert sample["size"] == (24, 16) and sample["cls"] == 3 % 3


def test_options_refused_with_a_reason(sets):
    with pytest.raises(ValueError, match="handler='raise'"):
        ShardMap(sets["v2"], handler="skip")
    with pytest.raises(ValueError, match="decode_size"):
        ShardMap(sets["v2"], decode_size=64)
    with pytest.raises(ShardkitError, match="cache_dir"):
        ShardMap(["pipe:cat x.tar"], allow_pipe=True)


def test_missing_index_names_the_shard(sets, tmp_path):
    shutil.copy(os.path.join(sets["v2"], "data-000002.tar"), tmp_path / "lone-000000.tar")
    with pytest.raises(ShardkitError, match=r"lone-000000\.tar.*shardkit index"):
        ShardMap(str(tmp_path / "lone-000000.tar"))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_files_stay_bounded(tmp_path):
    folder = str(tmp_path / "many")
    make_shards(folder, [2] * 12, image=False)
    m = ShardMap(folder, max_open_files=3)
    before = _open_fds()
    peak = 0
    for _ in range(2):
        for i in range(len(m)):
            m[i]
            peak = max(peak, _open_fds())
    assert peak <= before + 3 + 1  # +1: the /proc listing itself
    m.close()
    assert _open_fds() <= before


def test_dataloader_workers_match_direct_indexing(sets):
    m = ShardMap(sets["v2"])
    m[0]  # the parent holds an open shard file when the workers fork
    order = [int(i) for i in np.random.default_rng(0).permutation(len(m))]
    loader = DataLoader(m, batch_size=None, sampler=order, num_workers=2)
    assert [_content(s) for s in loader] == [_content(m[i]) for i in order]


def test_pickles_without_handles(sets):
    m = ShardMap(sets["v2"])
    first = m[0]
    m.get(first["__key__"])
    assert m._files  # a handle is open here...
    copy = pickle.loads(pickle.dumps(m))
    assert not copy._files  # ...but never in the pickle
    assert copy[0] == first and copy.get(first["__key__"]) == first


# -- remote: nginx and S3 --------------------------------------------------------------


@pytest.fixture(scope="module")
def served(sets, shard_files) -> str:
    """The v2 and v1 folders inside the nginx document root, under ``shardmap/``."""
    for folder in ("v2", "v1"):
        dest = os.path.join(shard_files.root, "shardmap", folder)
        if not os.path.isdir(dest):
            shutil.copytree(sets[folder], dest)
    return "shardmap/"


def _check_remote(base: str, local: dict[str, str], **kw) -> None:
    want = [_content(s) for s in _sequential(local["v2"])]
    m = ShardMap(base + "v2/data.manifest.json", **kw)
    assert m.urls[0].startswith(base)
    assert [_content(m[i]) for i in range(len(m))] == want
    assert _content(m[-1]) == want[-1]
    assert [_content(m.get(s["__key__"])) for s in want] == want
    assert m.get("absent") is None
    # No manifest and version-1 indexes: counts from each .idx, keys read from the shards.
    v1 = ShardMap(base + "v1/data-{000000..000003}.tar", **kw)
    assert [_content(v1[i]) for i in range(len(v1))] == want
    assert [_content(v1.get(s["__key__"])) for s in reversed(want)] == want[::-1]


@pytest.mark.parametrize("cached", [False, True], ids=["ranged", "cache"])
def test_nginx(nginx_server, served, sets, tmp_path, cached):
    _check_remote(nginx_server.url + served, sets, cache_dir=str(tmp_path / "cache") if cached else None)
    if cached:
        cached_files = [name for _, _, names in os.walk(tmp_path / "cache") for name in names]
        assert sum(name.endswith(".tar") for name in cached_files) == 6  # v2 and v1: 3 non-empty shards each


def test_nginx_missing_index(nginx_server, shard_files):
    url = nginx_server.url + shard_files.names[0]
    with pytest.raises(ShardkitError, match=rf"{shard_files.names[0]}.*shardkit index"):
        ShardMap([url])


_uploaded: set[str] = set()


@pytest.mark.parametrize("cached", [False, True], ids=["ranged", "cache"])
def test_s3(s3_server, sets, tmp_path, cached):
    if s3_server.name not in _uploaded:
        client = s3_server.client()
        for folder in ("v2", "v1"):
            for name in sorted(os.listdir(sets[folder])):
                client.upload_file(os.path.join(sets[folder], name), BUCKET, f"shardmap/{folder}/{name}")
        _uploaded.add(s3_server.name)
    _check_remote(f"s3://{BUCKET}/shardmap/", sets, cache_dir=str(tmp_path / "cache") if cached else None)


def _photo_shards(dest: str) -> str:
    """One shard: a 900x700 photo-like JPEG (decoded at a reduced scale when fused) and
    a 40x20 one whose EXIF orientation (6) turns it upright to 20x40."""
    from shardkit.cli.synthetic import photo_like
    from shardkit.writing.writer import ShardWriter

    big = io.BytesIO()
    Image.fromarray(photo_like(np.random.default_rng(1), 900, 700)).save(big, "JPEG", quality=90)
    turned = io.BytesIO()
    image = Image.fromarray(photo_like(np.random.default_rng(2), 40, 20))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(turned, "JPEG", quality=90, exif=exif.tobytes())
    with ShardWriter(dest, shard_size="1GB") as writer:
        writer.write({"__key__": "big", "jpg": big.getvalue(), "cls": 0})
        writer.write({"__key__": "turned", "jpg": turned.getvalue(), "cls": 1})
    return dest


def test_decoding_is_built_as_shard_dataset_builds_it(tmp_path):
    """One builder for both: the EXIF orientation and the fused crop of decode_size="auto"."""
    from torchvision.transforms import v2

    url = _photo_shards(str(tmp_path / "photos"))
    m = ShardMap(url, decode="numpy")
    assert m.get("turned")["jpg"].shape == (40, 20, 3)  # upright by default, as ShardDataset
    assert ShardMap(url, decode="numpy", exif_orientation=False).get("turned")["jpg"].shape == (20, 40, 3)
    kw = dict(decode="torch", transform={"jpg": v2.RandomResizedCrop(64)})
    fused_map = ShardMap(url, decode_size="auto", **kw)
    assert fused_map.decoding.fuse and not ShardMap(url, **kw).decoding.fuse
    exact_map = ShardMap(url, decode_size="exact", **kw)
    assert exact_map.decoding.fuse and exact_map.decoding.exact
    for i in range(len(exact_map)):  # "exact": the unfused values, by index too
        torch.manual_seed(i)
        exact = exact_map[i]["jpg"]
        torch.manual_seed(i)
        assert torch.equal(exact, ShardMap(url, **kw)[i]["jpg"])
    torch.manual_seed(0)
    fused = fused_map[0]["jpg"]
    torch.manual_seed(0)
    from_dataset = next(iter(ShardDataset(url, decode_size="auto", **kw)))["jpg"]
    torch.manual_seed(0)
    unfused = ShardMap(url, **kw)[0]["jpg"]
    assert fused.shape == from_dataset.shape == unfused.shape == (3, 64, 64)
    assert torch.equal(fused, from_dataset)  # the same crop, decoded the same way
    assert not torch.equal(fused, unfused)  # ... at a reduced DCT scale: the crop was fused


@pytest.mark.parametrize("decode", [None, lambda s: s])
def test_decode_size_without_a_builtin_decoder_is_refused_the_same_way(sets, decode):
    for cls in (ShardMap, ShardDataset):
        for size in (64, "auto"):
            with pytest.raises(ValueError, match="decode_size applies to decode='pil'/'numpy'/'torch'"):
                cls(sets["v2"], decode=decode, decode_size=size)
    with pytest.raises(ValueError, match="decode must be None, a callable or one of"):
        ShardMap(sets["v2"], decode="jpeg")
    with pytest.raises(ValueError, match="decode must be None, a callable or one of"):
        ShardDataset(sets["v2"], decode="jpeg")
