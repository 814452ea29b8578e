"""``shardkit doctor URL``: run the user's shards through the loader and say where time goes.

Runs the user's dataset with :class:`~shardkit.cli.profiling.StageTimes` hooks under a
ShardLoader for a few seconds, then reports per stage (read, decode, transform, collate, other worker time,
hand-off to the DataLoader queue, the main process), CPU-ms per image for the workers and
the main process, the single-core decode+transform cost of the same samples as a
reference, which stage bounds the run, and what to change. With several workers it
also runs that reference loop in as many processes at once: what the same work costs
per image when that many processes share the cores, with no loader at all, so the
loader's own share of the CPU can be told from the machine's.
"""

from __future__ import annotations

import gc
import importlib.util
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..decode.jpeg_region import region_support
from ..decode.planar import opencv_available
from ..errors import ShardkitError
from .profiling import STAGES, children_cpu_since, children_cpu_snapshot, rusage_cpu

#: ``--transform`` presets (torchvision v2, applied to the image field).
TRANSFORMS = ("none", "rrc224", "rrc224+flip", "resize256+center224")


def make_transform(name: str) -> Callable[[Any], Any] | None:
    """The torchvision v2 pipeline a ``--transform`` preset names (None for "none")."""
    if name == "none":
        return None
    from torchvision.transforms import v2

    if name == "rrc224":
        return v2.RandomResizedCrop(224)
    if name == "rrc224+flip":
        return v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()])
    if name == "resize256+center224":
        return v2.Compose([v2.Resize(256), v2.CenterCrop(224)])
    raise ValueError(f"unknown --transform {name!r}; choose one of {', '.join(TRANSFORMS)}")


@dataclass
class Diagnosis:
    """What a doctor run measured, and what it concludes."""

    images: int
    seconds: float
    workers: int
    threads: int
    cores: int
    stage_ms: dict[str, float]  # per delivered image, summed over workers
    worker_cpu_ms: float  # per image, all worker processes (the main process when 0 workers)
    main_cpu_ms: float  # per image, the main process (0 when it is the only one)
    wait_fraction: float  # of the run, the consumer waited for data
    reference_ms: float  # single-core decode+transform per image, same samples, in-process
    decode_size: Any
    fused: bool
    region_decode: bool = False  # fused crops decode only the crop (libjpeg-turbo 3, shardkit.decode.jpeg_region)
    exact_crop: bool = False  # decode_size="exact": fused crops at full resolution, the unfused values
    planar_opencv: bool = False  # images split into NCHW planes by OpenCV, not numpy (shardkit.decode.planar)
    bound: str = ""
    advice: list[str] = field(default_factory=list)
    # The reference loop run in ``workers`` processes at once (0: not measured)
    parallel_reference_ms: float = 0.0
    memory_reused: int = 0  # batches collated into reused batch memory (ShardLoader's rings)
    memory_fresh: int = 0  # batches that needed new memory

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["rate"] = self.rate
        data["cpu_ms_per_image"] = self.worker_cpu_ms + self.main_cpu_ms
        return data


def _reference_samples(urls: Any, count: int) -> list[dict]:
    from ..read.dataset import ShardDataset

    samples = []
    for sample in ShardDataset(urls, handler="skip"):
        samples.append(sample)
        if len(samples) == count:
            break
    return samples


