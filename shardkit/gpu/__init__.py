"""The optional GPU stage: CUDA helpers, the transform recipe, worker-side shipping,
batch decoders and the main-process batch stage. Everything here works without CUDA.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    # `from shardkit.gpu import CudaPrefetcher` named the flat module this package replaced.
    # import_module, not `from . import cuda`: that form asks this package for the
    # attribute first, which calls this function again while cuda is still importing.
    cuda = importlib.import_module(".cuda", __name__)
    try:
        return getattr(cuda, name)
    except AttributeError:
        raise AttributeError(f"module 'shardkit.gpu' has no attribute {name!r}") from None
