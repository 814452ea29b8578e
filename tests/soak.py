"""The remote-faults soak: a ShardLoader reads shards from nginx through a fault-injecting
proxy (:mod:`tests.faultproxy`), is killed mid-epoch and resumed from its last
``state_dict``, and every sample delivered is checked against the source shards.

One run (:func:`soak_run`) draws from its seed: how the dataset is named (manifest URL,
pattern with the manifest beside it, folder listing, or plain shards without sidecars,
which plan by whole shards), cache or not, worker count, batch size, shuffling, the
share of requests that get a random fault, maybe an outage of one path, and after which
batches the loader process is killed. The "trainer" (this process) counts what it was
handed and keeps the state saved after each batch, as a training loop checkpointing
every step would; a killed or failed loader is restarted from that state. A loader that
gives up must raise an error naming the URL it gave up on.

Used by ``tests/test_faults.py`` (a bounded soak in CI) and ``tools/soak.py`` (>= 200 runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import tarfile
import time
from collections import Counter
from typing import Any

# Imported here, not in the forked loader process, so that each fork starts at once.
from shardkit.loader import ShardLoader
from shardkit.read.dataset import ShardDataset
from shardkit.storage.backend import SourceOptions
from shardkit.writing.writer import ShardWriter
from tests.faultproxy import Chaos, FaultProxy

SOURCES = ("manifest", "pattern", "folder", "plain")
OUTAGE_PATHS = (
    "data.manifest.json",
    "data.manifest.json",
    "data-000001.tar",
    "data-000004.tar",
    "data-000003.tar.idx",
    "m/",
)


@dataclasses.dataclass
class SoakData:
    """Shards served under ``root``: ``m/`` with .idx files and a manifest (plans by
    sample), ``p/`` the same tar files alone (plans by whole shard)."""

    root: str
    shards: int
    expected: dict[str, str]  # key -> digest of the sample's fields, from tarfile

    def url(self, base: str, source: str) -> str:
        last = f"{self.shards - 1:06d}"
        return {
            "manifest": base + "m/data.manifest.json",
            "pattern": base + f"m/data-{{000000..{last}}}.tar",
            "folder": base + "m/",
            "plain": base + f"p/data-{{000000..{last}}}.tar",
        }[source]


def sample_digest(fields: dict[str, bytes]) -> str:
    """sha256 over a sample's fields (not its ``__key__``/``__url__``...), by name."""
    h = hashlib.sha256()
    for name in sorted(fields):
        if not name.startswith("__"):
            h.update(name.encode() + b"\0" + len(fields[name]).to_bytes(8, "little") + fields[name])
    return h.hexdigest()


