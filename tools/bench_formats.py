"""Read the same images stored in nine formats through a torch DataLoader; compare speed.

One synthetic set (photo-like JPEGs, ~400x300, ~40-60 KB, cached under --cache) is
stored as: HDF5 (vlen uint8 bytes), a dense numpy memmap (256x256 uint8 pixels: how
numpy datasets are usually kept, so no JPEG decode there), LMDB (pickled
``(jpeg, label)`` values, the common conversion-script layout), SQLite (BLOB rows),
TFRecord (8 files of tf.train.Example), a binary file + text index, an ImageFolder tree,
and shardkit shards (ShardWriter). Each is read the way PyTorch code usually reads it:
map-style datasets opening the file/env/connection lazily in each worker (h5py, numpy
memmap, lmdb, sqlite3, the binary file), an IterableDataset split by file across workers
(TFRecord), torchvision's ImageFolder, and ShardDataset/ShardLoader for shardkit.

Every path does the same per-sample work: PIL decode -> RandomResizedCrop(224) ->
uint8 CHW tensor, batches of 64, --workers workers, no shuffling. A second pass per
format reads bytes only (no decode) to show the storage overhead that decode hides.
Rates are steady-state (workers started and files opened before the clock starts; one
timed epoch decoded, best of three bytes-only), best of --repeat rounds that interleave
the formats, so load from other processes spreads over all of them.

    python tools/bench_formats.py --count 2000 --workers 2 --cache /tmp/shardkit-bench-formats
"""

from __future__ import annotations

import argparse
import glob
import io
import logging
import os
import pickle
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import Pool
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.transforms.functional import pil_to_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardkit.ingest import tfrecord as tfr  # noqa: E402
from shardkit.ingest.protobuf import parse_example  # noqa: E402
from tests.tfrecord_writer import write_tfrecord  # noqa: E402

BATCH = 64
CLASSES = 100
DENSE = 256
TFRECORD_FILES = 8
_crop = transforms.RandomResizedCrop(224, antialias=True)


# -- per-sample work, identical for every format ------------------------------------------


def augment(picture: Image.Image) -> torch.Tensor:
    return pil_to_tensor(_crop(picture))


def decode_augment(data: bytes) -> torch.Tensor:
    return augment(Image.open(io.BytesIO(data)).convert("RGB"))


def pil_loader(path: str) -> Image.Image:  # torchvision's default loader, inlined
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def read_only(data: Any) -> int:
    """The 'no decode' variant: touch the bytes (or pixels) and return their size."""
    return len(data) if not isinstance(data, np.ndarray) else int(np.asarray(data).nbytes)


def file_size_loader(path: str) -> int:
    with open(path, "rb") as f:
        return read_only(f.read())


# -- synthetic images -----------------------------------------------------------------------


