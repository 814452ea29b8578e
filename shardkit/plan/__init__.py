"""Who reads which samples in which order: the epoch planner, the Mix planner, resume state.

Pure functions of counts, seed, epoch and topology; no I/O, no data.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # `from shardkit.plan import EpochPlanner` named the flat module this package replaced.
    from . import epoch

    try:
        return getattr(epoch, name)
    except AttributeError:
        raise AttributeError(f"module 'shardkit.plan' has no attribute {name!r}") from None
