"""shardkit: sequential tar shards for image training."""

from __future__ import annotations

import logging

from .errors import SampleError, ShardFormatError, ShardkitError, SourceError
from .sizes import format_size, parse_size

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "SampleError", "ShardFormatError", "ShardkitError", "SourceError",
    "format_size", "parse_size", "__version__",
]