def _photo(seed: int, w: int = 400, h: int = 300) -> bytes:
    """Photo-like JPEG: smooth colour fields, blurry blobs and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-3, 3, 3)
        img[..., c] = 128 + 90 * np.sin(x / w * a * np.pi + p) * np.cos(y / h * b * np.pi)
    coarse = np.clip(rng.normal(128, 40, (h // 16 + 1, w // 16 + 1, 3)), 0, 255).astype(np.uint8)
    img += np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32) - 128
    img += rng.normal(0, rng.uniform(8, 11), (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _dense(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((DENSE, DENSE), Image.BILINEAR))


# -- building each format ---------------------------------------------------------------------


def build_all(cache: str, jpegs: list[bytes], labels: list[int]) -> dict[str, str]:
    """Write every format under ``cache`` (skipping those already there); name -> path."""
    import h5py
    import lmdb

    from shardkit.writing.writer import ShardWriter

    n = len(jpegs)
    paths: dict[str, str] = {}

    def step(name: str, path: str, build: Callable[[str], None]) -> None:
        paths[name] = path
        if os.path.exists(path):
            return
        tmp = path + ".part"
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(tmp):
            os.remove(tmp)
        t = time.perf_counter()
        build(tmp)
        os.rename(tmp, path)
        print(f"  built {name:<10} in {time.perf_counter() - t:5.1f}s", flush=True)

    def hdf5(path: str) -> None:
        with h5py.File(path, "w") as f:
            ds = f.create_dataset("images", (n,), dtype=h5py.vlen_dtype(np.uint8))
            for i, j in enumerate(jpegs):
                ds[i] = np.frombuffer(j, np.uint8)
            f["labels"] = np.array(labels, np.int64)

    def numpy_dense(path: str) -> None:
        os.makedirs(path)
        arr = np.lib.format.open_memmap(
            os.path.join(path, "images.npy"), mode="w+", dtype=np.uint8, shape=(n, DENSE, DENSE, 3)
        )
        with Pool(2) as pool:
            for i, pixels in enumerate(pool.imap(_dense, jpegs, chunksize=16)):
                arr[i] = pixels
        arr.flush()
        del arr
        np.save(os.path.join(path, "labels.npy"), np.array(labels, np.int64))

    def lmdb_env(path: str) -> None:
        env = lmdb.open(path, map_size=4 * sum(map(len, jpegs)) + (64 << 20))
        with env.begin(write=True) as txn:
            for i, (j, label) in enumerate(zip(jpegs, labels)):
                txn.put(f"{i:08d}".encode(), pickle.dumps((j, label)))
        env.close()

    def sqlite_db(path: str) -> None:
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE samples (id INTEGER PRIMARY KEY, image BLOB, label INTEGER)")
        conn.executemany(
            "INSERT INTO samples VALUES (?, ?, ?)", ((i, j, lab) for i, (j, lab) in enumerate(zip(jpegs, labels)))
        )
        conn.commit()
        conn.close()

    def tfrecords(path: str) -> None:
        os.makedirs(path)
        per = -(-n // TFRECORD_FILES)
        for k in range(TFRECORD_FILES):
            write_tfrecord(
                os.path.join(path, f"train-{k:05d}.tfrecord"),
                (
                    {"image/encoded": j, "image/class/label": lab}
                    for j, lab in zip(jpegs[k * per : (k + 1) * per], labels[k * per : (k + 1) * per])
                ),
            )

    def binary(path: str) -> None:
        os.makedirs(path)
        offset = 0
        with open(os.path.join(path, "data.bin"), "wb") as blob, open(os.path.join(path, "data.bin.idx"), "w") as index:
            for j, label in zip(jpegs, labels):
                blob.write(j)
                index.write(f"{offset} {len(j)} {label}\n")
                offset += len(j)

    def folder(path: str) -> None:
        for i, (j, label) in enumerate(zip(jpegs, labels)):
            os.makedirs(os.path.join(path, f"c{label:03d}"), exist_ok=True)
            with open(os.path.join(path, f"c{label:03d}", f"{i:08d}.jpg"), "wb") as f:
                f.write(j)

    def shards(path: str) -> None:
        with ShardWriter(path, shard_size="10MB") as writer:
            for i, (j, label) in enumerate(zip(jpegs, labels)):
                writer.write({"__key__": f"{i:08d}", "jpg": j, "cls": label})

    step("hdf5", os.path.join(cache, "set.h5"), hdf5)
    step("numpy", os.path.join(cache, "numpy"), numpy_dense)
    step("lmdb", os.path.join(cache, "lmdb"), lmdb_env)
    step("sqlite", os.path.join(cache, "set.db"), sqlite_db)
    step("tfrecord", os.path.join(cache, "tfrecord"), tfrecords)
    step("binary", os.path.join(cache, "binary"), binary)
    step("folder", os.path.join(cache, "folder"), folder)
    step("shardkit", os.path.join(cache, "shards"), shards)
    return paths


# -- the usual PyTorch readers ------------------------------------------------------------------


class H5Images(Dataset):
    def __init__(self, path: str, fn: Callable) -> None:
        import h5py

        self.path, self.fn, self.file = path, fn, None
        with h5py.File(path, "r") as f:
            self.labels = f["labels"][()]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if self.file is None:  # one handle per worker, opened after the fork
            import h5py

            self.file = h5py.File(self.path, "r")
            self.images = self.file["images"]
        return self.fn(self.images[i].tobytes()), int(self.labels[i])


class DenseNumpy(Dataset):
    def __init__(self, path: str, fn: Callable) -> None:
        self.path, self.fn, self.array = path, fn, None
        self.labels = np.load(os.path.join(path, "labels.npy"))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if self.array is None:
            self.array = np.load(os.path.join(self.path, "images.npy"), mmap_mode="r")
        pixels = np.array(self.array[i])
        out = augment(Image.fromarray(pixels)) if self.fn is decode_augment else read_only(pixels)
        return out, int(self.labels[i])


class LMDBImages(Dataset):
    def __init__(self, path: str, fn: Callable) -> None:
        import lmdb

        self.path, self.fn, self.env = path, fn, None
        env = lmdb.open(path, readonly=True, lock=False)
        self.n = env.stat()["entries"]
        env.close()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if self.env is None:
            import lmdb

            self.env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False)
        with self.env.begin() as txn:
            data, label = pickle.loads(txn.get(f"{i:08d}".encode()))
        return self.fn(data), label


class SQLiteImages(Dataset):
    def __init__(self, path: str, fn: Callable) -> None:
        self.path, self.fn, self.conn = path, fn, None
        with sqlite3.connect(path) as conn:
            self.n = conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if self.conn is None:
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        data, label = self.conn.execute("SELECT image, label FROM samples WHERE id = ?", (i,)).fetchone()
        return self.fn(data), label


class TFRecordImages(IterableDataset):
    """Files dealt round-robin to workers, as TFRecord readers for PyTorch do."""

    def __init__(self, path: str, fn: Callable, verify: bool) -> None:
        self.files = sorted(glob.glob(os.path.join(path, "*.tfrecord")))
        self.fn, self.verify = fn, verify

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        files = self.files[info.id :: info.num_workers] if info else self.files
        for path in files:
            for _, _, data in tfr.iter_records(path, verify=self.verify):
                features = parse_example(data)
                yield self.fn(features["image/encoded"][0]), features["image/class/label"][0]


class BinaryImages(Dataset):
    def __init__(self, path: str, fn: Callable) -> None:
        self.path, self.fn, self.fd = os.path.join(path, "data.bin"), fn, None
        index = np.loadtxt(self.path + ".idx", dtype=np.int64, ndmin=2)
        self.offsets, self.lengths, self.labels = index[:, 0], index[:, 1], index[:, 2]

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self.fd, int(self.lengths[i]), int(self.offsets[i]))
        return self.fn(data), int(self.labels[i])


def make_loader(name: str, path: str, fn: Callable, workers: int) -> Any:
    """The DataLoader (or ShardLoader) for one format."""
    common = dict(
        batch_size=BATCH,
        num_workers=workers,
        shuffle=False,
        prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0,
    )
    if name == "hdf5":
        return DataLoader(H5Images(path, fn), **common)
    if name == "numpy":
        return DataLoader(DenseNumpy(path, fn), **common)
    if name == "lmdb":
        return DataLoader(LMDBImages(path, fn), **common)
    if name == "sqlite":
        return DataLoader(SQLiteImages(path, fn), **common)
    if name.startswith("tfrecord"):
        common.pop("shuffle")
        return DataLoader(TFRecordImages(path, fn, verify=name == "tfrecord+crc"), **common)
    if name == "binary":
        return DataLoader(BinaryImages(path, fn), **common)
    if name == "folder":
        loader = file_size_loader if fn is read_only else pil_loader
        dataset = ImageFolder(path, loader=loader, transform=None if fn is read_only else augment)
        return DataLoader(dataset, **common)
    from shardkit.loader import ShardLoader
    from shardkit.read.dataset import ShardDataset

    if name == "shardkit":  # same PIL decode as every other row
        dataset = ShardDataset(path, decode=None, transform={"jpg": fn, "cls": int}, fields="jpg cls")
    else:  # "shardkit-own": shardkit's decoder (simplejpeg when installed)
        dataset = ShardDataset(path, decode="pil", transform={"jpg": augment}, fields="jpg cls")
    return ShardLoader(dataset, batch_size=BATCH, num_workers=workers)


def _cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of a process and all its descendants, from /proc.

    Other processes on a shared machine slow the wall clock, not this: it keeps the
    per-sample cost comparable when the machine is busy. NaN where /proc lacks it.
    """
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(_cpu_seconds(int(child)) for child in f.read().split())
    except (OSError, IndexError, ValueError):
        return float("nan") if pid == os.getpid() else 0.0
    return total


