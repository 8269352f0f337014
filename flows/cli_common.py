"""The Typer app and the options every command shares (params file, overrides, workspace)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tasks.config import Params, ParamsError, load_params
from tasks.layout import Layout

app = typer.Typer(
    name="retrainflow",
    help="Reproducible, scheduled transfer learning for image classification (Keras 3 + Prefect 3 + DVC 3).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="Params file (YAML) to read; every stage reads its section.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a param, e.g. --set top.lr=0.01 (repeatable; YAML values)."),
]
WorkdirOpt = Annotated[
    Path,
    typer.Option("--workdir", "-w", help="Workspace root: outputs go to index/, cache/, models/, ... here."),
]


def load_or_exit(params_file: Path, overrides: list[str] | None) -> Params:
    """Load and validate params; on error print every problem (key path and value) and exit with code 2."""
    try:
        return load_params(params_file, overrides or ())
    except ParamsError as err:
        console.print("[bold red]error:[/] ", end="")
        console.print(str(err), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def layout_for(workdir: Path) -> Layout:
    return Layout(workdir)


@app.command("params")
def show_params(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate the params file (with overrides) and print the effective values as YAML."""
    import yaml

    loaded = load_or_exit(params, set_)
    typer.echo(yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False))


@app.callback()
def main() -> None:
    """Reproducible, scheduled transfer learning for image classification.

    Stages: index -> features -> train-top -> finetune -> evaluate (-> promote). Each reads params.yaml
    (``--params``), accepts ``--set key.path=value`` overrides, and writes under ``--workdir``.
    """
