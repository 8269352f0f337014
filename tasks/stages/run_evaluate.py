"""The ``evaluate`` stage (``retrainflow stage evaluate``): the candidate and the top-only model on test and val.

A thin shell around :mod:`tasks.models.evaluation`: it resolves the inputs once (:func:`tasks.inputs.resolve_inputs`),
loads the candidate bundle and the top-only model (each fed as it was trained: the candidate as its bundle
records, the top-only model as its features were computed), runs both over the test and val splits and writes
through ``layout``: ``metrics/evaluate.json``, ``plots/confusion.csv``, ``reports/evaluation.json``,
``reports/model_comparison.md``, the PNG reports and the run record ``reports/runs/evaluate.json``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import Params
from tasks.errors import InputError
from tasks.inputs import Inputs, resolve_inputs
from tasks.io.atomic import atomic_write_json, atomic_write_text
from tasks.layout import Layout
from tasks.models.evaluation import (
    EvaluateManifest,
    ModelInput,
    Preview,
    SplitMetrics,
    comparison_markdown,
    compute_metrics,
    evaluate_split,
    flat_metrics,
    image_counter,
    input_passes,
    write_confusion_csv,
)
from tasks.progress import Reporter

STAGE = "evaluate"


def load_models(
    params: Params, layout: Layout, inputs: Inputs, names: tuple[str, ...]
) -> tuple[dict[str, ModelInput], str | None]:
    """The candidate (first: the prediction grid shows its inputs) and the top-only model, each with how its
    inputs are made; and the candidate's recorded sha256 (to match finetune's run record).

    When finetune's record says this candidate kept the top-only weights of the current head (and it is fed the
    same inputs), the top-only model IS the candidate: it is not built, and only the candidate is returned
    (:func:`same_as_top_only`)."""
    from tasks.models.full_model import load_bundle, load_top_model, raw_pixels, read_bundle_model_sha256

    candidate = load_bundle(layout.candidate_model)
    if candidate.names != names:
        raise InputError(
            f"the candidate model's classes {list(candidate.names)!r} differ from the index's {list(names)!r}"
        )
    model_sha256 = read_bundle_model_sha256(layout.candidate_model)
    models = {"candidate": ModelInput(candidate.model, candidate.image)}
    if not (same_as_top_only(layout, model_sha256) and candidate.image == raw_pixels(inputs.image)):
        top_only, _, _ = load_top_model(params, layout, inputs)
        models["top_only"] = ModelInput(top_only, raw_pixels(inputs.image))
    return models, model_sha256


def same_as_top_only(layout: Layout, model_sha256: str | None) -> bool:
    """Whether the candidate holds the top-only weights: finetune kept them (its record, for this very model file)
    and built it from the head that is in ``models/top`` now."""
    from tasks.models.bases import sha256_file
    from tasks.reports.plots import read_finetune_record

    record = read_finetune_record(layout, model_sha256)
    return (
        record is not None
        and record.get("kept") == "top-only"
        and layout.top_head_model.is_file()
        and record.get("top_head_sha256") == sha256_file(layout.top_head_model)
    )


def write_pngs(
    layout: Layout, results: dict[str, dict[str, SplitMetrics]], names: tuple[str, ...], preview: Preview
) -> list[Path]:
    """Training curves, the test confusion matrix and the (class-balanced) predictions grid."""
    from tasks.models.heads import read_head_info
    from tasks.reports.plots import (
        plot_confusion,
        plot_prediction_grid,
        plot_training_curves,
        read_history_csv,
    )

    chosen = preview.chosen()  # written even when empty (evaluate.preview_images: 0): it is a DVC output
    return [
        plot_training_curves(
            read_history_csv(layout.top_history),
            read_head_info(layout)["spec"]["name"],
            read_history_csv(layout.finetune_history),
            layout.training_curves_png,
        ),
        plot_confusion(
            results["candidate"]["test"].confusion, names, layout.confusion_png, "Test confusion matrix"
        ),
        plot_prediction_grid(
            [c.image for c in chosen],
            [names[c.actual] for c in chosen],
            [names[c.predicted] for c in chosen],
            [c.confidence for c in chosen],
            layout.predictions_png,
            "" if chosen else "no preview images (evaluate.preview_images: 0)",
        ),
    ]


def run_evaluate(params: Params, layout: Layout, *, progress: Reporter | None = None) -> EvaluateManifest:
    """Evaluate the candidate and the top-only model on test (and val); write metrics, plots data and reports.

    ``progress`` gets ``Step("evaluate", images done, total)`` (each pass of the input pipeline counts)."""
    from tasks.data.index_table import read_classes, read_index
    from tasks.models.full_model import probability_matrix
    from tasks.reports.plots import read_decision, write_run_record

    start = time.perf_counter()
    cfg = params.evaluate
    inputs = resolve_inputs(params, layout)
    names = tuple(read_classes(layout).names)
    models, model_sha256 = load_models(params, layout, inputs, names)
    index = read_index(layout)
    splits = {split: index[index["split"] == split].reset_index(drop=True) for split in ("test", "val")}
    if len(splits["test"]) == 0:
        raise InputError("evaluate needs test images, got 0 rows in the test split of the index")
    total = sum(len(rows) for rows in splits.values()) * input_passes(models)
    seen = image_counter(progress, total)
    preview = Preview(cfg.preview_images)
    results: dict[str, dict[str, SplitMetrics]] = {name: {} for name in models}
    test_candidate = np.zeros((0, len(names)))
    for split, rows in splits.items():
        if len(rows) == 0:
            continue
        ids = rows["class_id"].to_numpy()
        outputs = evaluate_split(
            models, rows, inputs.data_root, cfg.batch_size, preview if split == "test" else None, seen
        )
        for name, out in outputs.items():
            results[name][split] = compute_metrics(out, ids, names)
        if split == "test":
            test_candidate = probability_matrix(outputs["candidate"], len(names))
    if "top_only" not in models:  # the same weights: evaluated once
        results["top_only"] = results["candidate"]

    flat = flat_metrics(results, cfg.metric)
    atomic_write_json(layout.evaluate_metrics, flat)
    test_ids = splits["test"]["class_id"].to_numpy()
    write_confusion_csv(layout.confusion_csv, test_ids, test_candidate.argmax(axis=1), names)
    details: dict[str, Any] = {
        name: {split: asdict(m) for split, m in by_split.items()} for name, by_split in results.items()
    }
    atomic_write_json(layout.evaluation_details, {"classes": list(names), **details})
    decision = read_decision(layout, model_sha256)
    atomic_write_text(layout.model_comparison, comparison_markdown(results, decision))
    written = [*write_pngs(layout, results, names, preview), layout.model_comparison]
    seconds = time.perf_counter() - start
    test = results["candidate"]["test"]
    val = results["candidate"].get("val")
    manifest = EvaluateManifest(
        metric=cfg.metric,
        score=flat["score"],
        test_accuracy=test.accuracy,
        test_macro_f1=test.macro_f1,
        top_only_test_accuracy=results["top_only"]["test"].accuracy,
        val_accuracy=val.accuracy if val else None,
        test_images=len(splits["test"]),
        val_images=len(splits["val"]),
        reports=[p.as_posix() for p in written],
        seconds=round(seconds, 3),
    )
    write_run_record(
        layout.run_record(STAGE),
        {
            "seconds": manifest.seconds,
            "images_evaluated": total,
            "images_per_second": round(total / seconds, 2) if seconds > 0 else None,
            "model_file": layout.candidate_model.as_posix(),
            "model_sha256": model_sha256,
            "top_only": "evaluated" if "top_only" in models else "the candidate's figures (the same weights)",
            "reports": manifest.reports,
        },
    )
    return manifest
