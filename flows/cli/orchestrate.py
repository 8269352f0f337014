"""CLI commands of the orchestrate area: run, stage, serve, dashboard, promote, registry."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.cli.common import (
    EXIT_PARAMS,
    JsonOpt,
    ParamsOpt,
    SetOpt,
    WorkdirOpt,
    app,
    console,
    json_flag,
    layout_for,
    load_or_exit,
    locked,
    print_error,
)
from tasks.layout import Layout

if TYPE_CHECKING:
    from flows.cli.prefect_api import PrefectApi

STAGE_NAMES = ("index", "features", "train_top", "finetune", "evaluate")


def _stage_name(name: str) -> str:
    """``train-top`` and ``train_top`` both name the train_top stage."""
    normal = name.strip().replace("-", "_")
    if normal not in STAGE_NAMES:
        console.print(
            f"[bold red]error:[/] unknown stage {name!r}; expected one of {', '.join(STAGE_NAMES)}",
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_PARAMS)
    return normal


@contextmanager
def prefect_api(layout: Layout, *, start_server: bool = False) -> Iterator[PrefectApi]:
    """The Prefect API this command's flow runs report to (``flows.cli.prefect_api``). None answering
    (``PrefectApiError``) and Prefect's temporary API not starting in time are user errors of the error map:
    one clear ``error:`` line and exit 1, never a traceback."""
    from flows.cli.prefect_api import choose_api, reporting_to

    api = choose_api(start_server=start_server)
    if api.origin == "started":
        console.print(
            f"starting a Prefect server for this run: {api.ui_url} (log {layout.prefect_server_log})"
        )
    with reporting_to(api, log_file=layout.prefect_server_log) as chosen:
        yield chosen


def needs_server(params: Any) -> bool:
    """Dask workers report their chunk task runs to the caller's Prefect API: it must be a server they can
    reach, not Prefect's temporary in-process one."""
    return params.features.runner == "dask"


def run_summary_line(summary: dict[str, Any], layout: Layout) -> str:
    """One line for the end of ``retrainflow run``: what happened, the score, and which model file to use."""
    status = summary.get("status", "?")
    pushed = (
        f" (not pushed to the DVC remote: {summary['dvc_not_pushed_because']}; the next run pushes)"
        if summary.get("dvc_not_pushed_because")
        else ""
    )
    if status == "skipped":
        return f"retrain skipped: {summary.get('reason')}{pushed}"
    promote = summary.get("promote") or {}
    score = promote.get("score")
    figure = f"test {promote.get('metric')} {score:.4f}; " if isinstance(score, float) else ""
    model = layout.champion_link_model if promote.get("promoted") else layout.candidate_model
    line = f"retrain {status}: {figure}candidate {promote.get('candidate_id')} in {model}"
    if summary.get("dvc_not_committed_because"):
        line += f" (not committed to DVC: {summary['dvc_not_committed_because']})"
    line += pushed
    return line


@app.command("run")
def run_cmd(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("."),
    force: Annotated[
        bool, typer.Option("--force", help="Retrain even if data and params are unchanged.")
    ] = False,
    with_server: Annotated[
        bool,
        typer.Option(
            "--with-server",
            help="Start a local Prefect server (API + dashboard) on 127.0.0.1:4200 for this run when none is "
            "running, and stop it at the end; the run stays in Prefect's database (`retrainflow dashboard`).",
        ),
    ] = False,
    as_json: Annotated[bool, json_flag("Print the run summary as JSON on stdout.")] = False,
) -> None:
    """Run the whole pipeline as the Prefect `retrain` flow (index -> ... -> evaluate -> promote).

    Reports to the Prefect API in PREFECT_API_URL, else to a local server on 127.0.0.1:4200 when one is running
    (`retrainflow dashboard`), else to a temporary local API. Ends with one line: what the run wrote and where
    to see it in the dashboard.
    """
    loaded = load_or_exit(params, set_)  # validate before paying for a Prefect API
    layout = layout_for(workdir)
    with (
        locked(layout, "retrainflow run"),
        prefect_api(layout, start_server=with_server or needs_server(loaded)) as api,
    ):
        from flows.flows import retrain

        summary = retrain(
            params_file=str(params), overrides=list(set_ or []), force=force, workdir=str(workdir)
        )
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "stages"}, indent=2, default=str))
    console.print(run_summary_line(summary, layout), highlight=False, soft_wrap=True)
    link = api.flow_run_link(summary.get("flow_run_id"))
    if link:
        console.print(f"flow run: {link}", highlight=False, soft_wrap=True)


