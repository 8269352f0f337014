"""The ``evaluate`` stage: the candidate (and the top-only) model on the test and val splits.

Metrics are computed here with numpy (no sklearn): loss, accuracy, per-class precision / recall / F1, macro F1,
ROC AUC for binary, confusion matrix. Outputs: flat ``metrics/evaluate.json`` (DVC metrics), ``plots/confusion.csv``
(``actual,predicted`` rows for ``dvc plots``), ``reports/evaluation.json`` (the full nested results),
``reports/model_comparison.md`` and PNGs in ``reports/`` (see :mod:`tasks.reports`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