def measure(loader: Any, passes: int) -> tuple[float, float, int]:
    """(best samples/s, least CPU ms per sample, samples per epoch) over ``passes`` epochs.

    Workers persist across epochs. A warm-up (one batch, then the in-flight prefetch is
    drained by the next ``iter``) starts them and opens the files, so each timed epoch
    measures steady reading with everything produced in it counted.
    """
    for _ in loader:
        break
    best, cpu_best, total = 0.0, float("inf"), 0
    for _ in range(passes):
        total = 0
        cpu = _cpu_seconds()
        start = time.perf_counter()
        for images, _ in loader:
            total += len(images)
        best = max(best, total / (time.perf_counter() - start))
        cpu_best = min(cpu_best, (_cpu_seconds() - cpu) * 1e3 / total)
    return best, cpu_best, total


def disk_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="images in the synthetic set")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--cache", default="/tmp/shardkit-bench-formats", help="where sets are built")
    parser.add_argument("--repeat", type=int, default=2, help="rounds over all formats (best round kept per format)")
    parser.add_argument("--formats", default=None, help="comma-separated subset to run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cache = os.path.join(args.cache, f"n{args.count}")
    os.makedirs(cache, exist_ok=True)
    images_file = os.path.join(cache, "jpegs.pkl")
    if not os.path.exists(images_file):
        t = time.perf_counter()
        with Pool(2) as pool:
            jpegs = pool.map(_photo, range(args.count), chunksize=32)
        labels = np.random.default_rng(0).integers(0, CLASSES, args.count).tolist()
        with open(images_file + ".part", "wb") as f:
            pickle.dump((jpegs, labels), f)
        os.rename(images_file + ".part", images_file)
        print(f"generated {args.count} JPEGs in {time.perf_counter() - t:.1f}s", flush=True)
    with open(images_file, "rb") as f:
        jpegs, labels = pickle.load(f)
    sizes = np.array([len(j) for j in jpegs])
    print(
        f"{len(jpegs)} JPEGs 400x300, {sizes.mean() / 1e3:.1f} KB mean "
        f"({sizes.min() / 1e3:.0f}-{sizes.max() / 1e3:.0f} KB), {args.workers} workers, "
        f"batch {BATCH}, torch {torch.__version__}",
        flush=True,
    )
    paths = build_all(cache, jpegs, labels)
    paths["tfrecord+crc"] = paths["tfrecord"]
    paths["shardkit-own"] = paths["shardkit"]
    order = [
        "shardkit",
        "shardkit-own",
        "hdf5",
        "numpy",
        "lmdb",
        "sqlite",
        "tfrecord",
        "tfrecord+crc",
        "binary",
        "folder",
    ]
    if args.formats:
        order = [f for f in order if f in args.formats.split(",")]

    # Rounds interleave the formats so that load from other processes on the machine
    # spreads over all of them; each format keeps its best round.
    nan = float("nan")
    results: dict[str, list[float]] = {name: [0.0, 0.0, float("inf"), float("inf")] for name in order}
    for round_ in range(args.repeat):
        print(f"round {round_ + 1}/{args.repeat}", flush=True)
        for name in order:
            r = results[name]
            for slot, fn in enumerate((decode_augment, read_only)):
                if name == "shardkit-own" and fn is read_only:
                    r[slot], r[slot + 2] = nan, nan
                    continue
                loader = make_loader(name, paths[name], fn, args.workers)
                rate, cpu, total = measure(loader, 1 if fn is decode_augment else 3)
                del loader
                if total != len(jpegs):
                    raise SystemExit(f"{name}: read {total} samples per epoch, expected {len(jpegs)}")
                r[slot], r[slot + 2] = max(r[slot], rate), min(r[slot + 2], cpu)
            print(
                f"  {name:<13} decoded {r[0]:6.0f}/s {r[2]:5.2f} CPU ms/sample; "
                f"bytes only {r[1]:6.0f}/s {r[3]:6.3f} CPU ms/sample",
                flush=True,
            )

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if a == a and b == b else "-"

    def number(x: float, fmt: str) -> str:
        return format(x, fmt) if x == x else "-"

    base = results.get("shardkit", [nan] * 4)
    print(f"\nload average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(
        "\n| format | decode+RRC samples/s | x shardkit | CPU ms/sample | x shardkit "
        "| bytes-only samples/s | x shardkit | CPU ms/sample | on disk |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    notes = {
        "numpy": " (dense 256x256, no JPEG decode)",
        "shardkit-own": " (decode='pil': its own decoder)",
        "tfrecord": " (no CRC check)",
        "tfrecord+crc": " (CRCs checked)",
    }
    for name, (rate, raw, cpu, raw_cpu) in results.items():
        size = disk_size(paths[name]) / 1e6
        # "x shardkit": how many times faster (rate) / cheaper (CPU) shardkit is.
        print(
            f"| {name}{notes.get(name, '')} | {rate:.0f} | {ratio(base[0], rate)} | {cpu:.2f} "
            f"| {ratio(cpu, base[2])} | {number(raw, '.0f')} | {ratio(base[1], raw)} "
            f"| {number(raw_cpu, '.3f')} | {size:.0f} MB |"
        )


if __name__ == "__main__":
    main()
