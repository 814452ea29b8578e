"""Where each column of a table goes in a sample: the column plan, and a row turned into fields.

A table (CSV, TSV, JSONL, Parquet) keeps every column:

- the image column becomes the image member, under its real format's extension
  (``KEY.jpg``, ``KEY.png``...); a column holding a list of images becomes ``KEY.0.jpg``,
  ``KEY.1.png``, ... It holds paths (relative to the table's folder), raw bytes, or the
  Hugging Face ``Image`` struct ``{bytes, path}``. Paths are also kept in ``KEY.json``
  under the column's name (where the image came from);
- the caption column becomes ``KEY.txt`` (UTF-8); a null caption is an empty ``txt``
  (counted in the notes), so that every sample has the same fields: Hugging Face's
  webdataset loader refuses shards whose first samples do not;
- the label column becomes ``KEY.cls`` (integers as they are; names become indices into
  their sorted set, the manifest's classes) and keeps its value in ``KEY.json`` too;
- the key column (only when named) becomes the sample key;
- every other column goes into ``KEY.json`` with its type: numbers stay numbers, empty
  and null stay null, lists and structs stay lists and objects.

Columns are found by type, then by name, when not named: the image column is the one
column of Hugging Face ``Image`` structs (or lists of them), else the one binary column,
else the one text column named ``path``, ``file``, ``filename``, ``file_name``, ``image``,
``img``, ``image_path``, ``filepath`` or ``url`` (local paths or ``file://`` URLs: images
are not downloaded); several candidates are an error asking for ``--image-column``. The
caption is the text column named ``caption``, ``text`` or ``txt``, the label the one named
``label``, ``class``, ``cls`` or ``target`` (any case); when several match none is
chosen, all stay in ``KEY.json`` and the plan's notes say so.

Values are stored as they are or not at all: a binary column that is not the image is
refused (leave it out with ``--columns``); time stamps and decimals are stored as text
(ISO 8601, every digit), and NaN or infinite floats as null (JSON has neither), each with
a note.

How CSV cells are typed, and which keys pass: :mod:`shardkit.ingest.values`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ShardkitError
from .values import ValueNotes, json_value, label_index, text_value

IMAGE_NAMES = ("path", "file", "filename", "file_name", "image", "img", "image_path", "filepath", "url")
CAPTION_NAMES = ("caption", "text", "txt")
LABEL_NAMES = ("label", "class", "cls", "target")

#: Column kinds (from a typed table's schema; None when the table does not say: CSV, JSONL).
#: "image" is the Hugging Face Image struct ``{bytes, path}``; "list:K" a list of kind K.
IMAGE_KINDS = ("image", "binary", "text")
_STORED_AS_TEXT = {"temporal": "ISO 8601 text", "decimal": "text (every digit kept)"}


# -- the plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnPlan:
    """Where each column of a table goes (see the module docstring).

    ``image`` / ``caption`` / ``label`` / ``key``: the columns with those roles (None: no
    such column; no image column only in a table of new fields, ``images=False``);
    ``multi``: the image column holds lists of images; ``image_kind``: what
    it holds ("text" paths, "binary" bytes, "image" structs, None unknown); ``json``: the
    columns stored in ``KEY.json``, in table order; ``left_out``: the columns ``keep``
    left out; ``notes``: what the plan decided that a user should hear.
    """

    columns: tuple[str, ...]
    image: str | None
    caption: str | None = None
    label: str | None = None
    key: str | None = None
    json: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()
    multi: bool = False
    image_kind: str | None = None
    as_text: tuple[str, ...] = ()  # json columns stored as text (time stamps, decimals)
    notes: tuple[str, ...] = ()

    def destinations(self) -> dict[str, str]:
        """Each column and where it went: ``{"path": "image, json", "caption": "txt", ...}``."""
        out: dict[str, list[str]] = {c: [] for c in self.columns}
        if self.image is not None:
            out[self.image].append("images (0.EXT, 1.EXT...)" if self.multi else "image")
        if self.caption:
            out[self.caption].append("txt")
        if self.label:
            out[self.label].append("cls")
        if self.key:
            out[self.key].append("key")
        for c in self.json:
            out[c].append("json")
        return {c: ", ".join(where) if where else "left out (--columns)" for c, where in out.items()}

    def describe(self) -> str:
        """One line for the write's summary: which columns went where."""
        groups: dict[str, list[str]] = {}
        for column, where in self.destinations().items():
            groups.setdefault(where, []).append(column)
        return "; ".join(f"{', '.join(columns)} -> {where}" for where, columns in groups.items())


def _by_name(columns: Sequence[str], names: Sequence[str], allowed: Iterable[str]) -> list[str]:
    wanted = set(names)
    allowed = set(allowed)
    return [c for c in columns if c.lower() in wanted and c in allowed]


def _base_kind(kind: str | None) -> str | None:
    return kind[5:] if kind is not None and kind.startswith("list:") else kind


