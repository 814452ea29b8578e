"""The table form of a companion (CSV, TSV, JSONL, Parquet via pyarrow) and the CLI around
companions: `shardkit companion --from`, and ls/cat/verify with --join."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil

import pytest

from shardkit.errors import ShardkitError
from shardkit.format.companion import MISSING
from shardkit.read.dataset import ShardDataset
from shardkit.writing.companion import write_companion
from tests.helpers import make_shards, pairs, shardkit_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = [5, 0, 8, 3]
KEYS = [f"s{i:06d}" for i in range(sum(COUNTS))]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    dest = str(tmp_path_factory.mktemp("base"))
    make_shards(dest, COUNTS, image=True)
    return dest


def rows(keys=KEYS, seed: int = 0) -> list[dict]:
    out = [
        {"key": k, "caption": f"a caption for {k}", "label": i % 4, "aesthetic": round(5 + i / 10, 2), "note": None}
        for i, k in enumerate(keys)
    ]
    random.Random(seed).shuffle(out)
    return out


def write_table(path, table: list[dict]) -> str:
    path = str(path)
    if path.endswith((".csv", ".tsv")):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]), delimiter="\t" if path.endswith(".tsv") else ",")
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in table)
    elif path.endswith(".jsonl"):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in table)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(table), path, row_group_size=4)
    return path


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_a_shuffled_table_becomes_an_aligned_companion(base, tmp_path, kind):
    table = write_table(tmp_path / f"t.{kind}", rows(KEYS + ["zz_not_in_base"], seed=3))
    result = write_companion(base, str(tmp_path / "c"), table=table)
    assert (result.samples, result.shards, result.unmatched, result.missing) == (16, 4, ["zz_not_in_base"], [])
    joined = list(ShardDataset(base, join=[str(tmp_path / "c")], join_wins={"cls": 1, "json": 1}))
    for sample, (i, key) in pairs(joined, enumerate(KEYS)):
        assert sample["__key__"] == key and sample["txt"] == f"a caption for {key}".encode()
        assert sample["cls"] == str(i % 4).encode()
        # the label stays in json too, as shardkit write keeps it
        assert json.loads(sample["json"]) == {"label": i % 4, "aesthetic": round(5 + i / 10, 2), "note": None}


def test_table_keys_stay_text_and_cells_keep_their_type(base, tmp_path):
    table = tmp_path / "t.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "score", "flag"])
        for i, key in enumerate(KEYS):
            writer.writerow([key, "1e5" if i == 0 else "007", i, "nan" if i == 1 else ""])
    write_companion(base, str(tmp_path / "c"), table=str(table), key_column="id")
    first, second = list(ShardDataset(str(tmp_path / "c")))[:2]
    assert first["txt"] == b"1e5" and second["txt"] == b"007"  # captions are text as written
    assert json.loads(first["json"]) == {"score": 0, "flag": None}
    assert json.loads(second["json"]) == {"score": 1, "flag": "nan"}  # JSON has no NaN


def test_missing_keys_follow_the_policy(base, tmp_path):
    table = write_table(tmp_path / "t.jsonl", rows(KEYS[::2]))
    with pytest.raises(ShardkitError, match=r"data-000000\.tar sample 's000001': NoNewFields: .*t\.jsonl has no row"):
        write_companion(base, str(tmp_path / "e"), table=table)
    skip = write_companion(base, str(tmp_path / "s"), table=table, missing="skip")
    assert len(skip.missing) == 8 and skip.missing[0] == ("data-000000.tar", "s000001")
    assert [s["__key__"] for s in ShardDataset(base, join=[str(tmp_path / "s")], join_wins={"cls": 1, "json": 1})] == (
        KEYS[::2]
    )
    empty = write_companion(base, str(tmp_path / "m"), table=table, missing="empty")
    assert len(empty.missing) == 8
    got = list(ShardDataset(str(tmp_path / "m")))
    assert got[1]["txt"] == b"" and json.loads(got[1]["json"]) == {"label": None, "aesthetic": None, "note": None}
    assert "cls" not in got[1] and MISSING not in got[1] and got[0]["txt"] == b"a caption for s000000"


def test_a_table_of_label_fixes_replaces_only_those_labels(base, tmp_path):
    fixes = write_table(tmp_path / "fixes.csv", [{"key": "s000003", "label": 9}, {"key": "s000011", "label": 8}])
    with_json = write_companion(base, str(tmp_path / "j"), table=fixes, missing="empty")  # label in json too
    with pytest.raises(ShardkitError, match="field 'json' is in the base and companion 1"):
        ShardDataset(base, join=[str(tmp_path / "j")], join_wins={"cls": 1})
    assert with_json.samples == 16
    result = write_companion(base, str(tmp_path / "fix"), table=fixes, missing="empty", columns=[])
    assert len(result.missing) == 14 and result.unmatched == []
    plain = list(ShardDataset(base))
    fixed = list(ShardDataset(base, join=[str(tmp_path / "fix")], join_wins={"cls": 1}))
    for b, f in pairs(plain, fixed):
        want = {"s000003": b"9", "s000011": b"8"}.get(b["__key__"], b["cls"])
        assert f == {**b, "cls": want}


def test_class_names_map_to_the_bases_classes(tmp_path):
    from shardkit.writing.writer import ShardWriter

    with ShardWriter(str(tmp_path / "b"), classes=["cat", "dog", "fox"]) as writer:
        for i in range(6):
            writer.write({"__key__": f"k{i}", "cls": i % 3, "bin": b"x"})
    table = write_table(tmp_path / "t.jsonl", [{"key": f"k{i}", "label": ["fox", "cat"][i % 2]} for i in range(6)])
    write_companion(str(tmp_path / "b"), str(tmp_path / "c"), table=table, columns=[])
    manifest = json.loads((tmp_path / "c" / "data.manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog", "fox"]
    assert [s["cls"] for s in ShardDataset(str(tmp_path / "c"))] == [b"2", b"0"] * 3
    wrong = write_table(tmp_path / "w.jsonl", [{"key": f"k{i}", "label": "wolf"} for i in range(6)])
    with pytest.raises(ShardkitError, match="holds 'wolf', not among the base's classes"):
        write_companion(str(tmp_path / "b"), str(tmp_path / "d"), table=wrong)


def test_bad_tables_are_refused_naming_the_row(base, tmp_path):
    dup = write_table(tmp_path / "dup.jsonl", rows(KEYS + KEYS[:1]))
    with pytest.raises(ShardkitError, match=r"dup\.jsonl.*: key 's000000' \(column 'key'\) is also the key of"):
        write_companion(base, str(tmp_path / "a"), table=dup)
    nokey = write_table(tmp_path / "nokey.csv", [{"name": k, "caption": "x"} for k in KEYS])
    with pytest.raises(ShardkitError, match="no key column 'key'.*columns: name, caption"):
        write_companion(base, str(tmp_path / "a"), table=nokey)
    words = write_table(tmp_path / "words.jsonl", [{"key": k, "label": "cat"} for k in KEYS])
    with pytest.raises(ShardkitError, match="holds class names, and the base names no classes to map them to"):
        write_companion(base, str(tmp_path / "a"), table=words)
    (tmp_path / "t.txt").write_text("key\n")
    with pytest.raises(ShardkitError, match="not a table shardkit reads"):
        write_companion(base, str(tmp_path / "a"), table=str(tmp_path / "t.txt"))
    only_keys = write_table(tmp_path / "keys.jsonl", [{"key": k} for k in KEYS])
    with pytest.raises(ShardkitError, match="nothing to write"):
        write_companion(base, str(tmp_path / "a"), table=only_keys)


def test_cli_companion_ls_cat_and_verify_with_a_join(base, tmp_path):
    table = write_table(tmp_path / "captions.parquet", rows(KEYS + ["extra1"]))
    out = json.loads(
        shardkit_cli("companion", base, str(tmp_path / "c"), "--from", table, "--key-column", "key", "--json").stdout
    )
    assert out["samples"] == 16 and out["unmatched"] == 1 and out["unmatched_keys"] == ["extra1"]
    text = shardkit_cli("companion", base, str(tmp_path / "c2"), "--from", table).stdout.decode()
    assert "1 key(s) of the table are not in the base, first: extra1" in text
    ls = shardkit_cli(
        "ls", base, "--join", str(tmp_path / "c"), "--join-wins", "cls=1", "--join-wins", "json=0", "--json"
    )
    listed = json.loads(ls.stdout)
    assert len(listed) == 16 and listed[2]["txt"] == "a caption for s000002" and listed[2]["json"] == {"i": 2}
    clash = shardkit_cli("ls", base, "--join", str(tmp_path / "c"), check=False)
    assert clash.returncode == 1 and b"--join-wins cls=1" in clash.stderr
    wins = ("--join-wins", "cls=1", "--join-wins", "json=1")
    cat = shardkit_cli("cat", base, "s000007", "--field", "txt", "--join", str(tmp_path / "c"), *wins)
    assert cat.stdout == b"a caption for s000007"
    cat = shardkit_cli("cat", base, "s000007", "--field", "json", "--join", str(tmp_path / "c"), *wins)
    assert json.loads(cat.stdout) == {"label": 3, "aesthetic": 5.7, "note": None}
    assert shardkit_cli("ls", base, "--join-wins", "cls=1", check=False).returncode == 1
    assert shardkit_cli("ls", base, "--join", "x", "--join-wins", "cls", check=False).returncode == 2
    fixes = write_table(tmp_path / "fixes.csv", [{"key": "s000005", "label": 7}])
    shardkit_cli("companion", base, str(tmp_path / "f"), "--from", fixes, "--missing", "empty", "--columns", "", "-q")
    fixed = json.loads(shardkit_cli("ls", base, "--join", str(tmp_path / "f"), "--join-wins", "cls=1", "--json").stdout)
    assert [r["cls"] for r in fixed] == [str(i % 3) if i != 5 else "7" for i in range(16)]
    flag = shardkit_cli("companion", base, str(tmp_path / "g"), "--fn", "x:y", "--columns", "", check=False)
    assert flag.returncode == 1 and b"--columns name columns of --from TABLE" in flag.stderr
    report = json.loads(shardkit_cli("verify", base, "--join", str(tmp_path / "c"), "--json").stdout)
    assert report["ok"] and report["shards"] == 8 and report["samples"] == 32
    assert json.loads(shardkit_cli("verify", str(tmp_path / "c"), "--json").stdout)["ok"]  # against its recorded base


def test_verify_finds_a_companion_that_does_not_line_up(base, tmp_path):
    table = write_table(tmp_path / "t.jsonl", rows())
    write_companion(base, str(tmp_path / "c"), table=table)
    other = tmp_path / "other"
    shutil.copytree(base, other)
    # Rewrite shard 2 of a copy of the base with its samples in another order.
    from shardkit.writing.writer import ShardWriter

    samples = list(ShardDataset(base))
    order = samples[:5] + samples[6:13] + samples[5:6] + samples[13:]
    with ShardWriter(str(other), overwrite=True, shard_size="1GB") as writer:
        for count, start in zip(COUNTS, (0, 5, 5, 13)):
            for s in order[start : start + count]:
                writer.write({k: v for k, v in s.items() if k != "__url__"})
            writer.next_shard(allow_empty=True)
    proc = shardkit_cli("verify", str(other), "--join", str(tmp_path / "c"), "--json", check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and not report["ok"]
    messages = " | ".join(p["message"] for p in report["problems"])
    assert "sha256" in messages and "sample 0 has key 's000005' where the base has 's000006'" in messages
    assert any(p["url"].endswith("c/data-000002.tar") for p in report["problems"])
