"""ingest/values: CSV cells typed conservatively, values made JSON, keys and labels checked."""

from __future__ import annotations

import datetime
import decimal
import math

import pytest

from shardkit.errors import ShardkitError
from shardkit.ingest.values import ValueNotes, check_key, json_value, label_classes, label_index, text_value


@pytest.mark.parametrize(
    "text, value",
    [
        ("", None),
        ("12", 12),
        ("-3", -3),
        ("0", 0),
        ("007", "007"),  # leading zeros: an id, not a number
        ("+5", "+5"),
        ("1_000", "1_000"),
        (" 12", " 12"),
        ("1.5", 1.5),
        ("-0.25", -0.25),
        ("1e3", 1000.0),
        ("3.141592653589793", "3.141592653589793"),  # 16 significant digits: a double may not keep them
        ("0.123456789012345", 0.123456789012345),
        ("0.1234567890123456", "0.1234567890123456"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("true", True),
        ("FALSE", False),
        ("yes", "yes"),
        ("a photo", "a photo"),
    ],
)
def test_csv_cells_are_typed_conservatively(text, value):
    got = text_value(text)
    assert got == value and type(got) is type(value)


def test_json_values_keep_their_type_or_say_what_changed():
    notes = ValueNotes()
    row = {"a": [1.0, math.nan, {"b": math.inf}], "t": datetime.date(2024, 5, 1), "d": decimal.Decimal("1.10")}
    assert json_value(row["a"], "a", notes) == [1.0, None, {"b": None}]
    assert json_value(row["t"], "t", notes) == "2024-05-01" and json_value(row["d"], "d", notes) == "1.10"
    assert notes.nulled == {"a": 2}
    assert notes.lines("caption") == ["column 'a': 2 NaN or infinite value(s) stored as null (JSON has neither)"]
    with pytest.raises(ShardkitError, match="column 'x' holds a bytes"):
        json_value([b"\x00"], "x", notes)


@pytest.mark.parametrize(
    "key, problem",
    [
        ("a/b", "contains '/'"),
        (".hidden", "contains a dot"),
        ("img.001", "contains a dot"),
        ("", "is empty"),
        ("tab\there", "control character"),
        ("back\\slash", "backslash"),
        ("__meta__", "webdataset reserves"),
        (3.5, "not text or an integer"),
        (None, "not text or an integer"),
    ],
)
def test_bad_keys_are_errors_naming_the_row(key, problem):
    with pytest.raises(ShardkitError) as err:
        check_key(key, "id", "t.csv: line 7")
    assert str(err.value).startswith("t.csv: line 7: ") and problem in str(err.value)


def test_good_keys_pass():
    assert check_key("sa_000123", "id", "x") == "sa_000123"
    assert check_key(42, "id", "x") == "42"
    assert check_key("ü-名前 1", "id", "x") == "ü-名前 1"


def test_labels_are_indices_or_names():
    assert label_classes(["3", "1", "", None, 2]) is None  # all integers: used as they are
    assert label_classes(["cat", "dog", "cat", None]) == ["cat", "dog"]
    assert label_index("3", None, "label", "x") == 3 and label_index(2.0, None, "label", "x") == 2
    assert label_index("dog", {"cat": 0, "dog": 1}, "label", "x") == 1
    assert label_index("", None, "label", "x") is None
    with pytest.raises(ShardkitError, match="x: label 'cat' .* is not a class index"):
        label_index("cat", None, "label", "x")