def _named(column: str | None, columns: Sequence[str], what: str, flag: str, where: str) -> str | None:
    if column is not None and column not in columns:
        raise ShardkitError(f"{where}: no column {column!r} for {flag} ({what}); the columns are {', '.join(columns)}")
    return column


def _find_image(columns: Sequence[str], kinds: Mapping[str, str | None], where: str) -> str:
    for kind in ("image", "binary"):
        found = [c for c in columns if _base_kind(kinds.get(c)) == kind]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ShardkitError(
                f"{where}: several columns hold images ({', '.join(found)}); choose one with --image-column"
            )
    found = _by_name(columns, IMAGE_NAMES, [c for c in columns if _base_kind(kinds.get(c)) in ("text", None)])
    if len(found) == 1:
        return found[0]
    if found:
        raise ShardkitError(
            f"{where}: several columns may hold the images ({', '.join(found)}); choose one with --image-column"
        )
    raise ShardkitError(
        f"{where}: no image column (looked for image data, then a path column named "
        f"{', '.join(IMAGE_NAMES)}; the columns are {', '.join(columns)}); name it with --image-column"
    )


def _find_role(
    columns: Sequence[str], names: Sequence[str], candidates: Iterable[str], what: str, flag: str, notes: list[str]
) -> str | None:
    found = _by_name(columns, names, candidates)
    if len(found) > 1:
        notes.append(f"several columns could be the {what} ({', '.join(found)}): all kept in json; choose with {flag}")
        return None
    return found[0] if found else None


def plan_columns(
    columns: Sequence[str],
    *,
    kinds: Mapping[str, str | None] | None = None,
    image: str | None = None,
    caption: str | None = None,
    label: str | None = None,
    key: str | None = None,
    keep: Sequence[str] | None = None,
    where: str = "table",
    images: bool = True,
) -> ColumnPlan:
    """Decide where each of ``columns`` goes (module docstring).

    ``kinds``: each column's kind when the table has a schema
    (:func:`shardkit.ingest.parquet.arrow_kind`, :func:`shardkit.ingest.text_table.value_kind`);
    ``image``/``caption``/``label``/``key``: the columns named by the user; ``keep``: the
    columns to store in ``KEY.json`` (default: every column without another role, the
    label's and the image paths' included). ``where`` names the table in errors.
    ``images=False``: a table of new fields for samples that have their images (a
    companion set's, :mod:`shardkit.writing.companion_table`): no column is the image.
    """
    columns = list(columns)
    if len(set(columns)) != len(columns):
        repeated = sorted(c for c, n in Counter(columns).items() if n > 1)
        raise ShardkitError(f"{where}: column names repeat ({', '.join(repeated)})")
    kinds = dict(kinds or {})
    notes: list[str] = []
    if not images:
        if image is not None:
            raise ShardkitError(f"{where}: a table of new fields has no image column; {image!r} cannot be one")
        image_kind = None
    else:
        image = _named(image, columns, "the images", "--image-column", where) or _find_image(columns, kinds, where)
        image_kind = kinds.get(image)
        if _base_kind(image_kind) not in (*IMAGE_KINDS, None):
            raise ShardkitError(
                f"{where}: column {image!r} holds {image_kind} values, not image paths, bytes or Hugging Face images"
            )
    taken = {image} - {None}
    caption = _named(caption, columns, "captions", "--caption-column", where)
    if caption is None:
        text_columns = [c for c in columns if c not in taken and kinds.get(c) in ("text", None)]
        caption = _find_role(columns, CAPTION_NAMES, text_columns, "caption", "--caption-column", notes)
    elif kinds.get(caption) not in ("text", None):
        raise ShardkitError(f"{where}: caption column {caption!r} holds {kinds[caption]} values, not text")
    if caption is not None:
        taken.add(caption)
    label = _named(label, columns, "class labels", "--label-column", where)
    if label is None:
        label_columns = [c for c in columns if c not in taken and kinds.get(c) in ("text", "int", None)]
        label = _find_role(columns, LABEL_NAMES, label_columns, "class label", "--label-column", notes)
    elif kinds.get(label) not in ("text", "int", "float", None):
        raise ShardkitError(f"{where}: label column {label!r} holds {kinds[label]} values, not class indices or names")
    key = _named(key, columns, "sample keys", "--key-column", where)
    if key is not None and kinds.get(key) not in ("text", "int", None):
        raise ShardkitError(f"{where}: key column {key!r} holds {kinds[key]} values, not text or integers")
    roles = {image, caption, key} - {None}
    if keep is None:
        stored = [c for c in columns if c not in roles or (c == image and _base_kind(image_kind) in ("text", None))]
    else:
        missing = [c for c in keep if c not in columns]
        if missing:
            raise ShardkitError(
                f"{where}: --columns names {', '.join(map(repr, missing))}, "
                f"not among the columns ({', '.join(columns)})"
            )
        stored = [c for c in columns if c in set(keep)]
        if image in stored and _base_kind(image_kind) not in ("text", None):
            raise ShardkitError(f"{where}: --columns keeps {image!r}, which holds image data: it is the image member")
    for column in stored:
        kind = kinds.get(column)
        if column != image and kind is not None and ("binary" in kind or "image" in kind):
            raise ShardkitError(
                f"{where}: column {column!r} holds {kind} data, which KEY.json cannot hold as it is; leave it out "
                "with --columns (the columns to keep), or name it with --image-column if it holds the images"
            )
    as_text = tuple(c for c in stored if _base_kind(kinds.get(c)) in _STORED_AS_TEXT)
    for column in as_text:
        notes.append(f"column {column!r} is stored in json as {_STORED_AS_TEXT[_base_kind(kinds[column]) or '']}")
    return ColumnPlan(
        columns=tuple(columns),
        image=image,
        caption=caption,
        label=label,
        key=key,
        json=tuple(stored),
        left_out=tuple(c for c in columns if c not in stored and c not in roles and c != label),
        multi=image_kind is not None and image_kind.startswith("list:"),
        image_kind=_base_kind(image_kind),
        as_text=as_text,
        notes=tuple(notes),
    )


