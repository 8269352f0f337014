"""The ``evaluate`` stage's library: the candidate (and the top-only) model on the test and val splits (the stage
itself, loading the models and writing the outputs, is :mod:`tasks.stages.run_evaluate`).

Metrics are computed here with numpy (no sklearn): loss, accuracy, per-class precision / recall / F1, macro F1,
ROC AUC for binary, confusion matrix. Each model is fed test / val images the way it was trained: the candidate at
its input size with the resize interpolation its bundle records (``classes.json``), the top-only model at its own
input size with the interpolation its features were computed with (``image.interpolation``).

Outputs (each written atomically): flat ``metrics/evaluate.json`` (DVC metrics: model-quality figures only),
``plots/confusion.csv`` (``actual,predicted`` rows for ``dvc plots``), ``reports/evaluation.json`` (the full nested
results), ``reports/model_comparison.md`` (with which weights fine-tuning kept and why), PNGs in ``reports/`` (see
:mod:`tasks.reports.plots`; the predictions grid is class-balanced, :class:`Preview`) and ``layout.run_record("evaluate")``
(seconds, images/s, the files written). Progress: ``Step("evaluate", images done, total)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.inputs import ImageSpec
from tasks.io.atomic import atomic_write_text
from tasks.progress import Reporter, Step, report

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
    from tasks.models.full_model import probability_matrix

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
MODEL_LABELS = {"candidate": "fine-tuned (candidate)", "top_only": "top-only"}


@dataclass(frozen=True)
class Shown:
    """One preview image: its position in the split, the model's input pixels, true and predicted class."""

    position: int
    image: np.ndarray
    actual: int
    predicted: int
    confidence: float

    @property
    def wrong(self) -> bool:
        return self.actual != self.predicted


@dataclass
class Preview:
    """The predictions grid, class-balanced: ``limit`` images dealt round-robin over the true classes (class
    order), each class mixing mistakes and correct predictions where it has both. Deterministic.

    Fed while the test split streams; after each offer only the images the grid would show now are kept (an image
    left out never comes back as more arrive: a new image only takes slots away from the others, or lands in its
    own class's queue before them), so memory stays at ``limit + 1`` images.
    """

    limit: int
    kept: dict[tuple[int, bool], list[Shown]] = field(default_factory=dict)

    def offer(self, position: int, image: np.ndarray, actual: int, predicted: int, confidence: float) -> None:
        if self.limit <= 0:
            return
        shown = Shown(position, np.clip(image, 0, 255).astype(np.uint8), actual, predicted, confidence)
        self.kept.setdefault((actual, shown.wrong), []).append(shown)
        dealt = {item.position for item in self._dealt()}
        kept = {key: [item for item in bucket if item.position in dealt] for key, bucket in self.kept.items()}
        self.kept = {key: bucket for key, bucket in kept.items() if bucket}

    def classes(self) -> list[int]:
        """The true classes that have a kept image, in class order."""
        return sorted({actual for actual, _ in self.kept})

    def _queue(self, actual: int) -> list[Shown]:
        """One class's images in the order it is dealt them: mistakes and correct ones alternating (split order
        within each kind), a mistake first for even class ids and a correct one first for odd (so a grid with one
        slot per class mixes too); what one kind lacks the other fills."""
        wrong, right = self.kept.get((actual, True), []), self.kept.get((actual, False), [])
        first, second = (wrong, right) if actual % 2 == 0 else (right, wrong)
        n = min(len(first), len(second))
        return (
            [item for pair in zip(first[:n], second[:n], strict=True) for item in pair]
            + first[n:]
            + second[n:]
        )

    def _dealt(self) -> list[Shown]:
        """Up to ``limit`` images, one per class per round, in class order."""
        queues = [self._queue(actual) for actual in self.classes()]
        rounds = max((len(q) for q in queues), default=0)
        return [q[r] for r in range(rounds) for q in queues if r < len(q)][: self.limit]

    def chosen(self) -> list[Shown]:
        """The grid's images, grouped by true class, in split order within a class."""
        return sorted(self._dealt(), key=lambda item: (item.actual, item.position))


