"""CLI commands of the features area: ``retrainflow features`` and ``retrainflow cache list|prune``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.common import (
    EXIT_WEIGHTS,
    App,
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
    user_error,
)
from flows.cli.orchestrate import prefect_api

cache_app = App(help="Inspect and prune the feature cache (one folder per cache key).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@app.command("features")
def features_cmd(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("."),
    runner: Annotated[
        str | None,
        typer.Option(
            "--runner",
            help="local (one process) or dask: chunks of features.chunk_size images as Prefect task runs on a "
            "Dask cluster (same as --set features.runner=...).",
            show_default="features.runner",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="--runner dask without an address: worker processes of the local Dask cluster, one TF "
            "thread each (features.dask_workers).",
            show_default="features.dask_workers",
        ),
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option(
            "--dask-address",
            help="--runner dask: an existing scheduler, e.g. tcp://host:8786 (features.dask_address).",
            show_default=False,
        ),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    as_json: Annotated[
        bool, json_flag("Print the stage manifest (features/features.json) on stdout.")
    ] = False,
) -> None:
    """Compute the features of every view the index needs; only (image, view) pairs not cached go through the base.

    Train images get the clean view plus augment.passes augmented views, val and test the clean view. When
    fine-tuning takes the tail path (finetune.epochs > 0, finetune.path auto or tail), the same forward pass also
    caches the activation at the first unfrozen block's input for train's and val's views (a second cache key).
    features.engine picks what runs the frozen base: auto (LiteRT on a CPU when installed, Keras on a GPU), keras or
    litert; the base is converted to LiteRT once per key, and the engine is part of the cache key.
    Writes the cache (cache/features/<key>/ or features.cache_dir), features/features.json,
    features/activations.json, metrics/features.json (counts) and reports/runs/features.json (timings); ends with
    one line: "features <key>: computed N, reused M (...) on <engine>; activations <cut>: computed N, reused M; wrote ...".
    With --runner dask each chunk is an `extract-chunk` Prefect task run (retried when it fails or its worker
    dies); the command then reports to a Prefect server the workers can reach, starting one on 127.0.0.1 when
    none is configured or running. Needs `retrainflow index` first.
    """
    loaded = load_or_exit(params, [*(set_ or []), *_runner_overrides(runner, workers, dask_address)])
    layout = layout_for(workdir)
    from flows.console import progress_display
    from tasks.stages.run_features import run_features

    dask = loaded.features.runner == "dask"
    with (
        locked(layout, "retrainflow features"),
        prefect_api(layout, start_server=True) if dask else contextlib.nullcontext(),
        progress_display(console, enabled=False if no_progress else None) as progress,
    ):
        map_chunks = _map_chunks_on_dask(loaded) if dask else None
        manifest = run_features(loaded, layout, progress=progress, map_chunks=map_chunks)
    for warning in manifest.warnings:
        console.print("[yellow]warning:[/] ", end="")
        console.print(warning, markup=False, highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(manifest.to_json(), indent=2))
    else:
        written = [Path(manifest.cache_dir) / manifest.cache_key, layout.features_manifest]
        if manifest.activations:
            written.insert(1, Path(manifest.cache_dir) / manifest.activations["cache_key"])
        written += [layout.activations_manifest, layout.features_metrics, layout.run_record("features")]
        typer.echo(f"{manifest.summary()}; wrote {', '.join(p.as_posix() for p in written)}")


def _runner_overrides(runner: str | None, workers: int | None, address: str | None) -> list[str]:
    """The ``--runner/--workers/--dask-address`` options as ``--set`` overrides (params validate them)."""
    given = {"runner": runner, "dask_workers": workers, "dask_address": address}
    return [f"features.{key}={value}" for key, value in given.items() if value is not None]


def _map_chunks_on_dask(loaded: Any) -> Any:
    from flows.scale import map_chunks_on_dask

    return map_chunks_on_dask(loaded.features)


def _current_keys(
    params_file: Path, overrides: list[str] | None, workdir: Path, *, required: bool = True
) -> tuple[set[str], Path]:
    """(cache keys the current params use, cache root): the pooled features' key, plus the cut-point activations'
    when fine-tuning takes the tail path, both for the engine ``features.engine`` chooses. Fingerprints the
    weights (building nothing for files; the cut point is read off the architecture without weights).

    When the weights are unavailable (a user error of the error map): exit with the error, or
    (``required=False``) warn and give no key.
    """
    from tasks.features.activations import activation_key_spec, finetune_path
    from tasks.features.read import key_spec_for
    from tasks.inputs import resolve_inputs
    from tasks.models.bases import cut_point_of, weights_fingerprint
    from tasks.models.engines import choose_engine

    loaded = load_or_exit(params_file, overrides)
    inputs = resolve_inputs(loaded, layout_for(workdir))
    root = inputs.cache_root
    try:
        sha = weights_fingerprint(loaded.base, inputs.image_size)
    except Exception as err:
        if user_error(err) is None:
            raise
        print_error("error" if required else "warning", err)
        if required:
            raise typer.Exit(EXIT_WEIGHTS) from None
        return set(), root
    engine = choose_engine(loaded.features.engine).key
    keys = {key_spec_for(inputs, loaded.features, sha, engine).key}
    if finetune_path(loaded).wants_activations:
        cut = cut_point_of(loaded.base, inputs.image_size, loaded.finetune.unfreeze_blocks)
        keys.add(activation_key_spec(inputs, loaded, sha, cut, engine).key)
    return keys, root


@cache_app.command("list")
def cache_list(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("."),
    as_json: Annotated[bool, json_flag("Print JSON instead of a table.")] = False,
) -> None:
    """List the cache keys with their rows and size; `*` marks the key the current params use."""
    from tasks.features.cache import list_keys
    from tasks.models.engines import ENGINE_DIR

    current, root = _current_keys(params, set_, workdir, required=False)
    keys = list_keys(root)
    if as_json:
        typer.echo(
            json.dumps(
                [{**info.__dict__, "current": info.key in current} for info in keys], indent=2, default=str
            )
        )
        return
    if not keys:
        typer.echo(f"no feature cache under {root}")
        return
    typer.echo(f"feature cache: {root}")
    for info in keys:
        spec = info.spec
        what = f"{spec.get('base')} alpha={spec.get('alpha')} size={spec.get('image_size')} {spec.get('pooling')}"
        if spec.get("cut"):
            what += f" cut={spec['cut']} {'x'.join(str(n) for n in spec.get('shape', []))}"
        if spec.get("engine"):
            what += f" engine={spec['engine']}"
        mark = "*" if info.key in current else " "
        typer.echo(
            f"{mark} {info.key:<34} {info.rows:>8} rows {info.shards:>5} shards {_human(info.bytes):>10}  {what}"
        )
    total = sum(info.bytes for info in keys)
    typer.echo(f"{len(keys)} keys, {_human(total)} in {root}; * = used by the current params")
    converted = sorted((root / ENGINE_DIR).glob("*.tflite"))
    if converted:
        size = _human(sum(path.stat().st_size for path in converted))
        typer.echo(
            f"{len(converted)} converted base(s) for features.engine litert, {size} in {root / ENGINE_DIR}"
        )


@cache_app.command("prune")
def cache_prune(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("."),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
) -> None:
    """Remove every cache key the current params do not use (try `--dry-run` first): the pooled features' key
    and, when fine-tuning trains the tail, the cut-point activations' key are kept.

    Holds the workspace lock (as every writing command) and each key's own lock: a key a running `retrainflow
    features` is writing (from any workspace sharing the cache) is skipped and reported, never removed under it.
    """
    from tasks.features.cache import prune_keys

    current, root = _current_keys(params, set_, workdir)
    if dry_run:  # reads only: no workspace lock, so it also works while a run holds it
        result = prune_keys(root, current, dry_run=True)
    else:
        with locked(layout_for(workdir), "retrainflow cache prune"):
            result = prune_keys(root, current, dry_run=False)
    verb = "would remove" if dry_run else "removed"
    for info in result.removed:
        typer.echo(f"{verb} {info.key} ({info.rows} rows, {_human(info.bytes)})")
    for info in result.in_use:
        typer.echo(
            f"skipped {info.key}: in use by a running `retrainflow features`; prune again when it ends"
        )
    skipped = f", skipped {len(result.in_use)} in use" if result.in_use else ""
    typer.echo(
        f"{verb} {len(result.removed)} keys, {_human(sum(i.bytes for i in result.removed))} from {root}"
        f"{skipped}; kept {', '.join(sorted(current))}"
    )
