"""HTTP backend against real nginx and http.server, through a fault-injecting proxy."""

from __future__ import annotations

import hashlib
import logging
import os
import time

import pytest

from shardkit.errors import SourceError
from shardkit.storage.dispatch import SourceOptions, list_prefix, open_stream, read_bytes
from shardkit.storage.remote import http
from tests.servers import FaultProxy, free_port

FAST = SourceOptions(retries=8, backoff=0.001, timeout=10)


def read_all(
    url: str,
    options: SourceOptions = FAST,
    offset: int = 0,
    length: int | None = None,
    chunk: int = 1 << 20,
    readinto: bool = False,
) -> bytes:
    parts = []
    buf = bytearray(chunk)
    with open_stream(url, offset=offset, length=length, options=options) as f:
        while True:
            if readinto:
                n = f.readinto(buf)
                data = bytes(buf[:n])
            else:
                data = f.read(chunk)
            if not data:
                return b"".join(parts)
            parts.append(data)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("server", ["nginx_server", "plain_http_server"])
def test_full_stream_identical(server, shard_files, request):
    base = request.getfixturevalue(server).url
    for name in [*shard_files.names, shard_files.big]:
        assert read_all(base + name) == shard_files.data(name), name


@pytest.mark.timeout(30)
def test_readinto_small_buffers(nginx_server, shard_files):
    name = shard_files.names[1]
    out = bytearray()
    buf = bytearray(7777)
    with open_stream(nginx_server.url + name, options=FAST) as f:
        while n := f.readinto(buf):
            out += buf[:n]
        assert f.tell() == len(out)
    assert bytes(out) == shard_files.data(name)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("server", ["nginx_server", "plain_http_server"])
def test_ranged_reads(server, shard_files, request, caplog):
    base = request.getfixturevalue(server).url
    name = shard_files.names[2]
    data = shard_files.data(name)
    size = len(data)
    caplog.set_level(logging.WARNING, logger="shardkit.storage.remote.http")
    for offset, length in [
        (0, 512),
        (512, 10_000),
        (123_457, None),
        (size - 10, None),
        (size - 10, 100),
        (1, 1),
        (size, None),
        (0, 0),
    ]:
        got = read_all(base + name, offset=offset, length=length, chunk=65536, readinto=bool(offset % 2))
        want = data[offset:] if length is None else data[offset : offset + length]
        assert got == want, (offset, length)
    if server == "plain_http_server":
        # http.server answers 200 to a Range request: warned once, bytes still right.
        warnings = [r for r in caplog.records if "ignores HTTP Range" in r.getMessage()]
        assert len(warnings) <= 1


@pytest.mark.timeout(30)
def test_connection_reused(nginx_server, shard_files):
    """Whole and ranged reads leave the keep-alive connection reusable (no reconnects)."""
    with FaultProxy(nginx_server.port) as proxy:
        name = shard_files.names[5]
        data = shard_files.data(name)
        for offset, length in [(0, None), (10, 1000), (5000, None), (0, 100), (0, None)]:
            want = data[offset:] if length is None else data[offset : offset + length]
            assert read_all(proxy.url(name), offset=offset, length=length, readinto=offset == 10) == want
        assert proxy.connections == 1


@pytest.mark.timeout(60)
def test_cut_connections_resume_exactly(nginx_server, shard_files):
    """Every connection is reset after a random 100 KB-5 MB: 20 full reads, all exact."""
    name = shard_files.big
    want = shard_files.sha256(name)
    with FaultProxy(nginx_server.port, seed=1234, cut=(100_000, 5_000_000)) as proxy:
        buf = bytearray(1 << 20)
        for run in range(20):
            h = hashlib.sha256()
            with open_stream(proxy.url(name), options=FAST) as f:
                if run % 2:  # readinto (zero-copy path) and read() alternately
                    while n := f.readinto(buf):
                        h.update(memoryview(buf)[:n])
                else:
                    while data := f.read(1 << 20):
                        h.update(data)
            assert h.hexdigest() == want
        assert proxy.cuts >= 10  # the test really exercised resumes