@app.command("stage")
def stage_cmd(
    name: Annotated[str, typer.Argument(help="index | features | train_top | finetune | evaluate")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Run one stage inside its Prefect flow (the command each `dvc.yaml` stage runs).

    Reports to the same Prefect API as `retrainflow run`: under `dvc repro`, run `retrainflow dashboard` (or
    `make dashboard`) first so every stage shares one server instead of starting a temporary one each.
    """
    stage = _stage_name(name)
    loaded = load_or_exit(params, set_)
    layout = layout_for(workdir)
    start_server = stage == "features" and needs_server(loaded)
    with locked(layout, f"retrainflow stage {stage}"), prefect_api(layout, start_server=start_server):
        from flows.flows import STAGE_FLOWS

        manifest = STAGE_FLOWS[stage](
            params_file=str(params), overrides=list(set_ or []), workdir=str(workdir)
        )
    if as_json:
        typer.echo(json.dumps(manifest, indent=2, default=str))
    console.print(stage_summary_line(stage, manifest), highlight=False, soft_wrap=True)


def stage_summary_line(stage: str, manifest: dict[str, Any], fields: int = 6) -> str:
    """``stage features done: computed 10, reused 0, ...``: the manifest's first scalar fields, paths shortened
    to their file names."""
    shown = [
        f"{key} {Path(value).name if isinstance(value, str) and '/' in value else value}"
        for key, value in manifest.items()
        if isinstance(value, str | int | float | bool)
    ]
    return f"stage {stage} done: {', '.join(shown[:fields])}"


@app.command("serve")
def serve_cmd(
    cron: Annotated[str, typer.Option("--cron", help="Cron schedule, e.g. '0 3 * * *' (03:00 every day).")],
    name: Annotated[str, typer.Option("--name", help="Deployment name.")] = "scheduled-retrain",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("."),
    force: Annotated[
        bool, typer.Option("--force", help="Retrain on every run, even when unchanged.")
    ] = False,
) -> None:
    """Serve the retrain flow as a Prefect deployment on a cron schedule (runs until Ctrl-C)."""
    from flows.deploy import serve_retrain, validate_cron

    load_or_exit(params, set_)
    try:
        validate_cron(cron)
    except ValueError as err:  # a bad expression is a bad option value: exit 2, like bad params
        print_error("error", err)
        raise typer.Exit(EXIT_PARAMS) from None
    with prefect_api(layout_for(workdir)):
        serve_retrain(
            cron, name=name, params_file=params, overrides=list(set_ or []), workdir=workdir, force=force
        )


@app.command("dashboard")
def dashboard_cmd(
    port: Annotated[int, typer.Option("--port", help="Port of the Prefect server.")] = 4200,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
) -> None:
    """Start the Prefect server (API + dashboard) and print its URL; runs until Ctrl-C."""
    if not 0 < port < 65536:
        console.print(f"[bold red]error:[/] expected a port in 1..65535, got {port}", soft_wrap=True)
        raise typer.Exit(EXIT_PARAMS)
    from flows.cli.prefect_api import api_url_for, server_command, server_env

    url = f"http://{host}:{port}"
    typer.echo(f"Prefect dashboard: {url}")
    typer.echo(f"Point runs at it:  export PREFECT_API_URL={api_url_for(host, port)}")
    try:
        raise typer.Exit(subprocess.call(server_command(host, port), env=server_env(host, port)))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@app.command("promote")
def promote_cmd(
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, workdir: WorkdirOpt = Path(".")
) -> None:
    """Gate the current candidate (metrics/evaluate.json) against the champion and record it in the registry."""
    from tasks.models.registry import run_promote

    loaded = load_or_exit(params, set_)
    layout = layout_for(workdir)
    with locked(layout, "retrainflow promote"):
        manifest = run_promote(loaded, layout)
    typer.echo(json.dumps(manifest.to_json(), indent=2))
    console.print(f"promote: {manifest.reason}", highlight=False, soft_wrap=True)


@app.command("registry")
def registry_cmd(
    workdir: WorkdirOpt = Path("."),
    as_json: Annotated[bool, json_flag("Print the raw registry JSON.")] = False,
) -> None:
    """List every candidate model: when, data version, params hash, score, promoted or not and why."""
    from tasks.models.registry import read_registry

    reg = read_registry(layout_for(workdir))
    if as_json:
        typer.echo(json.dumps(reg.to_json(), indent=2))
        return
    if not reg.candidates:
        typer.echo("registry is empty: no candidate recorded yet")
        return
    typer.echo(
        f"champion: {reg.champion or 'none'}   ({len(reg.candidates)} candidates, {layout_for(workdir).model_registry})"
    )
    for c in reg.candidates:
        mark = "*" if c.id == reg.champion else " "
        verdict = "promoted" if c.promoted else "rejected"
        typer.echo(
            f"{mark} {c.id}  {c.metric} {c.score:.4f}  {verdict}  data {c.data_version[:16]}  "
            f"params {c.params_hash}  git {(c.git_commit or '-')[:12]}"
        )
        typer.echo(f"    {c.reason}")
