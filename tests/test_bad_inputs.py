"""Every bad input of tests/bad_corpus.py through the reader, the dataset, the loader and the CLI.

For each case and each handler mode:

- "raise": a ShardkitError whose message names the URL (and, for format errors, the
  member and/or byte offset), after exactly the samples before the damage;
- "warn": one warning per loss, naming the URL; exactly the bad sample (or the rest of a
  broken shard) is lost, and the next shard arrives in full;
- "skip": the same, silently.

Losses show in ``ShardLoader.stats()["skipped"]``. Python's tarfile (and webdataset) are
compared where that is meaningful.
"""

from __future__ import annotations

import http.server
import io
import os
import subprocess
import sys
import threading
import time

import pytest

from shardkit import cli
from shardkit.errors import SampleError, ShardFormatError, ShardkitError, SkippedSampleWarning, SourceError
from shardkit.format.compression import compression_of
from shardkit.format.samples import iter_samples
from shardkit.format.tar import iter_member_tuples
from shardkit.loader import ShardLoader
from shardkit.read.dataset import ShardDataset
from shardkit.writing.writer import ShardWriter
from tests import bad_corpus
from tests.bad_corpus import CASES, Case
from tests.helpers import make_shards, tiny_jpeg

pytestmark = pytest.mark.timeout(30)

MODES = ("raise", "warn", "skip")
GOOD_KEYS = [f"z{i:04d}" for i in range(4)]


def ids(cases: list[Case]) -> list[str]:
    return [c.name for c in cases]


@pytest.fixture(scope="module")
def good_shard(tmp_path_factory) -> str:
    """A valid shard (with index and manifest, in its own folder) read after each bad one."""
    dest = str(tmp_path_factory.mktemp("good"))
    with ShardWriter(dest, name="good") as writer:
        for i, key in enumerate(GOOD_KEYS):
            writer.write({"__key__": key, "jpg": tiny_jpeg(i), "cls": i % 3, "json": {"i": i}})
    return os.path.join(dest, writer.shards[0].name)


def delivered_and_skipped(case: Case) -> tuple[list[str], int]:
    if case.kind == "format":
        return list(case.keys), 1
    if case.kind == "sample":
        return [k for k in case.keys if k not in case.bad_keys], len(case.bad_keys)
    return list(case.keys), 0


def keys_until_error(loader) -> tuple[list[str], BaseException | None]:
    keys: list[str] = []
    try:
        for sample in loader:
            keys.append(sample["__key__"])
    except Exception as e:  # noqa: BLE001 - returned for the test to inspect
        return keys, e
    return keys, None


def shardkit_warnings(recwarn) -> list[str]:
    """The lines handler="warn" printed (SkippedSampleWarning, shown without any set-up)."""
    return [str(w.message) for w in recwarn if issubclass(w.category, SkippedSampleWarning)]


# --------------------------------------------------------------------------- the reader


def read_all(stream, url: str) -> tuple[list[dict], BaseException | None]:
    samples: list[dict] = []
    try:
        for sample in iter_samples(stream, url=url):
            samples.append(sample)
    except Exception as e:  # noqa: BLE001
        return samples, e
    finally:
        stream.close()
    return samples, None


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_reader(case: Case, tmp_path):
    """mmap, in-memory and chunked-stream reads agree, with the expected samples and error."""
    path, built = case.write(str(tmp_path))
    results = [
        read_all(open(path, "rb"), path),
        read_all(io.BytesIO(built.data), path),
        read_all(bad_corpus.Trickle(built.data, chunk=4093), path),
    ]
    samples, error = results[0]
    for other, other_error in results[1:]:
        assert [s["__key__"] for s in other] == [s["__key__"] for s in samples]
        assert str(other_error) == str(error)
    assert tuple(s["__key__"] for s in samples) == case.keys
    if case.kind == "format":
        assert isinstance(error, ShardFormatError), error
        assert path in str(error) and error.url == path
        assert error.offset is not None and "byte offset" in str(error)
        if built.offset is not None:
            assert error.offset == built.offset
        if built.member is not None:
            assert error.member == built.member and repr(built.member) in str(error)
        for text in case.message:
            assert text in str(error)
    else:
        assert error is None, error
    payload = sum(len(v) for s in samples for k, v in s.items() if not k.startswith("__"))
    if compression_of(built.data) is None:  # a compressed shard holds more than its size
        assert payload <= len(built.data)


