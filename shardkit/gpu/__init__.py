"""The optional GPU stage: CUDA helpers, the transform recipe, worker-side shipping,
batch decoders and the main-process batch stage. Everything here works without CUDA.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # `from shardkit.gpu import CudaPrefetcher` named the flat module this package replaced.
    from . import cuda

    try:
        return getattr(cuda, name)
    except AttributeError:
        raise AttributeError(f"module 'shardkit.gpu' has no attribute {name!r}") from None
