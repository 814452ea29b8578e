"""Batches collated as their samples come (shardkit.read.batcher) and the ShardLoader's
reused batch memory (shardkit.read.batchmem): every batch equals torch's default_collate
of its samples, and a batch the consumer keeps never changes, however long it keeps it.

Expected pixels are computed here from each sample's key with numpy, never by the code
under test; the batches cross real DataLoader worker processes.
"""

from __future__ import annotations

import os
from collections import OrderedDict, namedtuple
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from shardkit.errors import ShardkitError
from shardkit.loader import ShardLoader
from shardkit.read.batcher import StreamingBatch, stream_batches
from shardkit.read.batchmem import FREE, HELD, BatchMemory
from shardkit.read.dataset import ShardDataset
from shardkit.read.pipeline import collate
from shardkit.read.stages import StageHooks
from tests.helpers import make_shards, pairs

pytestmark = pytest.mark.timeout(120)

SIDE = 6  # pixels per side of the test images


def pixels_of(i: int) -> np.ndarray:
    """The CHW uint8 image sample ``i`` decodes to (computed by hand)."""
    c, y, x = np.indices((3, SIDE, SIDE))
    return ((i * 7 + c * 50 + y * 9 + x) % 256).astype(np.uint8)


def decode_by_key(sample: dict) -> tuple[torch.Tensor, int]:
    """A decoder for make_shards' non-image samples: a channels-last view like the JPEG
    decoders give, and the sample number as the label (picklable for the workers)."""
    i = int(sample["__key__"][1:])
    hwc = np.ascontiguousarray(pixels_of(i).transpose(1, 2, 0))
    return torch.from_numpy(hwc).permute(2, 0, 1), i


