"""ingest/columns: where each column of a table goes, how values are typed, which keys pass."""

from __future__ import annotations

import datetime
import decimal
import math

import pytest

from shardkit.errors import ShardkitError
from shardkit.ingest.columns import (
    ValueNotes,
    check_key,
    image_refs,
    json_value,
    label_classes,
    label_index,
    plan_columns,
    row_fields,
    row_to_sample,
    text_value,
)


def test_a_laion_like_table_keeps_every_column():
    columns = ["path", "caption", "aesthetic", "label", "source"]
    plan = plan_columns(columns)
    assert (plan.image, plan.caption, plan.label, plan.key) == ("path", "caption", "label", None)
    # the image paths and the label's value stay in json too; the caption is the txt
    assert plan.json == ("path", "aesthetic", "label", "source") and plan.left_out == ()
    assert plan.destinations() == {
        "path": "image, json",
        "caption": "txt",
        "aesthetic": "json",
        "label": "cls, json",
        "source": "json",
    }
    assert plan.describe() == "path -> image, json; caption -> txt; aesthetic, source -> json; label -> cls, json"


def test_columns_are_found_by_type_before_name_and_any_case():
    kinds = {"URL": "text", "TEXT": "text", "jpg": "binary", "similarity": "float"}
    plan = plan_columns(list(kinds), kinds=kinds)
    assert (plan.image, plan.caption, plan.image_kind, plan.multi) == ("jpg", "TEXT", "binary", False)
    assert plan.json == ("URL", "similarity")  # bytes never go to json
    hf = {"image": "image", "text": "text", "file": "text"}
    assert plan_columns(list(hf), kinds=hf).image == "image"  # the Hugging Face struct wins over a path name
    multi = {"images": "list:image", "caption": "text"}
    plan = plan_columns(list(multi), kinds=multi)
    assert plan.image == "images" and plan.multi and plan.image_kind == "image"


def test_ambiguity_is_an_error_for_images_and_a_note_for_captions():
    with pytest.raises(ShardkitError, match=r"several columns may hold the images \(path, image\).*--image-column"):
        plan_columns(["path", "image", "caption"], where="t.csv")
    with pytest.raises(ShardkitError, match=r"several columns hold images \(a, b\)"):
        plan_columns(["a", "b"], kinds={"a": "binary", "b": "binary"})
    with pytest.raises(ShardkitError, match=r"t.csv: no image column.*the columns are url, caption"):
        plan_columns(["url", "caption"], where="t.csv")
    plan = plan_columns(["path", "caption", "text"])
    assert plan.caption is None and plan.json == ("path", "caption", "text")
    assert plan.notes == (
        "several columns could be the caption (caption, text): all kept in json; choose with --caption-column",
    )
    assert plan_columns(["path", "caption", "text"], caption="text").caption == "text"


def test_named_columns_and_columns_to_keep():
    columns = ["id", "file", "alt", "score", "clicks", "cls"]
    plan = plan_columns(columns, image="file", caption="alt", key="id", keep=["score"])
    assert (plan.image, plan.caption, plan.key, plan.label) == ("file", "alt", "id", "cls")
    assert plan.json == ("score",) and plan.left_out == ("clicks",)
    assert plan.destinations()["clicks"] == "left out (--columns)" and plan.destinations()["id"] == "key"
    assert plan_columns(columns, keep=[]).json == ()
    with pytest.raises(ShardkitError, match=r"--columns names 'nope', not among the columns"):
        plan_columns(columns, keep=["nope"])
    with pytest.raises(ShardkitError, match=r"no column 'x' for --caption-column"):
        plan_columns(columns, caption="x")
    with pytest.raises(ShardkitError, match=r"column names repeat \(a\)"):
        plan_columns(["path", "a", "a"])


def test_columns_json_cannot_hold_are_refused_or_noted():
    kinds = {"image": "image", "mask": "binary", "ts": "temporal", "price": "decimal", "n": "int"}
    with pytest.raises(ShardkitError, match=r"column 'mask' holds binary data.*--columns"):
        plan_columns(list(kinds), kinds=kinds)
    plan = plan_columns(list(kinds), kinds=kinds, keep=["ts", "price", "n"])
    assert plan.as_text == ("ts", "price")
    assert plan.notes == (
        "column 'ts' is stored in json as ISO 8601 text",
        "column 'price' is stored in json as text (every digit kept)",
    )
    with pytest.raises(ShardkitError, match=r"caption column 'n' holds int values"):
        plan_columns(list(kinds), kinds=kinds, keep=[], caption="n")
    with pytest.raises(ShardkitError, match="'ts' holds temporal values, not image"):
        plan_columns(list(kinds), kinds=kinds, image="ts")


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


def test_a_row_becomes_txt_cls_and_typed_json():
    plan = plan_columns(["path", "caption", "aesthetic", "label", "note"])
    row = {"path": "a/1.jpg", "caption": "a dog", "aesthetic": "5.5", "label": "2", "note": ""}
    fields = row_fields(row, plan, where="t.csv: line 2", typed=False)
    assert fields == {
        "txt": "a dog",
        "cls": 2,
        "json": {"path": "a/1.jpg", "aesthetic": 5.5, "label": 2, "note": None},
    }
    notes = ValueNotes()
    assert row_fields({**row, "caption": ""}, plan, where="x", typed=False, notes=notes)["txt"] == ""
    assert notes.no_caption == 1
    with pytest.raises(ShardkitError, match=r"x: caption column 'caption' holds list, not text"):
        row_fields({**row, "caption": ["a", "b"]}, plan, where="x")
    sample = row_to_sample(row, plan, key="k1", images=[("png", b"P")], typed=False)
    assert sample["__key__"] == "k1" and sample["png"] == b"P" and sample["txt"] == "a dog"


def test_image_cells_paths_bytes_structs_and_lists():
    single = plan_columns(["image"], kinds={"image": "image"})
    assert image_refs({"bytes": b"J", "path": "x.jpg"}, single, "w") == [b"J"]
    assert image_refs({"bytes": None, "path": "x.jpg"}, single, "w") == ["x.jpg"]
    assert image_refs(None, single, "w") == [None]
    multi = plan_columns(["imgs"], kinds={"imgs": "list:binary"})
    assert image_refs([b"a", b"b"], multi, "w") == [b"a", b"b"] and image_refs(None, multi, "w") == []
    with pytest.raises(ShardkitError, match="w: column 'imgs' holds bytes, not a list"):
        image_refs(b"a", multi, "w")
    sample = row_to_sample({"imgs": None}, multi, key="k", images=[("jpg", b"1"), ("png", b"2")])
    assert sample == {"__key__": "k", "0.jpg": b"1", "1.png": b"2"}
