"""Smoke tests for examples/: each runs as a user would run it (a subprocess), at small sizes,
so the examples never rot. They print ``RESULT {json}`` lines that these tests check."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TIMEOUT = 150  # per subprocess; they take 5-20 s on 2 cores


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = TIMEOUT, torchrun: bool = False) -> str:
    """Run ``cmd`` in its own session; on timeout kill it (and what it started); return stdout+stderr."""
    full_env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
        NCCL_SOCKET_IFNAME="lo",
        PYTHONUNBUFFERED="1",
        **(env or {}),
    )
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = kill(proc, torchrun)
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s:\n{out[-5000:]}", pytrace=False)
    except BaseException:  # e.g. pytest-timeout or Ctrl-C: leave nothing running
        kill(proc, torchrun)
        raise
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-5000:]}", pytrace=False)
    return out


def kill(proc: subprocess.Popen, torchrun: bool) -> str:
    """Stop ``proc`` and its process group; return what it printed."""
    if torchrun and proc.poll() is None:  # torchrun's agent stops its ranks (own sessions) on SIGTERM
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        out, _ = proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):
        out = ""
    return out or ""


def results(out: str) -> list[dict]:
    return [json.loads(line[len("RESULT ") :]) for line in out.splitlines() if line.startswith("RESULT ")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_train_classifier_stops_and_resumes(tmp_path):
    ck = str(tmp_path / "ck.pt")
    script = os.path.join(EXAMPLES, "train_classifier.py")
    common = [sys.executable, script, "--count", "96", "--batch-size", "16", "--epochs", "2", "--checkpoint", ck]
    # Generates its data, trains 3 steps of epoch 0, saves model+optimizer+loader state, exits.
    first = results(run(common + ["--stop-after", "3"]))
    assert first == [{"epoch": 0, "samples": 48, "stopped": True, "steps": 3}]
    assert os.path.exists(ck)
    # Same (deterministic) data; another worker count; finishes epoch 0 then runs epoch 1.
    out = run(common + ["--resume", "--workers", "1"])
    assert "resumed from" in out
    epochs = results(out)
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert epochs[0]["samples"] == 96  # 48 before the stop + the 48 the epoch had left
    assert epochs[0]["stats"]["batches"] == 3  # 48 left / 16
    assert epochs[1]["samples"] == 96 and epochs[1]["stats"]["batches"] == 6
    assert epochs[1]["stats"]["bytes_read"] > 0 and epochs[1]["stats"]["skipped"] == 0


@pytest.mark.timeout(300)
def test_train_ddp_under_torchrun(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "--local_addr=127.0.0.1",
        "--max_restarts=0",
        os.path.join(EXAMPLES, "train_ddp.py"),
        "--count",
        "67",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--checkpoint",
        str(tmp_path / "ddp.pt"),
    ]
    epochs = results(run(cmd, torchrun=True))
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        ranks = r["ranks"]
        assert [s["rank"] for s in ranks] == [0, 1]
        # even="pad": 67 samples -> 34 per rank (one repeated), the same batch count everywhere
        assert [s["samples"] for s in ranks] == [34, 34]
        assert ranks[0]["batches"] == ranks[1]["batches"] == ranks[0]["steps"] > 0
        assert all(s["padded"] == 1 and s["dropped"] == 0 for s in ranks)
        assert all(s["bytes_read"] > 0 and "wait_s" in s for s in ranks)
    assert os.path.exists(tmp_path / "ddp.pt")


@pytest.fixture(scope="module")
def http_run() -> list[dict]:
    if importlib.util.find_spec("shardkit.storage.remote.http") is None:
        pytest.skip("shardkit.storage.remote.http (the HTTP backend) is not there yet")
    out = run(
        [
            sys.executable,
            os.path.join(EXAMPLES, "stream_http.py"),
            "--count",
            "64",
            "--batch-size",
            "16",
            "--epochs",
            "2",
        ]
    )
    return results(out)


@pytest.mark.timeout(300)
def test_stream_http_with_cache(http_run):
    first, second = http_run
    assert first["samples"] == second["samples"] == 64
    assert first["shard_requests"] > 0  # epoch 0 downloads every shard once...
    assert second["shard_requests"] == 0  # ...epoch 1 reads them from the cache
    assert first["cache_bytes"] > 0
    assert first["stats"]["bytes_read"] == second["stats"]["bytes_read"] > 0


@pytest.mark.timeout(300)
def test_stream_http_stats_report_cache_hits(http_run):
    first, second = http_run

    def counter(stats: dict, word: str) -> int | None:
        return next((v for k, v in stats.items() if "cache" in k and word in k), None)

    assert counter(first["stats"], "miss") == first["shard_requests"]  # per epoch, not cumulative
    assert counter(second["stats"], "hit") is not None and counter(second["stats"], "hit") > 0
    assert counter(second["stats"], "miss") == 0


@pytest.mark.timeout(300)
def test_convert_imagefolder_script():
    out = run(
        ["bash", os.path.join(EXAMPLES, "convert_imagefolder.sh")],
        env={"PYTHON": sys.executable, "COUNT": "60", "TRAIN_ARGS": "--epochs 1 --batch-size 16"},
    )
    assert "wrote" in out and "OK: " in out
    (epoch,) = results(out)
    assert epoch["samples"] == 60


@pytest.mark.timeout(300)
def test_recaption_with_companions():
    out = run([sys.executable, os.path.join(EXAMPLES, "recaption.py"), "--count", "60", "--workers", "2"])
    steps = {r.pop("step"): r for r in results(out)}
    assert list(steps) == ["base", "captions", "read", "recaption", "fixes", "verify"]
    base, captions = steps["base"], steps["captions"]
    assert base["samples"] == captions["samples"] == 60 and base["shards"] == captions["shards"] > 1
    assert captions["bytes"] < base["bytes"] / 5  # captions only: the images are not written again
    assert steps["read"]["batch"] == 16 and all(c.endswith(" photo") for c in steps["read"]["captions"])
    assert steps["recaption"]["refused_without_winner"] and steps["recaption"]["caption"].count(",") == 1
    assert steps["fixes"] == {"rows": 6, "kept": 54, "changed": 6, "as_fixed": True, "total": 60}
    assert steps["verify"]["ok"] and steps["verify"]["problems"] == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_image_text_from_a_table(fmt):
    if fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
        pytest.skip("pyarrow (shardkit[parquet]) is not installed")
    script = os.path.join(EXAMPLES, "image_text.py")
    out = run([sys.executable, script, "--from", fmt, "--count", "160", "--epochs", "2", "--workers", "1"])
    wrote = next(line for line in out.splitlines() if line.startswith("wrote "))
    image = "'path': 'image, json'" if fmt == "csv" else "'jpg': 'image'"
    assert wrote.startswith("wrote 160 samples") and image in wrote and "'caption': 'txt'" in wrote
    epochs = results(out)
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        # select= keeps the rows whose JSON says aesthetic >= 5 (about 3/5 of them); full batches of 32
        assert 32 <= r["samples"] < 160 and r["samples"] == 32 * r["batches"] and r["bytes_read"] > 0
    assert epochs[1]["last_loss"] < epochs[0]["first_loss"]  # the contrastive loss goes down


def test_examples_are_documented():
    for name in sorted(os.listdir(EXAMPLES)):
        if not name.endswith((".py", ".sh")):
            continue
        with open(os.path.join(EXAMPLES, name)) as f:
            head = f.read(3000)
        assert "What it shows" in head and "Run" in head, f"{name}: say what it shows and how to run it"
        assert "python " in head or "bash " in head, f"{name}: say how to run it at the top"
