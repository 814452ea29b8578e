"""Per-shard columns of a manifest, held compactly: a few arrays and byte blocks, not
one Python object per shard and field.

A manifest of 580k shards (LAION-5B at 10k samples a shard) kept as a list of per-shard
objects costs hundreds of MB and seconds to build. Here each column is a read-only
``Sequence`` whose items are made on access and which compares equal to a list of the
same items, so code written against lists keeps working:

- :class:`IntColumn`: int64 values (sample counts, byte sizes) in one numpy array;
  ``np.asarray(column)`` is the array itself, no copy.
- :class:`Digests`: sha256 per shard, 32 bytes each in one block; hex text on access,
  ``None`` where unknown.
- :class:`PatternNames` / :class:`PackedNames`: shard file names, as a numbering pattern
  (``train-000000.tar``, ``train-000001.tar``, ...) when they follow one, else packed
  UTF-8; :class:`NamesBuilder` picks which while names arrive.
- :class:`FieldSets`: each shard's field list, as an index into the distinct lists.
"""

from __future__ import annotations

import binascii
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np

_ITER_CHUNK = 1 << 16  # items turned into Python objects at a time when iterating
_SHOWN = 8  # items a repr shows


def _same_items(column: Sequence[Any], other: object) -> bool:
    """``column == other`` as a list of the same items would answer it."""
    if not isinstance(other, Sequence) or isinstance(other, (str, bytes, bytearray)):
        return False
    return len(column) == len(other) and all(a == b for a, b in zip(column, other))


def _repr(name: str, column: Sequence[Any]) -> str:
    items = [repr(x) for x in column[:_SHOWN]]
    if len(column) > _SHOWN:
        items.append(f"... {len(column)} items")
    return f"{name}([{', '.join(items)}])"


class IntColumn(Sequence[int]):
    """int64 values, one per shard, in one read-only numpy array."""

    __hash__ = None  # type: ignore[assignment]  # compares like a list, so unhashable like one

    def __init__(self, values: Iterable[int] | np.ndarray) -> None:
        if isinstance(values, (np.ndarray, IntColumn, list, tuple)):
            data = np.asarray(values)
        else:
            data = np.fromiter(values, dtype=np.int64)
        self.array = np.array(data, dtype=np.int64).reshape(-1)  # a copy: the caller's array stays theirs
        self.array.setflags(write=False)

    @property
    def total(self) -> int:
        return int(self.array.sum())

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> IntColumn: ...
    def __getitem__(self, index: int | slice) -> int | IntColumn:
        if isinstance(index, slice):
            return IntColumn(self.array[index])
        return int(self.array[index])

    def __iter__(self) -> Iterator[int]:
        for start in range(0, len(self.array), _ITER_CHUNK):
            yield from self.array[start : start + _ITER_CHUNK].tolist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, IntColumn):
            return bool(np.array_equal(self.array, other.array))
        return _same_items(self, other)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.array if dtype is None else self.array.astype(dtype, copy=False)
        return out.copy() if copy else out

    def __repr__(self) -> str:
        return _repr("IntColumn", self)

    def __reduce__(self) -> tuple[Any, ...]:
        return IntColumn, (self.array,)


