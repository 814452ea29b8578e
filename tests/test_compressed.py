"""Compressed shards (.tar.gz, .tar.zst, .tar.bz2, .tar.xz) read exactly like their
uncompressed twins: through the dataset, a 2-worker ShardLoader and every CLI command,
from local disk and over HTTP (nginx). The compressed files are made by the real tools
(gzip/zstd/bzip2/xz, GNU ``tar czf``) and by the webdataset package."""

from __future__ import annotations

import builtins
import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

from shardkit import cli
from shardkit.errors import ShardFormatError, SkippedSampleWarning
from shardkit.format.compression import compression_of, is_shard_name
from shardkit.format.index import Manifest, dataset_name_for
from shardkit.format.samples import iter_samples
from shardkit.loader import ShardLoader
from shardkit.read.dataset import ShardDataset
from tests.helpers import make_shards, pairs, tiny_jpeg
from tests.servers import run_nginx, use_s3

COUNTS = [5, 7, 4]
# name -> (suffix, command that compresses stdin to stdout)
TOOLS = {
    "gz": (".tar.gz", ["gzip", "-c", "-n"]),
    "zst": (".tar.zst", ["zstd", "-q", "-c"]),
    "bz2": (".tar.bz2", ["bzip2", "-c"]),
    "xz": (".tar.xz", ["xz", "-c"]),
}


def _compress(src: str, dest: str, command: list[str]) -> None:
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} not installed")
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        subprocess.run(command, stdin=fin, stdout=fout, check=True)


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict[str, str]:
    """``{"plain": folder, "gz": folder, ...}``: the same three shards, plain (with .idx and
    manifest from the writer) and compressed by each CLI tool, then `shardkit index`ed."""
    root = tmp_path_factory.mktemp("twins")
    plain = root / "plain"
    paths = make_shards(str(plain), COUNTS, image=True)
    out = {"plain": str(plain), "root": str(root)}
    for name, (suffix, command) in TOOLS.items():
        folder = root / name
        folder.mkdir()
        for path in paths:
            _compress(path, str(folder / (os.path.basename(path)[:-4] + suffix)), command)
        assert cli.main(["index", "--quiet", str(folder / f"data-{{000000..000002}}{suffix}")]) == 0
        out[name] = str(folder)
    return out


COMPRESSED = list(TOOLS)


def _raw(samples) -> list[tuple]:
    return [tuple(sorted((k, v) for k, v in s.items() if k == "__key__" or not k.startswith("__"))) for s in samples]


def test_magic_bytes_decide_not_the_name(tmp_path):
    data = make_shards(str(tmp_path / "p"), [3])[0]
    with open(data, "rb") as f:
        tar = f.read()
    liar = tmp_path / "really-gzip.tar"
    liar.write_bytes(gzip.compress(tar))
    honest = tmp_path / "plain.tar.gz"
    honest.write_bytes(tar)
    for path in (liar, honest):
        with open(path, "rb") as f:
            assert _raw(iter_samples(f, url=str(path))) == _raw(iter_samples(io.BytesIO(tar)))
    assert compression_of(gzip.compress(b"x")) == "gzip" and compression_of(tar) is None


def test_names_and_discovery():
    assert all(is_shard_name(f"a/b-000001{s}") for s, _ in TOOLS.values())
    assert not is_shard_name("x.tar.idx") and not is_shard_name("data.manifest.json")
    assert dataset_name_for(["train-000001.tar.gz", "train-000002.tar.gz"]) == "train"
    assert dataset_name_for(["val_000001.tar.zst"]) == "val"


@pytest.mark.parametrize("name", COMPRESSED)
def test_index_counts_in_manifest_no_idx(twins, name):
    folder = twins[name]
    assert not [f for f in os.listdir(folder) if f.endswith(".idx")]
    with open(os.path.join(folder, "data.manifest.json")) as f:
        manifest = Manifest.from_json(f.read())
    assert [s.samples for s in manifest.shards] == COUNTS
    # sha256 and bytes are the compressed file's, so a download can be checked
    first = manifest.shards[0]
    assert first.bytes == os.path.getsize(os.path.join(folder, first.name))


@pytest.mark.parametrize("name", COMPRESSED)
def test_dataset_reads_like_the_plain_twin(twins, name):
    plain = ShardDataset(twins["plain"], shuffle=8, seed=3)
    packed = ShardDataset(twins[name], shuffle=8, seed=3)
    assert len(packed) == len(plain) == sum(COUNTS)
    assert packed.counts == COUNTS
    assert _raw(packed) == _raw(plain)


