"""CLI commands of the index area (registered on the shared Typer app): ``retrainflow index``.

Display lives here, at the CLI edge: the validation progress (``tasks.progress`` steps drawn by
``flows.console.progress_display``), the summary table (:func:`print_summary`) and the closing line
(:func:`summary_line`). The stage itself (``tasks.stages.run_index.run_index``) prints nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.cli.common import (
    ParamsOpt,
    SetOpt,
    WorkdirOpt,
    app,
    console,
    json_flag,
    layout_for,
    load_or_exit,
    locked,
)

if TYPE_CHECKING:
    from rich.console import Console

    from tasks.progress import Reporter, Step
    from tasks.stages.run_index import IndexManifest

PROGRESS_MIN_FILES = 200  # show validation progress from this many files on (a short scan needs no bar)
SPLITS = ("train", "val", "test")
SHOWN = 10  # rejects / conflicts listed by the summary (all of them are in index_report.json)


def _quoted(value: object) -> str:
    """A YAML-safe scalar for an override (JSON strings are YAML), so a path like ``yes`` stays a string."""
    return json.dumps(str(value))


def index_overrides(
    root: Path | None, csv: Path | None, classes: str | None, workers: int | None
) -> list[str]:
    """The convenience options as ``--set`` overrides (they win over params.yaml and over ``--set``)."""
    extra: list[str] = []
    if root is not None:
        extra.append(f"data.root={_quoted(root)}")
    if csv is not None:
        extra += ["data.source=csv", f"data.csv={_quoted(csv)}"]
    if classes is not None:
        names = [c.strip() for c in classes.split(",") if c.strip()]
        extra.append(f"data.classes={json.dumps(names)}")
    if workers is not None:
        extra.append(f"data.workers={workers}")
    return extra


@app.command("index")
def index_cmd(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("."),
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help="Image folder (one subfolder per class), or the folder CSV paths are relative to. "
            "Same as --set data.root=PATH.",
        ),
    ] = None,
    csv: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="Index the files listed in this CSV (columns data.path_column, data.label_column) instead of "
            "class folders; a relative PATH is looked for in the current folder, then inside data.root. "
            "Same as --set data.source=csv --set data.csv=PATH.",
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes",
            help="Explicit class order, comma-separated (e.g. 'cats,dogs'); labels not listed are rejected. "
            "Same as --set data.classes=cats,dogs.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", min=0, help="Validation threads (0 = one per core). Same as --set data.workers=N."
        ),
    ] = None,
    as_json: Annotated[
        bool, json_flag("Print the stage manifest (paths written, counts) as JSON on stdout.")
    ] = False,
) -> None:
    """Scan the images, really decode every file, and write index/index.csv, classes.json, index_report.json.

    Bad files are listed with a reason in index_report.json and never reach training; exact duplicates are collapsed; the same bytes under two labels are excluded as a label conflict. An image's split depends only on its content hash and data.split_seed, so adding images never moves old ones.

    Exit codes: 1 when the dataset as a whole is unusable (no images, one class, an empty class, missing CSV columns), 2 on invalid params, 3 when another run holds the workspace.
    """
    from flows.console import progress_display
    from tasks.stages.run_index import run_index

    loaded = load_or_exit(params, [*(set_ or []), *index_overrides(root, csv, classes, workers)])
    layout = layout_for(workdir)
    with locked(layout, "retrainflow index"):
        with progress_display(console) as show:
            manifest = run_index(loaded, layout, progress=long_steps_only(show, PROGRESS_MIN_FILES))
        print_summary(json.loads(Path(manifest.report_file).read_text(encoding="utf-8")), console)
    console.print(summary_line(manifest), highlight=False, soft_wrap=True, markup=False)
    if as_json:
        typer.echo(json.dumps(manifest.to_dict(), indent=2))


def long_steps_only(show: Reporter, min_total: int) -> Reporter:
    """Pass on the steps of tasks with at least ``min_total`` units (a scan of a few files draws no bar)."""

    def forward(step: Step) -> None:
        if step.total is not None and step.total >= min_total:
            show(step)

    return forward


def summary_line(manifest: IndexManifest) -> str:
    """The one line the command ends with:
    ``index: 2000 images (1367 train / 331 val / 302 test), 0 rejected -> index/index.csv``."""
    splits = " / ".join(f"{manifest.splits.get(s, 0)} {s}" for s in SPLITS)
    extras = [
        f"{manifest.skipped} skipped" if manifest.skipped else "",
        f"{manifest.duplicates} duplicate(s) dropped" if manifest.duplicates else "",
        f"{manifest.conflicts} label conflict(s) excluded" if manifest.conflicts else "",
    ]
    counts = ", ".join([f"{manifest.rejects} rejected", *filter(None, extras)])
    return f"index: {manifest.images} images ({splits}), {counts} -> {manifest.index_table}"


def print_summary(report: Mapping[str, Any], console: Console) -> None:
    """A readable summary of ``index_report.json``: counts per class per split, rejects by kind, skipped files
    by reason, duplicates, conflicts, warnings."""
    from rich.table import Table

    table = Table(
        title=f"index: {report['images']} images, {len(report['classes'])} classes ({report['class_mode']})"
    )
    table.add_column("class")
    for split in (*SPLITS, "total"):
        table.add_column(split, justify="right")
    for name in report["classes"]:
        c = report["counts"][name]
        table.add_row(name, *(str(c[s]) for s in (*SPLITS, "total")))
    table.add_row("[bold]all[/]", *(str(report["splits"][s]) for s in SPLITS), f"[bold]{report['images']}[/]")
    console.print(table)
    _print_rejects(report["rejects"], report["rejects_by_kind"], console)
    _print_findings(report, console)
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)


def _print_rejects(rejects: list[dict[str, str]], by_kind: Mapping[str, int], console: Console) -> None:
    if not rejects:
        return
    kinds = ", ".join(f"{k}: {n}" for k, n in by_kind.items())
    console.print(f"[yellow]rejected {len(rejects)} file(s)[/] ({kinds})", highlight=False)
    for r in rejects[:SHOWN]:
        console.print(f"  {r['path']}: {r['reason']}", highlight=False, markup=False)
    if len(rejects) > SHOWN:
        console.print(f"  ... and {len(rejects) - SHOWN} more (see index_report.json)")


def _print_findings(report: Mapping[str, Any], console: Console) -> None:
    if report["skipped"]:
        reasons = Counter(s["reason"] for s in report["skipped"])
        why = "; ".join(f"{reason}: {n}" for reason, n in reasons.most_common())
        console.print(
            f"skipped {len(report['skipped'])} file(s) ({why})", highlight=False, markup=False, soft_wrap=True
        )
    if report["duplicates"]:
        dropped = sum(len(d["dropped"]) for d in report["duplicates"])
        console.print(f"duplicates: {len(report['duplicates'])} group(s), {dropped} extra copy(ies) dropped")
    if report["duplicate_rows"]:
        console.print(f"duplicate CSV rows: {len(report['duplicate_rows'])} path(s) listed more than once")
    if report["conflicts"]:
        console.print(
            f"[red]label conflicts: {len(report['conflicts'])}[/] (same file under different labels; "
            "every copy excluded)"
        )
        for c in report["conflicts"][:SHOWN]:
            where = c.get("paths") or {c["path"]: "/".join(c["labels"])}
            console.print("  " + ", ".join(f"{p} [{lab}]" for p, lab in where.items()), markup=False)