def test_zero_length_member_is_empty_bytes(tmp_path):
    path, _ = bad_corpus.by_name("zero_length_jpg").write(str(tmp_path))
    samples = list(iter_samples(open(path, "rb"), url=path))
    assert samples[1]["__key__"] == "b0000" and samples[1]["jpg"] == b"" and samples[1]["cls"] == b"1"


def test_grouping_of_odd_names(tmp_path):
    samples = {
        s["__key__"]: s
        for s in iter_samples(io.BytesIO(bad_corpus.by_name("keys_with_dots").build(str(tmp_path)).data), url="u")
    }
    assert sorted(samples["a"]) == ["__key__", "__url__", "b.c.jpg", "cls"]
    assert sorted(samples["dir.v1/s"]) == ["__key__", "__url__", "json", "seg.png"]
    assert "jpg" in samples["UP"]
    dup = list(
        iter_samples(io.BytesIO(bad_corpus.by_name("duplicate_key_not_consecutive").build(str(tmp_path)).data), url="u")
    )
    assert [sorted(k for k in s if not k.startswith("__")) for s in dup] == [["jpg"], ["jpg"], ["cls"]]


# --------------------------------------------------------------------------- tarfile, webdataset


def members_view(data: bytes) -> tuple[str, list[tuple[str, bytes]], str | None]:
    out: list[tuple[str, bytes]] = []
    try:
        for name, payload, _, _ in iter_member_tuples(io.BytesIO(data), url="u"):
            out.append((name, payload))
    except ShardFormatError as e:
        return "error", out, str(e)
    return "ok", out, None


COMPARABLE = [c for c in CASES if c.tarfile != "hangs"]


@pytest.mark.parametrize("case", COMPARABLE, ids=ids(COMPARABLE))
def test_compared_with_tarfile(case: Case, tmp_path):
    data = case.build(str(tmp_path)).data
    status, ours, _ = members_view(data)
    theirs_status, theirs = bad_corpus.tarfile_view(data)
    if case.tarfile == "same":
        assert (status, ours) == (theirs_status, theirs) if status == "ok" else theirs_status == "error"
    elif case.tarfile == "error":
        assert status == theirs_status == "error", theirs
    elif case.tarfile == "lenient":  # tarfile carries on (or stops) without an error
        assert status == "error" and theirs_status == "ok"
        if case.name != "gzip_tar":
            assert theirs[: len(ours)] == ours  # it agrees up to where we stop
    elif case.tarfile == "different":
        assert status == theirs_status == "ok"
        assert [p for _, p in ours] == [p for _, p in theirs] and ours != theirs  # names differ
    else:
        pytest.fail(f"unknown tarfile expectation {case.tarfile!r}")


HANGS = [c for c in CASES if c.tarfile == "hangs"]


def test_negative_sizes_fail_fast_where_tarfile_loops(tmp_path):
    """CVE-2025-8194: tarfile (and so webdataset) loops forever on a negative size on
    unpatched Pythons; shardkit raises at once. Patched Pythons raise too (both fine)."""
    assert HANGS
    procs = []
    code = "import sys, tarfile; t = tarfile.open(sys.argv[1]); [m for m in t]"
    for case in HANGS:
        path, _ = case.write(str(tmp_path))
        with pytest.raises(ShardFormatError, match="negative member size"):
            list(iter_samples(open(path, "rb"), url=path))
        procs.append(
            subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    deadline = time.monotonic() + 3
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            assert proc.returncode != 0, "tarfile accepted a negative size"
        except subprocess.TimeoutExpired:  # it loops: the unpatched behaviour
            proc.kill()
            proc.wait()


WDS = [c for c in CASES if c.kind in ("ok", "sample") and c.webdataset]


@pytest.mark.parametrize("case", WDS, ids=ids(WDS))
def test_grouping_matches_webdataset(case: Case, tmp_path):
    import webdataset as wds

    path, _ = case.write(str(tmp_path))
    theirs = list(wds.WebDataset(path, shardshuffle=False, empty_check=False))
    ours = list(iter_samples(open(path, "rb"), url=path))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs]
    for a, b in zip(ours, theirs, strict=True):  # empty is a valid answer for some inputs
        assert {k: v for k, v in a.items() if not k.startswith("__")} == {
            k: v for k, v in b.items() if not k.startswith("__")
        }


