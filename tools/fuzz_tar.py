#!/usr/bin/env python
"""Coverage-guided fuzzing of the tar reader and the sample grouper with atheris.

    pip install atheris
    python tools/fuzz_tar.py -atheris_runs=200000
    python tools/fuzz_tar.py -max_total_time=300 [-artifact_prefix=fuzz-out/] [CORPUS_DIR ...]

Seeded from a few valid shards (ustar, GNU long names, pax with global headers, base-256
sizes, links, directories; see ``tests/bad_corpus.seed_shards``), written into a
temporary corpus folder unless corpus folders are given. Half of the mutations are
followed by a checksum fix-up pass, so mutated headers get past the checksum test and
reach the size/pax/name code behind it.

Every input must satisfy:

- ``iter_samples`` either returns or raises ShardFormatError (anything else is a crash);
- the payload bytes returned never exceed the input size;
- the three window paths agree exactly (same samples, or the same error message):
  mmap (a memfd), an in-memory BytesIO, and a trickle stream returning <= 7 bytes a read;
- after a clean parse, re-reading from each sample's start offset up to the end offset
  (what the index-driven reader does) gives the same samples;
- no input takes more than ``-timeout`` seconds (default here 10) or ``-rss_limit_mb``
  (libFuzzer's 2048 MB): a huge declared size must not be allocated.

Findings are written by libFuzzer as ``crash-*``/``timeout-*``/``oom-*`` files (see
``-artifact_prefix``); replay one with ``python tools/fuzz_tar.py FILE``.
"""

from __future__ import annotations

import io
import os
import random
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import atheris

with atheris.instrument_imports(include=["shardkit.format.tar", "shardkit.format.samples"]):
    from shardkit.format.samples import iter_samples

from tests.bad_corpus import Trickle, fix_checksums, parse_or_error, seed_shards
from tests.bad_corpus import memfd as _memfd


def _run(stream) -> tuple[list[tuple[int, int, dict]], str | None]:
    return parse_or_error(stream, url="fuzz")


def check(data: bytes) -> None:
    results = [_run(io.BytesIO(data)), _run(Trickle(data))]
    if data:
        results.append(_run(_memfd(data)))
    first = results[0]
    for other in results[1:]:
        if other != first:
            raise AssertionError(
                f"window paths disagree: {first[1]!r} vs {other[1]!r}, {len(first[0])} vs {len(other[0])} samples"
            )
    samples, error = first
    payload = sum(len(v) for _, _, s in samples for k, v in s.items() if not k.startswith("__"))
    if payload > len(data):
        raise AssertionError(f"{payload} payload bytes from {len(data)} input bytes")
    if error is None and samples:
        # The index-driven read: from the first sample's offset to the last one's end.
        start, stop = samples[0][0], samples[-1][1]
        again = list(iter_samples(io.BytesIO(data[start:]), url="fuzz", start=start, stop=stop))
        if again != [s for _, _, s in samples]:
            raise AssertionError("re-reading with start/stop offsets gives other samples")


def test_one_input(data: bytes) -> None:
    check(data)


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    out = atheris.Mutate(data, max_size)
    if rng.random() < 0.5:
        out = fix_checksums(out)[:max_size]
    return out


def main() -> None:
    argv = list(sys.argv)
    if not any(a.startswith("-timeout=") for a in argv):
        argv.append("-timeout=10")
    if not any(a.startswith("-max_len=") for a in argv):
        argv.append("-max_len=65536")
    if not [a for a in argv[1:] if not a.startswith("-")]:
        corpus = tempfile.mkdtemp(prefix="fuzz-tar-corpus-")
        for i, seed in enumerate(seed_shards()):
            with open(os.path.join(corpus, f"seed-{i}.tar"), "wb") as f:
                f.write(seed)
        argv.append(corpus)
        print(f"seed corpus: {corpus}", file=sys.stderr)
    atheris.Setup(argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
