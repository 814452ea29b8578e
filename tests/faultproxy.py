"""A fault-injecting HTTP/1.1 proxy for the remote-source tests and ``tools/soak.py``.

It sits on 127.0.0.1 in front of a real server (nginx, moto, SeaweedFS), forwards each
request of a keep-alive connection and, per request, may break the answer on purpose:

- ``cut_head``: send only part of the response's header block, then close (FIN) or reset
  (RST). The cut is at a byte offset, just before a header line (so the block ends with a
  complete line and no blank line: what ``http.client`` accepts without complaint), or
  inside a header's value.
- ``cut_body``: send the header block and part of the body, then close or reset.
- ``stall``: stop forwarding for a while at some point of the header block or the body,
  then close.
- ``status``: answer 429/500/503 itself, with or without ``Retry-After``.
- ``reset``: reset the connection before any byte of the answer.

Faults come from a script (:meth:`FaultProxy.script`: these faults, in order, for the next
requests whose path ends with a suffix), from outages (:meth:`FaultProxy.outage`: one
path answers 503 or resets for its next N requests) and from chaos (a seeded random
fault for a share of the other requests). ``first=`` in a fault moves headers to the
front of the block (e.g. Content-Range before Content-Length) before it is cut.
``injected`` counts the faults by kind; ``requests`` counts requests seen.

Responses are forwarded by their framing (Content-Length, chunked, or until the server
closes), so connections stay alive between requests as they would without the proxy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
import struct
from collections import Counter

from tests.servers import HOST, LoopbackListener

KINDS = ("cut_head", "cut_body", "stall", "status", "reset")
_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
_S3_CODES = {429: "SlowDown", 500: "InternalError", 502: "BadGateway", 503: "SlowDown"}
_MAX_HEAD = 1 << 16


@dataclasses.dataclass(frozen=True)
class Fault:
    """One broken answer.

    kind: one of :data:`KINDS`.
    at: where a cut or stall happens, as a fraction of the header block (``cut_head``) or
        of the body (``cut_body``, ``stall``) in [0, 1).
    offset: ``cut_head`` after exactly this many bytes of the header block.
    before: ``cut_head`` just before this header's line (case-insensitive name).
    inside: ``cut_head`` inside this header's value, after ``keep`` characters of it.
    rst: end a cut with a reset instead of a clean close.
    status / retry_after: the answer of a ``status`` fault.
    seconds: how long a ``stall`` lasts (then the connection is closed).
    in_head: a ``stall`` inside the header block (at ``at`` of it) rather than the body.
    first: headers moved to the front of the block before any cut.
    """

    kind: str
    at: float = 0.5
    offset: int | None = None
    before: str | None = None
    inside: str | None = None
    keep: int = 1
    rst: bool = False
    status: int = 503
    retry_after: str | None = None
    seconds: float = 1.0
    in_head: bool = False
    first: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")

    @property
    def label(self) -> str:
        """The kind as counted in reports: ``status`` faults by their status code."""
        if self.kind == "status":
            return f"status_{self.status}" + ("_retry_after" if self.retry_after else "")
        if self.kind in ("cut_head", "cut_body"):
            return self.kind + ("_rst" if self.rst else "")
        return self.kind


@dataclasses.dataclass
class Chaos:
    """A random fault for a share ``rate`` of the requests, drawn from ``random.Random(seed)``.

    ``weights`` maps each kind to its relative weight; ``stall_seconds`` is how long stalls
    last (make it longer than the client's timeout); ``retry_after`` the values a status
    answer may carry (``None``: no header).
    """

    seed: int = 0
    rate: float = 0.3
    weights: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"cut_head": 3, "cut_body": 3, "stall": 0.5, "status": 2, "reset": 1}
    )
    stall_seconds: float = 1.0
    retry_after: tuple[str | None, ...] = (None, "0", "1")

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def draw(self) -> Fault | None:
        rng = self._rng
        if rng.random() >= self.rate:
            return None
        kinds = list(self.weights)
        kind = rng.choices(kinds, [self.weights[k] for k in kinds])[0]
        if kind == "status":
            return Fault("status", status=rng.choice((429, 500, 503)), retry_after=rng.choice(self.retry_after))
        if kind == "cut_head" and rng.random() < 0.5:
            # Cut at a line boundary: the header block ends with a complete line, no blank line.
            name = rng.choice(("Content-Length", "Content-Range", "ETag", "Last-Modified", "Connection"))
            first = ("Content-Range",) if rng.random() < 0.5 else ()
            if rng.random() < 0.5:
                return Fault("cut_head", before=name, rst=rng.random() < 0.3, first=first)
            return Fault("cut_head", inside=name, keep=rng.randint(0, 12), rst=rng.random() < 0.3, first=first)
        in_head = kind == "stall" and rng.random() < 0.3
        return Fault(kind, at=rng.random(), rst=rng.random() < 0.3, seconds=self.stall_seconds, in_head=in_head)


class _Conn:
    """A socket with a read buffer (for parsing heads)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read_head(self) -> bytes | None:
        """Bytes up to and including the blank line; None if the peer closed first."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > _MAX_HEAD:
                return None
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end], self.buf[end:]
        return head

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(max(65536, n - len(self.buf)))
            if not data:
                raise ConnectionError("peer closed mid-message")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_some(self, limit: int) -> bytes:
        if self.buf:
            out, self.buf = self.buf[:limit], self.buf[limit:]
            return out
        return self.sock.recv(min(limit, 262144))

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("peer closed mid-line")
            self.buf += data
        end = self.buf.index(b"\r\n") + 2
        line, self.buf = self.buf[:end], self.buf[end:]
        return line


def _headers(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))
    return lines[0], fields


def _field(fields: list[tuple[str, str]], name: str) -> str | None:
    for key, value in fields:
        if key.lower() == name.lower():
            return value
    return None


def _build(first_line: str, fields: list[tuple[str, str]]) -> bytes:
    return ("\r\n".join([first_line, *(f"{k}: {v}" for k, v in fields)]) + "\r\n\r\n").encode("latin-1")


def head_cut(head: bytes, fault: Fault) -> int:
    """Where ``fault`` cuts the header block ``head`` (an offset < len(head))."""
    text = head.decode("latin-1")
    for name, keep in ((fault.before, None), (fault.inside, fault.keep)):
        if name is None:
            continue
        at = text.lower().find("\r\n" + name.lower() + ":")
        if at < 0:  # the header is not there: cut at the end of the last line instead
            return len(head) - 2
        at += 2
        if keep is None:
            return at
        value_start = at + len(name) + 1
        while text[value_start] == " ":
            value_start += 1
        line_end = text.index("\r\n", at)
        return min(value_start + keep, line_end)
    if fault.offset is not None:
        return min(fault.offset, len(head) - 1)
    return min(int(fault.at * len(head)), len(head) - 1)


class FaultProxy(LoopbackListener):
    """An HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream_port`` that injects faults.

    Use as a context manager; ``url(path)`` is the proxied URL of ``path`` and
    ``endpoint`` the base URL (for S3 clients).
    """

    def __init__(self, upstream_port: int, *, chaos: Chaos | None = None) -> None:
        self.upstream_port = upstream_port
        self.chaos = chaos
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self.log: list[tuple[str, str]] = []  # (path, fault label) of each injected fault
        self._scripts: list[tuple[str, list[Fault]]] = []
        self._outages: dict[str, list] = {}
        super().__init__(backlog=128)

    # -- configuration ------------------------------------------------------------------
    def script(self, faults: list[Fault], path: str = "") -> None:
        """Break the next ``len(faults)`` requests whose path ends with ``path``, in order."""
        with self._lock:
            self._scripts.append((path, list(faults)))

    def outage(
        self, path: str, requests: int, *, status: int | None = 503, retry_after: str | None = None, after: int = 0
    ) -> None:
        """``requests`` requests in a row whose path ends with ``path`` get ``status``
        (``status=None``: the connection is reset instead), once ``after`` such requests
        went through."""
        fault = Fault("reset") if status is None else Fault("status", status=status, retry_after=retry_after)
        with self._lock:
            self._outages[path] = [requests, fault, after]

    def pending(self) -> int:
        """Scripted and outage faults not yet served."""
        with self._lock:
            return sum(len(f) for _, f in self._scripts) + sum(o[0] for o in self._outages.values())

    def _choose(self, path: str) -> Fault | None:
        with self._lock:
            self.requests += 1
            fault = None
            for suffix, outage in self._outages.items():
                if path.endswith(suffix) and outage[0] > 0:
                    if outage[2] > 0:
                        outage[2] -= 1
                        continue
                    outage[0] -= 1
                    fault = outage[1]
                    break
            if fault is None:
                for suffix, faults in self._scripts:
                    if faults and path.endswith(suffix):
                        fault = faults.pop(0)
                        break
            if fault is None and self.chaos is not None:
                fault = self.chaos.draw()
            if fault is not None:
                self.injected[fault.label] += 1
                self.log.append((path, fault.label))
            return fault

    # -- lifecycle ----------------------------------------------------------------------
    def _serve(self, client_sock: socket.socket) -> None:
        upstream_sock: socket.socket | None = None
        self._track(client_sock)
        try:
            client = _Conn(client_sock)
            upstream: _Conn | None = None
            while not self._stop.is_set():
                head = client.read_head()
                if head is None:
                    return
                request_line, fields = _headers(head)
                method, path = request_line.split(" ")[:2]
                body = b""
                length = _field(fields, "Content-Length")
                if _field(fields, "Expect") is not None:  # answer 100-continue ourselves
                    fields = [(k, v) for k, v in fields if k.lower() != "expect"]
                    client_sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                if length:
                    body = client.read_exact(int(length))
                fault = self._choose(path)
                if fault is not None and fault.kind in ("status", "reset"):
                    if fault.kind == "reset":
                        _reset(client_sock)
                        return
                    client_sock.sendall(_status_answer(fault))
                    continue
                if upstream is None:
                    upstream_sock = socket.create_connection((HOST, self.upstream_port), timeout=60)
                    self._track(upstream_sock)
                    upstream = _Conn(upstream_sock)
                upstream.sock.sendall(_build(request_line, fields) + body)
                if not self._relay(method, upstream, client_sock, fault):
                    return
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            for s in (client_sock, upstream_sock):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()
                    with self._lock:
                        self._open.discard(s)

    def _relay(self, method: str, upstream: _Conn, client: socket.socket, fault: Fault | None) -> bool:
        """Forward one response, broken as ``fault`` says; False when the connection ends."""
        head = upstream.read_head()
        if head is None:
            return False
        status_line, fields = _headers(head)
        if fault is not None and fault.first:
            wanted = [f for name in fault.first for f in fields if f[0].lower() == name.lower()]
            fields = wanted + [f for f in fields if f not in wanted]
        head = _build(status_line, fields)
        status = int(status_line.split(" ")[1])
        if fault is not None and (fault.kind == "cut_head" or (fault.kind == "stall" and fault.in_head)):
            client.sendall(head[: head_cut(head, fault)])
            if fault.kind == "stall":
                self._stop.wait(fault.seconds)
            _end(client, fault.rst)
            return False
        client.sendall(head)
        keep_alive = (_field(fields, "Connection") or "").lower() != "close"
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return keep_alive
        length = _field(fields, "Content-Length")
        chunked = "chunked" in (_field(fields, "Transfer-Encoding") or "").lower()
        if fault is not None and fault.kind in ("cut_body", "stall"):
            # Framed bodies are cut/stalled at a fraction of their length; others at a byte count.
            size = int(length) if length is not None and not chunked else 1 << 16
            at = int(fault.at * size)
            self._copy(upstream, client, at)
            if fault.kind == "stall":
                self._stop.wait(fault.seconds)
            _end(client, fault.rst)
            return False
        if chunked:
            while True:
                line = upstream.read_line()
                client.sendall(line)
                n = int(line.split(b";")[0].strip(), 16)
                if n == 0:
                    while (trailer := upstream.read_line()) != b"\r\n":
                        client.sendall(trailer)
                    client.sendall(b"\r\n")
                    return keep_alive
                client.sendall(upstream.read_exact(n + 2))
        if length is not None:
            self._copy(upstream, client, int(length))
            return keep_alive
        while data := upstream.read_some(262144):  # delimited by the server's close
            client.sendall(data)
        return False

    @staticmethod
    def _copy(upstream: _Conn, client: socket.socket, n: int) -> None:
        while n > 0:
            data = upstream.read_some(min(n, 262144))
            if not data:
                raise ConnectionError("upstream closed mid-body")
            client.sendall(data)
            n -= len(data)


def _status_answer(fault: Fault) -> bytes:
    body = (
        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{_S3_CODES.get(fault.status, 'ServiceUnavailable')}"
        f"</Code><Message>fault proxy</Message></Error>"
    ).encode()
    fields = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
    if fault.retry_after is not None:
        fields.append(("Retry-After", fault.retry_after))
    return _build(f"HTTP/1.1 {fault.status} {_REASONS.get(fault.status, 'Error')}", fields) + body


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _end(sock: socket.socket, rst: bool) -> None:
    """Close the client connection: a reset, or a clean FIN (what a cut header block needs)."""
    if rst:
        _reset(sock)
    else:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


__all__ = ["KINDS", "Chaos", "Fault", "FaultProxy", "head_cut"]
