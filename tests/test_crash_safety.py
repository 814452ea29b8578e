"""Crash safety: SIGKILL the writer CLI mid-write, SIGKILL a DataLoader worker mid-epoch.

(a) ``shardkit write`` killed at random points (seeded) leaves only complete shards under
final names -- byte-identical to an uninterrupted run's, their ``.idx`` consistent with a
scan, parseable by tarfile -- plus ``*.tmp`` files; the next ``--overwrite`` run removes
the temp files and writes the full dataset.

(b) A killed DataLoader worker surfaces as a RuntimeError naming the worker (no hang),
and resuming from the last ``loader.state_dict()`` finishes the epoch with every sample
exactly once, in the uninterrupted order.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from shardkit.format.index import Manifest, decode_index, scan_shard
from shardkit.format.tar import iter_member_tuples
from shardkit.loader import ShardLoader
from shardkit.read.dataset import ShardDataset
from shardkit.writing.writer import ShardWriter
from tests.helpers import make_shards

pytestmark = pytest.mark.timeout(60)

KILLS = 10
FINAL = re.compile(r"^data-\d{6}\.tar(\.idx)?$")
TEMP = re.compile(r"^data(-\d{6}\.tar(\.idx)?|\.manifest\.json|\.resume\.json)\.tmp$")


def shardkit_cmd() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "shardkit")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "shardkit.cli"]


def write_cmd(src: str, dest: str, *extra: str) -> list[str]:
    return shardkit_cmd() + ["write", src, dest, "--shard-size", "200kB", "--workers", "2", "-q", *extra]


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    from shardkit.cli.synthetic import make_image_folder

    root = str(tmp_path_factory.mktemp("photos"))
    make_image_folder(root, count=300, classes=3, size=(96, 72), workers=2)
    return root


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory) -> tuple[dict[str, str], int, float]:
    """An uninterrupted run: sha256 of every file it wrote, its shard count, and the
    seconds it spent per shard."""
    dest = str(tmp_path_factory.mktemp("reference"))
    proc = subprocess.run(write_cmd(photos, dest), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    files = {name: sha256(os.path.join(dest, name)) for name in os.listdir(dest)}
    shards = sum(FINAL.match(n) is not None and n.endswith(".tar") for n in files)
    assert shards >= 5, "want several shards"
    mtimes = sorted(os.stat(os.path.join(dest, n)).st_mtime_ns for n in files)
    return files, shards, max(1e-3, (mtimes[-1] - mtimes[0]) / 1e9 / shards)


def _wait_for(dest: str, name: str, since_ns: int, proc: subprocess.Popen) -> bool:
    """Poll until the writer (re)creates ``name`` in ``dest``; False if it exited first."""
    path = os.path.join(dest, name)
    while proc.poll() is None:
        try:
            if os.stat(path).st_mtime_ns >= since_ns:
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.0002)
    return False


def check_kill_leftovers(dest: str, reference: dict[str, str]) -> set[str]:
    """Only complete shards under final names, plus temp files. Returns the temp files."""
    names = set(os.listdir(dest))
    temps = {n for n in names if TEMP.match(n)}
    finals = {n for n in names if FINAL.match(n)}
    # data.resume.json: the parallel writer's record of where each finished shard's successor starts
    assert names - temps - finals <= {"data.manifest.json", "data.resume.json"}, (
        f"unexpected files {names - temps - finals}"
    )
    if "data.manifest.json" in names:
        # Rewritten after every finished shard: complete only when the run finished, and
        # otherwise listing exactly the complete shards that are there.
        manifest = Manifest.from_json(open(os.path.join(dest, "data.manifest.json"), encoding="utf-8").read())
        if manifest.complete:
            assert sha256(os.path.join(dest, "data.manifest.json")) == reference["data.manifest.json"]
        listed = {s.name for s in manifest.shards}
        tars = {n for n in finals if n.endswith(".tar")}
        # a prefix of the shards there: a kill between a rename and the manifest update,
        # or an earlier killed run's (identical) shards, may leave more than it lists
        assert listed <= tars and listed == {f"data-{i:06d}.tar" for i in range(len(listed))}
        assert all(s.sha256 == reference[s.name] for s in manifest.shards)
    for name in sorted(finals):
        path = os.path.join(dest, name)
        assert sha256(path) == reference[name], f"{name} differs from the uninterrupted run's"
        if name.endswith(".tar"):
            assert name + ".idx" in finals, f"{name} has no index"
            with open(path, "rb") as f:
                scan = scan_shard(f, url=path)
            with open(path + ".idx", "rb") as f:
                assert [int(x) for x in decode_index(f.read())] == scan.offsets
            with tarfile.open(path) as tf:
                members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isreg()]
            with open(path, "rb") as f:
                assert members == [(name, payload) for name, payload, _, _ in iter_member_tuples(f)]
    return temps


@pytest.mark.timeout(120)
def test_killed_writer_leaves_only_complete_shards(photos, reference, tmp_path):
    ref_files, shards, per_shard = reference
    dest = str(tmp_path / "out")
    rng = random.Random(20241121)
    seen_temps = 0
    for _ in range(KILLS):
        # A random point: some way into the writing of a random shard.
        shard, delay = rng.randrange(shards), rng.uniform(0, per_shard)
        started = time.time_ns()
        proc = subprocess.Popen(
            write_cmd(photos, dest, "--overwrite"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_for(dest, f"data-{shard:06d}.tar.tmp", started, proc)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        seen_temps += bool(check_kill_leftovers(dest, ref_files))
    assert seen_temps >= KILLS // 2, f"only {seen_temps} kills landed while a shard was being written"
    done = subprocess.run(write_cmd(photos, dest, "--overwrite"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    names = set(os.listdir(dest))
    assert not [n for n in names if n.endswith(".tmp")], names
    assert {n: sha256(os.path.join(dest, n)) for n in names} == ref_files
    verify = subprocess.run(
        shardkit_cmd() + ["verify", os.path.join(dest, "data.manifest.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert len(ShardDataset(dest)) == 300


# --------------------------------------------------------------------------- DataLoader workers


class SlowKill:
    """A transform that is a little slow (so workers are busy mid-epoch) and, when
    ``victim`` is set, SIGKILLs its own worker process on that sample -- once: a marker
    file remembers it, so the resumed run passes."""

    def __init__(self, victim: str | None = None, marker: str | None = None) -> None:
        self.victim, self.marker = victim, marker

    def __call__(self, sample: dict) -> dict:
        time.sleep(0.002)
        if sample["__key__"] == self.victim and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return sample


@pytest.fixture(scope="module")
def epoch_shards(tmp_path_factory) -> str:
    dest = str(tmp_path_factory.mktemp("epoch"))
    make_shards(dest, [40, 40, 40, 40], image=False)
    return os.path.join(dest, "data.manifest.json")


def make_loader(manifest: str, transform: SlowKill) -> ShardLoader:
    dataset = ShardDataset(manifest, shuffle=16, seed=7, transform=transform)
    return ShardLoader(dataset, batch_size=4, num_workers=2, prefetch_factor=2)


def run_until_failure(loader: ShardLoader, kill_after: int | None = None) -> tuple[tuple, BaseException | None]:
    """Iterate, checkpointing after every batch; returns (last (keys, state)), error."""
    saved: tuple = ([], loader.state_dict())
    try:
        for n, batch in enumerate(loader, 1):
            # One store: a SIGCHLD-raised error between two stores would split the pair.
            saved = (saved[0] + list(batch["__key__"]), loader.state_dict())
            if n == kill_after:
                os.kill(loader._iterator._workers[0].pid, signal.SIGKILL)
    except RuntimeError as e:
        return saved, e
    return saved, None


def stop_workers(loader: ShardLoader) -> None:
    """Shut the loader's (persistent) workers down now. A worker SIGKILLed while it held
    the shared result queue's lock leaves its sibling blocked on that lock, and
    DataLoader's own shutdown would wait 5 s for it: terminate the survivors first."""
    it = loader._iterator
    if it is not None:
        for w in it._workers:
            if w.is_alive():
                w.terminate()
        it._shutdown_workers()
    loader._iterator = None


