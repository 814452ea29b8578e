"""The per-sample stages of a worker, configured in one place and observable by hooks.

:class:`Decoding` is how ``decode``, ``decode_size``, ``allow_pickle`` and
``exif_orientation`` become a decoder (and, with ``decode_size="auto"`` or ``"exact"``, a fused crop):
``ShardDataset`` and ``ShardMap`` both build theirs here, so they accept and refuse the
same combinations.

:class:`StageHooks` observes a worker's stages without changing them (in the spirit of
SPDL's hooks and torchdata.nodes' wrapping): ``dataset.with_stages(hooks=factory)`` calls
the factory once per worker and epoch, in the worker, and the worker wraps its reader,
decoder, transform, collate and item stream with the hooks it returns. The profiler
behind ``shardkit doctor`` is one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..decode.fields import make_decoder
from ..decode.fuse import fuse_crop
from ..decode.pixels import DECODE_MODES
from ..decode.size import resolve_decode_size

T = TypeVar("T")
log = logging.getLogger(__name__)

#: The stages a worker runs: "read" (the reader's samples) and "items" (what the worker
#: hands to the DataLoader, batches or samples) are streams; the others are callables.
#: With the default collate a batch is built as its samples come: "batch" runs once per
#: sample (copying it into its batch), "collate" once per batch (completing it).
STAGE_NAMES = ("read", "decode", "transform", "batch", "collate", "items")


class Keep:
    """The type of :data:`KEEP`: "leave this stage as the dataset configured it"."""

    def __reduce__(self) -> str:
        return "KEEP"  # one object in every process

    def __repr__(self) -> str:
        return "KEEP"


KEEP = Keep()


class StageHooks:
    """Observes one worker's epoch; subclass and override what you watch.

    The defaults change nothing. A hook must hand on what flows through it unchanged
    (what it returns replaces the stage): it may time, count or log, not alter. Its
    :meth:`counters` ride on each item's progress record, so ``ShardLoader.stats()``
    sums them over the workers.
    """

    def wrap(self, stage: str, fn: Callable[..., T]) -> Callable[..., T]:
        """The callable to run for ``stage`` ("decode", "transform", "batch", "collate") in place of ``fn``."""
        return fn

    def wrap_iter(self, stage: str, items: Iterator[T]) -> Iterator[T]:
        """The stream to consume for ``stage`` ("read", "items") in place of ``items``."""
        return items

    def counters(self) -> dict[str, int]:
        """Integer counters of this worker's epoch so far (cumulative)."""
        return {}


#: What ``with_stages(hooks=...)`` takes: called in each worker at the start of each epoch.
HooksFactory = Callable[[], StageHooks]


def check_hooks(hooks: Any) -> HooksFactory | None:
    """``hooks`` if it is None or callable (a StageHooks subclass is), else TypeError."""
    if hooks is not None and not callable(hooks):
        raise TypeError(f"hooks must be a callable returning a StageHooks (e.g. the subclass itself), got {hooks!r}")
    return hooks


@dataclass(frozen=True)
class Decoding:
    """How a dataset decodes samples, validated: make one with :meth:`resolve`.

    ``decode`` is None (raw bytes), "pil", "numpy", "torch" or a callable on the sample;
    ``decode_size`` the resolved DCT decode size (an int or None); ``fuse`` is True for
    ``decode_size="auto"`` and ``"exact"``, which fuse a leading RandomResizedCrop into
    decoding; ``exact`` (``"exact"``) keeps the fused crops at full resolution, so their
    values are the unfused pipeline's.
    """

    decode: str | Callable[[dict], dict] | None = None
    decode_size: int | None = None
    fuse: bool = False
    allow_pickle: bool = False
    exif_orientation: bool = True
    exact: bool = False

    @classmethod
    def resolve(
        cls,
        decode: str | Callable[[dict], dict] | None,
        decode_size: int | str | None,
        transform: Any,
        *,
        allow_pickle: bool = False,
        exif_orientation: bool = True,
    ) -> Decoding:
        """Check the options together; ``decode_size="auto"`` is derived from ``transform``.

        ``decode_size`` only means something to the built-in decoders: with ``decode=None``
        or a callable it is refused, never ignored.
        """
        if not isinstance(exif_orientation, bool):
            raise TypeError(f"exif_orientation must be True or False, got {exif_orientation!r}")
        if decode is not None and not callable(decode) and decode not in DECODE_MODES:
            raise ValueError(f"decode must be None, a callable or one of {DECODE_MODES}, got {decode!r}")
        exact = decode_size == "exact"
        fuse = decode_size == "auto" or exact
        size = resolve_decode_size(decode_size, transform)
        if (decode is None or callable(decode)) and decode_size is not None:
            raise ValueError(
                f"decode_size applies to decode='pil'/'numpy'/'torch', not to decode={decode!r}: "
                "drop decode_size, or decode with a built-in mode"
            )
        decoding = cls(
            decode, size, fuse, allow_pickle=bool(allow_pickle), exif_orientation=exif_orientation, exact=exact
        )
        if exact and decoding.stages(transform)[1] is transform:
            # Nothing to fuse: the option changes nothing, which the user should hear of.
            log.warning(
                "decode_size='exact' fuses a leading RandomResizedCrop into decoding, and this "
                "transform has none that can be fused (decode=%r, transform=%r): images decode whole",
                decode,
                transform,
            )
        return decoding

    def decoder(self) -> Callable[[dict], dict] | None:
        """The sample decoder (None: samples stay bytes)."""
        if self.decode is None or callable(self.decode):
            return self.decode  # type: ignore[return-value]
        return make_decoder(
            self.decode,  # type: ignore[arg-type]  # checked in resolve
            decode_size=self.decode_size,
            allow_pickle=self.allow_pickle,
            exif_orientation=self.exif_orientation,
        )

    def stages(
        self, transform: Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]] | None
    ) -> tuple[Callable[[dict], dict] | None, Any]:
        """(decoder, transform) to run: with ``fuse``, a leading RandomResizedCrop of
        ``transform`` moves into the decoder (see :func:`shardkit.decode.fuse.fuse_crop`)."""
        decoder = self.decoder()
        return fuse_crop(decoder, transform, reduce=not self.exact) if self.fuse else (decoder, transform)