@pytest.mark.timeout(60)
def test_cut_ranged_read_resumes(nginx_server, shard_files):
    name = shard_files.big
    data = shard_files.data(name)
    with FaultProxy(nginx_server.port, seed=7, cut=(100_000, 400_000)) as proxy:
        got = read_all(proxy.url(name), offset=250_001, length=2_000_000, chunk=300_000, readinto=True)
        assert proxy.cuts >= 2
    assert got == data[250_001:2_250_001]


@pytest.mark.timeout(60)
def test_cut_without_range_support_restarts_and_skips(plain_http_server, shard_files, caplog):
    """http.server ignores Range: a cut stream re-downloads and discards the prefix."""
    name = shard_files.big
    caplog.set_level(logging.WARNING, logger="shardkit.storage.remote.http")
    http._warned_no_range.clear()
    with FaultProxy(plain_http_server.port, seed=3, cut=(1_000_000, 1_500_000), cut_first=2) as proxy:
        assert read_all(proxy.url(name), readinto=True) == shard_files.data(name)
        assert proxy.cuts == 2
    assert any("ignores HTTP Range" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(30)
def test_503_is_retried(nginx_server, shard_files):
    name = shard_files.names[0]
    with FaultProxy(nginx_server.port, fail_first=3) as proxy:
        assert read_all(proxy.url(name)) == shard_files.data(name)
        assert proxy.failed == 3


@pytest.mark.timeout(30)
def test_503_budget_exhausted(nginx_server, shard_files):
    with FaultProxy(nginx_server.port, fail_first=100) as proxy:
        url = proxy.url(shard_files.names[0])
        with pytest.raises(SourceError) as err:
            read_all(url, SourceOptions(retries=3, backoff=0.001))
        assert proxy.failed == 4
    assert err.value.status == 503
    assert err.value.url == url
    assert "HTTP 503" in str(err.value) and "after 3 retries" in str(err.value)


@pytest.mark.timeout(30)
def test_stall_times_out_and_resumes(nginx_server, shard_files):
    name = shard_files.big
    opts = SourceOptions(retries=3, backoff=0.001, timeout=0.5)
    with FaultProxy(nginx_server.port, stall=(300_000, 3.0)) as proxy:
        assert read_all(proxy.url(name), opts, readinto=True) == shard_files.data(name)
        assert proxy.stalls == 1


@pytest.mark.timeout(30)
def test_connection_refused_gives_up():
    url = f"http://127.0.0.1:{free_port()}/x.tar"
    with pytest.raises(SourceError) as err:
        read_all(url, SourceOptions(retries=2, backoff=0.001))
    assert "after 2 retries" in str(err.value) and url in str(err.value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "path,status", [("shards/missing.tar", 404), ("forbidden/x.tar", 403), ("private/secret.tar", 401)]
)
def test_permanent_errors_fail_fast(nginx_server, path, status):
    url = nginx_server.url + path
    start = time.monotonic()
    with pytest.raises(SourceError) as err:
        open_stream(url, options=SourceOptions(retries=8, backoff=5.0))
    # No backoff for a 4xx: one retry would sleep >= 2.5 s; the message names none.
    assert time.monotonic() - start < 10 and "retries" not in str(err.value)
    assert err.value.status == status and err.value.url == url
    assert f"HTTP {status}" in str(err.value) and url in str(err.value)


@pytest.mark.timeout(10)
def test_read_bytes(nginx_server, plain_http_server, shard_files):
    name = shard_files.names[3]
    for server in (nginx_server, plain_http_server):
        assert read_bytes(server.url + name, options=FAST) == shard_files.data(name)
        assert read_bytes(server.url + "shards/nope.json", options=FAST) is None


@pytest.mark.timeout(10)
def test_headers_per_prefix(nginx_server, shard_files):
    url = nginx_server.url + "private/secret.tar"
    want = shard_files.data("private/secret.tar")
    opts = SourceOptions(
        headers={
            nginx_server.url: {"Authorization": "Bearer wrong", "X-Other": "1"},
            nginx_server.url + "private/": {"Authorization": "Bearer t"},  # longest prefix wins
        }
    )
    assert read_all(url, opts) == want
    wrong = SourceOptions(headers={nginx_server.url: {"Authorization": "Bearer wrong"}})
    with pytest.raises(SourceError) as err:
        read_all(url, wrong)
    assert err.value.status == 401
    assert http.headers_for(url, opts)["Authorization"] == "Bearer t"
    assert http.headers_for(nginx_server.url + "x", opts)["Authorization"] == "Bearer wrong"


@pytest.mark.timeout(10)
def test_list_prefix_autoindex(nginx_server, plain_http_server, shard_files):
    for server in (nginx_server, plain_http_server):
        want = [server.url + n for n in shard_files.names]
        assert list_prefix(server.url + "shards/", options=FAST) == want
        assert list_prefix(server.url + "shards/data-00000", options=FAST) == want
        assert list_prefix(server.url + "shards/data-000001", options=FAST) == [want[1]]
        top = list_prefix(server.url, options=FAST)
        assert server.url + "shards/" in top and server.url + "big/" in top


@pytest.mark.timeout(30)
def test_put_file_webdav(nginx_server, shard_files, tmp_path):
    src = shard_files.path(shard_files.names[4])
    url = nginx_server.url + "upload/nested/dir/copy.tar"
    with FaultProxy(nginx_server.port, fail_first=2) as proxy:
        http.put_file(src, proxy.url("upload/nested/dir/copy.tar"), FAST)
    with open(os.path.join(nginx_server.root, "upload/nested/dir/copy.tar"), "rb") as f:
        assert f.read() == shard_files.data(shard_files.names[4])
    assert read_all(url) == shard_files.data(shard_files.names[4])
    with pytest.raises(SourceError) as err:
        http.put_file(src, nginx_server.url + "forbidden/y.tar", FAST)
    assert err.value.status == 403


@pytest.mark.timeout(30)
def test_session_recreated_after_fork(nginx_server, shard_files):
    name = shard_files.names[0]
    parent = http.session()
    pid = os.fork()
    if pid == 0:  # child: a fresh session that still works
        code = 1
        try:
            ok = http.session() is not parent and read_all(nginx_server.url + name) == shard_files.data(name)
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert http.session() is parent


@pytest.mark.timeout(10)
def test_pipe_backend(shard_files, tmp_path):
    name = shard_files.names[0]
    path = shard_files.path(name)
    opts = SourceOptions(allow_pipe=True)
    assert read_all(f"pipe:cat {path}", opts) == shard_files.data(name)
    assert read_all(f"pipe:cat {path}", opts, offset=1000, length=500) == shard_files.data(name)[1000:1500]
    with pytest.raises(SourceError, match="allow_pipe"):
        open_stream(f"pipe:cat {path}")
    with pytest.raises(SourceError) as err:
        read_all("pipe:echo partial; echo boom >&2; exit 3", opts)
    assert err.value.status == 3 and "boom" in str(err.value)


@pytest.mark.timeout(10)
def test_fsspec_backend(shard_files):
    pytest.importorskip("fsspec")
    name = shard_files.names[0]
    url = "memory://shardkit-test/" + name
    import fsspec

    with fsspec.open(url, "wb") as f:
        f.write(shard_files.data(name))
    assert read_all(url) == shard_files.data(name)
    assert read_all(url, offset=10, length=20) == shard_files.data(name)[10:30]
    assert read_bytes("memory://shardkit-test/none") is None
    assert list_prefix("memory://shardkit-test/shards") == ["memory://shardkit-test/" + name]
