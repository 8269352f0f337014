"""CLI commands of the features area (registered on the shared Typer app)."""

from flows.cli_common import app  # noqa: F401
