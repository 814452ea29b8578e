"""Datasets, transforms, hooks and the Mix under every start method of DataLoader workers.

Python 3.14 makes ``forkserver`` the default on Linux: whatever a ShardLoader hands its
workers must pickle, and the shared epoch must still reach persistent workers. Each run
here is compared with the ``fork`` run: the same keys in the same order, two epochs.
"""

from __future__ import annotations

import pytest
import torchvision.transforms.v2 as v2

from shardkit.cli.profiling import STAGES, profiled
from shardkit.loader import ShardLoader
from shardkit.read.dataset import ShardDataset
from shardkit.read.mix import Mix
from tests.helpers import keys_of, make_shards

pytestmark = pytest.mark.timeout(240)


def not_seven(sample: dict) -> bool:
    """A user function from a test module: spawned workers import it by name."""
    return not sample["__key__"].endswith("7")


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("starts")
    make_shards(str(root / "a"), [13, 0, 9], name="a", image=True)
    make_shards(str(root / "b"), [7, 5], name="b", image=True)
    return str(root / "a"), str(root / "b")


def _dataset(url: str, **kw) -> ShardDataset:
    aug = v2.Compose([v2.RandomResizedCrop(16), v2.RandomHorizontalFlip()])
    return ShardDataset(url, decode="torch", decode_size="auto", transform={"jpg": aug}, shuffle=4, seed=5, **kw)


def _make(kind: str, parts: tuple[str, str]):
    if kind == "dataset":
        return _dataset(parts[0], select=not_seven)
    # A Mix of profiled parts' views: the hooks factory, the Mix and its parts all travel.
    return profiled(Mix([_dataset(parts[0]), _dataset(parts[1], select=not_seven)], seed=3))


def _two_epochs(kind: str, parts: tuple[str, str], method: str) -> tuple[list[str], list[str], dict]:
    loader = ShardLoader(_make(kind, parts), batch_size=4, num_workers=2, multiprocessing_context=method)
    assert loader.persistent_workers
    first = keys_of(loader)
    loader.set_epoch(3)  # reaches the persistent workers through the shared epoch
    third = keys_of(loader)
    return first, third, loader.stats()


_fork_runs: dict[str, tuple[list[str], list[str], dict]] = {}


@pytest.mark.parametrize("kind", ["dataset", "mix"])
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_every_start_method_delivers_the_fork_run(parts, kind, method):
    if kind not in _fork_runs:
        _fork_runs[kind] = _two_epochs(kind, parts, "fork")
    want_first, want_third, _ = _fork_runs[kind]
    first, third, stats = _two_epochs(kind, parts, method)
    assert len(first) == len(want_first) and first == want_first
    assert len(third) == len(want_third) and third == want_third
    assert first != third and sorted(first) == sorted(third)  # a new order of the same samples
    if kind == "dataset":
        assert len(first) == 22 - 2 and not any(key.endswith("7") for key in first)
    else:  # part b's two keys ending in 7 are filtered; the hooks ran in the workers
        assert len(first) == 22 + 12 - 1
        assert stats["read_us"] > 0 and stats["decode_us"] > 0 and {f"{s}_us" for s in STAGES} <= set(stats)
    assert stats["samples"] == len(third)