class Digests(Sequence["str | None"]):
    """sha256 digests, one per shard: 32 bytes each in one block, ``known[i]`` False
    where a shard has none (``known`` None: all known). When none is known the block is
    empty: a manifest without digests costs one flag per shard."""

    SIZE = 32
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, block: bytes, known: np.ndarray | None = None) -> None:
        if known is not None:
            known = np.array(known, dtype=bool).reshape(-1)
            if not known.any():
                block = b""
            elif len(block) != self.SIZE * len(known):
                raise ValueError(f"{len(block)} bytes for {len(known)} digests of {self.SIZE} bytes")
            if len(known) and known.all():
                known = None
        if len(block) % self.SIZE:
            raise ValueError(f"a digest block holds whole {self.SIZE}-byte digests, got {len(block)} bytes")
        self.block = bytes(block)
        self.known = known

    @classmethod
    def unknown(cls, count: int) -> Digests:
        """``count`` shards, no digest known."""
        return cls(b"", np.zeros(count, dtype=bool))

    @classmethod
    def from_hex(cls, values: Iterable[str | None]) -> Digests:
        """From hex strings (64 digits each) or None; raises ValueError naming a bad one."""
        block = bytearray()
        known = bytearray()
        for i, value in enumerate(values):
            known.append(value is not None)
            block += bytes(cls.SIZE) if value is None else parse_digest(value, i)
        return cls(bytes(block), np.frombuffer(bytes(known), dtype=bool))

    @property
    def any_known(self) -> bool:
        return self.known is None or bool(self.known.any())

    @classmethod
    def from_base64(cls, text: str, *, start: int = 0, stop: int | None = None) -> Digests:
        """From ``text[start:stop]``: the 32-byte digests back to back, in standard base64.
        Decoded a slice at a time, so a long text is never copied whole; anything but
        canonical base64 is refused (ValueError)."""
        stop = len(text) if stop is None else stop
        block = bytearray()
        step = 4 * 65536  # base64 characters per slice: whole 4-character groups
        for at in range(start, stop, step):
            piece = text[at : min(at + step, stop)]
            try:
                data = binascii.a2b_base64(piece)
            except (binascii.Error, ValueError):
                data = None
            # a2b_base64 skips characters outside the alphabet: only a round trip is strict
            if data is None or binascii.b2a_base64(data, newline=False).decode("ascii") != piece:
                raise ValueError(f"sha256 digests are not base64 (characters {at - start}..{at - start + len(piece)})")
            block += data
        if len(block) % cls.SIZE:
            raise ValueError(f"{len(block)} bytes of sha256 digests are not whole {cls.SIZE}-byte digests")
        return cls(bytes(block))

    @property
    def all_known(self) -> bool:
        return self.known is None

    def base64(self) -> str:
        """All digests back to back, in base64 (unknown ones as zeros)."""
        return binascii.b2a_base64(self.block, newline=False).decode("ascii")

    def take(self, indices: Sequence[int] | np.ndarray) -> Digests:
        """The digests at ``indices``, in that order."""
        rows = np.asarray(indices, dtype=np.int64)
        known = None if self.known is None else self.known[rows]
        if not self.block:
            return Digests(b"", known)
        return Digests(np.frombuffer(self.block, dtype=np.uint8).reshape(-1, self.SIZE)[rows].tobytes(), known)

    def __len__(self) -> int:
        return len(self.known) if self.known is not None else len(self.block) // self.SIZE

    @overload
    def __getitem__(self, index: int) -> str | None: ...
    @overload
    def __getitem__(self, index: slice) -> Digests: ...
    def __getitem__(self, index: int | slice) -> str | None | Digests:
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"digest {index} of {n}")
        index %= n
        if self.known is not None and not self.known[index]:
            return None
        return self.block[index * self.SIZE : (index + 1) * self.SIZE].hex()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Digests):
            return list(self) == list(other)
        return _same_items(self, other)

    def __repr__(self) -> str:
        return _repr("Digests", self)


def parse_digest(value: object, index: int) -> bytes:
    """The 32 bytes of one sha256 given as 64 hex digits; ValueError naming shard ``index``."""
    if not isinstance(value, str) or len(value) != 2 * Digests.SIZE:
        raise ValueError(f"shard {index}: sha256 {value!r} is not 64 hex digits")
    try:
        return binascii.a2b_hex(value)
    except (binascii.Error, ValueError):
        raise ValueError(f"shard {index}: sha256 {value!r} is not 64 hex digits") from None


