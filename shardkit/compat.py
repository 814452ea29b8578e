"""The flat module paths of shardkit 0.1 (``shardkit.dataset``, ``shardkit.writer``, ...) as
aliases of the stage subpackages that replaced them: ``import shardkit.dataset`` gives the
module object ``shardkit.read.dataset``, so old imports and the names in them keep working.
``shardkit.writing.parallel`` (the process pool and the write driver in one module, now
``writing.pool`` and ``writing.driver``) is kept the same way.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

# old name -> new name, both under ``shardkit.``
MOVED = {
    "backend": "storage.backend",
    "cache": "storage.cache",
    "compression": "format.compression",
    "crop_decode": "decode.crop",
    "dataset": "read.dataset",
    "decodable": "decode.check",
    "decode_size": "decode.size",
    "engine_dask": "writing.dask_engine",
    "epochs": "read.base",
    "gpu_batch": "gpu.batch",
    "gpu_decoders": "gpu.decoders",
    "gpu_recipe": "gpu.recipe",
    "gpu_ship": "gpu.ship",
    "imageinfo": "decode.imageinfo",
    "index": "format.index",
    "jpeg_region": "decode.jpeg_region",
    "localfile": "storage.localfile",
    "merge": "writing.merge",
    "mix": "read.mix",
    "mixplan": "plan.mix",
    "parallel": "threadmap",
    "pipeline": "read.pipeline",
    "pixels": "decode.pixels",
    "profiling": "cli.profiling",
    "reader": "read.reader",
    "remote": "storage.remote",
    "remote.fsspec_backend": "storage.remote.fsspec_backend",
    "remote.http": "storage.remote.http",
    "remote.pipe": "storage.remote.pipe",
    "remote.s3": "storage.remote.s3",
    "remote.stream": "storage.remote.stream",
    "samples": "format.samples",
    "shardmap": "read.shardmap",
    "source": "storage.dispatch",
    "state": "plan.state",
    "tar": "format.tar",
    "urls": "read.urls",
    "worker": "read.worker",
    "write_parallel": "writing.driver",
    "writer": "writing.writer",
    # moved again within the stage: the process pool and the write driver were one module
    "writing.parallel": "writing.driver",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.original_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The target module is already executed; the import system has just set its
        # __spec__ to the alias's, so put back the real one (pickling and reload use it).
        module.__spec__ = self.original_spec


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds ``shardkit.<old>`` and hands out the module now at ``shardkit.<new>``."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("shardkit."):
            return None
        new = MOVED.get(fullname[len("shardkit.") :])
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias("shardkit." + new))


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        # Ahead of the path finder: under an aliased package (shardkit.remote) it would
        # otherwise load a second copy of a submodule under the old name.
        sys.meta_path.insert(0, MovedModuleFinder())