# --------------------------------------------------------------------------- dataset + loader


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_dataset_handler(case: Case, mode: str, tmp_path, good_shard, recwarn):
    path, built = case.write(str(tmp_path))
    dataset = ShardDataset([path, good_shard], handler=mode, decode="pil" if case.decode else None)
    loader = ShardLoader(dataset, batch_size=None, num_workers=0)
    keys, error = keys_until_error(loader)
    delivered, skipped = delivered_and_skipped(case)
    if mode == "raise" and skipped:
        assert isinstance(error, ShardkitError), error
        assert path in str(error)
        if case.kind == "format":
            assert isinstance(error, ShardFormatError) and keys == list(case.keys)
            assert "byte offset" in str(error) or "member" in str(error)
            if built.offset is not None:
                assert error.offset == built.offset
            if built.member is not None:
                assert error.member == built.member
        else:
            assert isinstance(error, SampleError)
            first_bad = case.keys.index(case.bad_keys[0])
            assert keys == list(case.keys[:first_bad])
            assert error.key == case.bad_keys[0] and f"{case.bad_keys[0]}." in str(error)
        for text in case.message:
            assert text in str(error)
    else:
        assert error is None, error
        assert keys == delivered + GOOD_KEYS  # the next shard arrives in full
        assert loader.stats()["skipped"] == skipped
        warnings = shardkit_warnings(recwarn)
        if mode == "warn":
            assert len(warnings) == skipped, warnings
            assert all(path in w for w in warnings)
        else:
            assert warnings == []
    if case.extra.get("pickle"):
        assert not os.path.exists(bad_corpus.marker_path(str(tmp_path))), "a pickle was unpickled"


def test_pickle_payload_really_runs_when_allowed(tmp_path, good_shard):
    """The marker pickle is a real payload: with allow_pickle=True decoding creates the file."""
    path, _ = bad_corpus.by_name("pickle_pyd").write(str(tmp_path))
    marker = bad_corpus.marker_path(str(tmp_path))
    raw = list(ShardLoader(ShardDataset([path], handler="skip"), batch_size=None, num_workers=0))
    assert isinstance(raw[1]["pyd"], bytes) and not os.path.exists(marker)  # never without decode
    list(ShardLoader(ShardDataset([path], decode="pil", handler="skip"), batch_size=None, num_workers=0))
    assert not os.path.exists(marker)
    list(ShardLoader(ShardDataset([path], decode="pil", allow_pickle=True), batch_size=None, num_workers=0))
    assert os.path.exists(marker)


@pytest.mark.parametrize("mode", MODES)
def test_several_bad_shards_with_worker_processes(mode, tmp_path, good_shard):
    """Two workers, a broken shard and a shard with bad samples: losses add up across
    workers; with "raise" the worker's error reaches the training loop naming the URL."""
    bad = [bad_corpus.by_name(n).write(str(tmp_path))[0] for n in ("truncated_in_payload", "corrupt_jpeg")]
    dataset = ShardDataset(bad + [good_shard], handler=mode, decode="pil")
    loader = ShardLoader(dataset, batch_size=2, num_workers=2)
    if mode == "raise":
        # DataLoader re-raises the worker's exception type from its message text, so
        # .url/.offset are None here, but the message still names the shard and offset.
        try:
            list(loader)
        except (ShardFormatError, SampleError) as e:
            message = str(e)
        else:
            pytest.fail("no error")
        loader._iterator._shutdown_workers()  # now, not at garbage collection (it can stall)
        assert any(path in message for path in bad) and "b0000" in message
        return
    keys = [k for batch in loader for k in batch["__key__"]]
    assert sorted(keys) == sorted(["g0000", "g0000", "g0001", "g0001"] + GOOD_KEYS)
    assert loader.stats()["skipped"] == 2


# --------------------------------------------------------------------------- indexed shards


DAMAGES = ("truncate", "checksum", "html", "missing")


@pytest.fixture
def indexed(tmp_path):
    paths = make_shards(str(tmp_path), [6, 6, 6], image=True)
    return str(tmp_path / "data.manifest.json"), paths


