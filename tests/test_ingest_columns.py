"""ingest/columns: where each column of a table goes, and a row turned into fields."""

from __future__ import annotations

import pytest

from shardkit.errors import ShardkitError
from shardkit.ingest.columns import image_refs, plan_columns, row_fields, row_to_sample
from shardkit.ingest.values import ValueNotes


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
    with pytest.raises(ShardkitError, match=r"t.csv: no image column.*the columns are link, caption"):
        plan_columns(["link", "caption"], where="t.csv")
    assert plan_columns(["URL", "TEXT"]).image == "URL"  # LAION's names (URLs are refused when read)
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
