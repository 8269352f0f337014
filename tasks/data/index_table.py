"""The index table and the classes file: their columns, their format, and the one reader (and writer) of each.

Every stage that reads the index (features, training, evaluation, preview) reads it here, so none of them stands
on the index stage's scanning and validation code (``tasks.data.indexing``) or on the decoder it uses.

* ``index.csv`` (``layout.index_table``): columns :data:`COLUMNS`, paths POSIX and relative to ``data.root``,
  sorted by path, one row per kept image; :func:`read_index` checks it against ``classes.json``.
* ``classes.json`` (``layout.classes_file``): :class:`ClassInfo` (class order: ids are positions in ``names``;
  class mode), read only through :func:`read_classes`.

Plain pandas and JSON: no TensorFlow, no images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.errors import DatasetError
from tasks.io.atomic import atomic_write, atomic_write_json
from tasks.layout import Layout

COLUMNS = (
    "path",
    "label",
    "class_id",
    "split",
    "sha256",
    "width",
    "height",
    "bytes",
    "orientation",
    "format",
)
SPLITS = ("train", "val", "test")
_STRING_COLUMNS = {"path": str, "label": str, "split": str, "sha256": str, "format": str}
_INT_COLUMNS = ("class_id", "width", "height", "bytes", "orientation")


@dataclass(frozen=True)
class ClassInfo:
    """Class order (ids are positions in ``names``) and class mode, as written to ``classes.json``."""

    names: tuple[str, ...]
    class_mode: str

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "class_mode": self.class_mode, "num_classes": self.num_classes}


# ------------------------------------------------------------------------------------------------ writing
def write_table(path: Path, table: pd.DataFrame) -> None:
    """``table`` (columns :data:`COLUMNS`) as ``index.csv`` at ``path``, atomically (:mod:`tasks.io.atomic`)."""
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, lineterminator="\n"))


def write_classes(path: Path, classes: ClassInfo) -> None:
    """``classes`` as ``classes.json`` at ``path``, atomically."""
    atomic_write_json(path, classes.to_dict())


# ------------------------------------------------------------------------------------------------ reading
def read_index(layout: Layout) -> pd.DataFrame:
    """The index table written by the index stage (paths stay strings; ids and sizes are ints)."""
    path = layout.index_table
    if not path.is_file():
        raise FileNotFoundError(f"index table not found at {path}; run `retrainflow index` first")
    table = pd.read_csv(path, dtype=_STRING_COLUMNS, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; re-run `retrainflow index`")
    for column in _INT_COLUMNS:
        table[column] = table[column].astype("int64")
    if layout.classes_file.is_file():
        _check_agrees(table, read_classes(layout), path, layout.classes_file)
    return table


def _check_agrees(table: pd.DataFrame, classes: ClassInfo, table_path: Path, classes_path: Path) -> None:
    """Every row's ``class_id`` names its ``label`` in ``classes.json`` (the two files are written one after the
    other: an index run killed between them must not pair a new table with old class ids)."""
    names = classes.names
    ids = table["class_id"].to_numpy()
    in_range = (ids >= 0) & (ids < len(names))
    expected = [names[i] if ok else None for i, ok in zip(ids, in_range, strict=True)]
    wrong = [i for i, (want, got) in enumerate(zip(expected, table["label"], strict=True)) if want != got]
    if wrong:
        row = table.iloc[wrong[0]]
        raise DatasetError(
            f"{table_path} and {classes_path} disagree ({len(wrong)} row(s); e.g. {row['path']!r} has label "
            f"{row['label']!r} and class_id {int(row['class_id'])}, classes are {list(names)}): an interrupted "
            "index run? re-run `retrainflow index`"
        )


def read_classes(layout: Layout) -> ClassInfo:
    """Class order and class mode from ``classes.json`` (the only reader of that file)."""
    path = layout.classes_file
    if not path.is_file():
        raise FileNotFoundError(f"classes file not found at {path}; run `retrainflow index` first")
    raw = json.loads(path.read_text(encoding="utf-8"))
    names = raw.get("names") if isinstance(raw, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) < 2:
        raise DatasetError(f"{path}: expected 'names' to be a list of at least 2 class names, got {names!r}")
    return ClassInfo(tuple(names), str(raw.get("class_mode", "categorical")))
