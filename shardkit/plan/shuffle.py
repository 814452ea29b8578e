"""The shuffle buffer, and where it stands after ``k`` emissions without replaying them.

:func:`shuffled` is the buffer itself: each item enters; once ``buffer`` items are held,
one chosen by ``rng.randrange(buffer)`` leaves; at the end the rest leave in
``rng.shuffle`` order. Its choices depend only on the RNG and the count, so the planner
knows the emitted order of a stream of ``n`` positions without data.

:func:`resume_shuffle` jumps to the state after ``k`` emissions (how far the stream read,
which positions are still held, the RNG) in numpy: Python's ``random.Random`` is a
Mersenne Twister whose state numpy's ``MT19937`` accepts, and ``randrange(buffer)`` is the
top ``buffer.bit_length()`` bits of 32-bit outputs, rejecting values ``>= buffer``. The
emissions after the jump are exactly those of an uninterrupted :func:`shuffled`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")
CHUNK = 1 << 20  # 32-bit draws per numpy step (8 MB), whatever the stream length
FAST_MAX_BUFFER = 1 << 32  # randrange(n) takes one 32-bit draw per try up to here


def shuffled(items: Iterable[T], buffer: int, rng: random.Random) -> Iterator[T]:
    """The shuffle buffer itself, over any iterable (used on data when counts are unknown)."""
    if buffer <= 1:
        yield from items
        return
    held: list[T] = []
    for item in items:
        held.append(item)
        if len(held) >= buffer:
            j = rng.randrange(len(held))
            held[j], held[-1] = held[-1], held[j]
            yield held.pop()
    rng.shuffle(held)
    yield from held


def shuffle_order(n: int, buffer: int, rng: random.Random) -> Iterator[int]:
    """Emission order of positions 0..n-1 through a shuffle buffer of ``buffer`` items.

    An item is emitted at most ``buffer - 1`` steps after it is read, which bounds memory.
    """
    return shuffled(range(n), buffer, rng)


@dataclass(frozen=True)
class ShuffleState:
    """A stream of ``n`` positions after ``emitted`` emissions through the buffer.

    Positions ``< read`` were read; of those, ``held`` (in the buffer's slot order) are
    not emitted yet. ``rng_state`` continues the RNG (None once the end's shuffle ran:
    then ``held`` leave in their order).
    """

    n: int
    buffer: int
    emitted: int
    read: int
    held: tuple[int, ...]
    rng_state: tuple | None

    def holes(self) -> np.ndarray:
        """The held positions, ascending: read but still to be emitted."""
        return np.sort(np.asarray(self.held, dtype=np.int64))

    def remaining_count(self) -> int:
        return self.n - self.emitted

    def order(self) -> Iterator[int]:
        """The positions still to be emitted, in emission order."""
        if self.rng_state is None:
            yield from self.held
            return
        rng = random.Random()
        rng.setstate(self.rng_state)
        if self.buffer <= 1:
            yield from range(self.read, self.n)
            return
        held = list(self.held)
        for item in range(self.read, self.n):
            held.append(item)
            if len(held) >= self.buffer:
                j = rng.randrange(len(held))
                held[j], held[-1] = held[-1], held[j]
                yield held.pop()
        rng.shuffle(held)
        yield from held


def read_count(n: int, buffer: int, emitted: int) -> int:
    """Positions a stream of ``n`` has read once it emitted ``emitted`` (0 for none)."""
    if buffer <= 1 or emitted == 0:
        return emitted
    return min(n, emitted + buffer - 1)


def resume_shuffle(n: int, buffer: int, rng_seed: str, emitted: int) -> ShuffleState:
    """The shuffle of ``n`` positions seeded by ``rng_seed`` after ``emitted`` emissions."""
    if emitted > n:
        raise ValueError(f"resume state says {emitted} samples were emitted but the plan has only {n}")
    if emitted < 0:
        raise ValueError(f"resume state says {emitted} samples were emitted")
    rng = random.Random(rng_seed)
    if buffer <= 1 or emitted == 0:
        return ShuffleState(n, buffer, emitted, emitted, (), rng.getstate())
    steady = max(0, n - buffer + 1)  # emissions while the buffer is full
    steps = min(emitted, steady)
    slots = np.arange(min(n, buffer - 1), dtype=np.int64)  # held[j], in list order
    if steps:
        _advance(rng, buffer, steps, slots)
    if emitted <= steady:
        return ShuffleState(n, buffer, emitted, emitted + buffer - 1, tuple(slots.tolist()), rng.getstate())
    held = slots.tolist()
    rng.shuffle(held)
    return ShuffleState(n, buffer, emitted, n, tuple(held[emitted - steady :]), None)


def _advance(rng: random.Random, buffer: int, steps: int, slots: np.ndarray) -> None:
    """Run ``steps`` full-buffer steps: step ``t`` reads position ``buffer - 1 + t`` and
    ``j = rng.randrange(buffer)`` picks what leaves; the new item takes slot ``j``
    unless it leaves at once (``j == buffer - 1``). Updates ``slots`` and ``rng``."""
    if buffer > FAST_MAX_BUFFER:  # never in practice: a buffer that large does not fit in memory
        _advance_slowly(rng, buffer, steps, slots)
        return
    bits = buffer.bit_length()
    version, internal, gauss = rng.getstate()
    gen = np.random.MT19937()
    gen.state = {
        "bit_generator": "MT19937",
        "state": {"key": np.array(internal[:624], np.uint32), "pos": internal[624]},
    }
    done = 0
    while done < steps:
        want = steps - done
        saved = gen.state
        size = min(CHUNK, int(want * (1 << bits) / buffer) + 64)
        draws = gen.random_raw(size) >> np.uint64(32 - bits)
        accepted = np.flatnonzero(draws < buffer)
        if len(accepted) > want:  # went past the last step: redraw exactly up to it
            gen.state = saved
            gen.random_raw(int(accepted[want - 1]) + 1)
            accepted = accepted[:want]
        _write_last(slots, draws[accepted].astype(np.int64), done, buffer)
        done += len(accepted)
    state = gen.state["state"]
    rng.setstate((version, tuple(int(x) for x in state["key"]) + (int(state["pos"]),), gauss))


def _write_last(slots: np.ndarray, choice: np.ndarray, first_step: int, buffer: int) -> None:
    """Apply steps ``first_step...`` with choices ``choice`` to ``slots``: the last step
    writing a slot decides what it holds. Those are nearly always within the last few
    ``buffer * log(buffer)`` steps, so look there first."""
    tail = len(choice)
    window = min(tail, 16 * buffer)
    while True:
        part = choice[tail - window :][::-1]
        kept = np.flatnonzero(part < buffer - 1)
        written, first = np.unique(part[kept], return_index=True)
        if len(written) == buffer - 1 or window == tail:
            steps = first_step + tail - 1 - kept[first]
            slots[written] = buffer - 1 + steps
            return
        window = min(tail, window * 4)


def _advance_slowly(rng: random.Random, buffer: int, steps: int, slots: np.ndarray) -> None:
    for t in range(steps):
        j = rng.randrange(buffer)
        if j < buffer - 1:
            slots[j] = buffer - 1 + t
