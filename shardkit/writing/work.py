"""What a writer worker process does with one input: load it, run the user's function on
it, check every image of what comes out.

Inputs travel as ``(key, payload)``: the key a sample gets when the function does not
name one, and the payload (an image-file entry, a sample read from a dataset format, or
a user's item). Results go back to the one assembler in the parent: a sample dict, a
list of them, None (the function dropped the input) or a ``(where, reason)`` skip.
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..decode.check import check_sample
from ..ingest.common import Warned
from ..ingest.files import Entry
from ..ingest.table import Row

Skip = tuple[str, str]  # (where, reason)
Result = dict[str, Any] | list[dict[str, Any]] | Warned | Skip | None

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def describe_sample(sample: Mapping[str, Any]) -> str:
    """How a sample from a dataset format is named in messages: its key and source id."""
    meta = sample.get("json")
    where = f"sample {sample.get('__key__')}"
    if isinstance(meta, dict) and meta:
        where += " (" + ", ".join(f"{k}={v}" for k, v in list(meta.items())[:2]) + ")"
    return where


def describe_input(item: tuple[str, Any]) -> str:
    """How an input is named in messages: the file path, the dataset sample, or the item."""
    key, payload = item
    if isinstance(payload, Entry):
        return payload.path
    if isinstance(payload, Row):
        return payload.where
    if isinstance(payload, Mapping) and "__key__" in payload:
        return describe_sample(payload)
    if isinstance(payload, (str, os.PathLike)):
        return os.fspath(payload)
    return f"input {key} ({_short.repr(payload)})"


def _keyed(sample: Any, key: str, what: str) -> dict[str, Any]:
    if not isinstance(sample, Mapping):
        raise TypeError(f"{what} is a {type(sample).__name__}, not a sample dict")
    if "__key__" in sample:
        return dict(sample)
    return {"__key__": key, **sample}


@dataclass(frozen=True)
class SampleWork:
    """One input to its samples, in a worker process (picklable when ``fn`` and ``load`` are).

    ``load``: reads the payload first (an image file; may return a skip). ``fn(payload)``:
    the user's function; returns a sample dict, a list of sample dicts, or None to drop the
    input; without it the payload must be a sample dict. A sample without ``__key__`` gets
    the input's key (``KEY_0``, ``KEY_1``... for a list). ``validate``: every image field of
    every sample is fully decoded (:func:`shardkit.decode.check.check_sample`); the input
    is skipped, with the reason, when one does not decode, and kept with its warnings
    (:class:`~shardkit.ingest.common.Warned`) when one decodes only with a warning the
    reader tolerates (``strict``: skipped too).
    """

    fn: Callable[[Any], Any] | None = None
    load: Callable[[tuple[str, Any]], Any] | None = None
    validate: bool = True
    max_pixels: int | None = None
    strict: bool = False

    def __call__(self, item: tuple[str, Any]) -> Result:
        key, payload = item
        warned: list[tuple[str, str]] = []
        if self.load is not None:
            payload = self.load(item)
            if isinstance(payload, tuple):  # the loader's (where, reason)
                return payload
            if isinstance(payload, Warned):  # the loader checked the image: keep its warnings
                warned.extend(payload.warnings)
                payload = payload.sample
        if self.fn is None:
            if not isinstance(payload, Mapping):
                raise TypeError(f"without fn every input must be a sample dict, got a {type(payload).__name__}")
            samples, single = [_keyed(payload, key, "the input")], True
        else:
            out = self.fn(payload)
            if out is None:
                return None
            single = isinstance(out, Mapping)
            if not single and not isinstance(out, (list, tuple)):
                raise TypeError(f"fn returned a {type(out).__name__}; return a sample dict, a list of them, or None")
            parts = [out] if single else list(out)
            samples = [
                _keyed(s, key if single else f"{key}_{j}", "fn's result" if single else f"item {j} of fn's result")
                for j, s in enumerate(parts)
            ]
        if self.validate:
            for sample in samples:
                check = check_sample(sample, max_pixels=self.max_pixels, strict=self.strict)
                named = "" if single else f"sample {sample['__key__']}: "
                if check.problem:
                    return describe_input(item), named + check.problem
                warned.extend((describe_input(item), named + warning) for warning in check.warnings)
        result = samples[0] if single else samples
        return Warned(result, tuple(warned)) if warned else result
