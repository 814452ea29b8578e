"""An order-keeping, bounded thread map (decoding and file reads release the GIL)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, *, window: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` on ``threads`` threads, results in input order.

    At most ``window`` (default ``4 * threads``) items are in flight, so memory stays
    flat however long ``items`` is. Exceptions surface at the item that raised them.
    """
    if threads <= 1:
        yield from map(fn, items)
        return
    window = window or 4 * threads
    with ThreadPoolExecutor(threads, thread_name_prefix="shardkit") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