class PatternNames(Sequence[str]):
    """Names ``prefix + number + suffix`` for numbers ``start, start+1, ...``, each number
    zero-padded to ``digits`` digits (more when it needs them): ``data-000000.tar``..."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, prefix: str, suffix: str, *, digits: int, start: int = 0, count: int) -> None:
        if not 1 <= digits <= 64 or start < 0 or count < 0:
            raise ValueError(f"bad name pattern: digits={digits}, start={start}, count={count}")
        self.prefix, self.suffix, self.digits, self.start, self.length = prefix, suffix, digits, start, count

    def name(self, number: int) -> str:
        return f"{self.prefix}{number:0{self.digits}d}{self.suffix}"

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            first, stop, step = index.indices(self.length)
            if step == 1:
                n = max(0, stop - first)
                return PatternNames(self.prefix, self.suffix, digits=self.digits, start=self.start + first, count=n)
            return [self[i] for i in range(first, stop, step)]
        if not -self.length <= index < self.length:
            raise IndexError(f"name {index} of {self.length}")
        return self.name(self.start + index % self.length)

    def __iter__(self) -> Iterator[str]:
        return map(self.name, range(self.start, self.start + self.length))

    def __eq__(self, other: object) -> bool:
        return _same_items(self, other)

    def __repr__(self) -> str:
        return f"PatternNames({self.name(self.start)!r}... {self.length} names)"


class PackedNames(Sequence[str]):
    """Names packed as UTF-8 back to back, with the offset where each one ends."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, blob: bytes, ends: np.ndarray) -> None:
        self.blob = bytes(blob)
        self.ends = np.array(ends, dtype=np.int64).reshape(-1)

    @classmethod
    def of(cls, names: Iterable[str]) -> PackedNames:
        blob = bytearray()
        ends = array("q")
        for name in names:
            blob += name.encode("utf-8", "surrogatepass")
            ends.append(len(blob))
        return cls(bytes(blob), np.frombuffer(ends, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ends)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return PackedNames.of(self[i] for i in range(*index.indices(len(self))))
        n = len(self.ends)
        if not -n <= index < n:
            raise IndexError(f"name {index} of {n}")
        index %= n
        start = int(self.ends[index - 1]) if index else 0
        return self.blob[start : int(self.ends[index])].decode("utf-8", "surrogatepass")

    def __eq__(self, other: object) -> bool:
        return _same_items(self, other)

    def __repr__(self) -> str:
        return _repr("PackedNames", self)


_NUMBERED = re.compile(r"(.*?)(\d+)(\D*)", re.DOTALL)


class NamesBuilder:
    """Collects names one at a time: as a :class:`PatternNames` while they follow the
    first name's numbering, packed from the first one that does not."""

    def __init__(self) -> None:
        self.pattern: PatternNames | None = None
        self.blob: bytearray | None = None  # packing: the names so far
        self.ends = array("q")
        self.count = 0

    def add(self, name: str) -> None:
        if self.blob is None:
            if self.count == 0:
                match = _NUMBERED.fullmatch(name)
                if match:
                    prefix, number, suffix = match.groups()
                    self.pattern = PatternNames(prefix, suffix, digits=len(number), start=int(number), count=0)
            pattern = self.pattern
            if pattern is not None and pattern.name(pattern.start + self.count) == name:
                self.count += 1
                return
            self.blob = bytearray()  # from here on packed, the names so far included
            if pattern is not None:
                for number in range(pattern.start, pattern.start + self.count):
                    self._pack(pattern.name(number))
            self.pattern = None
        self._pack(name)
        self.count += 1

    def extend(self, names: list[str]) -> None:
        """``add`` each of ``names``; while they follow the pattern, checked as one list."""
        p = self.pattern
        if self.blob is None and p is not None and self.count:
            first = p.start + self.count
            if names == [p.name(number) for number in range(first, first + len(names))]:
                self.count += len(names)
                return
        for name in names:
            self.add(name)

    def _pack(self, name: str) -> None:
        assert self.blob is not None
        self.blob += name.encode("utf-8", "surrogatepass")
        self.ends.append(len(self.blob))

    def build(self) -> Sequence[str]:
        if self.blob is None:
            p = self.pattern
            if p is None:  # no names at all
                return PackedNames(b"", np.zeros(0, dtype=np.int64))
            return PatternNames(p.prefix, p.suffix, digits=p.digits, start=p.start, count=self.count)
        return PackedNames(bytes(self.blob), np.frombuffer(self.ends, dtype=np.int64))


def names_of(names: Iterable[str]) -> Sequence[str]:
    """Names as compact as they allow: a pattern when they follow one, else packed."""
    if isinstance(names, (PatternNames, PackedNames)):
        return names
    builder = NamesBuilder()
    for name in names:
        builder.add(name)
    return builder.build()


class FieldSets(Sequence[list[str]]):
    """Each shard's field list: ``sets[ids[i]]``, the distinct lists stored once."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, sets: Sequence[Sequence[str]], ids: Iterable[int] | np.ndarray) -> None:
        self.sets = tuple(tuple(s) for s in sets)
        self.ids = np.array(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int32).reshape(-1)
        if len(self.ids) and (self.ids.min() < 0 or self.ids.max() >= len(self.sets)):
            raise ValueError(f"field-set indexes must be in [0, {len(self.sets)})")

    @classmethod
    def of(cls, lists: Iterable[Sequence[str]]) -> FieldSets:
        found: dict[tuple[str, ...], int] = {}
        ids = array("i")
        for fields in lists:
            ids.append(found.setdefault(tuple(fields), len(found)))
        return cls(list(found), np.frombuffer(ids, dtype=np.int32))

    def used(self) -> list[tuple[str, ...]]:
        """The distinct lists some shard has."""
        return [self.sets[i] for i in np.unique(self.ids).tolist()]

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> list[str]: ...
    @overload
    def __getitem__(self, index: slice) -> FieldSets: ...
    def __getitem__(self, index: int | slice) -> list[str] | FieldSets:
        if isinstance(index, slice):
            return FieldSets(self.sets, self.ids[index])
        return list(self.sets[int(self.ids[index])])

    def __eq__(self, other: object) -> bool:
        return _same_items(self, other)

    def __repr__(self) -> str:
        return _repr("FieldSets", self)