@pytest.fixture(scope="module")
def uninterrupted(epoch_shards, tmp_path_factory) -> list[str]:
    loader = make_loader(epoch_shards, SlowKill())
    keys = [k for batch in loader for k in batch["__key__"]]
    stop_workers(loader)
    return keys


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["from_outside", "from_inside"])
def test_killed_worker_is_an_error_and_resume_finishes_the_epoch(how, epoch_shards, uninterrupted, tmp_path):
    assert sorted(uninterrupted) == sorted(set(uninterrupted)) and len(uninterrupted) == 160
    if how == "from_outside":  # os.kill a worker from the training process after 5 batches
        transform, kill_after = SlowKill(), 5
    else:  # the worker kills itself on a chosen sample (once: the resumed run passes it)
        transform, kill_after = SlowKill(uninterrupted[60], str(tmp_path / "killed")), None
    loader = make_loader(epoch_shards, transform)
    started = time.monotonic()
    (keys, state), error = run_until_failure(loader, kill_after)
    assert isinstance(error, RuntimeError), "the epoch finished although a worker was killed"
    assert re.search(r"DataLoader worker \(pid", str(error)), str(error)
    assert time.monotonic() - started < 30
    assert 0 < len(keys) < 160
    stop_workers(loader)
    del error

    resumed = make_loader(epoch_shards, transform)
    resumed.load_state_dict(state)
    rest = [k for batch in resumed for k in batch["__key__"]]
    stop_workers(resumed)
    assert keys + rest == uninterrupted  # every sample exactly once, in the same order


