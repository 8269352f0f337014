"""The ``evaluate`` stage: the candidate (and the top-only) model on the test and val splits.

Metrics are computed here with numpy (no sklearn): loss, accuracy, per-class precision / recall / F1, macro F1,
ROC AUC for binary, confusion matrix. Each model is fed test / val images the way it was trained: the candidate at
its input size with the resize interpolation its bundle records (``classes.json``), the top-only model at its own
input size with the interpolation its features were computed with (``image.interpolation``).

Outputs (each written atomically): flat ``metrics/evaluate.json`` (DVC metrics), ``plots/confusion.csv``
(``actual,predicted`` rows for ``dvc plots``), ``reports/evaluation.json`` (the full nested results),
``reports/model_comparison.md`` and PNGs in ``reports/`` (see :mod:`tasks.reports`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.atomic import write_text_atomic
from tasks.config import Params
from tasks.layout import Layout

EPSILON = 1e-7  # the clip Keras applies to probabilities in cross-entropy


# ------------------------------------------------------------------------------------------------ metrics
@dataclass(frozen=True)
class ClassMetrics:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class SplitMetrics:
    """Every number for one model on one split; ``confusion[i][j]`` counts actual class i predicted as j."""

    count: int
    loss: float
    accuracy: float
    macro_f1: float
    roc_auc: float | None
    per_class: tuple[ClassMetrics, ...]
    confusion: tuple[tuple[int, ...], ...]

    def flat(self, prefix: str) -> dict[str, float | int]:
        """Flat ``{prefix}_{metric}`` keys (per class: ``{prefix}_f1_{class}``), for ``metrics/*.json``."""
        out: dict[str, float | int] = {
            f"{prefix}_count": self.count,
            f"{prefix}_loss": self.loss,
            f"{prefix}_accuracy": self.accuracy,
            f"{prefix}_macro_f1": self.macro_f1,
        }
        if self.roc_auc is not None:
            out[f"{prefix}_roc_auc"] = self.roc_auc
        for c in self.per_class:
            out[f"{prefix}_precision_{c.name}"] = c.precision
            out[f"{prefix}_recall_{c.name}"] = c.recall
            out[f"{prefix}_f1_{c.name}"] = c.f1
        return out


def probability_matrix(predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Model outputs -> ``[N, num_classes]`` class probabilities (a single sigmoid column becomes ``[1 - p, p]``)."""
    p = np.asarray(predictions, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2:
        raise ValueError(f"predictions: expected shape [N] or [N, C], got {p.shape!r}")
    if p.shape[1] == 1 and num_classes == 2:
        return np.concatenate([1.0 - p, p], axis=1)
    if p.shape[1] != num_classes:
        raise ValueError(f"predictions: expected {num_classes} columns, got shape {p.shape!r}")
    return p


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` int counts, rows = actual class, columns = predicted class."""
    actual = np.asarray(actual, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    if actual.shape != predicted.shape:
        raise ValueError(f"actual and predicted differ in shape: {actual.shape!r} vs {predicted.shape!r}")
    for name, ids in (("actual", actual), ("predicted", predicted)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(
                f"{name}: class ids must be in [0, {num_classes}), got {sorted(set(ids.tolist()))!r}"
            )
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (actual, predicted), 1)
    return matrix


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); None if one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos = int(positives.sum())
    n_neg = int(positives.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    i = 0
    while i < scores.size:  # average ranks (1-based) over runs of equal scores
        j = i
        while j + 1 < scores.size and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


def compute_metrics(predictions: np.ndarray, class_ids: np.ndarray, names: tuple[str, ...]) -> SplitMetrics:
    """All split metrics from model outputs and the true class ids (precision/recall of an unseen class: 0)."""
    num_classes = len(names)
    probs = probability_matrix(predictions, num_classes)
    actual = np.asarray(class_ids, dtype=np.int64)
    if probs.shape[0] != actual.shape[0]:
        raise ValueError(f"{probs.shape[0]} predictions but {actual.shape[0]} labels")
    count = int(actual.size)
    if count == 0:
        zeros = tuple(ClassMetrics(n, 0.0, 0.0, 0.0, 0) for n in names)
        empty = tuple(tuple(0 for _ in names) for _ in names)
        return SplitMetrics(0, math.nan, math.nan, math.nan, None, zeros, empty)
    predicted = probs.argmax(axis=1)
    matrix = confusion_matrix(actual, predicted, num_classes)
    true_p = np.clip(probs[np.arange(count), actual], EPSILON, 1 - EPSILON)
    per_class = []
    for c, name in enumerate(names):
        tp = float(matrix[c, c])
        precision = _ratio(tp, float(matrix[:, c].sum()))
        recall = _ratio(tp, float(matrix[c, :].sum()))
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class.append(ClassMetrics(name, precision, recall, f1, int(matrix[c, :].sum())))
    return SplitMetrics(
        count=count,
        loss=float(-np.log(true_p).mean()),
        accuracy=float((predicted == actual).mean()),
        macro_f1=float(np.mean([c.f1 for c in per_class])),
        roc_auc=roc_auc(probs[:, 1], actual == 1) if num_classes == 2 else None,
        per_class=tuple(per_class),
        confusion=tuple(tuple(int(v) for v in row) for row in matrix),
    )


# ------------------------------------------------------------------------------------------------ the stage
EVALUATE_METRICS_FILE = "evaluate.json"
CONFUSION_FILE = "confusion.csv"
DETAILS_FILE = "evaluation.json"
COMPARISON_FILE = "model_comparison.md"
CURVES_PNG = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
PREDICTIONS_PNG = "predictions.png"
MODEL_LABELS = {"candidate": "fine-tuned (candidate)", "top_only": "top-only"}


@dataclass
class Preview:
    """Up to ``limit`` mistakes and ``limit`` correct predictions, kept while streaming the test split."""

    limit: int
    wrong: list[tuple[int, np.ndarray, int, int, float]]
    right: list[tuple[int, np.ndarray, int, int, float]]

    def offer(self, position: int, image: np.ndarray, actual: int, predicted: int, confidence: float) -> None:
        bucket = self.wrong if actual != predicted else self.right
        if len(bucket) < self.limit:
            bucket.append((position, np.clip(image, 0, 255).astype(np.uint8), actual, predicted, confidence))

    def chosen(self) -> list[tuple[int, np.ndarray, int, int, float]]:
        """Mistakes first (up to half the grid, more if there are too few correct ones), in split order."""
        n_wrong = min(len(self.wrong), max(self.limit // 2, self.limit - len(self.right)))
        picked = self.wrong[:n_wrong] + self.right[: self.limit - n_wrong]
        return sorted(picked, key=lambda item: item[0])


@dataclass(frozen=True)
class EvaluateManifest:
    """What ``run_evaluate`` returns (JSON-able)."""

    metric: str
    score: float
    test_accuracy: float
    test_macro_f1: float
    top_only_test_accuracy: float
    val_accuracy: float | None
    test_images: int
    val_images: int
    reports: list[str]
    seconds: float


def predict_split(
    models: dict[str, Any], dataset: Any, class_ids: np.ndarray, preview: Preview | None
) -> dict[str, np.ndarray]:
    """Every model's outputs over one pass of ``dataset`` (image batches); feeds ``preview`` with the first model's."""
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in models}
    position = 0
    first = next(iter(models))
    for batch in dataset:
        for name, model in models.items():
            outputs[name].append(np.asarray(model.predict_on_batch(batch)))
        if preview is not None:
            probs = probability_matrix(outputs[first][-1], max(2, outputs[first][-1].shape[-1]))
            images = np.asarray(batch)
            for i in range(images.shape[0]):
                pred = int(probs[i].argmax())
                preview.offer(
                    position + i, images[i], int(class_ids[position + i]), pred, float(probs[i, pred])
                )
        position += int(np.asarray(batch).shape[0])
    return {name: np.concatenate(chunks) if chunks else np.zeros((0, 1)) for name, chunks in outputs.items()}


@dataclass(frozen=True)
class ModelInput:
    """A model to evaluate and how its inputs were made in training: input size, resize interpolation and
    whether images were centre-cropped to the aspect ratio."""

    model: Any
    image_size: tuple[int, int]
    interpolation: str
    crop_to_aspect_ratio: bool = False

    @classmethod
    def of(cls, model: Any, interpolation: str, crop_to_aspect_ratio: bool) -> ModelInput:
        """The model's own input size (``[B, H, W, 3]``) with ``interpolation`` and the crop rule."""
        shape = model.input_shape
        return cls(model, (int(shape[1]), int(shape[2])), interpolation, crop_to_aspect_ratio)


def evaluate_split(
    models: dict[str, ModelInput], rows: Any, root: Path, batch_size: int, preview: Preview | None
) -> dict[str, np.ndarray]:
    """Every model's outputs on ``rows``, each fed images resized as in its training (size, interpolation, crop).

    Models that agree on both share one pass of the input pipeline. ``preview`` gets the first model's inputs.
    """
    from tasks.pipeline import view_dataset

    ids = rows["class_id"].to_numpy()
    groups: dict[tuple[tuple[int, int], str, bool], dict[str, Any]] = {}
    for name, entry in models.items():
        key = (entry.image_size, entry.interpolation, entry.crop_to_aspect_ratio)
        groups.setdefault(key, {})[name] = entry.model
    first = next(iter(models))
    outputs: dict[str, np.ndarray] = {}
    for (size, interpolation, crop), group in groups.items():
        dataset = view_dataset(
            rows,
            root,
            image_size=size,
            batch_size=batch_size,
            interpolation=interpolation,
            crop_to_aspect_ratio=crop,
        )
        outputs.update(predict_split(group, dataset, ids, preview if first in group else None))
    return {name: outputs[name] for name in models}


# evaluate.metric -> the candidate's test score (an explicit table, as every registry here)
SCORE_METRICS: dict[str, Callable[[SplitMetrics], float]] = {
    "accuracy": lambda m: m.accuracy,
    "macro_f1": lambda m: m.macro_f1,
}
# the top-only model's figures copied into metrics/evaluate.json as top_only_<split>_<name>
TOP_ONLY_METRICS: dict[str, Callable[[SplitMetrics], float | None]] = {
    "loss": lambda m: m.loss,
    "accuracy": lambda m: m.accuracy,
    "macro_f1": lambda m: m.macro_f1,
    "roc_auc": lambda m: m.roc_auc,
}


def score_of(metrics: SplitMetrics, metric: str) -> float:
    """The score ``evaluate.metric`` names (see :data:`SCORE_METRICS`)."""
    if metric not in SCORE_METRICS:
        raise ValueError(f"evaluate.metric: expected one of {sorted(SCORE_METRICS)}, got {metric!r}")
    return float(SCORE_METRICS[metric](metrics))


def comparison_markdown(results: dict[str, dict[str, SplitMetrics]]) -> str:
    """One table: the top-only model against the fine-tuned candidate, on test (and val)."""
    lines = [
        "# Top-only vs fine-tuned",
        "",
        "| model | test accuracy | test loss | test macro F1 | test ROC AUC | val accuracy | val loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(value: float | None) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    for name in ("top_only", "candidate"):
        test, val = results[name]["test"], results[name].get("val")
        lines.append(
            f"| {MODEL_LABELS[name]} | {cell(test.accuracy)} | {cell(test.loss)} | {cell(test.macro_f1)} | "
            f"{cell(test.roc_auc)} | {cell(val.accuracy if val else None)} | {cell(val.loss if val else None)} |"
        )
    return "\n".join(lines) + "\n"


def write_confusion_csv(
    path: Path, actual: np.ndarray, predicted: np.ndarray, names: tuple[str, ...]
) -> None:
    """``actual,predicted`` class-name rows, one per test image (``dvc plots`` draws the confusion matrix)."""
    lines = ["actual,predicted"] + [f"{names[a]},{names[p]}" for a, p in zip(actual, predicted, strict=True)]
    write_text_atomic(path, "\n".join(lines) + "\n")


def run_evaluate(params: Params, layout: Layout) -> EvaluateManifest:
    """Evaluate the candidate and the top-only model on test (and val); write metrics, plots data and reports."""
    from tasks.finetune import data_root, load_top_model, split_rows
    from tasks.heads import load_bundle
    from tasks.index import read_classes, read_index
    from tasks.reports import plot_confusion, plot_prediction_grid, plot_training_curves, read_history_csv
    from tasks.train_top import TOP_HISTORY_FILE, read_head_info

    start = time.perf_counter()
    cfg = params.evaluate
    classes = read_classes(layout)
    names = tuple(classes.names)
    candidate = load_bundle(layout.candidate_model)
    if candidate.names != names:
        raise ValueError(
            f"the candidate model's classes {list(candidate.names)!r} differ from the index's {list(names)!r}"
        )
    top_only, _, _ = load_top_model(params, layout)
    models = {  # the candidate first: the prediction grid shows its inputs
        "candidate": ModelInput.of(candidate.model, candidate.interpolation, candidate.crop_to_aspect_ratio),
        "top_only": ModelInput.of(top_only, params.image.interpolation, params.image.crop_to_aspect_ratio),
    }
    index = read_index(layout)
    root = data_root(params)
    preview = Preview(cfg.preview_images, [], [])
    results: dict[str, dict[str, SplitMetrics]] = {name: {} for name in models}
    test_predictions = np.zeros((0, len(names)))
    counts: dict[str, int] = {}
    for split in ("test", "val"):
        rows = split_rows(index, split)
        counts[split] = len(rows)
        if len(rows) == 0:
            if split == "test":
                raise ValueError("evaluate needs test images, got 0 rows in the test split of the index")
            continue
        ids = rows["class_id"].to_numpy()
        outputs = evaluate_split(models, rows, root, cfg.batch_size, preview if split == "test" else None)
        for name, out in outputs.items():
            results[name][split] = compute_metrics(out, ids, names)
        if split == "test":
            test_predictions = probability_matrix(outputs["candidate"], len(names))
            test_ids = ids

    flat: dict[str, Any] = {"metric": cfg.metric}
    for split, metrics in results["candidate"].items():
        flat.update(metrics.flat(split))
    for split, metrics in results["top_only"].items():
        for key, value_of in TOP_ONLY_METRICS.items():
            value = value_of(metrics)
            if value is not None:
                flat[f"top_only_{split}_{key}"] = value
    score = score_of(results["candidate"]["test"], cfg.metric)
    flat["score"] = score
    write_text_atomic(layout.metrics_dir / EVALUATE_METRICS_FILE, json.dumps(flat, indent=2) + "\n")
    write_confusion_csv(layout.plots_dir / CONFUSION_FILE, test_ids, test_predictions.argmax(axis=1), names)

    reports = layout.reports_dir
    reports.mkdir(parents=True, exist_ok=True)
    details = {name: {split: asdict(m) for split, m in splits.items()} for name, splits in results.items()}
    write_text_atomic(
        reports / DETAILS_FILE, json.dumps({"classes": list(names), **details}, indent=2) + "\n"
    )
    write_text_atomic(reports / COMPARISON_FILE, comparison_markdown(results))
    from tasks.finetune import FINETUNE_HISTORY_FILE

    written = [
        plot_training_curves(
            read_history_csv(layout.plots_dir / TOP_HISTORY_FILE),
            read_head_info(layout)["spec"]["name"],
            read_history_csv(layout.plots_dir / FINETUNE_HISTORY_FILE),
            reports / CURVES_PNG,
        ),
        plot_confusion(
            results["candidate"]["test"].confusion, names, reports / CONFUSION_PNG, "Test confusion matrix"
        ),
    ]
    chosen = preview.chosen()  # written even when empty (evaluate.preview_images: 0): it is a DVC output
    written.append(
        plot_prediction_grid(
            [c[1] for c in chosen],
            [names[c[2]] for c in chosen],
            [names[c[3]] for c in chosen],
            [c[4] for c in chosen],
            reports / PREDICTIONS_PNG,
            "" if chosen else "no preview images (evaluate.preview_images: 0)",
        )
    )
    test = results["candidate"]["test"]
    val = results["candidate"].get("val")
    return EvaluateManifest(
        metric=cfg.metric,
        score=score,
        test_accuracy=test.accuracy,
        test_macro_f1=test.macro_f1,
        top_only_test_accuracy=results["top_only"]["test"].accuracy,
        val_accuracy=val.accuracy if val else None,
        test_images=counts["test"],
        val_images=counts.get("val", 0),
        reports=[p.as_posix() for p in written] + [(reports / COMPARISON_FILE).as_posix()],
        seconds=round(time.perf_counter() - start, 3),
    )
