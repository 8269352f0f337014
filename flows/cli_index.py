"""CLI commands of the index area (registered on the shared Typer app): ``retrainflow index``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import (
    EXIT_FAILED,
    ParamsOpt,
    SetOpt,
    WorkdirOpt,
    app,
    console,
    layout_for,
    load_or_exit,
    locked,
)


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
            "class folders. Same as --set data.source=csv --set data.csv=PATH.",
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes",
            help="Explicit class order, comma-separated (e.g. 'cats,dogs'); labels not listed are rejected. "
            "Same as --set data.classes=[...].",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", min=0, help="Validation threads (0 = one per core). Same as --set data.workers=N."
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the stage manifest (paths written, counts) as JSON on stdout."),
    ] = False,
) -> None:
    """Scan the images, really decode every file, and write index/index.csv, classes.json, index_report.json.

    Bad files are listed with a reason in index_report.json and never reach training; exact duplicates are collapsed; the same bytes under two labels are excluded as a label conflict. An image's split depends only on its content hash and data.split_seed, so adding images never moves old ones.

    Exit codes: 1 when the dataset as a whole is unusable (no images, one class, an empty class, missing CSV columns), 2 on invalid params, 3 when another run holds the workspace.
    """
    from tasks.index import DatasetError, run_index

    loaded = load_or_exit(params, [*(set_ or []), *index_overrides(root, csv, classes, workers)])
    layout = layout_for(workdir)
    with locked(layout, "retrainflow index", [(DatasetError, EXIT_FAILED)]):
        manifest = run_index(loaded, layout, console=console)
    if as_json:
        typer.echo(json.dumps(manifest.to_dict(), indent=2))
    else:
        console.print(
            f"wrote {manifest.index_table} ({manifest.images} images), {manifest.classes_file}, "
            f"{manifest.report_file}",
            highlight=False,
            soft_wrap=True,
        )
