"""What every command shares: the Typer app, the options, the exit codes and the error map.

The error map (:data:`USER_ERRORS`) is the one list of exceptions that are the user's to fix (invalid params, a
busy workspace, unusable data, missing inputs, a full disk, no Prefect API, a failed DVC call) with the exit code
each one gets. Every command runs under it (:class:`App` wraps each command in :func:`user_errors`): a user error
ends the command with one ``error:`` line and its code; anything else is a bug and propagates with its traceback.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tasks.config import Params, load_params
from tasks.layout import Layout

EXIT_FAILED = 1  # the stage could not run: unusable data, missing inputs, a full disk
EXIT_PARAMS = 2  # invalid params or overrides
EXIT_LOCKED = 3  # another run holds the workspace lock
EXIT_WEIGHTS = 4  # the base's weights are not available (offline, not cached)


@dataclass(frozen=True)
class UserError:
    """One row of the error map: instances of ``module.name`` (for which ``when`` holds) end the command with
    ``label: message`` on stderr and exit ``code``. ``message`` rewrites the text when the exception's own is not
    what the user needs."""

    module: str
    name: str
    code: int
    label: str = "error"
    when: Callable[[BaseException], bool] | None = None
    message: Callable[[BaseException], str] | None = None

    def matches(self, err: BaseException) -> bool:
        # a class whose module was never imported has no instances: no import (and no TensorFlow) just to check
        kind = getattr(sys.modules.get(self.module), self.name, None)
        return isinstance(kind, type) and isinstance(err, kind) and (self.when is None or self.when(err))


# OSErrors that are the environment's, not the code's: a full disk, a permission, a missing or misplaced file.
USER_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.EMFILE,
    }
)


def environment_oserror(err: BaseException) -> bool:
    """An OSError the user fixes: one of :data:`USER_ERRNOS`, or a missing / existing file or a permission the
    stages raise themselves with a message (``FileNotFoundError("no trained head at ...")``, no errno)."""
    return getattr(err, "errno", None) in USER_ERRNOS or isinstance(
        err, FileNotFoundError | FileExistsError | PermissionError | NotADirectoryError | IsADirectoryError
    )


def _startup_timeout(err: BaseException) -> bool:
    from flows.cli.prefect_api import is_startup_timeout

    return is_startup_timeout(err)


def _startup_timeout_message(err: BaseException) -> str:
    from flows.cli.prefect_api import startup_timeout_message

    return startup_timeout_message()


# THE error map, first match wins (ParamsError and the other domain errors subclass ValueError: they come first).
USER_ERRORS: tuple[UserError, ...] = (
    UserError("tasks.config", "ParamsError", EXIT_PARAMS),
    UserError("tasks.errors", "LockHeldError", EXIT_LOCKED, label="busy"),
    UserError("tasks.errors", "WeightsUnavailableError", EXIT_WEIGHTS),
    UserError(
        "tasks.errors", "InputError", EXIT_FAILED
    ),  # DatasetError, FeaturesMismatchError, RegistryError...
    UserError("flows.cli.prefect_api", "PrefectApiError", EXIT_FAILED),
    UserError("flows.dvc_ops", "DvcError", EXIT_FAILED),
    UserError("builtins", "OSError", EXIT_FAILED, when=environment_oserror),
    UserError(
        "builtins", "RuntimeError", EXIT_FAILED, when=_startup_timeout, message=_startup_timeout_message
    ),
)


def user_error(err: BaseException) -> UserError | None:
    """The error map's row for ``err``, None when it is not a user error (a bug: let its traceback show)."""
    return next((row for row in USER_ERRORS if row.matches(err)), None)


def exit_for(err: BaseException, row: UserError) -> typer.Exit:
    """Print ``err`` as its row says and return the Exit to raise (``raise exit_for(err, row) from None``)."""
    print_error(row.label, row.message(err) if row.message else err)
    return typer.Exit(row.code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Run the body under the error map: a user error exits with its code and one line, the rest propagates."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except Exception as err:
        row = user_error(err)
        if row is None:
            raise
        raise exit_for(err, row) from None


class App(typer.Typer):
    """A Typer app whose every command runs under the error map (:func:`user_errors`)."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(func)
            def run(*a: Any, **kw: Any) -> Any:
                with user_errors():
                    return func(*a, **kw)

            register(run)
            return func

        return decorator


app = App(
    name="retrainflow",
    help="Reproducible, scheduled transfer learning for image classification (Keras 3 + Prefect 3 + DVC 3).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

STAGE_JSON_HELP = "Print the stage manifest as JSON on stdout."


def json_flag(help: str = STAGE_JSON_HELP) -> Any:
    """The ``--json`` option (what it prints differs per command: ``help`` says what)."""
    return typer.Option("--json", help=help)


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
JsonOpt = Annotated[bool, json_flag()]


def load_or_exit(params_file: Path, overrides: list[str] | None) -> Params:
    """Load and validate params; on error print every problem (key path and value) and exit with code 2."""
    with user_errors():
        return load_params(params_file, overrides or ())


def print_error(label: str, err: BaseException | str) -> None:
    """``label: message`` on stderr, the message verbatim (no console markup, no inserted line breaks)."""
    console.print(f"[bold red]{label}:[/] ", end="")
    console.print(str(err), markup=False, highlight=False, soft_wrap=True)


@contextmanager
def locked(layout: Layout, command: str) -> Iterator[None]:
    """Hold the workspace lock for ``command``; a held lock, and every user error of the body, exit with the
    error map's code and one line once the lock is released."""
    from tasks.io.locking import workspace_lock

    with user_errors(), workspace_lock(layout, command=command):
        yield


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
