"""shardkit: sequential tar shards for image training."""

from __future__ import annotations

import logging

from . import compat
from .errors import SampleError, ShardFormatError, ShardkitError, SourceError
from .sizes import format_size, parse_size
from .storage.backend import SourceOptions
from .writing.writer import ShardWriter

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
compat.install()

__all__ = [
    "Mix",
    "SampleError",
    "ShardDataset",
    "ShardFormatError",
    "ShardLoader",
    "ShardMap",
    "ShardWriter",
    "ShardkitError",
    "SourceError",
    "SourceOptions",
    "WriteResult",
    "format_size",
    "parse_size",
    "write",
    "write_companion",
    "__version__",
]


def __getattr__(name: str):
    # ShardDataset/ShardLoader/ShardMap import torch, write imports PIL and the ingest formats:
    # load them on first use so that `import shardkit` and the CLI start fast.
    if name in ("write", "WriteResult"):
        from .writing import driver

        return getattr(driver, name)
    if name == "write_companion":
        from .writing.companion import write_companion

        return write_companion
    if name == "ShardDataset":
        from .read.dataset import ShardDataset

        return ShardDataset
    if name == "ShardLoader":
        from .loader import ShardLoader

        return ShardLoader
    if name == "Mix":
        from .read.mix import Mix

        return Mix
    if name == "ShardMap":
        from .read.shardmap import ShardMap

        return ShardMap
    raise AttributeError(f"module 'shardkit' has no attribute {name!r}")
