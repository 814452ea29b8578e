#!/usr/bin/env python3
"""Train straight from an HTTP server, keeping downloaded shards in a bounded local cache.

What it shows:

- ``ShardDataset("http://host/data-{000000..000009}.tar", cache_dir=..., cache_size=...)``:
  the sample counts come from ``data.manifest.json`` beside the shards (one small GET),
  each shard is downloaded once into the cache (shared by all DataLoader workers and by
  other training processes on the machine, LRU-bounded by ``cache_size``), and every
  later epoch reads the local copies.
- For the self-contained run it serves a generated shard folder with Python's own
  ``http.server`` on 127.0.0.1 (a server that ignores Range requests, which the cache
  makes irrelevant) and counts the requests it gets: epoch 0 downloads every shard,
  later epochs fetch no shard bytes at all.

Run (CPU, < 1 minute)::

    python examples/stream_http.py
    python examples/stream_http.py --no-cache          # every epoch downloads again

A real bucket or CDN (public, or with headers via ShardDataset(headers=...))::

    python examples/stream_http.py --num-classes 1000 \\
        --url "https://example.com/imagenet/train-{000000..001023}.tar" \\
        --cache-dir /scratch/shard-cache --cache-size 200GB

The script prints one ``RESULT {...}`` JSON line per epoch (used by tests/test_examples.py).
"""

from __future__ import annotations

import argparse
import collections
import functools
import http.server
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import ClassVar

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import train_classifier as tc  # noqa: E402  (model, augmentation, demo data)

from shardkit.loader import ShardLoader  # noqa: E402
from shardkit.read.dataset import ShardDataset  # noqa: E402


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Python's static file handler, quiet, counting requests per file."""

    requests: ClassVar[collections.Counter] = collections.Counter()
    lock: ClassVar[threading.Lock] = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802
        with self.lock:
            self.requests[self.path.rsplit("/", 1)[-1]] += 1
        super().do_GET()

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


def serve(folder: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``folder`` on 127.0.0.1 (a free port) from a background thread."""
    handler = functools.partial(CountingHandler, directory=folder)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def shard_requests() -> int:
    with CountingHandler.lock:
        return sum(n for name, n in CountingHandler.requests.items() if name.endswith(".tar"))


def main() -> int:
    p = argparse.ArgumentParser(description="Train from shards over HTTP with a local cache")
    p.add_argument(
        "--url",
        help="shard URL pattern, e.g. 'https://host/train-{000000..000099}.tar' "
        "(default: serve a generated demo set on 127.0.0.1)",
    )
    p.add_argument("--cache-dir", help="shard cache folder (default: a temp dir)")
    p.add_argument("--cache-size", default="1GB", help="cache bound, e.g. 50GB (default 1GB)")
    p.add_argument("--no-cache", action="store_true", help="stream without caching")
    p.add_argument("--count", type=int, default=300, help="images in the generated demo set")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=0, help="at most this many steps per epoch (0 = all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--model", default="tiny")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--shuffle", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)

    tmp = tempfile.mkdtemp(prefix="shardkit-http-")
    server = None
    try:
        url = args.url
        if url is None:
            folder = tc.make_demo_shards(tmp, count=args.count)
            n = len([f for f in os.listdir(folder) if f.endswith(".tar")])
            server, base = serve(folder)
            url = f"{base}/data-{{000000..{n - 1:06d}}}.tar"
            print(f"serving {n} generated shards: {url}", flush=True)
        cache_dir = None if args.no_cache else (args.cache_dir or os.path.join(tmp, "cache"))
        dataset = ShardDataset(
            url,
            shuffle=args.shuffle,
            seed=args.seed,
            even=None,
            decode="torch",
            transform={"jpg": tc.build_augment(args.size)},
            cache_dir=cache_dir,
            cache_size=args.cache_size if cache_dir else None,
            handler="warn",
        )
        loader = ShardLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
        model = tc.build_model(args.model, tc.num_classes_of(loader, args.num_classes))
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        normalize = tc.build_normalize()
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)
            before = shard_requests()
            steps, seen, t0 = 0, 0, time.perf_counter()
            loss = torch.tensor(float("nan"))
            for batch in loader:
                loss = F.cross_entropy(model(normalize(batch["jpg"])), batch["cls"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                seen += len(batch["cls"])
                if args.steps and steps >= args.steps:
                    break
            stats = loader.stats()
            result = {
                "epoch": epoch,
                "steps": steps,
                "samples": seen,
                "seconds": round(time.perf_counter() - t0, 2),
                "stats": stats,
            }
            line = (
                f"epoch {epoch}: {steps} steps, {seen} samples, loss {loss.item():.3f}, "
                f"read {stats['bytes_read'] / 1e6:.2f} MB, waited {stats['wait_s']:.2f} s for data"
            )
            if server is not None:
                result["shard_requests"] = shard_requests() - before
                line += f", {result['shard_requests']} shard downloads from the server"
            if cache_dir:
                cached = sum(
                    os.path.getsize(os.path.join(root, f))
                    for root, _, files in os.walk(os.path.join(cache_dir, "objects"))
                    for f in files
                )
                result["cache_bytes"] = cached
                line += f", cache holds {cached / 1e6:.2f} MB"
            print(line, flush=True)
            print("RESULT " + json.dumps(result), flush=True)
        del loader  # stop the workers before the server goes away
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
