"""CLI commands of the model area: ``train-top``, ``finetune``, ``evaluate``, ``predict``, ``export``.

Stage commands run the plain ``run_<stage>(params, layout)`` under the workspace lock (as ``retrainflow index``
does); ``retrainflow run`` chains them inside Prefect flows. TensorFlow is imported only inside the commands.
Long steps (finetune epochs, evaluate and predict images) report ``tasks.progress.Step`` events, drawn here by
``flows.console.progress_display``. Each command ends with one line saying what it wrote.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.common import (
    EXIT_FAILED,
    EXIT_PARAMS,
    JsonOpt,
    ParamsOpt,
    SetOpt,
    WorkdirOpt,
    app,
    console,
    layout_for,
    load_or_exit,
    locked,
    print_error,
)
from tasks.layout import Layout

# Help texts go through rich markup: a literal "[default: ...]" must be escaped ("\\[") or rich eats it as a tag.
MODEL_HELP = (
    r"A .keras model with classes.json beside it \[default: the promoted champion, else the candidate]."
)


def default_model(layout: Layout) -> Path:
    """The promoted champion's model when there is one, else the candidate this workspace produced."""
    champion = layout.champion_link_model
    return champion if champion.is_file() else layout.candidate_model


def model_or_exit(model: Path | None, layout: Layout) -> Path:
    """``--model`` when given, else :func:`default_model`; exit 1 with a one-line reason when that file is missing
    (never a complaint about the classes file beside a model that does not exist)."""
    if model is not None:
        if not model.is_file():
            print_error("error", f"model file not found: {model}")
            raise typer.Exit(EXIT_FAILED)
        return model
    found = default_model(layout)
    if not found.is_file():
        champion = layout.champion_link_model
        print_error(
            "error",
            f"no model found: expected {champion} or {layout.candidate_model}; run `retrainflow run` (or `make "
            "demo`) first, or pass --model",
        )
        raise typer.Exit(EXIT_FAILED)
    return found


def _manifest_dict(manifest: Any) -> dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(manifest), default=str))


def _run_stage(
    command: str,
    runner: Callable[..., Any],
    params_file: Path,
    overrides: list[str] | None,
    workdir: Path,
    as_json: bool,
    summary: Callable[[Any], str],
    *,
    progress: bool = False,
) -> None:
    """Load params, hold the workspace lock, run the stage (a user error exits with the error map's code).

    ``progress``: the runner takes ``progress=`` (a :data:`tasks.progress.Reporter`): its steps are drawn on
    stderr while it runs."""
    from flows.console import progress_display

    loaded = load_or_exit(params_file, overrides)
    layout = layout_for(workdir)
    with locked(layout, f"retrainflow {command}"):
        if progress:
            with progress_display(console) as reporter:
                manifest = runner(loaded, layout, progress=reporter)
        else:
            manifest = runner(loaded, layout)
    if as_json:
        typer.echo(json.dumps(_manifest_dict(manifest), indent=2))
    else:
        console.print(summary(manifest), highlight=False, soft_wrap=True)