@pytest.mark.parametrize("name", ["gz", "zst"])
def test_loader_two_workers_sample_level_split(twins, name):
    """Sample-level plans (pieces starting mid-shard) skip inside the decompressed stream."""

    def keys(folder: str) -> list:
        loader = ShardLoader(
            ShardDataset(folder, shuffle=4, seed=1, decode="torch", fields="jpg cls"), batch_size=3, num_workers=2
        )
        return [(img.sum().item(), cls.tolist()) for img, cls in loader]

    assert keys(twins[name]) == keys(twins["plain"])


def _cli_json(capsys, *args: str) -> object:
    assert cli.main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _strip(data: object, plain: str, other: str) -> object:
    """Make CLI output of a compressed twin comparable: URLs and byte counts differ."""
    text = json.dumps(data)
    for suffix, _ in TOOLS.values():
        text = text.replace(suffix, ".tar")
    return json.loads(text.replace(other, plain))


@pytest.mark.parametrize("name", COMPRESSED)
def test_every_cli_command(twins, name, capsys, tmp_path):
    plain, packed = twins["plain"], twins[name]
    assert _strip(_cli_json(capsys, "ls", packed, "-n", "100"), plain, packed) == _cli_json(
        capsys, "ls", plain, "-n", "100"
    )
    plain_stats = _cli_json(capsys, "stats", plain)
    assert _strip(_cli_json(capsys, "stats", packed), plain, packed) == plain_stats
    verify = _cli_json(capsys, "verify", packed, "--decode")
    assert verify["ok"] and verify["samples"] == sum(COUNTS), verify
    # index on a copy with a stale .idx left over from before compression: removed
    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    stale = next(p for p in os.listdir(twins["plain"]) if p.endswith(".idx"))
    shutil.copy(os.path.join(twins["plain"], stale), copy / (sorted(os.listdir(packed))[0] + ".idx"))
    assert _cli_json(capsys, "index", str(copy))["samples"] == sum(COUNTS)
    assert not [f for f in os.listdir(copy) if f.endswith(".idx")]


@pytest.mark.parametrize("name", COMPRESSED)
def test_cat_bytes_exact(twins, name, capfdbinary):
    assert cli.main(["cat", twins[name], "s000009", "--field", "jpg"]) == 0
    assert capfdbinary.readouterr().out == tiny_jpeg(9)


@pytest.fixture(scope="module")
def nginx_twins(twins):
    with run_nginx(twins["root"]) as server:
        yield server.url


@pytest.mark.parametrize("name", COMPRESSED)
def test_over_http(twins, nginx_twins, name, capsys):
    url = f"{nginx_twins}{name}/data.manifest.json"
    plain_url = f"{nginx_twins}plain/data.manifest.json"
    dataset = ShardDataset(url, shuffle=5, seed=2)
    assert dataset.counts == COUNTS
    assert _raw(dataset) == _raw(ShardDataset(plain_url, shuffle=5, seed=2))
    # by pattern (the manifest beside the shards is found by the dataset name)
    suffix = TOOLS[name][0]
    assert ShardDataset(f"{nginx_twins}{name}/data-{{000000..000002}}{suffix}").counts == COUNTS
    verify = _cli_json(capsys, "verify", url, "--decode")
    assert verify["ok"] and verify["samples"] == sum(COUNTS)
    assert _strip(_cli_json(capsys, "stats", url), f"{nginx_twins}plain/", f"{nginx_twins}{name}/") == _cli_json(
        capsys, "stats", plain_url
    )
    ls = _cli_json(capsys, "ls", url, "-n", "3")
    assert [r["key"] for r in ls] == ["s000000", "s000001", "s000002"]


def test_http_loader_two_workers(twins, nginx_twins):
    url = f"{nginx_twins}gz/data.manifest.json"
    loader = ShardLoader(ShardDataset(url, shuffle=4, seed=5), batch_size=4, num_workers=2)
    plain = ShardLoader(ShardDataset(twins["plain"], shuffle=4, seed=5), batch_size=4, num_workers=2)
    assert [b["__key__"] for b in loader] == [b["__key__"] for b in plain]


def test_tar_czf_matches_webdataset(tmp_path):
    """A shard made by GNU ``tar czf`` from a folder: same samples, byte for byte, as webdataset reads."""
    import webdataset as wds

    if shutil.which("tar") is None:
        pytest.skip("tar not installed")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"{i:04d}.jpg").write_bytes(tiny_jpeg(i))
        (src / f"{i:04d}.cls").write_text(str(i % 2))
        (src / f"{i:04d}.txt.gz").write_bytes(gzip.compress(f"caption {i}".encode()))
    shard = tmp_path / "made-by-tar.tgz"
    names = sorted(os.listdir(src))
    subprocess.run(["tar", "czf", str(shard), "-C", str(src), *names], check=True)
    ours = list(ShardDataset(str(shard)))
    theirs = list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs] == [f"{i:04d}" for i in range(6)]
    for a, b in pairs(ours, theirs):
        assert {k: v for k, v in a.items() if not k.startswith("__")} == {
            k: v for k, v in b.items() if not k.startswith("__")
        }
    # decoded: .txt.gz is decompressed like webdataset's decoder does
    decoded = list(ShardDataset(str(shard), decode="pil", fields="jpg cls txt.gz"))
    assert [d[2] for d in decoded] == [f"caption {i}" for i in range(6)]
    wds_decoded = list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False).decode("pil"))
    assert [d["txt.gz"] for d in wds_decoded] == [f"caption {i}" for i in range(6)]