def check_batch(images: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """Assert that a batch holds exactly the pixels its labels say; returns the labels."""
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert images.shape == (len(labels), 3, SIDE, SIDE) and images.is_contiguous()
    for image, label in pairs(images, labels.tolist()):
        assert np.array_equal(image.numpy(), pixels_of(label)), f"sample {label} changed"
    return labels.tolist()


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> str:
    """640 samples in 4 shards (80 batches of 8)."""
    dest = str(tmp_path_factory.mktemp("many"))
    make_shards(dest, [160, 160, 160, 160])
    return dest


def _loader(shards: str, **kwargs: Any) -> ShardLoader:
    ds = ShardDataset(shards, decode=decode_by_key, shuffle=50, seed=3)
    kwargs = {"batch_size": 8, "num_workers": 2, "prefetch_factor": 2, **kwargs}
    return ShardLoader(ds, **kwargs)


# ------------------------------------------------------------ streaming = default_collate


def _collated(samples: list[Any], capacity: int | None = None) -> Any:
    batch = StreamingBatch(capacity or len(samples))
    for sample in samples:
        batch.add(sample)
    out, ticket = batch.finish()
    assert ticket is None  # no batch memory outside a ShardLoader's workers
    return out


def _assert_same(got: Any, want: Any) -> None:
    """Same structure, types, values, dtypes, shapes and strides."""
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
        assert torch.equal(got, want)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            _assert_same(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        for a, b in pairs(got, want):
            _assert_same(a, b)
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.strides == want.strides and np.array_equal(got, want)
    else:
        assert got == want


def test_streamed_batches_equal_collate():
    rng = np.random.default_rng(0)
    samples = []
    for i in range(5):
        hwc = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        samples.append(
            {
                "__key__": f"k{i}",
                "jpg": torch.from_numpy(hwc).permute(2, 0, 1),  # channels-last view, as decoded
                "cls": i,
                "score": i / 3,
                "npy": rng.standard_normal((2, 3)).astype(np.float32),
                "pair": (torch.full((2,), i, dtype=torch.int32), f"t{i}"),
                "flag": i % 2 == 0,
                "half": torch.ones(2, dtype=torch.bfloat16) * i,  # numpy cannot copy it: collated at the end
            }
        )
    got = _collated(samples)
    _assert_same(got, collate(samples))
    for key in ("jpg", "cls", "score", "npy", "flag", "half"):  # what torch's own collate gives
        _assert_same(got[key], default_collate([s[key] for s in samples]))
    assert got["jpg"].is_contiguous() and got["cls"].dtype == torch.int64 and got["score"].dtype == torch.float64
    assert got["flag"].dtype == torch.bool and got["half"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "odd",
    [
        torch.zeros(3, 4, 6, dtype=torch.uint8),  # another shape
        torch.zeros(3, 4, 5, dtype=torch.int16),  # another dtype
        np.zeros((3, 4, 5), np.uint8),  # another type
        torch.zeros(3, 4, 5, dtype=torch.uint8),  # fits, contiguous among channels-last views
    ],
    ids=["shape", "dtype", "type", "fits"],
)
def test_a_sample_that_does_not_fit_gives_what_collate_gives(odd):
    images = [torch.from_numpy(np.full((4, 5, 3), i, np.uint8)).permute(2, 0, 1) for i in range(4)]
    samples = [(image, i) for i, image in enumerate(images)]
    samples.insert(2, (odd, 9))
    got = _collated(samples)
    want = collate(samples)
    _assert_same(got, want)
    if isinstance(want[0], list):  # not stackable: the samples' own tensors, strides included
        for image, original in pairs(got[0], [s[0] for s in samples]):
            assert type(image) is type(original)
            if isinstance(original, torch.Tensor):
                assert image.stride() == original.stride() and torch.equal(image, original)


def test_streaming_keeps_collates_errors_and_fallbacks():
    # A later sample missing a key fails as collate fails (KeyError), not silently.
    with pytest.raises(KeyError):
        _collated([{"a": torch.ones(2), "b": 1}, {"a": torch.ones(2)}])
    with pytest.raises(IndexError):
        _collated([(torch.ones(2), 1), (torch.ones(2),)])
    # An int too large for int64 fails as collate fails; a float among ints: as collate does.
    with pytest.raises(ValueError, match="Overflow"):
        collate([1, 2**70])
    with pytest.raises(ValueError, match="Overflow"):
        _collated([(torch.ones(1), 1), (torch.ones(1), 2**70)])
    for column in ([1, 2.5], [2.5, 1], [True, 1]):
        _assert_same(_collated([(torch.ones(1), v) for v in column]), collate([(torch.ones(1), v) for v in column]))
    # Namedtuples and ordered dicts become tuples and dicts, as collate makes them.
    point = namedtuple("point", "x y")
    points = [point(torch.ones(2), 1), point(torch.zeros(2), 2)]
    _assert_same(_collated(points), collate(points))
    ordered = [OrderedDict(x=torch.ones(2) * i, y=i) for i in range(3)]
    _assert_same(_collated(ordered), collate(ordered))
    # Views with gaps (a crop) stay as they are when the batch falls back.
    base = torch.arange(3 * 8 * 8, dtype=torch.uint8).reshape(3, 8, 8)
    crops = [base[:, i : i + 4, 1:5] for i in range(3)] + [base[:, :3, :4]]
    got = _collated(crops)
    assert isinstance(got, list) and all(a is b for a, b in pairs(got, crops))


def test_a_short_last_batch_has_memory_of_its_own_size():
    samples = [(torch.full((3, 2, 2), i, dtype=torch.uint8), i) for i in range(3)]
    images, labels = _collated(samples, capacity=8)
    _assert_same((images, labels), collate(samples))
    assert images.untyped_storage().nbytes() == 3 * 3 * 2 * 2 and labels.untyped_storage().nbytes() == 3 * 8


def test_stream_batches_keeps_tags_sizes_and_drop_last():
    tagged = [(f"t{i}", (torch.full((2,), i), i)) for i in range(7)]
    out = list(stream_batches(tagged, 3, drop_last=False))
    assert [(tag, size) for tag, (size, _, _) in out] == [("t2", 3), ("t5", 3), ("t6", 1)]
    assert [batch[1].tolist() for _, (_, _, batch) in out] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [tag for tag, _ in stream_batches(tagged, 3, drop_last=True)] == ["t2", "t5"]
    with pytest.raises(ShardkitError):
        list(stream_batches(tagged, 0, drop_last=False))


class _Counting(StageHooks):
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def wrap(self, stage, fn):
        def call(*args, **kwargs):
            self.calls[stage] = self.calls.get(stage, 0) + 1
            return fn(*args, **kwargs)

        return call


def test_hooks_see_each_sample_copied_and_each_batch_completed():
    hooks = _Counting()
    tagged = [(i, (torch.full((2,), i), i)) for i in range(10)]
    out = list(stream_batches(tagged, 4, drop_last=False, hooks=hooks))
    assert [size for _, (size, _, _) in out] == [4, 4, 2]
    assert hooks.calls == {"batch": 10, "collate": 3}


# --------------------------------------------------------- reused memory in the workers


def test_batches_in_reused_memory_equal_fresh_ones(many):
    fresh = [(x.clone(), y.clone()) for x, y in _loader(many, reuse_memory=False)]
    loader = _loader(many)
    got = list(loader)  # kept: every slot stays held, the workers fall back to fresh memory
    for (x, y), (fx, fy) in pairs(got, fresh):  # compared with clones of the other run's
        assert torch.equal(x, fx) and torch.equal(y, fy)
    labels = [label for x, y in got for label in check_batch(x, y)]
    assert sorted(labels) == list(range(640))
    assert loader.stats()["memory_fresh"] > 70  # the rings held the first batches to the end
    # Dropped at once: later batches reuse the memory of earlier ones.
    del got, x, y
    seen = []
    for x, y in loader:
        seen.extend(check_batch(x, y))
    stats = loader.stats()
    assert sorted(seen) == list(range(640)) and stats["memory_reused"] > stats["memory_fresh"]
    assert stats["memory_reused"] + stats["memory_fresh"] == stats["batches"] == 80


def test_a_consumer_keeping_the_last_100_batches_gets_correct_values(tmp_path):
    make_shards(str(tmp_path), [450, 450])  # 2 workers x 113 batches of 4 (the last of 2)
    loader = _loader(str(tmp_path), batch_size=4)
    # Each kept batch with the labels it had when it arrived: a reused slot would change
    # its pixels and labels together, so both are checked against that record.
    kept: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []
    views: list[tuple[torch.Tensor, int]] = []  # one image of some batches keeps their memory
    labels = []
    for n, (x, y) in enumerate(loader):
        arrived = check_batch(x, y)
        labels.extend(arrived)
        kept.append((x, y, arrived))
        if n % 10 == 0:
            views.append((x[0], arrived[0]))
        if len(kept) > 100:
            kept.pop(0)
        if n % 25 == 0:  # what is kept never changes while the workers go on
            for kx, ky, was in kept:
                assert check_batch(kx, ky) == was
    assert sorted(labels) == list(range(900)) and len(kept) == 100
    for kx, ky, was in kept:
        assert check_batch(kx, ky) == was
    for image, label in views:
        assert np.array_equal(image.numpy(), pixels_of(label))
    stats = loader.stats()
    assert stats["memory_reused"] > 0  # slots of dropped batches were reused meanwhile
    assert stats["memory_reused"] + stats["memory_fresh"] == stats["batches"] == 226


def test_persistent_workers_an_interrupted_epoch_and_memory_that_stays_bounded(many):
    loader = _loader(many, persistent_workers=True)
    it = iter(loader)
    held = [(x, y, check_batch(x, y)) for x, y in (next(it) for _ in range(3))]  # kept through the next epoch
    del it  # the epoch ends early: batches in flight are dropped by the DataLoader
    fresh = []
    for _ in range(10):
        seen = []
        for x, y in loader:
            seen.extend(check_batch(x, y))
        assert sorted(seen) == list(range(640))
        fresh.append(loader.stats()["memory_fresh"])
        for x, y, was in held:
            assert check_batch(x, y) == was
        held = []
    # The rings fill once (4 slots per worker; the 3 held batches take slots from the
    # first epoch); later epochs reuse them, a slot sometimes missing the consumer's
    # release by a step.
    assert sum(fresh[2:]) <= 8, fresh


def test_reuse_memory_option_is_honoured_or_refused(many):
    assert _loader(many, reuse_memory=False).stats() is not None
    ds = ShardDataset(many, decode=decode_by_key)
    with pytest.raises(ShardkitError, match="worker processes"):
        ShardLoader(ds, batch_size=8, num_workers=0, reuse_memory=True)
    with pytest.raises(ShardkitError, match="default collate_fn"):
        ShardLoader(ds, batch_size=8, num_workers=2, collate_fn=list, reuse_memory=True)
    with pytest.raises(ShardkitError, match="batch_size"):
        ShardLoader(ds, batch_size=None, num_workers=2, reuse_memory=True)
    with pytest.raises(TypeError, match="reuse_memory"):
        ShardLoader(ds, batch_size=8, num_workers=2, reuse_memory="yes")
    # Where it cannot apply and is not asked for, batches simply get fresh memory.
    loader = ShardLoader(ds, batch_size=8, num_workers=0)
    assert sorted(label for x, y in loader for label in check_batch(x, y)) == list(range(640))
    assert "memory_reused" not in loader.stats()
    off = _loader(many, reuse_memory=False)
    assert sorted(label for x, y in off for label in check_batch(x, y)) == list(range(640))
    assert "memory_reused" not in off.stats()


def test_resume_with_reused_memory_gives_the_uninterrupted_batches(many):
    full = [(x.clone(), y.clone()) for x, y in _loader(many)]
    loader = _loader(many)
    it = iter(loader)
    first = [next(it) for _ in range(13)]
    state = loader.state_dict()
    del it
    resumed = _loader(many)
    resumed.load_state_dict(state)
    rest = list(resumed)
    for (x, y), (fx, fy) in pairs(first + rest, full):
        assert torch.equal(x, fx) and torch.equal(y, fy)


# ------------------------------------------------------------- the board, by hand


class _Acquire(IterableDataset):
    """Takes ring slots in a real DataLoader worker, as the batcher does."""

    def __init__(self, memory: BatchMemory, n: int) -> None:
        self.memory, self.n = memory, n

    def __iter__(self):
        assert get_worker_info() is not None
        for _ in range(self.n):
            taken = self.memory.acquire()
            yield None if taken is None else taken[1]


def _tickets(memory: BatchMemory, n: int) -> list:
    loader = DataLoader(_Acquire(memory, n), batch_size=None, num_workers=1)
    return [None if t is None else tuple(t) for t in loader]  # (the DataLoader makes lists of tuples)


def test_the_board_frees_slots_only_when_the_consumer_dropped_them():
    memory = BatchMemory(1, 3)
    release = memory.tracker()
    release.start_run()  # run 1
    tickets = _tickets(memory, 4)
    assert tickets[:3] == [(0, 0, 1), (0, 1, 1), (0, 2, 1)] and tickets[3] is None  # all taken: fresh memory
    board = memory.board.numpy()
    shared = torch.arange(4.0).share_memory_()
    handed, labels = release.received((shared, [1, 2]), tickets[0])
    # The consumer gets the slot's memory under a storage of the batch's own.
    assert handed.data_ptr() == shared.data_ptr() and not handed.is_shared() and labels == [1, 2]
    view = handed[1:]
    pinned = {"x": torch.zeros(4)}
    assert release.received(pinned, tickets[1]) is pinned  # a pinned copy: nothing shared to wait for
    release.received(torch.zeros(4), None)  # fresh memory: nothing to free
    assert board[0].tolist() == [1, FREE, 1]
    del shared, handed
    release.collect()
    assert board[0, 0] == 1  # a view keeps the batch's memory alive
    assert view.tolist() == [1.0, 2.0, 3.0]
    del view
    release.collect()
    assert board[0].tolist() == [FREE, FREE, 1]
    # A new run: a batch still held stays held, a slot never handed out is free again.
    kept = release.received(torch.zeros(2).share_memory_(), (0, 0, 1))
    board[0, 0] = 1
    release.start_run()  # run 2
    assert board[0].tolist() == [HELD, FREE, 1] and int(memory.run[0]) == 2
    assert _tickets(memory, 3) == [(0, 1, 2), (0, 2, 2), None]
    del kept
    release.collect()
    assert board[0].tolist() == [FREE, 2, 2]


def test_batch_memory_checks_its_sizes():
    with pytest.raises(ValueError):
        BatchMemory(0, 3)
    with pytest.raises(ValueError):
        BatchMemory(2, 0)
    assert BatchMemory(2, 3).acquire() is None  # not in a DataLoader worker


# ------------------------------------------------- garbage collection in the workers


class _FreezeProbe(StageHooks):
    """Reports, from inside the worker, how many objects the collector never scans."""

    def counters(self) -> dict[str, int]:
        import gc

        return {"frozen": gc.get_freeze_count()}


def test_workers_exempt_what_they_inherited_from_collector_scans(many):
    import gc

    ds = ShardDataset(many, decode=decode_by_key).with_stages(hooks=_FreezeProbe)
    before = gc.get_freeze_count()
    loader = ShardLoader(ds, batch_size=8, num_workers=2)
    assert sorted(label for x, y in loader for label in check_batch(x, y)) == list(range(640))
    # Each worker froze the objects it inherited (torch's modules: many thousands), so a
    # full collection there never walks, and copies, the parent's heap.
    assert loader.stats()["frozen"] > 2 * 10_000
    # The main process is not a DataLoader worker: it is left as it was.
    in_process = ShardLoader(ds, batch_size=8, num_workers=0)
    assert len(list(in_process)) == 80 and gc.get_freeze_count() == before


def test_two_iterators_at_once_never_share_slots(many):
    """Without persistent workers every ``iter(loader)`` starts workers of its own; one
    iterator's dropped batches must never free a slot whose batch the other still holds."""
    loader = _loader(many, persistent_workers=False)
    kept: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []
    seen_a, seen_b = [], []
    for (xa, ya), (xb, yb) in zip(iter(loader), iter(loader)):
        arrived = check_batch(xa, ya)
        seen_a.extend(arrived)
        kept.append((xa, ya, arrived))  # iterator A's batches are all kept
        seen_b.extend(check_batch(xb, yb))  # iterator B's are dropped at once
        del xb, yb
        for kx, ky, was in kept[-6:]:
            assert check_batch(kx, ky) == was
    del xa, ya
    for kx, ky, was in kept:
        assert check_batch(kx, ky) == was
    assert sorted(seen_a) == sorted(seen_b) == list(range(640))


def _second_worker_starts_late(worker_id: int) -> None:
    import time

    if worker_id == 1:
        time.sleep(1.5)


def test_each_iterator_runs_the_epoch_it_began_with(many):
    """Without persistent workers a second iterator begun meanwhile moves the dataset's
    epoch on; a worker of the first that starts reading only after that must still run
    the first iterator's epoch (else it reads another order: repeats and gaps)."""
    loader = _loader(many, persistent_workers=False, worker_init_fn=_second_worker_starts_late)
    first = iter(loader)
    x, y = next(first)  # from worker 0; worker 1 is still asleep
    seen = check_batch(x, y)
    second = iter(loader)
    next(second)  # the dataset's epoch moves on here
    assert loader.epoch == 1
    for x, y in first:
        seen.extend(check_batch(x, y))
    assert sorted(seen) == list(range(640))
    del second


# ----------------------------------------- what the main process hands the consumer


def _receive_then_check(queue: Any, refilled: Any, results: Any) -> None:
    """In another process: take batches with the labels they had when the loader handed
    them out, wait until the loader has gone on, then check every one."""
    got = []
    while (item := queue.get()) is not None:
        got.append(item)
    refilled.wait(60)
    changed = 0
    for x, y, was in got:
        try:
            changed += check_batch(x, y) != was
        except AssertionError:
            changed += 1
    results.put((len(got), changed))


def test_batches_sent_on_to_another_process_never_change(many):
    """A consumer that forwards batches (a torch.multiprocessing queue) and drops them
    frees their slots; the other process must still see what it was sent."""
    import torch.multiprocessing as tmp

    context = tmp.get_context("fork")
    queue, results, refilled = context.Queue(), context.Queue(), context.Event()
    child = context.Process(target=_receive_then_check, args=(queue, refilled, results), daemon=True)
    child.start()
    loader = _loader(many, pin_memory=False)  # (pinned batches would be copies already)
    for x, y in loader:
        queue.put((x, y, check_batch(x, y)))
        del x, y
    for x, y in loader:  # every slot is refilled while the other process holds what it got
        check_batch(x, y)
    assert loader.stats()["memory_reused"] > 40
    queue.put(None)
    refilled.set()
    sent, changed = results.get(timeout=60)
    child.join(30)
    assert (sent, changed) == (80, 0)


def decode_large(sample: dict) -> tuple[torch.Tensor, int]:
    """A 3x256x256 channels-last image filled with the sample number (a batch of 8 spans
    1.5 MB: hundreds of pages)."""
    i = int(sample["__key__"][1:])
    return torch.from_numpy(np.full((256, 256, 3), i % 251, np.uint8)).permute(2, 0, 1), i


def _faults_reading_an_epoch(loader: ShardLoader) -> float:
    """Minor page faults of this process per batch while copying every batch's pixels
    into one tensor (what a copy to the GPU does; a reduction would allocate)."""
    import resource

    into = torch.zeros(8, 3, 256, 256, dtype=torch.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    batches = 0
    for x, y in loader:
        into[: len(x)].copy_(x)
        assert torch.equal(into[: len(x), :, 255, 255], (y % 251).to(torch.uint8)[:, None].expand(-1, 3))
        batches += 1
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / batches


def test_the_main_process_keeps_ring_slots_mapped(many):
    """Reading a batch made in a ring slot the main process has mapped before costs no
    page faults; memory mapped afresh for each batch (what a DataLoader does) faults
    its pages in on the first read."""
    ds = ShardDataset(many, decode=decode_large)
    rates = {}
    for reuse in (True, False):
        # Unpinned: a pin-memory thread would read (and fault in) every batch before us.
        loader = ShardLoader(ds, batch_size=8, num_workers=2, prefetch_factor=2, reuse_memory=reuse, pin_memory=False)
        _faults_reading_an_epoch(loader)  # the rings fill and are mapped here
        rates[reuse] = _faults_reading_an_epoch(loader)
        if reuse:
            assert loader.stats()["memory_reused"] > 70
        del loader
    # Fresh memory faults in 1.5 MB per batch (dozens of faults with fault-around).
    assert rates[False] > 10 and rates[True] < rates[False] / 4, rates


def _mapped_shared_memory() -> int:
    """How many of torch's shared-memory files this process has mapped."""
    with open("/proc/self/maps") as maps:
        return sum("/torch_" in line for line in maps)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc (Linux)")
def test_slots_stay_mapped_while_their_workers_do(many):
    import gc

    gc.collect()
    before = _mapped_shared_memory()
    persistent = _loader(many, persistent_workers=True, pin_memory=False)
    assert len([check_batch(x, y) for x, y in persistent]) == 80
    gc.collect()
    # 2 workers x 4 slots x (images, labels), all kept mapped for the next epoch.
    assert _mapped_shared_memory() - before >= 8
    del persistent
    gc.collect()
    assert _mapped_shared_memory() <= before
    one_off = _loader(many, persistent_workers=False, pin_memory=False)
    assert len([check_batch(x, y) for x, y in one_off]) == 80
    gc.collect()
    # Its workers exited: still mapped are the board of its slots (two small tensors) and
    # the last batch, which the loop held when the epoch ended (freed at the next start).
    assert _mapped_shared_memory() - before <= 4
    assert one_off.stats()["memory_reused"] > 40


_NUMPY_VIEW_THEN_SEND = """
import io, sys
import numpy as np
import torch.multiprocessing  # registers torch's pickling of tensors
from multiprocessing.reduction import ForkingPickler
from tests.test_batch_memory import _loader, pixels_of
loader = _loader(sys.argv[1], persistent_workers=False, pin_memory=False)
for n, (x, y) in enumerate(loader):
    if n == 5:
        kept, view, label = x, x[0].numpy(), int(y[0])
del x, y
# The epoch is over and its workers are gone; sending the batch on moves it to new
# shared memory, so only the tracker still holds the slot the numpy view points to.
ForkingPickler(io.BytesIO()).dump(kept)
assert not kept.untyped_storage().data_ptr() == view.ctypes.data
assert np.array_equal(view, pixels_of(label)) and np.array_equal(kept[0].numpy(), pixels_of(label))
sys.stdout.write("ok")
"""


def test_a_numpy_view_outlives_sending_its_batch_on(many):
    """Sending a batch on moves its alias to new shared memory (as torch does for any
    tensor); a numpy view taken before still points at the slot, which must stay
    mapped while the batch is watched. (In a process of its own: a fault would kill it.)"""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", _NUMPY_VIEW_THEN_SEND, many], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout == "ok", proc.stderr[-2000:]


def test_a_shared_tensor_in_another_container_is_watched_by_its_own_storage():
    """Slot tensors sit in dicts, tuples and lists; one anywhere else (a hook that wraps
    batches, say) is not aliased, and its slot stays taken until it is dropped."""
    Pair = namedtuple("Pair", "image label")
    memory = BatchMemory(1, 2)
    release = memory.tracker()
    release.start_run()
    tickets = _tickets(memory, 2)
    board = memory.board.numpy()
    shared = torch.arange(4.0).share_memory_()
    handed = release.received([Pair(shared, 1)], tickets[0])
    assert handed[0].image is shared  # not aliased
    del handed
    release.collect()
    assert board[0, 0] == 1  # the consumer still holds the tensor
    del shared
    release.collect()
    assert board[0, 0] == FREE