@app.command("train-top")
def train_top_cmd(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Train every head in top.heads on the cached features; keep the best by top.select_metric.

    Writes models/top/ (head.keras, head.json), metrics/top.json, reports/top_comparison.md,
    plots/top_history.csv, plots/top_heads/<head>.csv and reports/runs/train_top.json. Needs `retrainflow index`
    and `retrainflow features` first.
    """
    from tasks.stages.run_train_top import run_train_top

    _run_stage(
        "train-top",
        run_train_top,
        params,
        set_,
        workdir,
        as_json,
        lambda m: (
            f"best head {m.best_head}: val loss {m.val_loss:.4f}, val accuracy {m.val_accuracy:.4f} "
            f"({len(m.heads)} heads compared; see reports/top_comparison.md)"
        ),
        progress=True,
    )


@app.command("finetune")
def finetune_cmd(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Build the full model (raw pixels in) from the best head and fine-tune the base's last blocks.

    finetune.epochs 0 skips training (the top-only model is the result). A killed run resumes from its last finished
    epoch when started again. Writes models/candidate/model.keras + classes.json, metrics/finetune.json and
    plots/finetune_history.csv.
    """
    from tasks.stages.run_finetune import run_finetune

    def summary(m: Any) -> str:
        if m.skipped:
            return f"finetune skipped (finetune.epochs 0): {m.decision}; wrote {m.model_file}"
        resumed = f", resumed after epoch {m.resumed_from_epoch}" if m.resumed_from_epoch else ""
        return (
            f"fine-tuned {len(m.trainable_layers)} base layers for {m.epochs_run} epochs{resumed}; {m.decision}; "
            f"wrote {m.model_file}"
        )

    _run_stage("finetune", run_finetune, params, set_, workdir, as_json, summary, progress=True)


@app.command("evaluate")
def evaluate_cmd(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Evaluate the candidate and the top-only model on the test and val splits.

    Writes metrics/evaluate.json (flat, for `dvc metrics show`), plots/confusion.csv (for `dvc plots show`),
    reports/evaluation.json, reports/model_comparison.md and PNGs (training curves, confusion matrix, predictions).
    """
    from tasks.stages.run_evaluate import run_evaluate

    _run_stage(
        "evaluate",
        run_evaluate,
        params,
        set_,
        workdir,
        as_json,
        lambda m: (
            f"test accuracy {m.test_accuracy:.4f} (top-only {m.top_only_test_accuracy:.4f}), macro F1 "
            f"{m.test_macro_f1:.4f} on {m.test_images} images; reports in {Path(m.reports[0]).parent}"
        ),
        progress=True,
    )


@app.command("predict")
def predict_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help=MODEL_HELP),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="Output format: csv or json.")] = "csv",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the predictions here instead of stdout.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 32,
    workdir: WorkdirOpt = Path("."),
) -> None:
    """Predict the class of image files and folders; a file that cannot be decoded gets a row with an error.

    Exits 1 when no file could be predicted (the predictions, error rows only, are still written).
    """
    from flows.console import progress_display
    from tasks.models.predict import OUTPUT_FORMATS, format_predictions, predict_paths

    if fmt not in OUTPUT_FORMATS:
        console.print(f"[bold red]error:[/] --format: expected one of {OUTPUT_FORMATS}, got {fmt!r}")
        raise typer.Exit(EXIT_PARAMS)
    from tasks.models.full_model import read_bundle_classes

    model_file = model_or_exit(model, layout_for(workdir))
    names, _ = read_bundle_classes(model_file)
    with progress_display(console) as reporter:
        predictions = predict_paths(
            model_file, [str(p) for p in paths], batch_size=batch_size, progress=reporter
        )
    text = format_predictions(predictions, names, fmt)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    else:
        typer.echo(text, nl=False)
    failed = [p for p in predictions if p.error]
    where = str(output) if output is not None else "stdout"
    if len(failed) == len(predictions):
        print_error("error", _nothing_predicted(predictions, [str(p) for p in paths]))
        raise typer.Exit(EXIT_FAILED)
    failures = f"; {len(failed)} failed (see the error column)" if failed else ""
    console.print(
        f"predicted {len(predictions) - len(failed)} of {len(predictions)} files{failures}; wrote {fmt} to {where}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _nothing_predicted(predictions: list[Any], paths: list[str]) -> str:
    """Why predict produced nothing: no file found, or every file failed (the first error named)."""
    if not predictions:
        return f"no files found in {', '.join(paths)}"
    first = predictions[0]
    return f"none of the {len(predictions)} files could be predicted (first: {first.path}: {first.error})"


@app.command("export")
def export_cmd(
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help=MODEL_HELP),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help=r"Folder to create \[default: models/export/<model folder name>, plus -tflite for tflite].",
        ),
    ] = None,
    export_format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="savedmodel (TF serving) or tflite (LiteRT float32, for phones and edge devices).",
        ),
    ] = "savedmodel",
    workdir: WorkdirOpt = Path("."),
) -> None:
    """Export a .keras model with its classes.json: a TF SavedModel for serving (signature `serve`), or a LiteRT
    model.tflite (--format tflite). Both take float32 [B, H, W, 3] pixels 0-255 and give class probabilities."""
    from tasks.models.predict import EXPORT_FORMATS, TFLITE_FILE, export_model

    if export_format not in EXPORT_FORMATS:
        console.print(
            f"[bold red]error:[/] --format: expected one of {EXPORT_FORMATS}, got {export_format!r}"
        )
        raise typer.Exit(2)
    layout = layout_for(workdir)
    model_file = model_or_exit(model, layout)
    suffix = "-tflite" if export_format == "tflite" else ""
    target = (
        output if output is not None else layout.models_dir / "export" / f"{model_file.parent.name}{suffix}"
    )
    written = export_model(model_file, target, export_format)
    what = f"{TFLITE_FILE} + classes.json" if export_format == "tflite" else "SavedModel + classes.json"
    console.print(f"exported {model_file} to {written} ({what})", highlight=False, soft_wrap=True)