def _reference_pass(pipeline: Any, samples: list[dict]) -> float:
    """CPU-ms per image of one pass of decode + transform over ``samples``.

    The garbage collector is off for the pass: a full collection walks every object of
    this process (torch's modules), unrelated to the work measured, and one falling in a
    short pass would make the reference look costlier than it is (and, in a forked copy,
    copy the whole heap)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.process_time()
        for sample in samples:
            pipeline.attempt(dict(sample))
        return (time.process_time() - start) * 1e3 / max(1, len(samples))
    finally:
        if enabled:
            gc.enable()


def _reference_ms(
    urls: Any, ds_kwargs: dict[str, Any], count: int = 128, *, budget_s: float = 2.0, processes: int = 1
) -> tuple[float, float]:
    """CPU-ms per image of decode + transform alone on one core, on the first samples
    (the median of up to three passes within ``budget_s``), and, with ``processes`` > 1,
    the same loop run in that many processes at once (0.0 when not measured)."""
    import torch

    from ..read.dataset import ShardDataset

    samples = _reference_samples(urls, count)
    pipeline = ShardDataset(urls, **{k: v for k, v in ds_kwargs.items() if k != "threads"}).pipeline(lambda e: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for sample in samples[:4]:  # warm-up (first-call imports and allocations)
            pipeline.attempt(dict(sample))
        passes: list[float] = []
        started = time.perf_counter()
        while len(passes) < 3 and (not passes or time.perf_counter() - started < budget_s):
            passes.append(_reference_pass(pipeline, samples))
        parallel = _parallel_reference_ms(pipeline, samples, processes) if processes > 1 else 0.0
        return statistics.median(passes), parallel
    finally:
        torch.set_num_threads(threads)


def _parallel_pass(pipeline: Any, samples: list[dict], barrier: Any, results: Any) -> None:
    import torch

    torch.set_num_threads(1)
    barrier.wait()
    results.put(_reference_pass(pipeline, samples))


def _parallel_reference_ms(pipeline: Any, samples: list[dict], processes: int) -> float:
    """The mean CPU-ms per image of ``processes`` forked copies of the reference pass run
    at once (0.0 where processes cannot be forked)."""
    if not sys.platform.startswith("linux"):
        return 0.0  # fork is the only start method that shares the samples cheaply, and safe only here
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(processes), context.SimpleQueue()
    procs = [
        context.Process(target=_parallel_pass, args=(pipeline, samples, barrier, results), daemon=True)
        for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    values = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    return sum(values) / len(values)


def diagnose(
    urls: Any,
    *,
    transform: Any = None,
    workers: int = 2,
    threads: int = 0,
    batch_size: int = 64,
    decode: str = "torch",
    decode_size: int | str | None = "auto",
    seconds: float = 5.0,
    field_name: str = "jpg;png;jpeg;webp",
) -> Diagnosis:
    """Run the loader over ``urls`` for about ``seconds`` and measure where time goes.

    ``transform`` is applied to the first image field of ``field_name``'s alternatives
    that a sample has (as ``{"jpg": transform}``); labels (``cls``) are kept when present.
    """
    import torch

    from ..decode.fuse import FusedFieldDecoder, FusedSamplePipeline
    from ..loader import ShardLoader
    from ..read.dataset import ShardDataset
    from .profiling import profiled

    if workers < 0 or threads < 0 or batch_size < 1 or seconds <= 0:
        raise ValueError("need workers >= 0, threads >= 0, batch_size >= 1 and seconds > 0")
    alternatives = [f for f in field_name.split(";") if f]
    transform_map = {f: transform for f in alternatives} if transform is not None else None
    ds_kwargs: dict[str, Any] = dict(
        decode=decode,
        decode_size=decode_size,
        transform=transform_map,
        threads=threads,
        fields=field_name,
        handler="warn",
    )
    ds = ShardDataset(urls, **ds_kwargs)
    fused = isinstance(ds.stages()[0], (FusedFieldDecoder, FusedSamplePipeline))
    loader = ShardLoader(
        profiled(ds), batch_size=batch_size, num_workers=workers, persistent_workers=False, pin_memory=False
    )
    threads_before = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)  # like a DataLoader worker
    warmup = max(1, workers)  # the first batch from each worker carries the start-up: not counted
    images = 0
    first: dict[str, Any] = {}
    try:
        iterator = iter(loader)
        started = time.perf_counter()
        for n, batch in enumerate(iterator, 1):
            if n <= warmup:
                if n == warmup:
                    first = {
                        "t": time.perf_counter(),
                        "stats": loader.stats(),
                        "main": rusage_cpu(resource.RUSAGE_SELF),
                        "workers": children_cpu_snapshot(),
                    }
                continue
            images += len(batch[0]) if isinstance(batch, (tuple, list)) else batch_size
            if time.perf_counter() - started >= seconds:
                break
        if not first or images == 0:
            raise ShardkitError(
                f"the data ran out before {warmup + 1} batches: doctor needs more samples than "
                f"{warmup} batch(es) of {batch_size} (try a smaller --batch)"
            )
        elapsed = time.perf_counter() - first["t"]
        stats = loader.stats()
        main_cpu = rusage_cpu(resource.RUSAGE_SELF) - first["main"]
        worker_cpu = children_cpu_since(first["workers"])
        del iterator  # its workers stop now (not persistent: the loader keeps no iterator)
    finally:
        torch.set_num_threads(threads_before)
    per = 1e3 / images
    stage_ms = {
        stage: (stats.get(f"{stage}_us", 0) - first["stats"].get(f"{stage}_us", 0)) / 1e3 / images for stage in STAGES
    }
    if workers == 0:
        worker_cpu, main_cpu = main_cpu, 0.0
    wait = (stats.get("wait_s", 0.0) - first["stats"].get("wait_s", 0.0)) / elapsed if elapsed else 0.0
    reference, parallel = _reference_ms(urls, ds_kwargs, processes=workers)
    diagnosis = Diagnosis(
        images=images,
        seconds=elapsed,
        workers=workers,
        threads=threads,
        cores=os.cpu_count() or 1,
        stage_ms=stage_ms,
        worker_cpu_ms=worker_cpu * per,
        main_cpu_ms=main_cpu * per,
        wait_fraction=wait,
        reference_ms=reference,
        # the size in force; "exact", or an "auto" with nothing to derive, as asked (both resolve to None)
        decode_size=decode_size if ds.decoding.exact or ds.decode_size is None else ds.decode_size,
        fused=fused,
        region_decode=fused and region_support()[0],
        exact_crop=fused and ds.decoding.exact,
        planar_opencv=opencv_available(),
        parallel_reference_ms=parallel,
        memory_reused=int(stats.get("memory_reused", 0)) - int(first["stats"].get("memory_reused", 0)),
        memory_fresh=int(stats.get("memory_fresh", 0)) - int(first["stats"].get("memory_fresh", 0)),
    )
    diagnosis.bound, diagnosis.advice = conclude(
        diagnosis, remote="://" in str(urls), cached=bool(ds.options.cache_dir)
    )
    return diagnosis


def conclude(d: Diagnosis, *, remote: bool = False, cached: bool = False) -> tuple[str, list[str]]:
    """Which stage bounds the run ("io", "decode", "transform", "collate", "overhead" (per-sample
    work in the workers outside those stages) or "transfer" (idle workers)), and advice."""
    streams = max(1, d.workers)
    busy = {s: d.stage_ms[s] for s in ("read", "decode", "transform", "collate", "other")}
    worker_ms = sum(busy.values())
    # Wall time per image the workers had; if they were busy for little of it, the time went
    # into handing batches over and the main process.
    available_ms = d.seconds * 1e3 * streams / max(1, d.images)
    advice: list[str] = []
    if d.workers > 0 and worker_ms < 0.5 * available_ms:
        bound = "transfer"
        advice.append(
            "workers are idle most of the time: batches wait on the hand-over to the main process; "
            "use fewer workers with threads= (decode threads in one process), or larger batches"
        )
    else:
        stage = max(busy, key=busy.get)  # type: ignore[arg-type]
        bound = {"read": "io", "other": "overhead"}.get(stage, stage)
    if bound == "io":
        advice.append(
            "reading dominates: "
            + (
                "add cache_dir= (a local cache) for remote shards"
                if remote and not cached
                else "check the disk/network throughput; more workers overlap reads"
            )
        )
    if bound in ("decode", "transform"):
        parallel = max(1, d.workers) * max(1, d.threads)  # decode streams running at once
        if parallel < d.cores:
            advice.append(
                f"{d.workers} worker(s) x {d.threads} thread(s) on {d.cores} cores: use "
                f"num_workers={d.cores} (or threads= per worker) to use every core"
            )
        elif parallel > d.cores and d.workers > 1:
            advice.append(
                f"{d.workers} workers x {max(1, d.threads)} thread(s) on {d.cores} cores: more decode "
                "streams than cores only adds overhead"
            )
        if d.decode_size is None and not d.fused:
            advice.append(
                "decode_size='exact' fuses a leading RandomResizedCrop and decodes only its region (the same "
                "values); decode_size='auto' also decodes JPEGs smaller (close values)"
            )
        if d.fused and not d.region_decode:
            advice.append(
                "fused crops decode whole JPEGs: pip install 'shardkit[turbo]' (libjpeg-turbo 3) decodes only the crop"
            )
        if bound == "transform":
            advice.append(
                "the transform costs more than decoding: move float conversion/normalisation to the GPU "
                "and keep uint8 batches"
            )
    if bound == "overhead":
        advice.append("per-sample Python work dominates (small images?): larger batches or threads= help")
    if bound == "collate":
        advice.append("collating dominates: return fixed-size uint8 tensors so batches stack without lists")
    if not d.planar_opencv and d.stage_ms.get("collate", 0.0) >= 0.02:
        split = "numpy splits images into NCHW planes: "
        if importlib.util.find_spec("cv2") is None:
            advice.append(split + "pip install 'shardkit[opencv]' does that copy several times faster")
        else:  # another OpenCV wheel beside it would break both
            advice.append(split + "the installed cv2 is unusable (see the log); repair it")
    overhead = (d.worker_cpu_ms + d.main_cpu_ms) / d.reference_ms if d.reference_ms else 0.0
    shared = (d.worker_cpu_ms + d.main_cpu_ms) / d.parallel_reference_ms if d.parallel_reference_ms else overhead
    if overhead > 1.3 and shared > 1.15:
        advice.append(
            f"the loader spends {overhead:.2f}x the CPU of decode+transform alone: per-image overhead "
            "(IPC, main process, dispatch); fewer workers with threads= may help"
        )
    elif overhead > 1.3:
        advice.append(
            f"{d.workers} processes doing decode+transform at once already cost {d.parallel_reference_ms:.2f} ms "
            f"per image against {d.reference_ms:.2f} on one core: the machine's cores are contended (other "
            "processes, shared caches); fewer workers with threads= may help"
        )
    if not advice:
        advice.append("nothing obvious to change")
    return bound, advice


def format_report(d: Diagnosis) -> str:
    """Human-readable report of a :class:`Diagnosis`."""
    lines = [
        f"{d.images:,} images in {d.seconds:.1f} s = {d.rate:,.0f} img/s "
        f"({d.workers} workers, {d.threads} threads, {d.cores} cores, decode_size={d.decode_size!r}"
        f"{', fused crop decode' if d.fused else ''}{' at full resolution' if d.exact_crop else ''}"
        f"{' of the crop region only' if d.region_decode else ''})",
        f"{'stage':12s} {'ms/img':>8s} {'share':>6s}",
    ]
    total = sum(d.stage_ms[s] for s in STAGES if s != "handoff") or 1.0
    names = {"read": "read/io", "other": "other", "handoff": "handoff"}
    for stage in STAGES:
        share = f"{d.stage_ms[stage] / total:6.0%}" if stage != "handoff" else "      "
        lines.append(f"{names.get(stage, stage):12s} {d.stage_ms[stage]:8.2f} {share}")
    lines.append(f"{'main process':12s} {d.main_cpu_ms:8.2f}        (CPU: receiving batches, the loop)")
    lines.append(f"waiting: the consumer waited {d.wait_fraction:.0%} of the run for data")
    total = d.worker_cpu_ms + d.main_cpu_ms
    ratio = total / d.reference_ms if d.reference_ms else 0.0
    lines.append(
        f"CPU ms/img: workers {d.worker_cpu_ms:.2f} + main {d.main_cpu_ms:.2f} = "
        f"{total:.2f}; decode+transform alone on one core {d.reference_ms:.2f} "
        f"({ratio:.2f}x)"
    )
    if d.parallel_reference_ms:
        lines.append(
            f"            the same loop in {d.workers} processes at once {d.parallel_reference_ms:.2f} "
            f"({total / d.parallel_reference_ms:.2f}x: the loader's own share; the rest is the cores' contention)"
        )
    if d.memory_reused or d.memory_fresh:
        lines.append(f"batch memory: {d.memory_reused} batches in reused memory, {d.memory_fresh} in new memory")
    lines.append(f"bound: {d.bound}")
    lines.extend(f"advice: {a}" for a in d.advice)
    return "\n".join(lines)
