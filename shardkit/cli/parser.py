"""The ``shardkit`` command line's grammar: commands, flags, their help and their types.

Every value a flag cannot take is an argparse type error, so it exits 2 (a usage error)
before any work starts; :mod:`shardkit.cli.main` runs the commands.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from .. import __version__
from ..sizes import parse_size
from .show import add_show_parser

EPILOG = "exit codes: 0 ok, 1 problems found (or an error), 2 usage error"


def shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace("x", ",").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; e.g. 1000,64,64,3") from None


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (anything else is a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def part(text: str) -> tuple[int, int]:
    from ..writing.merge import parse_part

    try:
        return parse_part(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def quality(text: str) -> int:
    value = at_least(1)(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"JPEG quality goes from 1 to 100, got {value}")
    return value


def decode_size(text: str) -> int | str | None:
    if text == "none":
        return None
    if text in ("auto", "exact"):
        return text
    try:
        return at_least(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be auto, exact, none or a positive integer, got {text!r}") from None


def column_list(text: str) -> tuple[str, ...]:
    """Comma-separated column names ('' for none)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if text.strip() and not names:
        raise argparse.ArgumentTypeError(f"no column names in {text!r}")
    return names


SHARDS_HELP = "shards: one or more files, brace patterns, globs, folders, manifests, http(s):// or s3:// URLs"
JOIN_HELP = "a companion set of SHARDS (its manifest or folder) whose fields to add; repeat for several"


def winner(text: str) -> tuple[str, int]:
    """``FIELD=PART`` of --join-wins: the part (0 the base, 1 the first --join...) whose FIELD is kept."""
    field, sep, number = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"expected FIELD=PART, e.g. txt=1, got {text!r}")
    return field, at_least(0)(number)


def add_join(p: argparse.ArgumentParser, *, wins: bool = True) -> None:
    p.add_argument("--join", action="append", default=[], metavar="COMPANION", help=JOIN_HELP)
    if wins:
        p.add_argument(
            "--join-wins",
            action="append",
            default=[],
            type=winner,
            metavar="FIELD=PART",
            help="for a field two parts hold: the part whose value is shown (0 the base, 1 the first --join, ...)",
        )


