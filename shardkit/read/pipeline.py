"""Per-sample processing after the shuffle: decode, transform, select fields, batch.

Runs inside DataLoader workers, so batches cross the process boundary already collated
(one IPC message per batch, uint8 tensors rather than float).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from ..decode.fields import SampleDecoder
from ..decode.fuse import FusedFieldDecoder, FusedSamplePipeline
from ..decode.planar import to_planar
from ..errors import SampleError, ShardkitError, SkippedSampleWarning
from ..threadmap import ordered_map
from .stages import StageHooks

log = logging.getLogger(__name__)
# Decoders that take ``only=`` (the fields to decode; the others stay bytes).
_DECODE_ONLY = (SampleDecoder, FusedFieldDecoder, FusedSamplePipeline)

HANDLERS = ("raise", "warn", "skip")


def make_handler(handler: str | Callable[[Exception], Any]) -> Callable[[Exception], None]:
    """ "raise" re-raises; "warn" skips with a :class:`~shardkit.errors.SkippedSampleWarning`
    (one line on stderr per skip, shown by default); "skip" skips silently; a callable
    is called with the exception and skips unless it raises."""
    if callable(handler):
        return handler  # type: ignore[return-value]
    if handler not in HANDLERS:
        raise ValueError(f"handler must be one of {HANDLERS} or a callable, got {handler!r}")
    return _HANDLER_FUNCS[handler]


def _raise(exc: Exception) -> None:
    raise exc


def _warn(exc: Exception) -> None:
    # A warning, not a log record: the package's logger has only a NullHandler until the
    # user configures logging, and a skipped sample must be visible without that. A fresh
    # registry per call shows every occurrence (the default filter shows one per
    # location), while the user's own filters still apply.
    lost = getattr(exc, "lost_samples", 1)
    what = "1 sample" if lost == 1 else f"{lost} samples" if lost else "the rest of a shard"
    warnings.warn_explicit(f"skipped {what}: {exc}", SkippedSampleWarning, "shardkit", 0, registry={})


def _skip(exc: Exception) -> None:
    return None


_HANDLER_FUNCS = {"raise": _raise, "warn": _warn, "skip": _skip}


def parse_fields(fields: str | Sequence[str]) -> list[list[str]]:
    """``"jpg;png cls"`` -> ``[["jpg", "png"], ["cls"]]`` (alternatives within a slot)."""
    slots = fields.split() if isinstance(fields, str) else list(fields)
    parsed = [[alt.strip().lower() for alt in slot.split(";") if alt.strip()] for slot in slots]
    if not parsed or any(not slot for slot in parsed):
        raise ValueError(f"bad fields spec {fields!r}; e.g. 'jpg;png cls'")
    return parsed


class SamplePipeline:
    """select -> decode -> transform -> fields, with errors routed through the handler.

    ``select(raw_sample) -> bool`` sees the undecoded sample, so a rejected sample costs
    no decode. ``hooks`` observe the "decode" and "transform" stages.
    """

    def __init__(
        self,
        *,
        decoder: Callable[[dict], dict] | None = None,
        transform: Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]] | None = None,
        fields: str | Sequence[str] | None = None,
        handler: Callable[[Exception], None],
        select: Callable[[dict], bool] | None = None,
        hooks: StageHooks | None = None,
    ) -> None:
        self.select = select
        self.decoder = decoder
        self.transform = transform
        self.fields = parse_fields(fields) if fields is not None else None
        self.handler = handler
        hooks = hooks or StageHooks()
        self._decode_stage = hooks.wrap("decode", self.decode)
        self._transform_stage = hooks.wrap("transform", self.apply_transform)

    def _select(self, sample: dict) -> tuple:
        out = []
        for slot in self.fields or []:
            for ext in slot:
                if ext in sample:
                    out.append(sample[ext])
                    break
            else:
                raise SampleError(
                    f"has none of the fields {'/'.join(slot)} (it has: "
                    f"{', '.join(k for k in sample if not k.startswith('__'))})",
                    url=sample.get("__url__"),
                    key=sample.get("__key__"),
                )
        return tuple(out)

    def _wanted(self, sample: dict) -> set[str]:
        """The fields ``fields`` will pick from this sample (the first present alternative
        of each slot): the only ones worth decoding."""
        wanted = set()
        for slot in self.fields or []:
            for ext in slot:
                if ext in sample:
                    wanted.add(ext)
                    break
        return wanted

    def decode(self, sample: dict) -> dict:
        """The decode stage alone (the sample as it is without a decoder)."""
        if self.decoder is None:
            return sample
        if self.fields is not None and isinstance(self.decoder, _DECODE_ONLY):
            # Decode only what the tuple will hold: a broken member of another field
            # costs nothing and cannot fail the sample (other fields stay raw bytes).
            return self.decoder(sample, only=self._wanted(sample))
        return self.decoder(sample)

    def apply_transform(self, sample: Any) -> Any:
        """The transform stage alone (a per-field mapping runs each field's callable)."""
        if isinstance(self.transform, Mapping):
            for ext, fn in self.transform.items():
                if ext in sample:
                    sample[ext] = fn(sample[ext])
            return sample
        return sample if self.transform is None else self.transform(sample)

    def __call__(self, sample: dict) -> Any:
        if self.select is not None and not self.select(sample):
            return FILTERED
        if self.decoder is not None:
            sample = self._decode_stage(sample)
        if self.transform is not None:
            sample = self._transform_stage(sample)
        if self.fields is not None:
            return self._select(sample)
        return sample

    def attempt(self, sample: dict) -> Any:
        """``self(sample)``, or a :class:`Failed` holding the error (located as a
        SampleError) instead of raising; the handler is not called."""
        try:
            return self(sample)
        except Exception as e:  # noqa: BLE001 - per-sample errors go to the handler
            if not isinstance(e, ShardkitError):
                e = SampleError(f"{type(e).__name__}: {e}", url=sample.get("__url__"), key=sample.get("__key__"))
            return Failed(e)

    def map(
        self,
        tagged: Iterable[tuple[Any, dict]],
        on_skip: Callable[[], None],
        *,
        threads: int = 0,
        on_filter: Callable[[], None] | None = None,
    ) -> Iterator[tuple[Any, Any]]:
        """Process ``(tag, sample)`` pairs in order (on ``threads`` threads when > 1),
        yielding ``(tag, result)``; failures go to the handler, which raises or skips;
        samples ``select`` rejects are dropped (``on_filter`` counts them).
        The tag travels with its sample so progress counts never run ahead of output."""
        if threads > 1:
            return map_parts(
                [self], ((tag, (0, sample)) for tag, sample in tagged), on_skip, threads=threads, on_filter=on_filter
            )
        return self._map_inline(tagged, on_skip, on_filter)

    def _map_inline(
        self, tagged: Iterable[tuple[Any, dict]], on_skip: Callable[[], None], on_filter: Callable[[], None] | None
    ) -> Iterator[tuple[Any, Any]]:
        """:meth:`map` in this thread: the same steps as :func:`map_parts`, with fewer
        calls per sample (no part routing, no thread map)."""
        attempt, handler = self.attempt, self.handler
        for tag, sample in tagged:
            result = attempt(sample)
            if result is FILTERED:
                if on_filter is not None:
                    on_filter()
            elif type(result) is Failed:
                handler(result.error)
                on_skip()
            else:
                yield tag, result


def map_parts(
    pipelines: Sequence[SamplePipeline],
    tagged: Iterable[tuple[Any, tuple[int, dict]]],
    on_skip: Callable[[], None],
    *,
    threads: int = 0,
    on_filter: Callable[[], None] | None = None,
) -> Iterator[tuple[Any, Any]]:
    """:meth:`SamplePipeline.map` where each ``(tag, (part, sample))`` goes through
    ``pipelines[part]`` and that part's handler (a Mix of datasets)."""

    def run(item: tuple[Any, tuple[int, dict]]) -> tuple[Any, int, Any]:
        tag, (part, sample) = item
        return tag, part, pipelines[part].attempt(sample)

    for tag, part, result in ordered_map(run, tagged, threads):
        if result is FILTERED:
            if on_filter is not None:
                on_filter()
            continue
        if isinstance(result, Failed):
            pipelines[part].handler(result.error)
            on_skip()
            continue
        yield tag, result


FILTERED: Any = object()  # what a sample ``select`` rejected becomes


class Failed:
    """What :meth:`SamplePipeline.attempt` returns for a sample that failed."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def collate(batch: list[Any]) -> Any:
    """torch's default_collate, but lists where values cannot be stacked (PIL images,
    differently sized tensors, bytes), and a faster copy of channels-last images."""
    import torch
    from torch.utils.data import default_collate

    first = batch[0]
    if isinstance(first, dict):
        return {k: collate([b[k] for b in batch]) for k in first}
    if isinstance(first, tuple):
        return tuple(collate([b[i] for b in batch]) for i in range(len(first)))
    if isinstance(first, torch.Tensor) and _channels_last_images(batch):
        return _stack_channels_last(batch)
    try:
        return default_collate(batch)
    except (TypeError, RuntimeError):
        return list(batch)


# dtypes numpy can copy (not bfloat16)
_NUMPY_DTYPES = frozenset({"uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bool"})


def _channels_last_images(batch: list[Any]) -> bool:
    """CHW tensors that are views of HWC pixels (the decoders' output), all alike, on the CPU."""
    import torch

    first = batch[0]
    return (
        first.dim() == 3
        and first.stride(0) == 1
        and first.size(0) > 1
        and first.device.type == "cpu"
        and not first.requires_grad
        and str(first.dtype).removeprefix("torch.") in _NUMPY_DTYPES
        and all(
            isinstance(t, torch.Tensor)
            and t.shape == first.shape
            and t.dtype == first.dtype
            and t.device == first.device
            and not t.requires_grad
            for t in batch
        )
    )


def _stack_channels_last(batch: list[Any]) -> Any:
    """``torch.stack`` into a contiguous NCHW batch, as default_collate gives, copying each
    image with :func:`~shardkit.decode.planar.to_planar`: torch's strided copy from HWC to
    CHW is several times slower."""
    import torch
    from torch.utils.data import get_worker_info

    first = batch[0]
    shape = (len(batch), *first.shape)
    if get_worker_info() is not None:  # straight into shared memory, as default_collate does
        storage = first._typed_storage()._new_shared(math.prod(shape), device=first.device)
        out = first.new(storage).resize_(*shape)
    else:
        out = torch.empty(shape, dtype=first.dtype)
    target = out.numpy()
    for index, image in enumerate(batch):
        to_planar(target[index], image.numpy().transpose(1, 2, 0))
    return out


def batched(
    tagged: Iterable[tuple[Any, Any]], batch_size: int, *, drop_last: bool, collate_fn: Callable[[list[Any]], Any]
) -> Iterator[tuple[Any, Any]]:
    """Group ``(tag, item)`` pairs into ``(tag of the last item, collated batch)``."""
    if batch_size < 1:
        raise ShardkitError(f"batch_size must be >= 1, got {batch_size}")
    chunk: list[Any] = []
    tag = None
    for tag, item in tagged:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield tag, collate_fn(chunk)
            chunk = []
    if chunk and not drop_last:
        yield tag, collate_fn(chunk)
