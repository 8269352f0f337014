"""The ``index`` stage shell: params in, ``index/`` out (``retrainflow stage index``, ``dvc repro index``).

Thin on purpose (DVC's example-get-started stages): read what the stage needs from ``params``, call the library
(:func:`tasks.data.indexing.build_index`, which scans and validates and writes nothing), write the three outputs at the
:class:`tasks.layout.Layout` paths through the table's own writers (:mod:`tasks.data.index_table`, atomic) and
:mod:`tasks.io.atomic`, return a small JSON-able manifest. Prints nothing: progress goes out as
``tasks.progress.Step("index", done, total, "img")`` events.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from tasks.config import Params
from tasks.data.index_table import write_classes, write_table
from tasks.data.indexing import IndexResult, build_index, source_for
from tasks.io.atomic import atomic_write_json
from tasks.layout import Layout
from tasks.progress import Reporter


@dataclass(frozen=True)
class IndexManifest:
    """What ``run_index`` wrote and the headline counts (JSON-able)."""

    index_table: str
    classes_file: str
    report_file: str
    images: int
    classes: tuple[str, ...]
    class_mode: str
    splits: dict[str, int]
    rejects: int
    skipped: int
    duplicates: int
    conflicts: int
    warnings: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_outputs(result: IndexResult, layout: Layout) -> None:
    """``index.csv``, ``classes.json`` and ``index_report.json``, each atomic (:mod:`tasks.io.atomic` removes the temp
    files of an earlier, killed writer first), in that order: ``tasks.data.index_table.read_index`` refuses a table
    that disagrees with the classes file (a run killed between the two writes)."""
    write_table(layout.index_table, result.table)
    write_classes(layout.classes_file, result.classes)
    atomic_write_json(layout.index_report, result.report, ensure_ascii=False)


def run_index(
    params: Params,
    layout: Layout,
    dataframe: pd.DataFrame | None = None,
    *,
    progress: Reporter | None = None,
) -> IndexManifest:
    """The index stage: scan + validate, write the three outputs, return the manifest (nothing is printed).

    ``dataframe`` (paths relative to ``params.data.root``) replaces the configured source. ``progress``
    receives ``Step("index", done, total, "img")`` events while the files are validated (see
    :func:`tasks.data.indexing.build_index`). Only ``params.data`` is read (the stage's ``params`` in ``dvc.yaml``).
    """
    cfg = params.data
    result = build_index(source_for(cfg, dataframe), cfg, progress=progress)
    write_outputs(result, layout)
    report = result.report
    return IndexManifest(
        index_table=str(layout.index_table),
        classes_file=str(layout.classes_file),
        report_file=str(layout.index_report),
        images=report["images"],
        classes=result.classes.names,
        class_mode=result.classes.class_mode,
        splits=report["splits"],
        rejects=len(report["rejects"]),
        skipped=len(report["skipped"]),
        duplicates=sum(len(d["dropped"]) for d in report["duplicates"]),
        conflicts=len(report["conflicts"]),
        warnings=len(report["warnings"]),
    )