def build_parser() -> argparse.ArgumentParser:
    from ..ingest import FORMATS  # the names only: no format module is imported

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
        help="image folder (class subfolders), list file (path<TAB>label), table (.csv, .tsv, .jsonl, "
        ".parquet or a folder/pattern of them), .h5, .npy/.npz, LMDB, SQLite, .tfrecord, or binary file + index",
    )
    w.add_argument("dest", help="output folder")
    w.add_argument(
        "--shard-size",
        type=size,
        default="1GB",
        help="max shard size: 1GB, 512MiB, 1.5G, 100k, bytes (k/M/G = 1000-based, KiB/MiB/GiB = 1024-based)",
    )
    w.add_argument("--max-count", type=at_least(1), help="max samples per shard")
    w.add_argument("--name", default="data", help="shard name prefix (default: data)")
    w.add_argument("--from", dest="from_format", choices=tuple(FORMATS), help="source format (default: detected)")
    w.add_argument(
        "--shuffle", action="store_true", help="write samples in shuffled order (image files, CSV/TSV/JSONL tables)"
    )
    w.add_argument("--seed", type=int, help="seed for --shuffle (default 0)")
    w.add_argument(
        "--resize",
        type=at_least(1),
        metavar="MAX_SIDE",
        help="re-encode images to at most this side (image files, tables)",
    )
    w.add_argument(
        "--quality",
        type=quality,
        help="JPEG quality (1-100) when re-encoding images of image files or tables (all become JPEG), "
        "or of dense arrays stored with --format jpg",
    )
    w.add_argument(
        "--workers",
        type=at_least(1),
        help="writer processes that read, check and encode the inputs (default: CPU cores, or 1 "
        "when they would have nothing to do: a dataset format, or a table holding its images, with --no-validate); "
        "the output is byte-identical for any number",
    )
    w.add_argument(
        "--strict",
        action="store_true",
        help="an unreadable image is an error, not a skip; so is one that decodes only with a "
        "decoder warning (kept and counted otherwise)",
    )
    w.add_argument(
        "--no-validate",
        dest="validate",
        action="store_false",
        help="store images without decoding them first (trusted data only; faster)",
    )
    w.add_argument(
        "--max-pixels", type=at_least(1), help="decompression-bomb limit for the decode check (default: PIL's)"
    )
    again = w.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace shards of the same name in DEST")
    again.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted write of the same input and options (keeps its complete shards)",
    )
    w.add_argument(
        "--part",
        type=part,
        metavar="I/N",
        help="write only part I of N (0-based) for many machines; then run shardkit merge DEST once",
    )
    t = w.add_argument_group(
        "tables (CSV, TSV, JSONL, Parquet; every column is kept: image -> KEY.jpg, caption -> KEY.txt, "
        "label -> KEY.cls, the rest -> KEY.json)"
    )
    t.add_argument(
        "--image-column",
        help="column of the images: paths, bytes or Hugging Face images, or a list of them (KEY.0.jpg, "
        "KEY.1.jpg...) (default: the one image column, else path/file/filename/image...); "
        "SQLite: column of the image bytes (default: image)",
    )
    t.add_argument("--caption-column", help="column of the captions, stored as KEY.txt (default: caption/text/txt)")
    t.add_argument(
        "--label-column",
        help="column of the class labels, stored as KEY.cls (default: label/class/cls/target; SQLite: label)",
    )
    t.add_argument(
        "--key-column",
        help="column of the sample keys: unique, no '/' or '.' (default: row numbers; SQLite: key, else the rowid)",
    )
    t.add_argument(
        "--columns",
        type=column_list,
        metavar="A,B,...",
        help="the columns to keep in KEY.json (default: every column without another role; '' keeps none)",
    )
    g = w.add_argument_group("dataset formats (HDF5, numpy, LMDB, SQLite, TFRecord, binary)")
    g.add_argument("--images-key", help="HDF5 dataset or .npz array of the images (default: images, else data)")
    g.add_argument("--labels-key", help="HDF5 dataset or .npz array of the labels (default: labels, if present)")
    g.add_argument("--keys-key", help="HDF5 dataset or .npz array of sample ids (default: keys, if present)")
    g.add_argument(
        "--format",
        dest="image_format",
        choices=("png", "jpg", "npy"),
        help="how dense pixel arrays are stored (default png, lossless)",
    )
    g.add_argument("--shape", type=shape, help="raw memmap shape, e.g. 1000,64,64,3")
    g.add_argument("--dtype", help="raw memmap dtype, e.g. uint8")
    g.add_argument("--table", help="SQLite table (default: the only table, or the only one with the image column)")
    g.add_argument("--image-feature", help="TFRecord feature of the image (default: image/encoded, else image)")
    g.add_argument("--label-feature", help="TFRecord feature of the label (default: image/class/label, else label)")
    g.add_argument("--index", help="index file of a binary source")
    g.add_argument("--labels", help="labels .npy for a numpy source")
    g.add_argument("--allow-pickle", action="store_true", help="unpickle LMDB values (trusted data only)")

    m = add(
        "merge",
        "after shardkit write --part I/N on every part: check all parts are complete and write one manifest",
        "shardkit merge /shared/shards",
    )
    m.add_argument("dest", help="the folder the parts were written to")
    m.add_argument(
        "--name", help="shard name prefix (default: the one dataset whose parts are in DEST; several are listed)"
    )

    i = add(
        "index",
        "write .idx sidecars and a manifest for existing tar shards (e.g. from webdataset)",
        "shardkit index 'shards/train-{000000..000099}.tar'",
    )
    i.add_argument("urls", nargs="+", metavar="SHARDS", help="local shards: files, brace patterns, globs or a folder")
    i.add_argument("--name", help="manifest name (default: from the shard names)")

    ls = add("ls", "list samples and their fields", "shardkit ls shards/*.tar -n 5")
    ls.add_argument("urls", nargs="+", metavar="SHARDS", help=SHARDS_HELP)
    ls.add_argument("-n", type=at_least(1), default=20, help="how many samples (default 20)")
    add_join(ls)

    c = add("cat", "write one field of one sample to stdout", "shardkit cat shards/ 000042 --field jpg > x.jpg")
    c.add_argument("urls", nargs="+", metavar="SHARDS", help=SHARDS_HELP)
    c.add_argument("key", help="the sample's key (see shardkit ls)")
    c.add_argument("--field", help="extension of the field (default: the only one)")
    add_join(c)

    v = add(
        "verify",
        "parse every shard and check it against the manifest and indexes (and a companion against its base)",
        "shardkit verify shards/data.manifest.json --decode --join captions/",
    )
    v.add_argument("urls", nargs="+", metavar="SHARDS", help=SHARDS_HELP)
    v.add_argument("--decode", action="store_true", help="also decode every image")
    v.add_argument(
        "--join",
        action="append",
        default=[],
        metavar="COMPANION",
        help="a companion set of SHARDS to verify too, and against them: base manifest sha256, shards, "
        "keys in order; repeat for several",
    )

    co = add(
        "companion",
        "write new fields for an existing shard set (captions, labels, embeddings) without rewriting it",
        "shardkit companion shards/ captions/ --from captions.parquet --key-column key",
    )
    co.add_argument(
        "base", help="the base set: its manifest (NAME.manifest.json) or folder, local, http(s):// or s3://"
    )
    co.add_argument("dest", help="output folder of the companion set")
    source = co.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from",
        dest="table",
        metavar="TABLE",
        help="a .csv, .tsv, .jsonl or .parquet table, one row per key: the caption column becomes txt, "
        "a class column cls, the others json",
    )
    source.add_argument(
        "--fn",
        metavar="MODULE:FUNCTION",
        help="a function of the raw base sample returning a dict of new fields (imported from MODULE)",
    )
    co.add_argument("--key-column", help="the table's column of base keys (default: key)")
    co.add_argument("--caption-column", help="the table's captions, stored as KEY.txt (default: caption/text/txt)")
    co.add_argument(
        "--label-column",
        help="the table's class labels, stored as KEY.cls: indices, or names of the base's classes "
        "(default: label/class/cls/target)",
    )
    co.add_argument(
        "--columns",
        type=column_list,
        metavar="A,B,...",
        help="the table's columns to keep in KEY.json (default: every column without another role; '' keeps "
        "none, e.g. for label fixes)",
    )
    co.add_argument(
        "--missing",
        choices=("error", "skip", "empty"),
        default="error",
        help="a base key without a row (or fn returning None): error (default), skip (a marker keeps the "
        "place; joined reads leave the sample out) or empty (joined reads keep it: the table's text and "
        "json fields empty, else no new field)",
    )
    co.add_argument("--name", help="the companion's manifest name (default: the base's)")
    co.add_argument(
        "--workers",
        type=at_least(1),
        help="processes running --fn (default: CPU cores; a table: 1); the output is byte-identical for any number",
    )
    co_again = co.add_mutually_exclusive_group()
    co_again.add_argument("--overwrite", action="store_true", help="replace a companion of the same name in DEST")
    co_again.add_argument("--resume", action="store_true", help="finish an interrupted companion write")

    s = add("stats", "samples, bytes, field types and label histogram per shard", "shardkit stats shards/")
    s.add_argument("urls", nargs="+", metavar="SHARDS", help=SHARDS_HELP)

    d = add("demo", "generate images, shard them, stream them, compare with small files", "shardkit demo")
    d.add_argument("--count", type=at_least(1), default=1000, help="images to generate (default 1000)")
    d.add_argument(
        "--workers", type=at_least(0), default=2, help="DataLoader worker processes that read the shards (default 2)"
    )
    d.add_argument("--keep", action="store_true", help="keep the temporary folder")

    dr = add(
        "doctor",
        "run shards through the loader for a few seconds and say where the time goes",
        "shardkit doctor 'shards/data-{000000..000009}.tar' --transform rrc224+flip --workers 4",
    )
    dr.add_argument("urls", nargs="+", metavar="SHARDS", help=SHARDS_HELP)
    dr.add_argument(
        "--transform",
        default="rrc224+flip",
        help="augmentation preset: none, rrc224, rrc224+flip, resize256+center224 (default rrc224+flip)",
    )
    dr.add_argument(
        "--workers",
        type=at_least(0),
        default=min(os.cpu_count() or 1, 8),
        help="DataLoader worker processes (default: cores, at most 8; 0: the main process)",
    )
    dr.add_argument("--threads", type=at_least(0), default=0, help="decode threads per worker (default 0)")
    dr.add_argument("--batch", type=at_least(1), default=64, help="batch size (default 64)")
    dr.add_argument(
        "--decode-size",
        type=decode_size,
        default="auto",
        help="auto (default), exact (crop fused at full size: the values of none), none or a shorter side",
    )
    dr.add_argument("--seconds", type=seconds, default=5.0, help="how long to run (default 5)")
    dr.add_argument("--field", default="jpg;png;jpeg;webp", help="image field alternatives (default jpg;png;jpeg;webp)")
    dr.add_argument("--plot", metavar="PNG", help="also draw the time per image of each stage as a bar chart")

    b = add(
        "bench",
        "benchmark shardkit against ImageFolder and webdataset (its --workers: DataLoader workers)",
        "shardkit bench -- --count 2000",
    )
    b.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see: shardkit bench -- --help)"
    )

    add_show_parser(sub, parents=[common])
    return parser
