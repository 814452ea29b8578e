"""Who reads which samples in which order: the epoch planner, the Mix planner, resume state.

Pure functions of counts, seed, epoch and topology; no I/O, no data.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    # `from shardkit.plan import EpochPlanner` named the flat module this package replaced.
    # import_module, not `from . import epoch`: that form asks this package for the
    # attribute first, which calls this function again while epoch is still importing.
    epoch = importlib.import_module(".epoch", __name__)
    try:
        return getattr(epoch, name)
    except AttributeError:
        raise AttributeError(f"module 'shardkit.plan' has no attribute {name!r}") from None
