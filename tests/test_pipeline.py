"""The per-sample pipeline: error handlers, field specs, decode/transform/select, the ordered
thread map, batching and collation. Expected values are computed here by hand (hashlib,
numpy, plain Python), never by the code under test.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from shardkit.errors import SampleError, ShardkitError, SkippedSampleWarning
from shardkit.read.pipeline import Failed, SamplePipeline, batched, collate, make_handler, parse_fields
from shardkit.read.stages import StageHooks
from tests.helpers import pairs

pytestmark = pytest.mark.timeout(30)

URL = "/data/train-000003.tar"


def raw_sample(i: int, **fields: Any) -> dict:
    """A sample as the reader yields it: bytes per extension plus __key__/__url__."""
    out: dict = {"__key__": f"k{i:04d}", "__url__": URL, "cls": str(i % 5).encode()}
    out.update(fields)
    return out


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


class Collect:
    def __init__(self) -> None:
        self.errors: list[Exception] = []

    def __call__(self, exc: Exception) -> None:
        self.errors.append(exc)


# --------------------------------------------------------------------------- make_handler


def test_raise_handler_reraises_the_same_exception():
    error = ValueError("boom")
    with pytest.raises(ValueError) as info:
        make_handler("raise")(error)
    assert info.value is error


def test_warn_handler_warns_visibly_and_returns():
    # A warning, not a log record: visible without any logging set-up (issue 13).
    with pytest.warns(SkippedSampleWarning) as caught:
        assert make_handler("warn")(SampleError("bad pixels", url=URL, key="k0001")) is None
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "bad pixels" in message and URL in message and message.startswith("skipped 1 sample")


def test_skip_handler_is_silent(caplog):
    with caplog.at_level(logging.DEBUG, logger="shardkit"):
        assert make_handler("skip")(ValueError("quiet")) is None
    assert not [r for r in caplog.records if r.name.startswith("shardkit")]


def test_callable_handler_is_used_as_is():
    seen = Collect()
    assert make_handler(seen) is seen


@pytest.mark.parametrize("bad", ["ignore", "RAISE", "", None, 3])
def test_unknown_handler_is_a_value_error(bad):
    with pytest.raises(ValueError, match="handler must be one of"):
        make_handler(bad)


# --------------------------------------------------------------------------- parse_fields


def test_parse_fields():
    assert parse_fields("jpg;png cls") == [["jpg", "png"], ["cls"]]
    assert parse_fields("  JPG;Png   cls  ") == [["jpg", "png"], ["cls"]]
    assert parse_fields(["jpg;png", "cls"]) == [["jpg", "png"], ["cls"]]
    assert parse_fields(("seg.png",)) == [["seg.png"]]
    assert parse_fields("jpg;;png") == [["jpg", "png"]]


@pytest.mark.parametrize("spec", ["", "   ", ";", "jpg ;", ["jpg", ""], ["cls", " ; "], []])
def test_bad_fields_specs_raise(spec):
    with pytest.raises(ValueError, match="bad fields spec"):
        parse_fields(spec)


def test_bad_fields_spec_fails_when_the_pipeline_is_built():
    with pytest.raises(ValueError):
        SamplePipeline(fields="jpg ;", handler=make_handler("raise"))


# --------------------------------------------------------------------------- SamplePipeline


def test_decoder_then_field_transforms_then_fields():
    calls: list[str] = []

    def decoder(sample: dict) -> dict:
        calls.append("decode")
        out = dict(sample)
        out["cls"] = int(sample["cls"])
        for ext in ("jpg", "png"):
            if ext in sample:
                out[ext] = len(sample[ext])
        return out

    def times_ten(value: int) -> int:
        calls.append("cls")
        return value * 10  # on undecoded bytes this would give b"3333333333"

    pipe = SamplePipeline(
        decoder=decoder,
        transform={"cls": times_ten, "png": lambda v: -v, "txt": str.upper},
        fields="png;jpg cls __key__",
        handler=make_handler("raise"),
    )
    assert pipe(raw_sample(3, jpg=b"abcd")) == (4, 30, "k0003")
    assert calls == ["decode", "cls"]
    # the first alternative present wins, and its transform applied
    assert pipe(raw_sample(8, jpg=b"abcd", png=b"xy")) == (-2, 30, "k0008")


def test_field_transforms_without_decoder_or_fields():
    pipe = SamplePipeline(transform={"cls": int}, handler=make_handler("raise"))
    out = pipe(raw_sample(4, txt=b"hello"))
    assert out == {"__key__": "k0004", "__url__": URL, "cls": 4, "txt": b"hello"}


def test_sample_level_transform():
    def transform(sample: dict) -> dict:
        return {"label": int(sample["cls"]) + 1, "size": len(sample["jpg"]), "__key__": sample["__key__"]}

    with_fields = SamplePipeline(transform=transform, fields="size label", handler=make_handler("raise"))
    assert with_fields(raw_sample(2, jpg=b"12345")) == (5, 3)
    plain = SamplePipeline(transform=lambda s: (s["__key__"], len(s)), handler=make_handler("raise"))
    assert plain(raw_sample(2, jpg=b"12345")) == ("k0002", 4)


def test_missing_field_raises_sample_error_naming_key_and_url():
    pipe = SamplePipeline(fields="jpg;png cls", handler=make_handler("raise"))
    tagged = [(0, raw_sample(0, jpg=b"a")), (1, raw_sample(1, webp=b"b"))]
    out = []
    with pytest.raises(SampleError) as info:
        for item in pipe.map(tagged, Counter()):
            out.append(item)  # noqa: PERF402 - what came before the error
    assert out == [(0, (b"a", b"0"))]
    error = info.value
    assert error.key == "k0001" and error.url == URL
    assert "k0001" in str(error) and URL in str(error) and "jpg/png" in str(error) and "webp" in str(error)


def test_missing_field_goes_through_a_collecting_handler():
    handler = Collect()
    skipped = Counter()
    pipe = SamplePipeline(fields="jpg cls", handler=handler)
    tagged = [(i, raw_sample(i, jpg=b"x") if i != 2 else raw_sample(i)) for i in range(4)]
    assert [tag for tag, _ in pipe.map(tagged, skipped)] == [0, 1, 3]
    assert skipped.n == 1
    (error,) = handler.errors
    assert isinstance(error, SampleError) and error.key == "k0002" and error.url == URL


def expensive(data: bytes, rounds: int) -> str:
    """Deterministic CPU work of a chosen length (no sleeping)."""
    digest = data
    for _ in range(rounds):
        digest = hashlib.sha256(digest * 64).digest()
    return digest.hex()


@pytest.mark.parametrize("threads", [0, 1, 4])
def test_map_keeps_order_and_tags_travel_with_their_samples(threads):
    n = 60
    samples = [raw_sample(i, bin=i.to_bytes(4, "little")) for i in range(n)]
    # early samples cost the most, so on threads later ones finish first
    rounds = [1 + 3 * (n - i) for i in range(n)]
    expected = [expensive(i.to_bytes(4, "little"), rounds[i]) for i in range(n)]

    def transform(sample: dict) -> tuple[str, str]:
        i = int(sample["__key__"][1:])
        return sample["__key__"], expensive(sample["bin"], rounds[i])

    pipe = SamplePipeline(transform=transform, handler=make_handler("raise"))
    tagged = ((("tag", i), s) for i, s in enumerate(samples))  # a generator, as in the worker
    out = list(pipe.map(tagged, Counter(), threads=threads))
    assert [tag for tag, _ in out] == [("tag", i) for i in range(n)]
    assert [result for _, result in out] == [(f"k{i:04d}", expected[i]) for i in range(n)]


@pytest.mark.parametrize("threads", [0, 4])
def test_failing_sample_is_dropped_with_skip(threads):
    def transform(sample: dict) -> int:
        value = int(sample["cls"])
        if sample["__key__"] == "k0007":
            raise ValueError("cannot transform this one")
        return value

    skipped = Counter()
    pipe = SamplePipeline(transform=transform, handler=make_handler("skip"))
    out = list(pipe.map(((i, raw_sample(i)) for i in range(12)), skipped, threads=threads))
    assert [tag for tag, _ in out] == [i for i in range(12) if i != 7]
    assert [v for _, v in out] == [i % 5 for i in range(12) if i != 7]
    assert skipped.n == 1


@pytest.mark.parametrize("threads", [0, 4])
def test_other_exceptions_become_sample_errors(threads):
    handler = Collect()
    pipe = SamplePipeline(transform={"cls": lambda v: 1 // (int(v) - 2)}, handler=handler)
    out = list(pipe.map(((i, raw_sample(i)) for i in range(5)), Counter(), threads=threads))
    assert [tag for tag, _ in out] == [0, 1, 3, 4]
    (error,) = handler.errors
    assert isinstance(error, SampleError) and error.key == "k0002" and error.url == URL
    assert "ZeroDivisionError" in str(error)
    with pytest.raises(SampleError, match="ZeroDivisionError"):
        list(
            SamplePipeline(transform={"cls": lambda v: 1 // (int(v) - 2)}, handler=make_handler("raise")).map(
                ((i, raw_sample(i)) for i in range(5)), Counter(), threads=threads
            )
        )


def test_attempt_returns_the_located_failure_without_calling_the_handler():
    handler = Collect()
    pipe = SamplePipeline(transform={"cls": lambda v: 1 // (int(v) - 2)}, handler=handler)
    assert pipe.attempt(raw_sample(3))["cls"] == 1
    failed = pipe.attempt(raw_sample(2))
    assert isinstance(failed, Failed) and isinstance(failed.error, SampleError)
    assert failed.error.key == "k0002" and "ZeroDivisionError" in str(failed.error)
    assert handler.errors == []


class Hooked(StageHooks):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def wrap(self, stage, fn):
        def call(sample):
            self.seen.append((stage, sample["__key__"]))
            return fn(sample)

        return call


def test_hooks_wrap_the_decode_and_transform_stages():
    hooks = Hooked()

    def decoder(sample: dict) -> dict:
        return {**sample, "cls": int(sample["cls"])}

    pipe = SamplePipeline(decoder=decoder, transform={"cls": str}, handler=make_handler("raise"), hooks=hooks)
    out = [pipe(raw_sample(i)) for i in range(3)]
    assert [s["cls"] for s in out] == ["0", "1", "2"]
    assert hooks.seen == [(stage, f"k{i:04d}") for i in range(3) for stage in ("decode", "transform")]
    bare = SamplePipeline(handler=make_handler("raise"), hooks=hooks)
    assert bare(raw_sample(4))["__key__"] == "k0004" and len(hooks.seen) == 6  # no stage, no call


@pytest.mark.parametrize("threads", [0, 4])
def test_select_drops_samples_before_decoding(threads):
    decoded: list[str] = []

    def decoder(sample: dict) -> dict:
        decoded.append(sample["__key__"])  # list.append is atomic under threads
        return {**sample, "cls": int(sample["cls"])}

    skipped, filtered = Counter(), Counter()
    pipe = SamplePipeline(
        decoder=decoder, fields="cls", handler=make_handler("raise"), select=lambda s: s["cls"] != b"0"
    )  # sees the raw bytes
    out = list(pipe.map(((i, raw_sample(i)) for i in range(23)), skipped, threads=threads, on_filter=filtered))
    kept = [i for i in range(23) if i % 5]
    assert out == [(i, (i % 5,)) for i in kept]
    assert sorted(decoded) == [f"k{i:04d}" for i in kept]
    assert filtered.n == 23 - len(kept) and skipped.n == 0
    # without on_filter the rejects are dropped all the same
    assert [tag for tag, _ in pipe.map(((i, raw_sample(i)) for i in range(6)), skipped)] == [1, 2, 3, 4]


def test_a_failing_select_goes_to_the_handler():
    handler = Collect()
    skipped, filtered = Counter(), Counter()
    pipe = SamplePipeline(handler=handler, select=lambda s: int(s["cls"]) < 3 or s["missing"])
    out = list(pipe.map(((i, raw_sample(i)) for i in range(5)), skipped, on_filter=filtered))
    assert [tag for tag, _ in out] == [0, 1, 2]
    assert skipped.n == 2 and filtered.n == 0
    assert [e.key for e in handler.errors] == ["k0003", "k0004"]
    assert all(isinstance(e, SampleError) and "KeyError" in str(e) for e in handler.errors)


def test_a_raising_handler_stops_the_map_without_counting_a_skip():
    def strict(exc: Exception) -> None:
        raise RuntimeError(f"stop: {exc}")

    skipped = Counter()
    pipe = SamplePipeline(fields="jpg", handler=make_handler(strict))
    with pytest.raises(RuntimeError, match="stop: .*k0001"):
        list(pipe.map([(0, raw_sample(0, jpg=b"")), (1, raw_sample(1))], skipped))
    assert skipped.n == 0


# --------------------------------------------------------------------------- batched


def tagged_items(n: int) -> list[tuple[str, int]]:
    return [(f"t{i}", i) for i in range(n)]


def test_batched_keeps_the_short_last_batch():
    out = list(batched(tagged_items(7), 3, drop_last=False, collate_fn=list))
    assert out == [("t2", [0, 1, 2]), ("t5", [3, 4, 5]), ("t6", [6])]


def test_batched_drops_the_short_last_batch():
    out = list(batched(iter(tagged_items(7)), 3, drop_last=True, collate_fn=list))
    assert out == [("t2", [0, 1, 2]), ("t5", [3, 4, 5])]


@pytest.mark.parametrize("drop_last", [True, False])
def test_batched_exact_multiple_and_empty(drop_last):
    assert list(batched(tagged_items(6), 2, drop_last=drop_last, collate_fn=tuple)) == [
        ("t1", (0, 1)),
        ("t3", (2, 3)),
        ("t5", (4, 5)),
    ]
    assert list(batched([], 2, drop_last=drop_last, collate_fn=list)) == []
    assert list(batched(tagged_items(1), 1, drop_last=drop_last, collate_fn=list)) == [("t0", [0])]


def test_batched_uses_the_collate_fn():
    out = list(batched(tagged_items(5), 2, drop_last=False, collate_fn=collate))
    assert [tag for tag, _ in out] == ["t1", "t3", "t4"]
    assert [batch.tolist() for _, batch in out] == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("size", [0, -1])
def test_batch_size_below_one_raises(size):
    with pytest.raises(ShardkitError, match="batch_size must be >= 1"):
        list(batched(tagged_items(3), size, drop_last=False, collate_fn=list))


# --------------------------------------------------------------------------- collate


def test_collate_stacks_tensors_arrays_and_numbers():
    a, b = torch.arange(6).reshape(2, 3), torch.arange(6, 12).reshape(2, 3)
    stacked = collate([a, b])
    assert isinstance(stacked, torch.Tensor) and stacked.shape == (2, 2, 3)
    assert torch.equal(stacked, torch.arange(12).reshape(2, 2, 3))
    arrays = collate([np.full((2, 2), 1, np.uint8), np.full((2, 2), 2, np.uint8)])
    assert isinstance(arrays, torch.Tensor) and arrays.dtype == torch.uint8
    assert arrays.tolist() == [[[1, 1], [1, 1]], [[2, 2], [2, 2]]]
    labels = collate([3, 1, 4])
    assert isinstance(labels, torch.Tensor) and labels.tolist() == [3, 1, 4]


def test_collate_keeps_lists_where_it_cannot_stack():
    raw = [b"\xff\xd8one", b"\xff\xd8two"]
    assert collate(raw) == raw
    images = [Image.new("RGB", (4, 3)), Image.new("RGB", (5, 3))]
    out = collate(images)
    assert isinstance(out, list) and len(out) == 2 and all(x is y for x, y in pairs(out, images))
    ragged = [torch.zeros(3, 4), torch.ones(3, 5)]
    out = collate(ragged)
    assert isinstance(out, list) and all(x is y for x, y in pairs(out, ragged))
    assert collate(["k0", "k1"]) == ["k0", "k1"]


def test_collate_recurses_into_dicts_and_tuples():
    batch = [
        {
            "__key__": f"k{i}",
            "img": torch.full((2, 2), i),
            "cls": i,
            "jpg": bytes([i]),
            "pair": (torch.tensor([i, i]), torch.zeros(i + 1), {"n": i}),
        }
        for i in range(3)
    ]
    out = collate(batch)
    assert set(out) == {"__key__", "img", "cls", "jpg", "pair"}
    assert out["__key__"] == ["k0", "k1", "k2"]
    assert out["img"].shape == (3, 2, 2) and out["img"][:, 0, 0].tolist() == [0, 1, 2]
    assert out["cls"].tolist() == [0, 1, 2]
    assert out["jpg"] == [b"\x00", b"\x01", b"\x02"]
    pairs, ragged, inner = out["pair"]
    assert isinstance(out["pair"], tuple)
    assert pairs.tolist() == [[0, 0], [1, 1], [2, 2]]
    assert isinstance(ragged, list) and [t.shape[0] for t in ragged] == [1, 2, 3]
    assert isinstance(inner, dict) and inner["n"].tolist() == [0, 1, 2]
    tuples = collate([(torch.ones(2), "a", 1), (torch.zeros(2), "b", 2)])
    assert isinstance(tuples, tuple) and len(tuples) == 3
    assert tuples[0].tolist() == [[1, 1], [0, 0]] and tuples[1] == ["a", "b"] and tuples[2].tolist() == [1, 2]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_collate_of_channels_last_images_equals_torch_stack(dtype):
    # The decoders give CHW views of HWC pixels; the batch must be what default_collate
    # gives: the same values in a contiguous NCHW tensor (bfloat16 takes torch's path).
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 255, (17, 13, 3), generator=gen).to(dtype).permute(2, 0, 1) for _ in range(5)]
    out = collate(images)
    expected = default_collate(images)
    assert out.dtype == dtype and out.shape == (5, 3, 17, 13) and out.is_contiguous()
    assert out.stride() == expected.stride() and torch.equal(out, expected)
    # Mixed dtypes take torch's path (type promotion); 1-channel views stack as before.
    mixed = [*images[:2], images[2].to(torch.int16)]
    assert torch.equal(collate(mixed), default_collate(mixed))
    assert torch.equal(collate([i[:1] for i in images]), default_collate([i[:1] for i in images]))


class _CollateInWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        images = [torch.full((4, 5, 3), i, dtype=torch.uint8).permute(2, 0, 1) for i in range(3)]
        batch = collate(images)
        yield batch.is_shared(), batch


def test_collate_in_a_worker_writes_straight_into_shared_memory():
    loader = torch.utils.data.DataLoader(_CollateInWorker(), batch_size=None, num_workers=1)
    [(shared, batch)] = list(loader)
    assert shared is True  # no extra copy when the batch crosses to the main process
    assert batch.shape == (3, 3, 4, 5) and batch[:, 0, 0, 0].tolist() == [0, 1, 2]
