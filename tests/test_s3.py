"""S3 backend against real SeaweedFS (``weed mini``) and moto_server."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from shardkit.errors import SourceError
from shardkit.storage.dispatch import SourceOptions, list_prefix, open_stream, read_bytes
from shardkit.storage.remote import s3
from tests.servers import BUCKET, FaultProxy

FAST = SourceOptions(retries=8, backoff=0.001, timeout=10)


def read_all(
    url: str, options: SourceOptions = FAST, offset: int = 0, length: int | None = None, chunk: int = 1 << 20
) -> bytes:
    parts = []
    with open_stream(url, offset=offset, length=length, options=options) as f:
        while True:
            data = f.read(chunk)
            if not data:
                return b"".join(parts)
            parts.append(data)


def s3_url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


@pytest.mark.timeout(60)
def test_full_stream_identical(s3_server, shard_files):
    for name in [*shard_files.names, shard_files.big]:
        assert read_all(s3_url(name)) == shard_files.data(name), name


@pytest.mark.timeout(60)
def test_ranged_reads(s3_server, shard_files):
    name = shard_files.names[2]
    data = shard_files.data(name)
    size = len(data)
    for offset, length in [
        (0, 512),
        (512, 10_000),
        (123_457, None),
        (size - 10, None),
        (size - 10, 100),
        (size, None),
        (0, 0),
    ]:
        got = read_all(s3_url(name), offset=offset, length=length, chunk=65536)
        want = data[offset:] if length is None else data[offset : offset + length]
        assert got == want, (offset, length)


@pytest.mark.timeout(60)
def test_cut_connections_resume_exactly(s3_server, shard_files, monkeypatch):
    name = shard_files.big
    want = shard_files.sha256(name)
    with FaultProxy(s3_server.port, seed=99, cut=(100_000, 5_000_000)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        for _ in range(5):
            h = hashlib.sha256()
            with open_stream(s3_url(name), options=FAST) as f:
                while data := f.read(1 << 20):
                    h.update(data)
            assert h.hexdigest() == want
        assert proxy.cuts >= 2


@pytest.mark.timeout(60)
def test_503_retried_then_budget(s3_server, shard_files, monkeypatch):
    name = shard_files.names[0]
    with FaultProxy(s3_server.port, fail_first=2) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        assert read_all(s3_url(name)) == shard_files.data(name)
        assert proxy.failed == 2
    with FaultProxy(s3_server.port, fail_first=100) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        with pytest.raises(SourceError) as err:
            read_all(s3_url(name), SourceOptions(retries=2, backoff=0.001))
    assert err.value.status == 503 and "after 2 retries" in str(err.value)
    assert s3_url(name) in str(err.value)


@pytest.mark.timeout(30)
def test_missing_key_fails_fast(s3_server):
    url = s3_url("shards/missing.tar")
    start = time.monotonic()
    with pytest.raises(SourceError) as err:
        open_stream(url, options=SourceOptions(retries=8, backoff=5.0))
    # No retry: one would sleep >= 2.5 s, eight of them minutes; the message names none.
    assert time.monotonic() - start < 10 and "retries" not in str(err.value)
    assert err.value.status == 404 and err.value.url == url
    assert read_bytes(url, options=FAST) is None
    with pytest.raises(SourceError) as err:
        read_bytes("s3://no-such-bucket-xyz/a", options=FAST)
    assert err.value.status == 404 and "NoSuchBucket" in str(err.value)


@pytest.mark.timeout(30)
def test_bad_credentials_fail_fast(s3_server, monkeypatch):
    if s3_server.name == "moto":
        pytest.skip("moto accepts any credentials")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    start = time.monotonic()
    with pytest.raises(SourceError) as err:
        open_stream(s3_url("shards/data-000000.tar"), options=SourceOptions(backoff=5.0))
    assert time.monotonic() - start < 10 and "retries" not in str(err.value)
    assert err.value.status == 403


@pytest.mark.timeout(30)
def test_read_bytes(s3_server, shard_files):
    name = shard_files.names[3]
    assert read_bytes(s3_url(name), options=FAST) == shard_files.data(name)


@pytest.mark.timeout(30)
def test_list_prefix(s3_server, shard_files):
    want = [s3_url(n) for n in shard_files.names]
    assert list_prefix(s3_url("shards/"), options=FAST) == want
    assert list_prefix(s3_url("shards/data-00000"), options=FAST) == want
    assert list_prefix(s3_url("shards/data-000001"), options=FAST) == [want[1]]
    top = list_prefix(s3_url(""), options=FAST)
    assert s3_url("shards/") in top and s3_url("big/") in top


@pytest.mark.timeout(30)
def test_put_file(s3_server, shard_files, monkeypatch):
    src = shard_files.path(shard_files.names[4])
    url = s3_url("upload/copy.tar")
    with FaultProxy(s3_server.port, fail_first=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s3.put_file(src, url, FAST)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert read_all(url) == shard_files.data(shard_files.names[4])


@pytest.mark.timeout(30)
def test_client_recreated_after_fork(s3_server, shard_files):
    name = shard_files.names[0]
    parent = s3.client(FAST)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ok = s3.client(FAST) is not parent and read_all(s3_url(name)) == shard_files.data(name)
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert s3.client(FAST) is parent