def expected_samples(paths: list[str]) -> dict[str, str]:
    """key -> digest for every sample of the tar files, read with Python's tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    f = tar.extractfile(member)
                    assert f is not None
                    samples.setdefault(key, {})[ext] = f.read()
    return {key: sample_digest(fields) for key, fields in samples.items()}


def make_soak_data(root: str, *, shards: int = 8, seed: int = 0) -> SoakData:
    """``shards`` shards of 3-12 samples of 2-30 KB random payload (shard 2 empty)."""
    rng = random.Random(seed)
    m, p = os.path.join(root, "m"), os.path.join(root, "p")
    n = 0
    with ShardWriter(m, name="data", shard_size="1GB") as writer:
        for s in range(shards):
            for _ in range(0 if s == 2 else rng.randint(3, 12)):
                writer.write({"__key__": f"k{n:05d}", "bin": rng.randbytes(rng.randint(2_000, 30_000)), "cls": n % 7})
                n += 1
            writer.next_shard(allow_empty=True)
    os.makedirs(p, exist_ok=True)
    paths = []
    for i in range(shards):
        name = f"data-{i:06d}.tar"
        shutil.copy(os.path.join(m, name), os.path.join(p, name))
        paths.append(os.path.join(p, name))
    return SoakData(root, shards, expected_samples(paths))


@dataclasses.dataclass
class RunSpec:
    """What one run does, drawn from its seed (see :func:`draw_spec`)."""

    seed: int
    source: str
    cache: bool
    workers: int
    batch_size: int
    shuffle: int
    rate: float
    kills: list[float]  # kill the loader once this share of the samples was delivered
    outage: tuple[str, int, bool, int] | None  # (path suffix, requests, reset instead of 503, after requests)


def draw_spec(seed: int) -> RunSpec:
    rng = random.Random(seed)
    outage = None
    if rng.random() < 0.4:
        outage = (rng.choice(OUTAGE_PATHS), rng.randint(1, 10), rng.random() < 0.25, rng.choice((0, 1, 2)))
    return RunSpec(
        seed=seed,
        source=rng.choice(SOURCES),
        cache=rng.random() < 0.35,
        workers=rng.choice((0, 1, 2)),
        batch_size=rng.randint(1, 5),
        shuffle=rng.choice((0, 0, 7)),
        rate=rng.uniform(0.15, 0.5),
        kills=sorted(rng.uniform(0.05, 0.95) for _ in range(rng.choice((0, 1, 1, 2)))),
        outage=outage,
    )


@dataclasses.dataclass
class RunResult:
    spec: RunSpec
    expected: int
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    corrupted: int = 0
    hung: bool = False
    complete: bool = False
    kills: int = 0
    gave_up: list[str] = dataclasses.field(default_factory=list)  # messages of the loaders that gave up
    quiet: list[str] = dataclasses.field(default_factory=list)  # give-ups whose message names no URL
    # Give-ups before the retry budget was spent: every fault here is transient, so a
    # loader may only give up "after N retries".
    premature: list[str] = dataclasses.field(default_factory=list)
    faults: Counter[str] = dataclasses.field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        bad = self.lost or self.duplicated or self.corrupted or self.hung or self.quiet or self.premature
        return self.complete and not bad


# Retry fast (the faults are dense); a stall outlasts the timeout so it must be cut off.
OPTIONS = {"retries": 6, "backoff": 0.002, "max_backoff": 0.05, "timeout": 0.5}
STALL_SECONDS = 1.0


def _loader_process(conn: Any, url: str, spec: RunSpec, cache_dir: str | None, state: dict | None) -> None:
    """The training process: read batches, send each with the state saved after it."""
    os.setpgid(0, 0)  # its DataLoader workers join this group: one kill ends them all
    try:
        known = {f.name for f in dataclasses.fields(SourceOptions)}  # lets the soak measure older versions too
        options = SourceOptions(**{k: v for k, v in OPTIONS.items() if k in known}, cache_dir=cache_dir)  # type: ignore[arg-type]
        ds = ShardDataset(url, shuffle=spec.shuffle, seed=spec.seed, even=None, source_options=options)
        loader = ShardLoader(ds, batch_size=spec.batch_size, num_workers=spec.workers, persistent_workers=False)
        if state is not None:
            loader.load_state_dict(state)
        for batch in loader:
            keys = batch["__key__"]
            items = [
                (key, sample_digest({k: v[i] for k, v in batch.items() if isinstance(v, list) and k != "__key__"}))
                for i, key in enumerate(keys)
            ]
            conn.send(("batch", items, loader.state_dict()))
        conn.send(("done",))
    except Exception as e:  # noqa: BLE001 - reported to the trainer, which judges it
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _kill_group(proc: Any) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)


def soak_run(spec: RunSpec, data: SoakData, upstream_port: int, work: str, *, deadline: float = 60.0) -> RunResult:
    """One run; never raises for what the loader does (that is the result)."""
    result = RunResult(spec, expected=len(data.expected))
    started = time.monotonic()
    ctx = mp.get_context("fork")
    delivered: list[tuple[str, str]] = []
    state: dict | None = None
    kills = [round(k * len(data.expected)) for k in spec.kills]
    cache_dir = os.path.join(work, f"cache-{spec.seed}") if spec.cache else None
    chaos = Chaos(seed=spec.seed, rate=spec.rate, stall_seconds=STALL_SECONDS)
    with FaultProxy(upstream_port, chaos=chaos) as proxy:
        if spec.outage is not None:
            path, n, reset, after = spec.outage
            retry_after = random.Random(spec.seed).choice((None, "0"))
            proxy.outage(path, n, status=None if reset else 503, retry_after=retry_after, after=after)
        url = data.url(proxy.url(""), spec.source)
        restarts = 0
        while not result.complete and restarts <= 8:
            restarts += 1
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_loader_process, args=(child, url, spec, cache_dir, state))
            proc.start()
            child.close()
            outcome = None
            while outcome is None:
                left = deadline - (time.monotonic() - started)
                if left <= 0 or not parent.poll(left):
                    outcome = "hung"
                    break
                try:
                    msg = parent.recv()
                except EOFError:
                    outcome = "died"
                    break
                if msg[0] == "batch":
                    delivered.extend(msg[1])
                    state = msg[2]
                    if kills and len(delivered) >= kills[0]:
                        kills.pop(0)
                        outcome = "killed"
                elif msg[0] == "done":
                    outcome = "done"
                else:
                    outcome = "error"
                    result.gave_up.append(msg[1])
                    if proxy.url("") not in msg[1]:
                        result.quiet.append(msg[1])
                    if f"after {OPTIONS['retries']} retries" not in msg[1]:
                        result.premature.append(msg[1])
            _kill_group(proc)
            parent.close()
            if outcome == "hung":
                result.hung = True
                break
            if outcome == "died":
                result.quiet.append(f"loader process died with exit code {proc.exitcode} and no message")
            result.kills += outcome == "killed"
            result.complete = outcome == "done"
        result.faults = Counter(proxy.injected)
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    counts = Counter(key for key, _ in delivered)
    result.delivered = len(delivered)
    result.duplicated = sum(n - 1 for n in counts.values() if n > 1)
    result.corrupted = sum(1 for key, digest in delivered if data.expected.get(key) != digest)
    result.lost = sum(1 for key in data.expected if key not in counts) if result.complete else 0
    result.seconds = time.monotonic() - started
    return result


@dataclasses.dataclass
class Summary:
    runs: int = 0
    complete: int = 0
    samples_expected: int = 0
    samples_delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    corrupted: int = 0
    hangs: int = 0
    kills: int = 0
    runs_that_gave_up: int = 0
    give_ups: int = 0
    quiet: list[str] = dataclasses.field(default_factory=list)
    premature: list[str] = dataclasses.field(default_factory=list)
    faults: Counter[str] = dataclasses.field(default_factory=Counter)
    messages: Counter[str] = dataclasses.field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, r: RunResult, proxy_prefix: str = "") -> None:
        self.runs += 1
        self.complete += r.complete
        self.samples_expected += r.expected
        self.samples_delivered += r.delivered
        self.lost += r.lost
        self.duplicated += r.duplicated
        self.corrupted += r.corrupted
        self.hangs += r.hung
        self.kills += r.kills
        self.runs_that_gave_up += bool(r.gave_up)
        self.give_ups += len(r.gave_up)
        self.quiet += r.quiet
        self.premature += r.premature
        self.faults.update(r.faults)
        for message in r.gave_up:
            self.messages[_shape(message)] += 1
        self.seconds += r.seconds


def _shape(message: str) -> str:
    """A give-up message with its host, shard and byte numbers blanked, to group alike ones."""
    first = message.splitlines()[0] if "Original Traceback" not in message else message.strip().splitlines()[-1]
    first = re.sub(r"^[\w.]+\.(\w+Error)", r"\1", first.strip())  # as raised in a DataLoader worker
    first = re.sub(r"127\.0\.0\.1:\d+", "HOST", first)
    return re.sub(r"\d{4,}", "N", first)[:300]


__all__ = ["RunSpec", "RunResult", "SoakData", "Summary", "draw_spec", "make_soak_data", "soak_run"]
