"""The Typer app and the options every command shares (params file, overrides, workspace)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
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

EXIT_FAILED = 1  # the stage could not run: unusable data, missing inputs, a full disk
EXIT_PARAMS = 2  # invalid params or overrides
EXIT_LOCKED = 3  # another run holds the workspace lock

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
        print_error("error", err)
        raise typer.Exit(EXIT_PARAMS) from None


def print_error(label: str, err: BaseException) -> None:
    """``label: message`` on stderr, the message verbatim (no console markup, no inserted line breaks)."""
    console.print(f"[bold red]{label}:[/] ", end="")
    console.print(str(err), markup=False, highlight=False, soft_wrap=True)


Failures = Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], int]]


@contextmanager
def locked(layout: Layout, command: str, failures: Failures = ()) -> Iterator[None]:
    """Hold the workspace lock for ``command``; a held lock exits with EXIT_LOCKED, and each expected failure
    ``(exception types, exit code)`` exits with its code and a one-line reason instead of a traceback."""
    from tasks.locking import LockHeldError, workspace_lock

    try:
        with workspace_lock(layout, command=command):
            yield
    except LockHeldError as err:
        print_error("busy", err)
        raise typer.Exit(EXIT_LOCKED) from None
    except _flat(kinds for kinds, _ in failures) as err:
        print_error("error", err)
        raise typer.Exit(next(code for kinds, code in failures if isinstance(err, kinds))) from None


def _flat(
    kinds: Iterable[type[BaseException] | tuple[type[BaseException], ...]],
) -> tuple[type[BaseException], ...]:
    """``except`` takes a flat tuple of exception classes (``isinstance`` also takes nested ones)."""
    return tuple(k for kind in kinds for k in (kind if isinstance(kind, tuple) else (kind,)))


def layout_for(workdir: Path) -> Layout:
    return Layout(workdir)


@app.command("params")
def show_params(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate the params file (with overrides) and print the effective values as YAML."""
    import yaml

    loaded = load_or_exit(params, set_)
    typer.echo(yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False))


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"retrainflow {version('retrainflow')}")
        raise typer.Exit(0)


@app.callback()
def main(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show TensorFlow's own log lines (hidden by default).")
    ] = False,
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Reproducible, scheduled transfer learning for image classification.

    Stages: index -> features -> train-top -> finetune -> evaluate (-> promote). Each reads params.yaml
    (``--params``), accepts ``--set key.path=value`` overrides, and writes under ``--workdir``.
    """
    from flows.cli import defaults as cli_defaults

    cli_defaults.apply(cli_defaults.process_defaults(), verbose=verbose)
    if not verbose and ctx.invoked_subcommand not in cli_defaults.WITHOUT_TENSORFLOW:
        cli_defaults.import_tensorflow_quietly()
