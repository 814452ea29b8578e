"""Bytes to pixels and values: field decoders, the pixel policy, image headers, decode size,
the region decoder, the fused crop, and the write-time decode check.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    # `from shardkit.decode import make_decoder` named the flat module this package replaced.
    # import_module, not `from . import fields`: that form asks this package for the
    # attribute first, which calls this function again while fields is still importing.
    fields = importlib.import_module(".fields", __name__)
    try:
        return getattr(fields, name)
    except AttributeError:
        raise AttributeError(f"module 'shardkit.decode' has no attribute {name!r}") from None
