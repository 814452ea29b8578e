"""Mix and select= through real DataLoaders, ShardLoader, resume and a real torchrun job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from shardkit.errors import ShardkitError
from shardkit.loader import ShardLoader
from shardkit.read.dataset import ShardDataset
from shardkit.read.mix import Mix
from tests.helpers import make_shards, resumed_keys, stop_after

HERE = os.path.dirname(os.path.abspath(__file__))
A_COUNTS, B_COUNTS = [11, 0, 9], [6]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("mix")
    make_shards(str(root / "a"), A_COUNTS, name="a")
    make_shards(str(root / "b"), B_COUNTS, name="b")
    return str(root / "a"), str(root / "b")


def ids(items) -> list[str]:
    """'a/s000003'-style ids (part folder + key) from samples or batches."""
    out = []
    for item in items:
        keys, urls = item["__key__"], item["__url__"]
        if isinstance(keys, str):
            keys, urls = [keys], [urls]
        out += [f"{os.path.basename(os.path.dirname(u))}/{k}" for u, k in zip(urls, keys)]
    return out


ALL = [f"a/s{i:06d}" for i in range(sum(A_COUNTS))] + [f"b/s{i:06d}" for i in range(sum(B_COUNTS))]


def test_every_sample_once_through_a_plain_dataloader(parts):
    mix = Mix([ShardDataset(parts[0], shuffle=5), ShardDataset(parts[1])], seed=2, even=None)
    got = ids(DataLoader(mix, batch_size=None, num_workers=2))
    assert sorted(got) == sorted(ALL) and len(mix) == len(ALL)
    # parts interleave rather than follow each other
    first_b = next(i for i, x in enumerate(got) if x.startswith("b/"))
    assert first_b < len(got) - len(B_COUNTS) * 6


def test_weights_exact_counts_and_passes_continue(parts):
    def make():
        return Mix([ShardDataset(parts[0]), ShardDataset(parts[1])], weights=[1, 3], epoch_length=40, seed=7)

    mix = make()
    loader = ShardLoader(mix, batch_size=4, num_workers=2)
    seen_b: list[str] = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        got = ids(loader)
        assert Counter(x[0] for x in got) == {"a": 10, "b": 30}
        seen_b += [x for x in got if x.startswith("b/")]
    assert len(loader) == 10
    # b (6 samples) is drawn 30 times an epoch: whole passes, no repeat inside a pass
    # (the order within a worker's share is shuffled, so compare passes as sets per epoch)
    per_epoch = [Counter(seen_b[i * 30 : (i + 1) * 30]) for i in range(3)]
    assert all(set(c.values()) == {5} for c in per_epoch)


def test_parts_keep_their_own_transform_and_select(parts):
    a = ShardDataset(parts[0], transform=lambda s: {**s, "src": "a"}, select=lambda s: int(s["cls"]) != 1)
    b = ShardDataset(parts[1], transform=lambda s: {**s, "src": "b"})
    got = list(Mix([a, b], even=None))
    assert {s["src"] for s in got if os.path.basename(os.path.dirname(s["__url__"])) == "a"} == {"a"}
    assert all(int(s["cls"]) != 1 for s in got if s["src"] == "a")
    assert sum(s["src"] == "b" for s in got) == 6
    with pytest.raises(TypeError, match="select"):
        len(Mix([a, b]))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("k", [0, 2, 5])
def test_resume_mid_epoch_exact_and_elastic(parts, k):
    def make(workers):
        mix = Mix(
            [ShardDataset(parts[0], shuffle=3), ShardDataset(parts[1], shuffle=2)],
            weights=[2, 1],
            epoch_length=33,
            seed=11,
        )
        mix.set_epoch(1)
        return ShardLoader(mix, batch_size=3, num_workers=workers)

    full = ids(make(2))
    before, state = stop_after(make(2), k, ids)
    assert before + resumed_keys(make(2), state, ids) == full  # same topology: the exact rest
    for workers in (0, 3):
        assert sorted(before + resumed_keys(make(workers), state, ids)) == sorted(full)


def test_select_resume_is_exact_and_counted(parts):
    def make():
        ds = ShardDataset(parts[0], shuffle=4, seed=1, select=lambda s: int(s["cls"]) == 0)
        return ShardLoader(ds, batch_size=2, num_workers=2)

    loader = make()
    full = ids(loader)
    assert len(full) == 7 and all(k.startswith("a/") for k in full)  # every third sample of 20
    assert loader.stats()["filtered"] == 13
    with pytest.raises(TypeError, match="upper bound"):
        len(make().shard_dataset)
    before, state = stop_after(make(), 2, ids)
    assert before + resumed_keys(make(), state, ids) == full


def test_select_runs_before_decode(parts, tmp_path):
    calls = []

    def decode(sample):
        calls.append(sample["__key__"])
        return sample

    list(ShardDataset(parts[0], decode=decode, select=lambda s: s["__key__"].endswith("3")))
    assert calls == ["s000003", "s000013"]


def test_bad_parts_are_refused(parts, tmp_path):
    a = ShardDataset(parts[0])
    with pytest.raises(ShardkitError, match="batches by itself"):
        Mix([a, ShardDataset(parts[1], batch_size=4)])
    with pytest.raises(ShardkitError, match="even"):
        Mix([a, ShardDataset(parts[1], even="drop")])
    with pytest.raises(ShardkitError, match="rank/world_size"):
        Mix([a, ShardDataset(parts[1], rank=0, world_size=2)])
    with pytest.raises(ShardkitError, match="epoch_length"):
        Mix([a, ShardDataset(parts[1], epoch_length=5)])
    with pytest.raises(ValueError, match="weights"):
        Mix([a], weights=[1, 2])
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(parts[1]):
        if name.endswith(".tar"):
            (bare / name).write_bytes(open(os.path.join(parts[1], name), "rb").read())
    with pytest.raises(ShardkitError, match="shardkit index"):
        Mix([a, ShardDataset(str(bare))])


def test_stateful_dataloader_protocol(parts):
    tdl = pytest.importorskip("torchdata.stateful_dataloader")

    def make():
        return tdl.StatefulDataLoader(
            Mix([ShardDataset(parts[0], shuffle=3), ShardDataset(parts[1])], seed=4), batch_size=None, num_workers=2
        )

    full = ids(make())
    before, state = stop_after(make(), 7, ids)
    assert sorted(before + resumed_keys(make(), state, ids)) == sorted(full)


@pytest.mark.timeout(300)
def test_torchrun_two_ranks_pad_equal_batches(parts, tmp_path):
    out = str(tmp_path)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--rdzv_backend=static",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "--local_addr=127.0.0.1",
        "--max_restarts=0",
        os.path.join(HERE, "dist_mix_worker.py"),
        "--a",
        parts[0],
        "--b",
        parts[1],
        "--out",
        out,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    with open(os.path.join(out, "torchrun.log"), "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=os.path.dirname(HERE), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert rc == 0, open(os.path.join(out, "torchrun.log")).read()[-3000:]
    ranks = [json.load(open(os.path.join(out, f"mix-rank{r}.json"))) for r in range(2)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == ranks[0]["len"]
    keys = Counter(k for r in ranks for k in r["keys"])
    by_part = Counter(k.split("/")[0] for k in keys.elements())
    # weights 1:2 of 35 -> 12 of a, 23 of b; pad adds at most world-1 per part
    assert 12 <= by_part["a"] <= 13 and 23 <= by_part["b"] <= 24
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"])


def test_threads_are_honoured_or_refused(parts):
    def part(i: int, threads: int = 0) -> ShardDataset:
        return ShardDataset(parts[i], shuffle=3, threads=threads)

    assert Mix([part(0, 2), part(1, 2)]).threads == 2
    assert Mix([part(0, 2), part(1)]).threads == 2  # 0 is the default: the part that sets it decides
    assert Mix([part(0), part(1)], threads=3).threads == 3
    with pytest.raises(ShardkitError, match=r"parts set different threads \(2, 3\).*set threads= on the Mix"):
        Mix([part(0, 2), part(1, 3)])
    with pytest.raises(ShardkitError, match=r"part 0 .*threads=2 but the Mix runs threads=4"):
        Mix([part(0, 2), part(1)], threads=4)
    inline, threaded = Mix([part(0), part(1)], seed=5), Mix([part(0), part(1)], seed=5, threads=3)
    assert len(ids(inline)) == len(ALL) and ids(threaded) == ids(inline)


def test_mix_batches_carry_the_cache_counters(parts):
    from tests.servers import run_nginx

    root = os.path.dirname(parts[0])
    with run_nginx(root) as server, tempfile.TemporaryDirectory() as cache:

        def mix() -> Mix:
            urls = [f"{server.url}{name}/{name}.manifest.json" for name in ("a", "b")]
            return Mix([ShardDataset(url, cache_dir=cache) for url in urls], seed=1)

        loader = ShardLoader(mix(), batch_size=5, num_workers=0)
        assert sorted(ids(loader)) == sorted(ALL)
        first = loader.stats()
        assert first["cache_misses"] == 3 and first["cache_hits"] == 0  # the 3 non-empty shards
        shards = ("a/a-000000.tar", "a/a-000002.tar", "b/b-000000.tar")  # a-000001 is empty: never read
        assert first["cache_bytes_downloaded"] == sum(os.path.getsize(os.path.join(root, s)) for s in shards)
        assert len(ids(loader)) == len(ALL)
        second = loader.stats()  # this epoch's share only
        assert second["cache_misses"] == 0 and second["cache_hits"] == 3 and second["cache_bytes_downloaded"] == 0
