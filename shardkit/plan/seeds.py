"""The seeds of every random stream the planner and the workers draw from, made in one place.

A stream is named by a domain and the numbers that make it unique (seed, epoch, stage
or pass, rank, worker, ...), joined with ``:``: ``rng_seed(7, 2, 0, 1, 3)`` is
``"shardkit:7:2:0:1:3"``. ``random.Random`` takes the string as it is (hashed with
SHA-512, stable across processes and Python runs); NumPy takes :func:`int_seed` of it.
Changing a string changes the order of every run that depends on it, so the formats here
are part of the resume contract.
"""

from __future__ import annotations

import hashlib


def rng_seed(*parts: int | str, domain: str = "shardkit") -> str:
    """The seed string of one random stream: ``domain`` and ``parts`` joined by ``:``."""
    return ":".join([domain, *(str(p) for p in parts)])


def int_seed(text: str) -> int:
    """A 64-bit integer seed from a seed string (for NumPy generators)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
