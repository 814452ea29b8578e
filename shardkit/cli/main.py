"""The ``shardkit`` command line. Exit codes: 0 ok, 1 problems found, 2 usage error."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..errors import ShardkitError
from ..sizes import format_size

log = logging.getLogger("shardkit")

EPILOG = "exit codes: 0 ok, 1 problems found (or an error), 2 usage error"


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and not args.json and sys.stderr.isatty()


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")
    elif not args.quiet:
        sys.stdout.write(text.rstrip("\n") + "\n")


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace("x", ",").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; e.g. 1000,64,64,3") from None


def cmd_write(args: argparse.Namespace) -> int:
    from ..ingest import IngestOptions
    from ..writing.merge import parse_part
    from ..writing.parallel import write_source

    options = IngestOptions(
        images_key=args.images_key,
        labels_key=args.labels_key,
        keys_key=args.keys_key,
        image_format=args.format,
        quality=args.quality or 95,
        shape=args.shape,
        dtype=args.dtype,
        table=args.table,
        image_column=args.image_column,
        label_column=args.label_column,
        key_column=args.key_column,
        image_feature=args.image_feature,
        label_feature=args.label_feature,
        index=args.index,
        labels=args.labels,
        allow_pickle=args.allow_pickle,
        strict=args.strict,
        validate=args.validate,
        max_pixels=args.max_pixels,
    )
    if args.workers is not None and args.workers < 1:
        raise ValueError("--workers must be at least 1")
    summary = write_source(
        args.src,
        args.dest,
        fmt=args.from_format,
        options=options,
        shuffle=args.shuffle,
        seed=args.seed,
        resize=args.resize,
        quality=args.quality,
        workers=args.workers,
        part=parse_part(args.part) if args.part else None,
        name=args.name,
        shard_size=args.shard_size,
        max_count=args.max_count,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=_progress(args),
    )
    text = (
        f"wrote {summary.shards} shard(s), {summary.samples:,} samples, {format_size(summary.bytes)} "
        f"in {summary.seconds:.1f} s ({summary.rate:,.0f} samples/s, "
        f"{summary.bytes / 1e6 / max(summary.seconds, 1e-9):.0f} MB/s, {summary.workers} worker(s))"
    )
    if summary.resumed_shards:
        text += f"\nresumed after {summary.resumed_shards} complete shard(s) already in {args.dest}"
    if summary.skipped:
        text += f"\nskipped {len(summary.skipped)} file(s) that do not read or decode:"
        text += "".join(f"\n  {where}: {reason}" for where, reason in summary.skipped[:10])
        if len(summary.skipped) > 10:
            text += f"\n  ... and {len(summary.skipped) - 10} more (--json lists them all)"
    if args.part:
        text += f"\npart {args.part} done; after every part: shardkit merge {args.dest}" + (
            f" --name {args.name}" if args.name != "data" else ""
        )
    else:
        text += f"\nread them with: ShardDataset({summary.pattern!r})  (manifest: {summary.manifest})"
    _out(args, summary.as_dict(), text)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..writing.merge import merge_parts
    from ..writing.parallel import shard_pattern

    manifest = merge_parts(args.dest, name=args.name)
    pattern = shard_pattern(args.dest, args.name, len(manifest.shards))
    path = os.path.join(args.dest, f"{args.name}.manifest.json")
    _out(
        args,
        {
            "shards": len(manifest.shards),
            "samples": manifest.total_samples,
            "bytes": manifest.total_bytes,
            "pattern": pattern,
            "manifest": path,
        },
        f"merged: {len(manifest.shards)} shard(s), {manifest.total_samples:,} samples, "
        f"{format_size(manifest.total_bytes)}\nread them with: ShardDataset({pattern!r})  (manifest: {path})",
    )
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from .inspect import build_index

    manifest = build_index(args.urls, name=args.name, progress=_progress(args))
    _out(
        args,
        {"shards": len(manifest.shards), "samples": manifest.total_samples},
        f"indexed {len(manifest.shards)} shard(s), {manifest.total_samples:,} samples; "
        f"manifest {manifest.name}.manifest.json",
    )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from ..read.urls import resolve_shards
    from .inspect import describe, shard_samples

    rows = []
    for url in resolve_shards(args.url).urls:
        for sample in shard_samples(url):
            rows.append({"url": url, **describe(sample)})
            if len(rows) >= args.n:
                break
        if len(rows) >= args.n:
            break
    _out(args, rows, "\n".join(json.dumps(r, default=str) for r in rows))
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    from ..read.urls import resolve_shards
    from .inspect import find_sample

    sample = find_sample(resolve_shards(args.url), args.key)
    fields = [k for k in sample if not k.startswith("__")]
    field = args.field or (fields[0] if len(fields) == 1 else None)
    if field is None:
        raise ShardkitError(f"sample {args.key!r} has fields {', '.join(fields)}; choose one with --field")
    if field not in sample:
        raise ShardkitError(f"sample {args.key!r} has no field {field!r} (it has {', '.join(fields)})")
    sys.stdout.buffer.write(sample[field])
    sys.stdout.flush()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .inspect import verify

    report = verify(args.urls if len(args.urls) > 1 else args.urls[0], decode=args.decode, progress=_progress(args))
    data = {
        "ok": report.ok,
        "shards": report.shards,
        "samples": report.samples,
        "bytes": report.bytes,
        "problems": [{"url": p.url, "message": p.message} for p in report.problems],
    }
    lines = [f"PROBLEM {p.url}: {p.message}" for p in report.problems]
    lines.append(
        f"{'OK' if report.ok else 'FAILED'}: {report.shards} shard(s), {report.samples:,} samples, "
        f"{format_size(report.bytes)}, {len(report.problems)} problem(s)"
    )
    _out(args, data, "\n".join(lines))
    return 0 if report.ok else 1


def cmd_stats(args: argparse.Namespace) -> int:
    from .inspect import stats

    data = stats(args.urls if len(args.urls) > 1 else args.urls[0])
    lines = [f"{data['shards']} shard(s), {data['samples']:,} samples"]
    lines.append("fields: " + ", ".join(f"{k} x{v}" for k, v in sorted(data["fields"].items())))
    if data["labels"]:
        names = data["classes"]
        lines.append(
            "labels: "
            + ", ".join(f"{names[k] if names and 0 <= k < len(names) else k}: {v}" for k, v in data["labels"].items())
        )
    for s in data["per_shard"]:
        lines.append(f"  {s['url']}: {s['samples']} samples, {format_size(sum(s['field_bytes'].values()))} payload")
    _out(args, data, "\n".join(lines))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(count=args.count, workers=args.workers, keep=args.keep, progress=_progress(args))


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args.bench_args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import diagnose, format_report, make_transform

    text: str = args.decode_size
    decode_size: int | str | None = None if text == "none" else text
    if text not in ("none", "auto"):
        try:
            decode_size = int(text)
        except ValueError:
            raise ValueError(f"--decode-size must be auto, none or an integer, got {text!r}") from None
    diagnosis = diagnose(
        args.url,
        transform=make_transform(args.transform),
        workers=args.workers,
        threads=args.threads,
        batch_size=args.batch,
        decode_size=decode_size,
        seconds=args.seconds,
        field_name=args.field,
    )
    _out(args, diagnosis.as_dict(), format_report(diagnosis))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument("--verbose", "-v", action="store_true", help="debug logging")

    parser = argparse.ArgumentParser(
        prog="shardkit",
        description="Write image datasets into tar shards and inspect them.",
        epilog="example: shardkit write ./imagenet/train ./shards --shard-size 1GB\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"shardkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            parents=[common],
            epilog=f"example: {example}\n{EPILOG}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    w = add(
        "write",
        "turn an image folder, list/CSV/JSONL file or another dataset format into shards",
        "shardkit write ./train ./shards --shard-size 1GB --workers 4",
    )
    w.add_argument(
        "src",
        help="image folder (class subfolders), list file (path<TAB>label), .csv, .jsonl, "
        ".h5, .npy/.npz, LMDB, SQLite, .tfrecord, or binary file + index",
    )
    w.add_argument("dest", help="output folder")
    w.add_argument(
        "--shard-size",
        default="1GB",
        help="max shard size: 1GB, 512MiB, 1.5G, 100k, bytes (k/M/G = 1000-based, KiB/MiB/GiB = 1024-based)",
    )
    w.add_argument("--max-count", type=int, help="max samples per shard")
    w.add_argument("--name", default="data", help="shard name prefix (default: data)")
    w.add_argument("--from", dest="from_format", help="source format (default: detected)")
    w.add_argument("--shuffle", action="store_true", help="write samples in shuffled order")
    w.add_argument("--seed", type=int, default=0, help="seed for --shuffle")
    w.add_argument("--resize", type=int, metavar="MAX_SIDE", help="re-encode images to at most this side")
    w.add_argument("--quality", type=int, help="JPEG quality when re-encoding")
    w.add_argument(
        "--workers",
        type=int,
        help="processes reading, checking and encoding inputs (default: "
        "CPU cores); the output is byte-identical for any number",
    )
    w.add_argument("--strict", action="store_true", help="an unreadable image is an error, not a skip")
    w.add_argument(
        "--no-validate",
        dest="validate",
        action="store_false",
        help="store images without decoding them first (trusted data only; faster)",
    )
    w.add_argument("--max-pixels", type=int, help="decompression-bomb limit for the check (default: PIL's)")
    w.add_argument("--overwrite", action="store_true", help="replace shards of the same name in DEST")
    w.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted write of the same input and options (keeps its complete shards)",
    )
    w.add_argument(
        "--part",
        metavar="I/N",
        help="write only part I of N (0-based) for many machines; then run shardkit merge DEST once",
    )
    g = w.add_argument_group("dataset formats (HDF5, numpy, LMDB, SQLite, TFRecord, binary)")
    g.add_argument("--images-key"), g.add_argument("--labels-key"), g.add_argument("--keys-key")
    g.add_argument(
        "--format",
        default="png",
        choices=("png", "jpg", "npy"),
        help="how dense pixel arrays are stored (default png, lossless)",
    )
    g.add_argument("--shape", type=_shape, help="raw memmap shape, e.g. 1000,64,64,3")
    g.add_argument("--dtype", help="raw memmap dtype, e.g. uint8")
    g.add_argument("--table"), g.add_argument("--image-column"), g.add_argument("--label-column")
    g.add_argument("--key-column"), g.add_argument("--image-feature"), g.add_argument("--label-feature")
    g.add_argument("--index", help="index file of a binary source")
    g.add_argument("--labels", help="labels .npy for a numpy source")
    g.add_argument("--allow-pickle", action="store_true", help="unpickle LMDB values (trusted data only)")
    w.set_defaults(func=cmd_write)

    m = add(
        "merge",
        "after shardkit write --part I/N on every part: check all parts are complete and write one manifest",
        "shardkit merge /shared/shards",
    )
    m.add_argument("dest", help="the folder the parts were written to")
    m.add_argument("--name", default="data", help="shard name prefix (default: data)")
    m.set_defaults(func=cmd_merge)

    i = add(
        "index",
        "write .idx sidecars and a manifest for existing tar shards (e.g. from webdataset)",
        "shardkit index 'shards/train-{000000..000099}.tar'",
    )
    i.add_argument("urls", nargs="+")
    i.add_argument("--name", help="manifest name (default: from the shard names)")
    i.set_defaults(func=cmd_index)

    ls = add("ls", "list samples and their fields", "shardkit ls shards/data.manifest.json -n 5")
    ls.add_argument("url")
    ls.add_argument("-n", type=int, default=20, help="how many samples (default 20)")
    ls.set_defaults(func=cmd_ls)

    c = add("cat", "write one field of one sample to stdout", "shardkit cat shards/ 000042 --field jpg > x.jpg")
    c.add_argument("url")
    c.add_argument("key")
    c.add_argument("--field", help="extension of the field (default: the only one)")
    c.set_defaults(func=cmd_cat)

    v = add(
        "verify",
        "parse every shard and check it against the manifest and indexes",
        "shardkit verify shards/data.manifest.json --decode",
    )
    v.add_argument("urls", nargs="+")
    v.add_argument("--decode", action="store_true", help="also decode every image")
    v.set_defaults(func=cmd_verify)

    s = add("stats", "samples, bytes, field types and label histogram per shard", "shardkit stats shards/")
    s.add_argument("urls", nargs="+")
    s.set_defaults(func=cmd_stats)

    d = add("demo", "generate images, shard them, stream them, compare with small files", "shardkit demo")
    d.add_argument("--count", type=int, default=1000, help="images to generate (default 1000)")
    d.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    d.add_argument("--keep", action="store_true", help="keep the temporary folder")
    d.set_defaults(func=cmd_demo)

    dr = add(
        "doctor",
        "run shards through the loader for a few seconds and say where the time goes",
        "shardkit doctor 'shards/data-{000000..000009}.tar' --transform rrc224+flip --workers 4",
    )
    dr.add_argument("url", help="shards: pattern, folder, manifest, http(s):// or s3://")
    dr.add_argument(
        "--transform",
        default="rrc224+flip",
        help="augmentation preset: none, rrc224, rrc224+flip, resize256+center224 (default rrc224+flip)",
    )
    dr.add_argument(
        "--workers",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="DataLoader worker processes (default: cores, at most 8)",
    )
    dr.add_argument("--threads", type=int, default=0, help="decode threads per worker (default 0)")
    dr.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    dr.add_argument("--decode-size", default="auto", help="auto (default), none or a shorter side in pixels")
    dr.add_argument("--seconds", type=float, default=5.0, help="how long to run (default 5)")
    dr.add_argument("--field", default="jpg;png;jpeg;webp", help="image field alternatives (default jpg;png;jpeg;webp)")
    dr.set_defaults(func=cmd_doctor)

    b = add(
        "bench",
        "benchmark shardkit against ImageFolder and webdataset (see tools/bench.py)",
        "shardkit bench -- --count 2000",
    )
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    b.set_defaults(func=cmd_bench)

    from .show import add_show_parser

    add_show_parser(sub, parents=[common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="shardkit: %(levelname)s: %(message)s")
    if args.command in ("demo",):
        logging.getLogger("shardkit").setLevel(max(level, logging.INFO) if not args.verbose else level)
    try:
        return int(args.func(args) or 0)
    except ShardkitError as e:
        sys.stderr.write(f"shardkit {args.command}: error: {e}\n")
        return 1
    except (ValueError, TypeError) as e:
        if args.verbose:
            raise
        sys.stderr.write(f"shardkit {args.command}: error: {e}\n")
        return 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        sys.stderr.write(f"shardkit {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
