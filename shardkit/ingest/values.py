"""Values on their way into a sample: CSV cells typed, values made JSON, keys and labels checked.

CSV and TSV cells are text; each value is typed on its own, conservatively, so that
nothing changes on the way: the empty cell is null; ``true``/``false`` (any case) are
booleans; an integer without a sign ``+``, leading zeros, spaces or underscores is an
int (``007`` stays text); a decimal number with at most 15 significant digits (which a
double keeps exactly) is a float; everything else, ``nan`` and ``inf`` included, is text.

Keys (``--key-column``) must be non-empty text or integers without ``/``, dots (Hugging
Face, DALI and webdataset split member names at different dots), control characters,
backslashes or the ``__x__`` form webdataset reserves, and unique: a bad or repeated key
is an error naming its row.
"""

from __future__ import annotations

import datetime
import decimal
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ShardkitError

_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_BOOLS = {"true": True, "false": False}


def text_value(text: str | None) -> Any:
    """A CSV/TSV cell as a typed value, conservatively (module docstring)."""
    if text is None or text == "":
        return None
    if _INT.fullmatch(text):
        return int(text)
    lowered = text.lower()
    if lowered in _BOOLS:
        return _BOOLS[lowered]
    if _FLOAT.fullmatch(text):
        digits = text.lstrip("-").split("e")[0].split("E")[0].replace(".", "").lstrip("0")
        if len(digits) <= 15:
            value = float(text)
            if math.isfinite(value):
                return value
    return text


@dataclass
class ValueNotes:
    """What happened to values on the way into JSON, per column: counts, for the summary."""

    nulled: Counter = field(default_factory=Counter)  # NaN/infinite floats stored as null
    no_caption: int = 0

    def lines(self, caption: str | None) -> list[str]:
        out = [
            f"column {column!r}: {count} NaN or infinite value(s) stored as null (JSON has neither)"
            for column, count in sorted(self.nulled.items())
        ]
        if self.no_caption:
            out.append(f"{self.no_caption} row(s) have a null caption ({caption!r}): stored as an empty txt")
        return out


def json_value(value: Any, column: str, notes: ValueNotes) -> Any:
    """``value`` as JSON holds it: containers recursed, NaN/inf to null (counted), time
    stamps to ISO 8601 text, decimals to text. Bytes cannot be stored: ShardkitError."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        notes.nulled[column] += 1
        return None
    if isinstance(value, Mapping):
        return {str(k): json_value(v, column, notes) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v, column, notes) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise ShardkitError(f"column {column!r} holds a {type(value).__name__}, which KEY.json cannot hold")


# -- keys and labels --------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def check_key(value: Any, column: str, where: str) -> str:
    """The sample key a key column's value gives, or ShardkitError naming the row."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ShardkitError(f"{where}: key column {column!r} holds {value!r}, not text or an integer")
    key = str(value)
    problem = None
    if not key:
        problem = "is empty"
    elif "/" in key:
        problem = "contains '/'"
    elif "." in key:
        problem = "contains a dot (readers split member names at dots, each at a different one)"
    elif _CONTROL.search(key):
        problem = "contains a control character or a backslash"
    elif key.startswith("__") and key.endswith("__"):
        problem = "has the __name__ form webdataset reserves for metadata"
    if problem:
        raise ShardkitError(f"{where}: key {key!r} (column {column!r}) {problem}")
    return key


def label_classes(values: Iterable[Any]) -> list[str] | None:
    """Class names when the labels are not all integers (their sorted set), else None."""
    names: set[str] = set()
    numeric = True
    for value in values:
        if value is None or value == "":
            continue
        names.add(str(value))
        numeric = numeric and _as_index(value) is not None
    return None if numeric else sorted(names)


def _as_index(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value)
    return None


def label_index(value: Any, classes: Mapping[str, int] | None, column: str, where: str) -> int | None:
    """The ``cls`` of a label value: its index among ``classes`` or the integer itself."""
    if value is None or value == "":
        return None
    if classes is not None:
        return classes[str(value)]
    index = _as_index(value)
    if index is None:
        raise ShardkitError(f"{where}: label {value!r} (column {column!r}) is not a class index or name")
    return index
