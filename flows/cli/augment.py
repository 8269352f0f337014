"""CLI commands of the augment area (registered on the shared Typer app): ``retrainflow augment-preview``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import ParamsOpt, SetOpt, WorkdirOpt, app, console, json_flag, layout_for, load_or_exit


@app.command("augment-preview")
def augment_preview_cmd(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("."),
    images: Annotated[
        int, typer.Option("--images", "-n", min=1, max=64, help="Images (rows of the grid).")
    ] = 6,
    views: Annotated[
        int,
        typer.Option(
            "--views", "-m", min=1, max=32, help="Augmented views per image (columns after 'clean')."
        ),
    ] = 5,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy", help="With augment.grid: preview only this policy (its name or short hash)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="PNG to write (one policy only). Default: reports/augment_preview_<hash>.png"
        ),
    ] = None,
    as_json: Annotated[bool, json_flag("Print what was written as JSON on stdout.")] = False,
) -> None:
    """Write a PNG grid of N images x (clean + M augmented views) for the augmentation policy in params.

    The views are exactly what the features stage computes (same pipeline, same seeds): view k of an image is a pure function of its content hash, the pass number k and the policy, augment.seed included. With augment.grid, one PNG per policy of the grid (augment.grid_samples of them when set, drawn with augment.seed as the features stage draws them). Images come from the index's train split, or from data.root when no index exists yet.

    Example: retrainflow augment-preview -n 4 -m 6 --set augment.rotation_range=40 --set augment.fill_mode=wrap
    """
    from tasks.reports.preview import run_preview

    loaded = load_or_exit(params, set_)
    manifest = run_preview(
        loaded, layout_for(workdir), images=images, views=views, policy_name=policy, out=out
    )
    if as_json:
        typer.echo(json.dumps(manifest.to_dict(), indent=2))
    else:
        for path, name in zip(manifest.files, manifest.policies, strict=True):
            console.print(f"wrote {path}  (policy {name})", highlight=False, soft_wrap=True)