def test_webdataset_tarwriter_tar_gz(tmp_path):
    import webdataset as wds

    path = str(tmp_path / "wds-000000.tar.gz")
    with wds.TarWriter(path) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "jpg": tiny_jpeg(i), "cls": str(i).encode()})
    with open(path, "rb") as f:
        assert compression_of(f.read(6)) == "gzip"  # really compressed
    ours = list(ShardDataset(path))
    theirs = list(wds.WebDataset(path, shardshuffle=False, empty_check=False))
    assert _raw(ours) == _raw(theirs)
    assert cli.main(["index", "--quiet", path]) == 0
    assert len(ShardDataset(path)) == 5


def test_missing_zstandard_names_the_extra(twins, monkeypatch):
    real_import = builtins.__import__

    def no_zstd(name, *args, **kwargs):
        if name == "zstandard":
            raise ImportError("No module named 'zstandard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zstd)
    path = os.path.join(twins["zst"], "data-000000.tar.zst")
    with pytest.raises(ShardFormatError, match=r"pip install 'shardkit\[zstd\]'") as info, open(path, "rb") as f:
        list(iter_samples(f, url=path))
    assert path in str(info.value)


@pytest.mark.parametrize("name", ["gz", "zst", "xz"])
def test_cut_compressed_shard_keeps_complete_samples(twins, name, tmp_path, recwarn):
    """A compressed shard cut short: skip/warn yield every whole sample before the cut, and
    the shard after it arrives in full; warn says which shard."""
    src = os.path.join(twins[name], "data-000001" + TOOLS[name][0])
    with open(src, "rb") as f:
        data = f.read()
    cut = tmp_path / os.path.basename(src)
    cut.write_bytes(data[: len(data) * 2 // 3])
    # what a tolerant decompression of the cut file holds: the complete samples before the cut
    before = []
    with open(cut, "rb") as f:
        try:
            for s in iter_samples(f, url=str(cut)):
                before.append(s["__key__"])
        except ShardFormatError as e:
            assert "truncated" in str(e) and str(cut) in str(e)
        else:
            pytest.fail("a cut compressed shard read without an error")
    assert before == [f"s{i:06d}" for i in range(5, 5 + len(before))]
    # zstd decodes whole blocks (128 KiB): a small shard cut anywhere has no whole block left
    assert len(before) >= (0 if name == "zst" else 2)
    later = os.path.join(twins[name], "data-000002" + TOOLS[name][0])
    loader = ShardLoader(ShardDataset([str(cut), later], handler="warn"), batch_size=None, num_workers=0)
    keys = [s["__key__"] for s in loader]
    assert keys == before + [f"s{i:06d}" for i in range(12, 16)]
    lines = [str(w.message) for w in recwarn if w.category is SkippedSampleWarning]
    assert len(lines) == 1 and str(cut) in lines[0]


def test_tarfile_agrees_on_a_compressed_twin(twins):
    """Python's tarfile (what webdataset uses) lists the same members."""
    path = os.path.join(twins["bz2"], "data-000000.tar.bz2")
    with tarfile.open(path) as tf:
        theirs = [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]
    with open(path, "rb") as f:
        ours = [
            (f"{s['__key__']}.{k}", v)
            for s in iter_samples(f, url=path)
            for k, v in s.items()
            if not k.startswith("__")
        ]
    assert sorted(ours) == sorted(theirs)


def test_over_s3(twins, moto_server, monkeypatch, capsys):
    """The same through S3 (moto): prefix listing finds the manifest, counts split by sample."""
    use_s3(monkeypatch, moto_server)
    client = moto_server.client()
    for name in ("gz", "zst"):
        for file in os.listdir(twins[name]):
            client.upload_file(os.path.join(twins[name], file), moto_server.bucket, f"compressed/{name}/{file}")
        url = f"s3://{moto_server.bucket}/compressed/{name}/"
        dataset = ShardDataset(url, shuffle=5, seed=4)
        assert dataset.counts == COUNTS
        assert _raw(dataset) == _raw(ShardDataset(twins["plain"], shuffle=5, seed=4))
        verify = _cli_json(capsys, "verify", url + "data.manifest.json")
        assert verify["ok"] and verify["samples"] == sum(COUNTS)
