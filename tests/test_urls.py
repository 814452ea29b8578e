"""expand_pattern and resolve_shards on real folders: patterns, manifests, folders, lists, errors.

Expected counts come from Python's ``tarfile`` reading the shards, expected sha256 from
hashlib over the files; neither from shardkit's own sidecars.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
from dataclasses import replace

import pytest

from shardkit.errors import ShardkitError
from shardkit.format.index import Manifest, ShardInfo
from shardkit.read.dataset import ShardDataset
from shardkit.read.urls import ShardUrls, expand_pattern, load_manifest, resolve_shards
from shardkit.writing.writer import ShardWriter
from tests.helpers import make_shards, pairs, sample

pytestmark = pytest.mark.timeout(30)

COUNTS = [3, 5, 0, 4]
NAMES = [f"data-{i:06d}.tar" for i in range(len(COUNTS))]
PATTERN = "data-{000000..000003}.tar"


def tar_count(path: str) -> int:
    """Samples in a shard by tarfile: distinct keys of its regular members."""
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar if m.isfile()})


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    """A dataset folder: four shards (one empty), their .idx files and data.manifest.json."""
    dest = str(tmp_path_factory.mktemp("urls"))
    paths = make_shards(dest, COUNTS)
    assert [os.path.basename(p) for p in paths] == NAMES
    assert [tar_count(p) for p in paths] == COUNTS
    return dest


@pytest.fixture
def ds(pristine, tmp_path) -> str:
    """A private copy of the dataset folder, free to change."""
    dest = str(tmp_path / "ds")
    shutil.copytree(pristine, dest)
    return dest


def remove(folder: str, suffix: str) -> None:
    for name in os.listdir(folder):
        if name.endswith(suffix):
            os.remove(os.path.join(folder, name))


# --------------------------------------------------------------------------- expand_pattern


def test_expand_brace_range_keeps_zero_padding():
    assert expand_pattern("d/train-{000..003}.tar") == [f"d/train-00{i}.tar" for i in range(4)]
    assert expand_pattern("x-{08..11}") == ["x-08", "x-09", "x-10", "x-11"]
    assert expand_pattern("x-{8..11}") == ["x-8", "x-9", "x-10", "x-11"]


def test_expand_angle_range_is_the_same_as_braces():
    assert expand_pattern("d/train-<000..003>.tar") == expand_pattern("d/train-{000..003}.tar")
    assert expand_pattern("s3://b/p-<0098..0101>.tar") == [
        "s3://b/p-0098.tar",
        "s3://b/p-0099.tar",
        "s3://b/p-0100.tar",
        "s3://b/p-0101.tar",
    ]


def test_expand_alternatives_and_products():
    assert expand_pattern("x-{a,b}.tar") == ["x-a.tar", "x-b.tar"]
    assert expand_pattern("{tr,va}-<0..1>.tar") == ["tr-0.tar", "tr-1.tar", "va-0.tar", "va-1.tar"]
    assert expand_pattern("plain.tar") == ["plain.tar"]


# --------------------------------------------------------------------------- resolve_shards


def test_pattern_takes_counts_from_the_indexes(ds):
    remove(ds, ".manifest.json")
    shards = resolve_shards(os.path.join(ds, PATTERN))
    paths = [os.path.join(ds, n) for n in NAMES]
    assert shards.urls == paths
    assert shards.counts == [tar_count(p) for p in paths] == COUNTS
    assert shards.total == sum(COUNTS)
    assert shards.sha256 is None and shards.manifest is None
    os.remove(paths[1] + ".idx")  # one index missing: no counts at all
    partial = resolve_shards(os.path.join(ds, PATTERN))
    assert partial.urls == paths and partial.counts is None and partial.total is None


def test_pattern_uses_the_manifest_beside_the_shards(ds):
    remove(ds, ".idx")
    shards = resolve_shards(os.path.join(ds, "data-<000001..000003>.tar"))
    paths = [os.path.join(ds, n) for n in NAMES[1:]]
    assert shards.urls == paths
    assert shards.counts == COUNTS[1:]
    assert shards.sha256 == [sha256_of(p) for p in paths]
    assert shards.manifest_url == os.path.join(ds, "data.manifest.json")


def test_manifest_path_gives_counts_and_sha256_joined_to_its_folder(ds, tmp_path, monkeypatch):
    remove(ds, ".idx")  # counts can only come from the manifest
    monkeypatch.chdir(tmp_path)
    shards = resolve_shards("ds/data.manifest.json")
    assert shards.urls == [os.path.join("ds", n) for n in NAMES]
    assert shards.counts == [tar_count(u) for u in shards.urls] == COUNTS
    assert shards.sha256 == [sha256_of(u) for u in shards.urls]
    assert shards.manifest_url == "ds/data.manifest.json"
    assert shards.manifest is not None and shards.manifest.complete
    with open(os.path.join(ds, "data.manifest.json")) as f:  # the file holds names, relative to it
        assert [s.name for s in Manifest.from_json(f.read()).shards] == NAMES


def test_manifest_urls_are_made_on_access_relative_to_the_manifest(tmp_path):
    names = ["sub/a-0.tar", "b-7.tar", "http://other/x.tar"]
    manifest = Manifest([ShardInfo(n, i, 10 * i, f"{i:064x}") for i, n in enumerate(names)], name="d")
    (tmp_path / "d.manifest.json").write_text(manifest.to_json())
    shards = resolve_shards(str(tmp_path / "d.manifest.json"))
    want = [str(tmp_path / "sub" / "a-0.tar"), str(tmp_path / "b-7.tar"), "http://other/x.tar"]
    assert isinstance(shards.urls, ShardUrls) and shards.urls == want and want == list(shards.urls)
    assert shards.urls[-1] == want[-1] and shards.urls[1:] == want[1:] and len(shards.urls) == 3
    assert shards.counts == [0, 1, 2] and shards.total == 3
    assert shards.sha256 == [f"{i:064x}" for i in range(3)]
    remote = ShardUrls("http://h/ds/d.manifest.json", names)
    assert remote == ["http://h/ds/sub/a-0.tar", "http://h/ds/b-7.tar", "http://other/x.tar"]
    assert remote != want and remote != "http://h/ds/sub/a-0.tar"


def test_a_version_1_manifest_resolves_as_its_version_2_twin(ds):
    path = os.path.join(ds, "data.manifest.json")
    v2 = resolve_shards(path)
    with open(path) as f:
        manifest = Manifest.from_json(f.read())
    assert manifest.version == 2
    with open(path, "w") as f:  # as shardkit wrote it before version 2
        f.write(replace(manifest, version=1).to_json())
    v1 = resolve_shards(path)
    assert v1.manifest is not None and v1.manifest.version == 1
    assert v1.urls == v2.urls == [os.path.join(ds, n) for n in NAMES]
    assert v1.counts == v2.counts == COUNTS and v1.sha256 == v2.sha256 == [sha256_of(u) for u in v2.urls]
    keys = [s["__key__"] for s in ShardDataset(path)]
    assert len(keys) == sum(COUNTS) and keys == [f"s{i:06d}" for i in range(sum(COUNTS))]


def test_folder_with_a_manifest_uses_it(ds):
    remove(ds, ".idx")
    for folder in (ds, ds + "/"):
        shards = resolve_shards(folder)
        assert shards.manifest_url is not None
        assert os.path.samefile(shards.manifest_url, os.path.join(ds, "data.manifest.json"))
        assert [os.path.basename(u) for u in shards.urls] == NAMES
        assert all(os.path.samefile(u, os.path.join(ds, n)) for u, n in pairs(shards.urls, NAMES))
        assert shards.counts == COUNTS


def test_folder_without_a_manifest_lists_sorted_tar_files(ds):
    remove(ds, ".manifest.json")
    shutil.copyfile(os.path.join(ds, NAMES[1]), os.path.join(ds, "aaa.tar"))
    with open(os.path.join(ds, "notes.txt"), "w") as f:
        f.write("not a shard")
    shards = resolve_shards(ds)
    assert shards.urls == [os.path.join(ds, n) for n in ["aaa.tar"] + NAMES]
    assert shards.counts is None and shards.sha256 is None and shards.manifest is None


def test_folder_of_indexed_shards_without_a_manifest_gets_counts_from_the_indexes(ds):
    remove(ds, ".manifest.json")
    shards = resolve_shards(ds)
    assert shards.urls == [os.path.join(ds, n) for n in NAMES]
    assert shards.counts == [tar_count(os.path.join(ds, n)) for n in NAMES] == COUNTS


def test_folder_without_shards_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ShardkitError, match="no .tar shards or manifest"):
        resolve_shards(str(tmp_path))


def test_folder_with_two_manifests_names_both(tmp_path):
    make_shards(str(tmp_path), [2], name="alpha")
    make_shards(str(tmp_path), [3], name="beta")
    with pytest.raises(ShardkitError) as info:
        resolve_shards(str(tmp_path))
    assert "alpha.manifest.json" in str(info.value) and "beta.manifest.json" in str(info.value)
    # naming one of them works
    assert resolve_shards(str(tmp_path / "beta.manifest.json")).counts == [3]


def test_list_of_paths_keeps_its_order(ds):
    paths = [os.path.join(ds, n) for n in NAMES]
    for given in ([paths[3], paths[0], paths[1]], (paths[3], paths[0], paths[1])):
        shards = resolve_shards(given)
        assert shards.urls == [paths[3], paths[0], paths[1]]
        assert shards.counts == [COUNTS[3], COUNTS[0], COUNTS[1]]
        assert shards.sha256 == [sha256_of(p) for p in shards.urls]
    remove(ds, ".manifest.json")  # then from the indexes, still aligned
    shards = resolve_shards([paths[3], paths[0]])
    assert shards.counts == [COUNTS[3], COUNTS[0]] and shards.sha256 is None


def test_double_colon_joins_patterns(ds, tmp_path):
    other = str(tmp_path / "other")
    (extra,) = make_shards(other, [2], name="other")
    shards = resolve_shards(os.path.join(ds, "data-{000000..000001}.tar") + "::" + extra + "::")
    assert shards.urls == [os.path.join(ds, NAMES[0]), os.path.join(ds, NAMES[1]), extra]
    # two datasets: no one manifest covers them, the indexes do
    assert shards.counts == [COUNTS[0], COUNTS[1], tar_count(extra)] == [3, 5, 2]


@pytest.mark.parametrize("last,missing", [(9, 6), (7, 4), (6, 3), (4, 1)])
def test_missing_shards_are_named(ds, last, missing):
    wanted = [os.path.join(ds, f"data-{i:06d}.tar") for i in range(last + 1)]
    absent = [w for w in wanted if not os.path.exists(w)]
    assert len(absent) == missing
    with pytest.raises(ShardkitError) as info:
        resolve_shards(os.path.join(ds, f"data-{{000000..{last:06d}}}.tar"))
    message = str(info.value)
    assert f"{missing} of {last + 1} shard(s) do not exist" in message
    for path in absent[:3]:
        assert path in message
    for path in absent[3:]:
        assert path not in message
    if missing > 3:
        assert message.endswith(f"and {missing - 3} more")
    else:
        assert "more" not in message


def test_a_shard_listed_twice_is_refused(ds):
    path = os.path.join(ds, NAMES[1])
    for given in (
        [path, os.path.join(ds, NAMES[0]), path],
        f"{path}::{path}",
        os.path.join(ds, "data-00000{1,0,1}.tar"),
    ):
        with pytest.raises(ShardkitError, match="more than once") as info:
            resolve_shards(given)
        assert path in str(info.value)


def test_nothing_given_is_an_error():
    for given in ("", "::", []):
        with pytest.raises(ShardkitError, match="no shard URLs"):
            resolve_shards(given)


def test_incomplete_manifest_resolves_with_a_warning(tmp_path, caplog):
    dest = str(tmp_path / "partial")
    with pytest.raises(RuntimeError), ShardWriter(dest, name="part", max_count=3) as writer:
        for i in range(7):
            writer.write(sample(i, image=False))
        raise RuntimeError("interrupted")
    manifest = os.path.join(dest, "part.manifest.json")
    with open(manifest) as f:
        assert json.load(f)["complete"] is False
    paths = [os.path.join(dest, f"part-{i:06d}.tar") for i in range(3)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shardkit"):
        shards = resolve_shards(manifest)
    assert shards.urls == paths
    assert shards.counts == [tar_count(p) for p in paths] == [3, 3, 1]
    assert shards.manifest is not None and not shards.manifest.complete
    records = [r for r in caplog.records if r.name == "shardkit.read.urls" and r.levelno == logging.WARNING]
    assert len(records) == 1
    assert manifest in records[0].getMessage() and "incomplete" in records[0].getMessage()
    assert not load_manifest(manifest).complete
