"""The ``shardkit`` command line. Exit codes: 0 ok, 1 problems found, 2 usage error."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ShardkitError
from ..sizes import format_size
from .parser import build_parser
from .show import cmd_show

log = logging.getLogger("shardkit")


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and not args.json and sys.stderr.isatty()


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")
    elif not args.quiet:
        sys.stdout.write(text.rstrip("\n") + "\n")


# IngestOptions fields set from the flags of the same name (the dataset formats' layout).
_INGEST_FLAGS = (
    "images_key",
    "labels_key",
    "keys_key",
    "image_format",
    "shape",
    "dtype",
    "table",
    "image_column",
    "caption_column",
    "label_column",
    "key_column",
    "columns",
    "image_feature",
    "label_feature",
    "index",
    "labels",
    "allow_pickle",
)


def cmd_write(args: argparse.Namespace) -> int:
    from ..ingest import IngestOptions
    from ..writing.driver import write

    # Only the flags given: a dataset-format flag the source does not read is refused.
    layout = {k: getattr(args, k) for k in _INGEST_FLAGS if getattr(args, k) not in (None, False)}
    summary = write(
        args.src,
        args.dest,
        fmt=args.from_format,
        options=IngestOptions(**layout),
        shuffle=args.shuffle,
        seed=args.seed,
        resize=args.resize,
        quality=args.quality,
        validate=args.validate,
        strict=args.strict,
        max_pixels=args.max_pixels,
        workers=args.workers,
        part=args.part,
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
        what = "row(s)" if summary.columns else "file(s)"  # a table's inputs are its rows
        text += f"\nskipped {len(summary.skipped)} {what} that do not read or decode:"
        text += "".join(f"\n  {where}: {reason}" for where, reason in summary.skipped[:10])
        if len(summary.skipped) > 10:
            text += f"\n  ... and {len(summary.skipped) - 10} more (--json lists them all)"
    if summary.warned:
        text += (
            f"\nkept {len(summary.warned)} image(s) that decode with a warning (readers decode them too; "
            "--strict refuses them):"
        )
        text += "".join(f"\n  {where}: {warning}" for where, warning in summary.warned[:10])
        if len(summary.warned) > 10:
            text += f"\n  ... and {len(summary.warned) - 10} more (--json lists them all)"
    if summary.columns:
        groups: dict[str, list[str]] = {}
        for column, where in summary.columns.items():
            groups.setdefault(where, []).append(column)
        text += "\ncolumns: " + "; ".join(f"{', '.join(names)} -> {where}" for where, names in groups.items())
    if args.part:
        text += f"\npart {args.part[0]}/{args.part[1]} done; after every part: shardkit merge {args.dest}" + (
            f" --name {args.name}" if args.name != "data" else ""
        )
    else:
        text += f"\nread them with: ShardDataset({summary.pattern!r})  (manifest: {summary.manifest})"
    _out(args, summary.as_dict(), text)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..format.index import manifest_name
    from ..writing.merge import merge_parts
    from ..writing.result import shard_pattern

    manifest = merge_parts(args.dest, name=args.name)
    pattern = shard_pattern(args.dest, manifest.name, len(manifest.shards))
    path = os.path.join(args.dest, manifest_name(manifest.name))
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
    from ..read.urls import resolve_shards
    from ..writing.indexer import build_index

    manifest = build_index(resolve_shards(args.urls).urls, name=args.name, progress=_progress(args))
    _out(
        args,
        {"shards": len(manifest.shards), "samples": manifest.total_samples},
        f"indexed {len(manifest.shards)} shard(s), {manifest.total_samples:,} samples; "
        f"manifest {manifest.name}.manifest.json",
    )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from ..read.urls import resolve_shards
    from .inspect import describe, samples_of

    rows = []
    for sample in samples_of(resolve_shards(args.urls), join=args.join, join_wins=_wins(args)):
        rows.append({"url": sample["__url__"], **describe(sample)})
        if len(rows) >= args.n:
            break
    _out(args, rows, "\n".join(json.dumps(r, default=str) for r in rows))
    return 0


def _wins(args: argparse.Namespace) -> dict[str, int] | None:
    if args.join_wins and not args.join:
        raise ShardkitError("--join-wins decides between the parts of a join; there is no --join")
    return dict(args.join_wins) or None


def cmd_cat(args: argparse.Namespace) -> int:
    from ..read.urls import resolve_shards
    from .inspect import find_sample

    sample = find_sample(resolve_shards(args.urls), args.key, join=args.join, join_wins=_wins(args))
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

    report = verify(args.urls, decode=args.decode, progress=_progress(args), join=args.join)
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


def cmd_companion(args: argparse.Namespace) -> int:
    from ..writing.companion import write_companion

    flags = {"--key-column": args.key_column, "--caption-column": args.caption_column}
    flags.update({"--label-column": args.label_column, "--columns": args.columns})
    given = [flag for flag, value in flags.items() if value is not None]
    if given and args.table is None:
        raise ShardkitError(f"{', '.join(given)} name columns of --from TABLE; --fn has none")
    summary = write_companion(
        args.base,
        args.dest,
        _import_fn(args.fn) if args.fn else None,
        table=args.table,
        key_column=args.key_column,
        caption_column=args.caption_column,
        label_column=args.label_column,
        columns=args.columns,
        missing=args.missing,
        name=args.name,
        workers=args.workers,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=_progress(args),
    )
    text = (
        f"wrote a companion of {summary.shards} shard(s), {summary.samples:,} samples, "
        f"{format_size(summary.bytes)} in {summary.seconds:.1f} s ({summary.workers} worker(s))"
    )
    if summary.resumed_shards:
        text += f"\nresumed after {summary.resumed_shards} complete shard(s) already in {args.dest}"
    if summary.missing:
        text += f"\n{len(summary.missing)} key(s) without new fields (--missing {args.missing}), first: "
        text += ", ".join(f"{key} ({os.path.basename(shard)})" for shard, key in summary.missing[:5])
    if summary.unmatched:
        text += f"\n{len(summary.unmatched)} key(s) of the table are not in the base, first: "
        text += ", ".join(summary.unmatched[:5])
    text += f"\nread them with: ShardDataset(BASE, join=[{args.dest!r}])  (manifest: {summary.manifest})"
    _out(args, summary.as_dict(), text)
    return 0


def _import_fn(spec: str) -> Callable[..., Any]:
    """``MODULE:FUNCTION`` -> the function (the module is imported as Python imports it)."""
    import importlib

    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ShardkitError(f"--fn {spec!r}: expected MODULE:FUNCTION, e.g. mycaptions:caption")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ShardkitError(f"--fn {spec!r}: {e}") from None
    if not callable(fn):
        raise ShardkitError(f"--fn {spec!r} is not a function")
    return fn  # type: ignore[no-any-return]


def cmd_stats(args: argparse.Namespace) -> int:
    from .inspect import stats

    data = stats(args.urls)
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

    diagnosis = diagnose(
        args.urls,
        transform=make_transform(args.transform),
        workers=args.workers,
        threads=args.threads,
        batch_size=args.batch,
        decode_size=args.decode_size,
        seconds=args.seconds,
        field_name=args.field,
    )
    if args.plot:
        from .plot import plot_stage_times

        plot_stage_times(diagnosis, args.plot)
    _out(args, diagnosis.as_dict(), format_report(diagnosis))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "write": cmd_write,
    "merge": cmd_merge,
    "index": cmd_index,
    "ls": cmd_ls,
    "cat": cmd_cat,
    "verify": cmd_verify,
    "stats": cmd_stats,
    "companion": cmd_companion,
    "demo": cmd_demo,
    "doctor": cmd_doctor,
    "bench": cmd_bench,
    "show": cmd_show,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet and (args.json or args.verbose):
        parser.error(f"--quiet cannot be combined with {'--json' if args.json else '--verbose'}")
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="shardkit: %(levelname)s: %(message)s")
    if args.command in ("demo",):
        logging.getLogger("shardkit").setLevel(max(level, logging.INFO) if not args.verbose else level)
    try:
        return int(COMMANDS[args.command](args) or 0)
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
