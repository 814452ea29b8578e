"""The writer's ordered process pool (shardkit.writing.pool), with real worker processes."""

from __future__ import annotations

import os
import threading
import time

import pytest

from shardkit.errors import ShardkitError, WorkerDied
from shardkit.writing.pool import ordered_results, start_method_for


def uneven_square(i: int) -> tuple[int, int]:
    """Work whose duration differs per input, so batches finish out of order."""
    time.sleep(0.002 * (i % 4))
    return i * i, os.getpid()


def fails_on_7(i: int) -> int:
    if i == 7:
        raise ValueError("seven is bad")
    return i


def exits_on_11(i: int) -> int:
    if i == 11:
        os._exit(5)
    return i


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_results_come_back_in_input_order_from_every_worker(start_method):
    out = list(
        ordered_results(uneven_square, ((i, i) for i in range(60)), workers=3, batch_size=4, start_method=start_method)
    )
    assert len(out) == 60 and [i for i, _ in out] == list(range(60))
    assert [square for _, (square, _) in out] == [i * i for i in range(60)]
    assert len({pid for _, (_, pid) in out}) == 3 and os.getpid() not in {pid for _, (_, pid) in out}


def test_one_worker_runs_in_this_process():
    out = list(ordered_results(uneven_square, ((i, i) for i in range(5)), workers=1))
    assert len(out) == 5 and {pid for _, (_, pid) in out} == {os.getpid()}
    with pytest.raises(ValueError, match="at least 1"):
        list(ordered_results(uneven_square, [(0, 0)], workers=0))


@pytest.mark.parametrize("workers", [1, 2])
def test_an_error_in_the_work_names_the_input(workers):
    with pytest.raises(ShardkitError, match="item 7: ValueError: seven is bad"):
        list(ordered_results(fails_on_7, ((i, i) for i in range(20)), workers=workers, describe=lambda i: f"item {i}"))


def test_a_worker_that_dies_is_named_with_its_input():
    with pytest.raises(WorkerDied, match=r"exited with status 5 while reading item 11"):
        list(ordered_results(exits_on_11, ((i, i) for i in range(40)), workers=2, describe=lambda i: f"item {i}"))


def exits_on_the_first(item: tuple[int, bytes]) -> int:
    if item[0] == 0:
        os._exit(5)
    return len(item[1])


def test_a_worker_that_dies_while_being_fed_is_named_not_a_broken_pipe():
    # Large inputs and a deep queue: the main process is still sending to the worker when
    # it exits, so the send fails (EPIPE) before its death is seen; that must read as the
    # worker's death with its input, not as a BrokenPipeError.
    payload = bytes(2 << 20)
    items = ((i, (i, payload)) for i in range(60))
    with pytest.raises(WorkerDied, match=r"exited with status 5 while reading item 0"):
        list(
            ordered_results(
                exits_on_the_first, items, workers=2, batch_size=1, prefetch=30, describe=lambda it: f"item {it[0]}"
            )
        )


def test_work_that_does_not_pickle_is_refused_before_a_process_starts():
    started = []
    with pytest.raises(ShardkitError, match=r"started with 'spawn': it does not pickle"):
        list(
            ordered_results(
                lambda i: i, [(0, 0)], workers=2, start_method="spawn", on_start=lambda pids: started.extend(pids)
            )
        )
    assert started == []
    assert list(ordered_results(lambda i: -i, ((i, i) for i in range(9)), workers=2, start_method="fork")) == [
        (i, -i) for i in range(9)
    ]


def test_start_method_follows_the_threads_of_this_process():
    with pytest.raises(ValueError, match="not available"):
        start_method_for("teleport")
    assert start_method_for("spawn") == "spawn"
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:  # another thread could hold a lock across a fork: never fork then
        assert start_method_for(None) == "forkserver"
    finally:
        stop.set()
        thread.join()


def test_work_from_an_interactive_main_is_refused_not_a_dying_worker(tmp_path):
    """A function of ``python -c`` (or a notebook) pickles by reference to a __main__ the
    workers cannot import; without the check every worker would die with a traceback."""
    import subprocess
    import sys

    code = (
        "import shardkit\n"
        "def caption(i):\n"
        "    return {'txt': str(i)}\n"
        f"shardkit.write(range(20), {str(tmp_path / 'out')!r}, fn=caption, workers=2, start_method='forkserver')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 1 and "interactive session" in proc.stderr and "forkserver" in proc.stderr
    assert "Traceback" in proc.stderr and proc.stderr.count("Traceback") == 1  # ours, not one per worker
    assert not (tmp_path / "out").exists()


def echo(item: bytes) -> bytes:
    return item


@pytest.mark.timeout(60)
def test_large_batches_and_large_results_do_not_deadlock(tmp_path):
    # Batches and results both larger than a pipe's buffer: the parent sending the next
    # batch and a worker sending its results once waited for each other forever.
    import shardkit

    items = [{"__key__": f"k{i:04d}", "bin": os.urandom(50_000)} for i in range(200)]
    result = shardkit.write(items, str(tmp_path), fn=copy_sample, validate=False, workers=2)
    assert result.samples == 200
    out = list(ordered_results(echo, ((i, os.urandom(200_000)) for i in range(40)), workers=2, batch_size=4))
    assert [i for i, _ in out] == list(range(40)) and all(len(b) == 200_000 for _, b in out)


def copy_sample(sample: dict) -> dict:
    return {"bin": sample["bin"], "txt": "x"}