def damage(path: str, how: str) -> list[str]:
    """Damage a shard written with an index; returns the keys a reader still gets from it."""
    with open(path, "rb") as f:
        data = f.read()
    offsets = [m[2] for m in iter_member_tuples(io.BytesIO(data))]
    if how == "truncate":  # in the payload of the 11th member (sample 3's jpg)
        data = data[: offsets[10] + 600]
    elif how == "checksum":  # the first header of sample 3
        data = bytearray(data)
        data[offsets[9] + 5] ^= 0x10
        data = bytes(data)
    elif how == "html":
        data = b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>"
    if how == "missing":
        os.remove(path)
        return []
    with open(path, "wb") as f:
        f.write(data)
    return [s["__key__"] for s in read_all(io.BytesIO(data), path)[0]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_indexed_shard(indexed, how, mode, recwarn):
    """With an index the reader seeks by sample: the lost count is exact, the rest arrives."""
    manifest, paths = indexed
    survivors = damage(paths[1], how)
    dataset = ShardDataset(manifest, handler=mode)
    assert dataset.counts == [6, 6, 6]
    loader = ShardLoader(dataset, batch_size=None, num_workers=0)
    keys, error = keys_until_error(loader)
    expected = [f"s{i:06d}" for i in range(6)] + survivors + [f"s{i:06d}" for i in range(12, 18)]
    if mode == "raise":
        assert isinstance(error, SourceError if how == "missing" else ShardFormatError), error
        assert paths[1] in str(error)
        assert keys == expected[: 6 + len(survivors)]
        return
    assert error is None, error
    assert keys == expected
    assert loader.stats()["skipped"] == 6 - len(survivors)
    warnings = shardkit_warnings(recwarn)
    assert (len(warnings) == 1 and paths[1] in warnings[0]) if mode == "warn" else not warnings
    if mode == "warn":
        assert f"skipped {6 - len(survivors)} sample" in warnings[0]


# --------------------------------------------------------------------------- stream sources


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """A plain HTTP server (status 200 for whatever file is asked for), stopped afterwards."""
    root = tmp_path_factory.mktemp("http")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **kw: _QuietHandler(*a, directory=str(root), **kw)
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize(
    "name",
    ["html_error_page", "gzip_tar_cut", "size_octal_8GiB", "size_base256_huge", "truncated_in_payload", "corrupt_jpeg"],
)
def test_over_http(http_root, name, good_shard):
    """The same errors through a network stream (no mmap): an HTML page served with 200,
    a .tar.gz cut short, a huge declared size (must not be allocated)."""
    root, base = http_root
    case = bad_corpus.by_name(name)
    case.write(str(root))
    url = f"{base}/{name}.tar"
    loader = ShardLoader(
        ShardDataset([url], handler="raise", decode="pil" if case.decode else None), batch_size=None, num_workers=0
    )
    keys, error = keys_until_error(loader)
    assert isinstance(error, ShardkitError) and url in str(error), error
    for text in case.message:
        assert text in str(error)
    assert keys == [k for k in case.keys if k not in case.bad_keys][: len(keys)]
    skipping = ShardLoader(
        ShardDataset([url, good_shard], handler="skip", decode="pil" if case.decode else None),
        batch_size=None,
        num_workers=0,
    )
    delivered, skipped = delivered_and_skipped(case)
    assert [s["__key__"] for s in skipping] == delivered + GOOD_KEYS
    assert skipping.stats()["skipped"] == skipped


@pytest.mark.parametrize("name", ["size_octal_8GiB", "gzip_tar_cut", "truncated_in_header"])
def test_through_a_pipe(name, tmp_path, good_shard):
    path, _ = bad_corpus.by_name(name).write(str(tmp_path))
    url = f"pipe:cat {path}"
    dataset = ShardDataset([url, good_shard], handler="skip", allow_pipe=True)
    loader = ShardLoader(dataset, batch_size=None, num_workers=0)
    assert [s["__key__"] for s in loader] == list(bad_corpus.by_name(name).keys) + GOOD_KEYS
    assert loader.stats()["skipped"] == 1


# --------------------------------------------------------------------------- CLI


FORMAT = [c for c in CASES if c.kind == "format"]


@pytest.mark.parametrize("case", FORMAT, ids=ids(FORMAT))
def test_cli_verify_reports_the_problem(case: Case, tmp_path, capsys):
    path, _ = case.write(str(tmp_path))
    assert cli.main(["verify", path]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM {path}:" in out and "FAILED" in out
    for text in case.message:
        assert text in out


def test_cli_cat_before_and_after_the_damage(tmp_path, capfdbinary):
    path, _ = bad_corpus.by_name("truncated_in_payload").write(str(tmp_path))
    assert cli.main(["cat", path, "g0000", "--field", "jpg"]) == 0
    assert capfdbinary.readouterr().out == bad_corpus.tiny_jpeg(0)
    assert cli.main(["cat", path, "b0000", "--field", "bin"]) == 1
    err = capfdbinary.readouterr().err.decode()
    assert path in err and "truncated" in err and "b0000.bin" in err
