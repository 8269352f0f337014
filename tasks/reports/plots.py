"""PNG reports a person would rather look at: training curves, confusion matrix, a grid of predictions; the
training histories (``plots/*_history.csv``); and the per-run records (``reports/runs/<stage>.json``: timings and
details kept out of ``metrics/``, written by :func:`write_run_record`; finetune's decision read back by
:func:`read_decision`).

Drawn with matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg): no pyplot, no global figure
state, no display needed. matplotlib is imported inside the functions.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.io.atomic import atomic_write, atomic_write_json
from tasks.layout import Layout


def write_run_record(path: Path, record: Mapping[str, Any]) -> Path:
    """Write a stage's run record (``layout.run_record(stage)``) atomically as indented JSON."""
    atomic_write_json(path, dict(record), default=str)
    return path


def read_finetune_record(layout: Layout, model_sha256: str | None) -> dict[str, Any] | None:
    """The last finetune run's record when that run wrote the model whose sha256 is ``model_sha256``; None when
    there is no record or it describes another model."""
    try:
        record = json.loads(layout.run_record("finetune").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or model_sha256 is None or record.get("model_sha256") != model_sha256:
        return None
    return record


def read_decision(layout: Layout, model_sha256: str | None) -> tuple[str, str] | None:
    """``(kept, sentence)`` of the last finetune run (its run record: "top-only" or "fine-tuned", and
    :func:`tasks.models.finetuning.weights_decision`'s sentence) when that run wrote the model whose sha256 is
    ``model_sha256``; None when there is no record or it describes another model."""
    record = read_finetune_record(layout, model_sha256)
    if record is None:
        return None
    kept, decision = record.get("kept"), record.get("decision")
    return (kept, decision) if isinstance(kept, str) and isinstance(decision, str) else None


def read_history_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a ``plots/*_history.csv`` file (empty list when the file is missing or has no rows)."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def save_figure(fig: Any, out: Path, **savefig: Any) -> Path:
    """``fig.savefig`` to a temp file, committed by :func:`tasks.io.atomic.atomic_write` (the format is ``out``'s
    suffix, e.g. PNG)."""
    fmt = Path(out).suffix.lstrip(".") or None
    return atomic_write(out, lambda tmp: fig.savefig(tmp, format=fmt, **savefig))


def _save(fig: object, out: Path) -> Path:
    return save_figure(fig, out, dpi=100, bbox_inches="tight")


def plot_training_curves(
    top_rows: list[dict[str, str]], top_head: str | None, finetune_rows: list[dict[str, str]], out: Path
) -> Path:
    """Loss and accuracy per epoch: the chosen head's top-model training, then fine-tuning continuing after it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    top = [r for r in top_rows if top_head is None or r.get("head") == top_head]
    offset = len(top)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for rows, stage, start in ((top, "top", 0), (finetune_rows, "finetune", offset)):
            rows = [r for r in rows if r.get(metric) not in (None, "")]
            if not rows:
                continue
            epochs = [start + int(float(r["epoch"])) for r in rows]
            ax.plot(epochs, [float(r[metric]) for r in rows], marker=".", label=f"{stage} train")
            if rows[0].get(f"val_{metric}") not in (None, ""):
                ax.plot(epochs, [float(r[f"val_{metric}"]) for r in rows], marker=".", label=f"{stage} val")
        if finetune_rows and offset:
            ax.axvline(offset + 0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"Training curves (head: {top_head})" if top_head else "Training curves")
    return _save(fig, out)


def plot_confusion(matrix: Sequence[Sequence[int]], names: Sequence[str], out: Path, title: str = "") -> Path:
    """A confusion matrix heat map with counts (rows actual, columns predicted)."""
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=np.int64)
    if m.shape != (len(names), len(names)):
        raise ValueError(f"matrix: expected shape {(len(names), len(names))}, got {m.shape!r}")
    size = 2.5 + 0.6 * len(names)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), labels=list(names), rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=list(names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    threshold = m.max() / 2 if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(
                j,
                i,
                str(m[i, j]),
                ha="center",
                va="center",
                color="white" if m[i, j] > threshold else "black",
            )
    ax.set_title(title or "Confusion matrix")
    return _save(fig, out)


def plot_prediction_grid(
    images: Sequence[np.ndarray],
    true_labels: Sequence[str],
    predicted_labels: Sequence[str],
    confidences: Sequence[float],
    out: Path,
    title: str = "",
) -> Path:
    """Images with ``true / predicted (confidence)``; mistakes get a red frame and a red title."""
    from matplotlib.figure import Figure

    n = len(images)
    if not (len(true_labels) == len(predicted_labels) == len(confidences) == n):
        raise ValueError(
            f"expected as many labels and confidences as images ({n}), got {len(true_labels)}, "
            f"{len(predicted_labels)}, {len(confidences)}"
        )
    cols = max(1, min(4, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(3 * cols, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    mistakes = 0
    for ax, img, true, pred, conf in zip(
        axes, images, true_labels, predicted_labels, confidences, strict=False
    ):
        ax.axis("on")
        ax.imshow(np.asarray(img, dtype=np.uint8))
        wrong = true != pred
        mistakes += int(wrong)
        colour = "red" if wrong else "green"
        ax.set_title(
            f"{'✗ ' if wrong else ''}true: {true}\npred: {pred} ({conf:.0%})", color=colour, fontsize=9
        )
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(4 if wrong else 1)
    fig.suptitle(title or f"Predictions ({n} images, {mistakes} mistakes marked in red)")
    return _save(fig, out)
