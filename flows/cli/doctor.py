"""``retrainflow doctor``: environment checks with what to fix."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from flows.cli.common import ParamsOpt, SetOpt, WorkdirOpt, app, console, layout_for

STATUS_STYLE = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}


@app.command()
def doctor(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("."),
) -> None:
    """Check the environment: versions against the pins, params, data, the base's weights (missing ImageNet
    weights that cannot be downloaded block), DVC, the Prefect API and free disk where the feature cache goes.
    Prints what to fix; exits 1 when something blocks a run."""
    from tasks.doctor import blocking, run_checks

    checks = run_checks(params, tuple(set_ or ()), layout_for(workdir))
    table = Table(title="retrainflow doctor")
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for c in checks:
        table.add_row(c.name, STATUS_STYLE[c.status], c.detail, c.fix)
    console.print(table)
    if blocking(checks):
        console.print("[bold red]blocked:[/] fix the FAIL rows above before running the pipeline.")
        raise typer.Exit(1)
    console.print("[green]ready to run.[/]")
