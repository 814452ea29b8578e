"""Human sizes: parse "1GB", "512MiB", "1.5G", "100k" and format byte counts.

Units: k/M/G/T and kB/MB/GB/TB are powers of 1000 (SI, like disk vendors and S3 bills);
KiB/MiB/GiB/TiB are powers of 1024. A bare number is bytes. Case does not matter for the
SI letters ("1gb" == "1GB").
"""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Return a byte count from an int or a human size string.

    >>> parse_size("1GB"), parse_size("512MiB"), parse_size("1.5G"), parse_size("100k")
    (1000000000, 536870912, 1500000000, 100000)
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"size must not be negative: {value!r}")
        return int(value)
    match = _SIZE_RE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"not a size: {value!r} (use e.g. 1GB, 512MiB, 1.5G, 100k or a byte count; "
            "k/M/G/T are powers of 1000, KiB/MiB/GiB/TiB powers of 1024)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """Format a byte count with SI units: 1234567 -> '1.23 MB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
