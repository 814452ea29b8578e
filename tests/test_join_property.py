"""Property tests: for random shard layouts a companion written from a shuffled table lines
up with its base, and the joined stream is the base stream with the new fields, for any
ranks x workers, shuffle on or off, and with a resume at any point (the same topology
continues exactly; another covers the rest exactly once)."""

from __future__ import annotations

import csv
import json
import os
import random
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from shardkit.format.index import decode_index_keys
from shardkit.plan.state import ResumeState
from shardkit.read.dataset import ShardDataset
from shardkit.read.pipeline import make_handler
from shardkit.read.reader import ReadStats
from shardkit.read.worker import WorkerEpoch
from shardkit.writing.companion import write_companion
from tests.helpers import make_shards


def _table(path: str, rows: list[dict]) -> None:
    if path.endswith(".csv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["key", "caption", "score"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def _build(root: str, counts: list[int], kind: str, seed: int) -> tuple[str, str, dict[str, dict], list[str]]:
    """A base with ``counts``, and its companion written from a shuffled table holding a
    caption and a score per key plus a few keys the base lacks."""
    base, comp = os.path.join(root, "base"), os.path.join(root, "comp")
    make_shards(base, counts, image=False)
    rng = random.Random(seed)
    keys = [f"s{i:06d}" for i in range(sum(counts))]
    rows = {k: {"key": k, "caption": f"caption {k} {rng.random():.6f}", "score": rng.randint(0, 99)} for k in keys}
    extra = [f"x{i:03d}" for i in range(rng.randint(0, 3))]
    table = [*rows.values(), *({"key": k, "caption": "none", "score": 0} for k in extra)]
    rng.shuffle(table)
    path = os.path.join(root, f"captions.{kind}")
    _table(path, table)
    result = write_companion(base, comp, table=path, workers=rng.choice([1, 2]))
    assert sorted(result.unmatched) == extra and result.samples == len(keys) and result.missing == []
    return base, comp, rows, [k for r in table if (k := r["key"]) in extra]


def _stream(ds: ShardDataset, workers: int, rank: int, worker: int, resume: ResumeState | None = None) -> list[dict]:
    epoch = WorkerEpoch(
        ds.epoch_spec(),
        ds.reader(make_handler("raise"), ReadStats()),
        topology=ds.topology(workers),
        rank=rank,
        worker=worker,
        epoch=ds.epoch,
        resume=resume,
    )
    return [s for s in epoch.samples() if s is not None]


layouts = st.lists(st.integers(0, 9), min_size=1, max_size=5).filter(lambda c: sum(c) > 0)


@settings(max_examples=25, deadline=None)
@given(
    counts=layouts,
    kind=st.sampled_from(["csv", "jsonl"]),
    world=st.integers(1, 3),
    workers=st.integers(0, 3),
    buffer=st.sampled_from([0, 4]),
    even=st.sampled_from([None, "pad"]),
    epoch=st.integers(0, 2),
    data=st.data(),
)
def test_joined_stream_is_the_base_stream_with_the_new_fields(counts, kind, world, workers, buffer, even, epoch, data):
    with tempfile.TemporaryDirectory() as root:
        base, comp, rows, _ = _build(root, counts, kind, data.draw(st.integers(0, 10**6)))
        for number in range(len(counts)):  # aligned: the base's keys, in order, shard by shard
            name = f"data-{number:06d}.tar.idx"
            with open(os.path.join(base, name), "rb") as a, open(os.path.join(comp, name), "rb") as b:
                assert decode_index_keys(a.read()) == decode_index_keys(b.read())
        options = {"shuffle": buffer, "seed": 7, "even": even, "world_size": world, "rank": 0}
        plain = ShardDataset(base, **options)
        joined = ShardDataset(base, join=[comp], join_wins={"json": 1}, **options)  # the table's json replaces it
        for ds in (plain, joined):
            ds.set_epoch(epoch)
        cells = {}
        for rank in range(world):
            for worker in range(max(1, workers)):
                want = _stream(plain, workers, rank, worker)
                got = _stream(joined, workers, rank, worker)
                assert len(got) == len(want)
                for b, j in zip(want, got):
                    row = rows[b["__key__"]]
                    assert j["txt"] == row["caption"].encode() and json.loads(j["json"]) == {"score": row["score"]}
                    assert {k: v for k, v in j.items() if k not in ("txt", "json")} == {
                        k: v for k, v in b.items() if k != "json"
                    }
                cells[rank, worker] = got
        keys = sorted(s["__key__"] for v in cells.values() for s in v)
        if even is None:
            assert keys == sorted(rows)  # every sample once
        else:
            assert set(keys) == set(rows) and len(keys) - len(rows) < world


@settings(max_examples=25, deadline=None)
@given(
    counts=layouts,
    world=st.integers(1, 3),
    workers=st.integers(0, 3),
    new_world=st.integers(1, 3),
    new_workers=st.integers(0, 3),
    buffer=st.sampled_from([0, 4]),
    data=st.data(),
)
def test_resume_at_any_point_of_a_joined_stream(counts, world, workers, new_world, new_workers, buffer, data):
    with tempfile.TemporaryDirectory() as root:
        base, comp, rows, _ = _build(root, counts, "jsonl", data.draw(st.integers(0, 10**6)))

        def dataset(w: int) -> ShardDataset:
            return ShardDataset(
                base, join=[comp], join_wins={"json": 1}, shuffle=buffer, seed=3, even=None, world_size=w, rank=0
            )

        old = dataset(world)
        topology = old.topology(workers)
        cells = {(r, w): _stream(old, workers, r, w) for r in range(world) for w in range(topology.streams)}
        emitted = [[data.draw(st.integers(0, len(cells[r, w]))) for w in range(topology.streams)] for r in range(world)]
        state = ResumeState(0).with_progress(topology, emitted)
        for (r, w), full in cells.items():  # the same topology continues each stream exactly
            again = _stream(old, workers, r, w, state)
            assert [s["__key__"] for s in again] == [s["__key__"] for s in full[emitted[r][w] :]]
            assert all(s["txt"] == rows[s["__key__"]]["caption"].encode() for s in again)
        consumed = [s["__key__"] for (r, w), v in cells.items() for s in v[: emitted[r][w]]]
        new = dataset(new_world)
        streams = new.topology(new_workers).streams
        rest = [s for r in range(new_world) for w in range(streams) for s in _stream(new, new_workers, r, w, state)]
        assert sorted(consumed + [s["__key__"] for s in rest]) == sorted(rows)  # every sample once
        assert all(s["txt"] == rows[s["__key__"]]["caption"].encode() for s in rest)