@dataclass(frozen=True)
class EvaluateManifest:
    """What ``run_evaluate`` (:mod:`tasks.stages.run_evaluate`) returns (JSON-able)."""

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
    models: dict[str, Any],
    dataset: Any,
    class_ids: np.ndarray,
    preview: Preview | None,
    seen: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Every model's outputs over one pass of ``dataset`` (image batches); feeds ``preview`` with the first model's;
    ``seen(n)`` after each batch of ``n`` images."""
    from tasks.models.full_model import probability_matrix

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
        size = int(np.asarray(batch).shape[0])
        position += size
        if seen is not None:
            seen(size)
    return {name: np.concatenate(chunks) if chunks else np.zeros((0, 1)) for name, chunks in outputs.items()}


@dataclass(frozen=True)
class ModelInput:
    """A model to evaluate and how its inputs were made in training (``image``: its input size, the resize
    interpolation, whether images were centre-cropped to the aspect ratio; raw pixels, no ``rescale``: a full model
    applies it itself)."""

    model: Any
    image: ImageSpec

    @classmethod
    def of(cls, model: Any, interpolation: str, crop_to_aspect_ratio: bool) -> ModelInput:
        """The model's own input size (``[B, H, W, 3]``) with ``interpolation`` and the crop rule."""
        shape = model.input_shape
        return cls(model, ImageSpec((int(shape[1]), int(shape[2])), interpolation, crop_to_aspect_ratio))

    @property
    def input_key(self) -> ImageSpec:
        """How its images are made: models with the same key share one pass of the input pipeline."""
        return self.image


def input_passes(models: dict[str, ModelInput]) -> int:
    """How many passes of the input pipeline :func:`evaluate_split` makes over a split."""
    return len({entry.input_key for entry in models.values()})


def evaluate_split(
    models: dict[str, ModelInput],
    rows: Any,
    root: Path,
    batch_size: int,
    preview: Preview | None,
    seen: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Every model's outputs on ``rows``, each fed images resized as in its training (size, interpolation, crop).

    Models that agree on both share one pass of the input pipeline. ``preview`` gets the first model's inputs;
    ``seen(n)`` is called after each batch of ``n`` images of each pass.
    """
    from tasks.data.pipeline import view_dataset

    ids = rows["class_id"].to_numpy()
    groups: dict[ImageSpec, dict[str, Any]] = {}
    for name, entry in models.items():
        groups.setdefault(entry.input_key, {})[name] = entry.model
    first = next(iter(models))
    outputs: dict[str, np.ndarray] = {}
    for image, group in groups.items():
        dataset = view_dataset(rows, root, image, batch_size=batch_size)
        outputs.update(predict_split(group, dataset, ids, preview if first in group else None, seen))
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


def comparison_markdown(
    results: dict[str, dict[str, SplitMetrics]], decision: tuple[str, str] | None = None
) -> str:
    """One table: the top-only model against the fine-tuned candidate, on test (and val); then, when known
    (``decision``: finetune's ``(kept, sentence)``, :func:`tasks.reports.plots.read_decision`), which weights the
    candidate holds and why."""
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
    if decision is not None:
        kept, sentence = decision
        same = " (the two rows are the same weights)" if kept == "top-only" else ""
        lines += ["", f"**Candidate:** {sentence}{same}."]
    return "\n".join(lines) + "\n"


def write_confusion_csv(
    path: Path, actual: np.ndarray, predicted: np.ndarray, names: tuple[str, ...]
) -> None:
    """``actual,predicted`` class-name rows, one per test image (``dvc plots`` draws the confusion matrix)."""
    lines = ["actual,predicted"] + [f"{names[a]},{names[p]}" for a, p in zip(actual, predicted, strict=True)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def image_counter(progress: Reporter | None, total: int) -> Callable[[int], None]:
    """A ``seen(n)`` callback adding up images and reporting ``Step("evaluate", done, total)``."""
    done = [0]

    def seen(n: int) -> None:
        done[0] += n
        report(progress, Step("evaluate", done[0], total, "img", final=done[0] >= total))

    return seen


def flat_metrics(results: dict[str, dict[str, SplitMetrics]], metric: str) -> dict[str, Any]:
    """``metrics/evaluate.json``: the candidate's split figures, the top-only model's (``top_only_*``), the score."""
    flat: dict[str, Any] = {"metric": metric}
    for split, metrics in results["candidate"].items():
        flat.update(metrics.flat(split))
    for split, metrics in results["top_only"].items():
        for key, value_of in TOP_ONLY_METRICS.items():
            value = value_of(metrics)
            if value is not None:
                flat[f"top_only_{split}_{key}"] = value
    flat["score"] = score_of(results["candidate"]["test"], metric)
    return flat