# --------------------------------------------------------------------------- known writer bugs

_KILLED_WRITER = """
import os, signal, sys
from shardkit.writing.writer import ShardWriter
dest, prefix, n, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
writer = ShardWriter(dest, max_count=10, overwrite=True)
for i in range(n):
    if i == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    writer.write({"__key__": f"{prefix}{i:04d}", "cls": i})
writer.close()
"""


@pytest.mark.timeout(60)
def test_killed_overwrite_does_not_silently_mix_two_datasets(tmp_path):
    dest = str(tmp_path)
    run = [sys.executable, "-c", _KILLED_WRITER, dest]
    subprocess.run(run + ["a", "50", "-1"], check=True, timeout=60)  # dataset A: a0000..a0049
    killed = subprocess.run(run + ["b", "50", "25"], timeout=60)  # B dies in its 3rd shard
    assert killed.returncode == -signal.SIGKILL
    try:
        keys = [s["__key__"] for s in ShardLoader(ShardDataset(dest), batch_size=None, num_workers=0)]
    except Exception:  # noqa: BLE001 - refusing to read is an acceptable answer
        return
    assert not ({k[0] for k in keys} == {"a", "b"}), f"read {len(keys)} samples of two datasets mixed"


def test_writer_leaves_datasets_with_a_longer_name_alone(tmp_path):
    dest = str(tmp_path)
    with ShardWriter(dest, name="data-2021") as writer:
        writer.write({"__key__": "k0", "cls": 0})
    ShardWriter(dest, name="data").close()  # no shards named data-NNNNNN.tar: must not refuse
    with ShardWriter(dest, name="data", overwrite=True) as writer:
        writer.write({"__key__": "k1", "cls": 1})
    assert os.path.exists(os.path.join(dest, "data-2021-000000.tar"))


def test_writer_removes_only_its_own_temp_files(tmp_path):
    dest = str(tmp_path)
    other = os.path.join(dest, "data-2021-000000.tar.tmp")  # another writer's shard in progress
    with open(other, "wb") as f:
        f.write(b"\0" * 1024)
    ShardWriter(dest, name="data").close()
    assert os.path.exists(other)