# -- rows -------------------------------------------------------------------------------


def image_refs(value: Any, plan: ColumnPlan, where: str) -> list[Any]:
    """The images a row's image cell holds: paths (str) and bytes, one or a list; a
    Hugging Face struct gives its bytes, or its path when it has no bytes."""
    items = value if plan.multi else [value]
    if plan.multi and value is None:
        return []
    if plan.multi and not isinstance(value, (list, tuple)):
        raise ShardkitError(f"{where}: column {plan.image!r} holds {type(value).__name__}, not a list of images")
    refs: list[Any] = []
    for item in items:
        if isinstance(item, Mapping):  # Hugging Face Image: {"bytes": ..., "path": ...}
            item = item.get("bytes") or item.get("path")
        if isinstance(item, (bytes, bytearray, memoryview)):
            refs.append(bytes(item))
        elif isinstance(item, str) and item:
            refs.append(item)
        else:
            refs.append(None)  # the loader skips the row, naming the image
    return refs


def row_fields(
    row: Mapping[str, Any],
    plan: ColumnPlan,
    *,
    where: str,
    classes: Mapping[str, int] | None = None,
    typed: bool = True,
    notes: ValueNotes | None = None,
) -> dict[str, Any]:
    """The non-image fields of a row's sample: ``txt``, ``cls`` and ``json`` (module docstring).

    ``typed``: the values already have their types (JSONL, Parquet); False for CSV/TSV
    text, typed with :func:`text_value`. ``classes``: label name -> index when the labels
    are names. ``notes`` collects what happened to values (NaN to null...).
    """
    notes = notes if notes is not None else ValueNotes()
    fields: dict[str, Any] = {}
    if plan.caption is not None:
        caption = row.get(plan.caption)
        if caption is None or (not typed and caption == ""):  # an empty CSV cell is null
            notes.no_caption += 1
            fields["txt"] = ""
        elif isinstance(caption, str):
            fields["txt"] = caption
        elif isinstance(caption, (int, float)) and not isinstance(caption, bool):
            fields["txt"] = str(caption)
        else:
            raise ShardkitError(
                f"{where}: caption column {plan.caption!r} holds {type(caption).__name__}, not text; "
                "name another with --caption-column"
            )
    if plan.label is not None:
        cls = label_index(row.get(plan.label), classes, plan.label, where)
        if cls is not None:
            fields["cls"] = cls
    if plan.json:
        meta = {}
        for column in plan.json:
            value = row.get(column)
            if not typed:
                meta[column] = value if column == plan.image else text_value(value)
            else:
                meta[column] = json_value(value, column, notes)
        fields["json"] = meta
    return fields


def row_to_sample(
    row: Mapping[str, Any],
    plan: ColumnPlan,
    *,
    key: str,
    images: Sequence[tuple[str, bytes]] = (),
    where: str = "row",
    classes: Mapping[str, int] | None = None,
    typed: bool = True,
    notes: ValueNotes | None = None,
) -> dict[str, Any]:
    """A row as a sample dict: ``__key__``, the images (``(ext, bytes)`` pairs, already
    loaded: one is ``KEY.EXT``, a list ``KEY.0.EXT``...), then :func:`row_fields`."""
    sample: dict[str, Any] = {"__key__": key}
    if plan.multi:
        for i, (ext, data) in enumerate(images):
            sample[f"{i}.{ext}"] = data
    elif images:
        ext, data = images[0]
        sample[ext] = data
    sample.update(row_fields(row, plan, where=where, classes=classes, typed=typed, notes=notes))
    return sample
