"""The ``train_top`` stage's library: train every candidate head on cached features and keep the best one
(the stage itself, reading the features and writing the outputs, is :mod:`tasks.stages.run_train_top`).

Training uses every cached training view (clean + augmented passes); validation uses the clean val view.
Each head in ``params.top.heads`` is trained with the optimizer / lr / epochs / batch size of ``params.top`` and
early stopping on val loss (best weights restored); the best head by ``top.select_metric`` is saved to
``layout.top_dir`` (``head.keras`` + ``head.json``). Outputs: ``metrics/top.json`` (the heads' figures),
``reports/top_comparison.md``, ``plots/top_history.csv`` (every head's epochs, one table), ``plots/top_heads/<head>.csv``
(the same rows, one file per head: ``dvc plots`` draws each head as its own series) and the run record
``reports/runs/train_top.json`` (seconds, the feature cache key). Seeded by ``params.seed``: two runs on the same
features give the same heads. Progress: one ``Step("train_top <head>", epoch, epochs, "epoch")`` per epoch.
"""

from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import HeadSpec, TopConfig
from tasks.errors import InputError
from tasks.io.atomic import atomic_write_text
from tasks.layout import Layout
from tasks.models.optimizers import make_optimizer
from tasks.progress import Reporter, keras_epochs

STAGE = "train_top"  # the stage's name: its progress tasks, its errors and its run record
HISTORY_COLUMNS = ("head", "epoch", "loss", "accuracy", "val_loss", "val_accuracy")
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a head name that is also a plain file name


@dataclass(frozen=True)
class HeadResult:
    """How one candidate head did: its metrics at the restored (best val loss) epoch."""

    name: str
    type: str
    val_loss: float
    val_accuracy: float
    train_loss: float
    train_accuracy: float
    epochs: int  # epochs run (early stopping may stop before top.epochs)
    best_epoch: int  # 1-based epoch whose weights were kept
    seconds: float
    params: int
    history: dict[str, list[float]] = field(repr=False)


@dataclass(frozen=True)
class TopManifest:
    """What ``run_train_top`` (:mod:`tasks.stages.run_train_top`) returns (JSON-able)."""

    best_head: str
    select_metric: str
    val_loss: float
    val_accuracy: float
    head_file: str
    feature_dim: int
    train_samples: int
    val_samples: int
    heads: list[dict[str, Any]]


def train_head(
    spec: HeadSpec,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    class_mode: str,
    num_classes: int,
    cfg: TopConfig,
    seed: int,
    progress: Reporter | None = None,
) -> tuple[Any, HeadResult]:
    """Train one head on ``(features, encoded labels)`` pairs; return the model (best weights) and its result.

    ``progress`` receives one ``Step("train_top <head>", epoch, cfg.epochs, "epoch")`` per epoch."""
    import keras

    from tasks.models.heads import build_head, output_spec

    x, y = train
    vx, vy = val
    if len(x) == 0 or len(vx) == 0:
        raise InputError(f"train_top needs training and val samples, got {len(x)} train and {len(vx)} val")
    keras.utils.set_random_seed(seed)
    model = build_head(spec, int(x.shape[1]), class_mode, num_classes)
    model.compile(
        optimizer=make_optimizer(cfg.optimizer, cfg.lr),
        loss=output_spec(class_mode, num_classes).loss,
        metrics=["accuracy"],
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=cfg.patience, restore_best_weights=True, verbose=0
    )
    start = time.perf_counter()
    history = model.fit(
        x,
        y,
        validation_data=(vx, vy),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        shuffle=True,
        callbacks=[stop, keras_epochs(progress, f"{STAGE} {spec.name}", cfg.epochs)],
        verbose=0,
    )
    seconds = time.perf_counter() - start
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    best = int(np.argmin(hist["val_loss"]))
    result = HeadResult(
        name=spec.name,
        type=spec.type,
        val_loss=hist["val_loss"][best],
        val_accuracy=hist["val_accuracy"][best],
        train_loss=hist["loss"][best],
        train_accuracy=hist["accuracy"][best],
        epochs=len(hist["val_loss"]),
        best_epoch=best + 1,
        seconds=round(seconds, 3),
        params=int(model.count_params()),
        history=hist,
    )
    return model, result


def select_best(results: list[HeadResult], metric: str) -> HeadResult:
    """The best head by ``val_loss`` (lowest) or ``val_accuracy`` (highest; ties broken by val loss)."""
    if not results:
        raise ValueError("select_best: got no head results")
    if metric == "val_loss":
        return min(results, key=lambda r: (r.val_loss, -r.val_accuracy))
    if metric == "val_accuracy":
        return max(results, key=lambda r: (r.val_accuracy, -r.val_loss))
    raise ValueError(f"select_metric: expected 'val_loss' or 'val_accuracy', got {metric!r}")


def train_heads(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    class_mode: str,
    num_classes: int,
    cfg: TopConfig,
    seed: int,
    progress: Reporter | None = None,
) -> tuple[Any, HeadResult, list[HeadResult]]:
    """Train every head of ``cfg.heads`` (same seed each); return (best model, best result, all results)."""
    models: dict[str, Any] = {}
    results: list[HeadResult] = []
    for spec in cfg.heads:
        model, result = train_head(spec, train, val, class_mode, num_classes, cfg, seed, progress)
        models[spec.name] = model
        results.append(result)
    best = select_best(results, cfg.select_metric)
    return models[best.name], best, results


# ------------------------------------------------------------------------------------------------ outputs
def comparison_markdown(results: list[HeadResult], best: HeadResult, cfg: TopConfig) -> str:
    """A readable table of the candidate heads."""
    lines = [
        "# Top model comparison",
        "",
        f"Optimizer {cfg.optimizer}, lr {cfg.lr:g}, up to {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"early stopping on val loss (patience {cfg.patience}). Selected by `{cfg.select_metric}`: "
        f"**{best.name}**.",
        "",
        "| head | type | params | val loss | val accuracy | train loss | train accuracy | epochs | best epoch | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mark = " (best)" if r.name == best.name else ""
        lines.append(
            f"| {r.name}{mark} | {r.type} | {r.params} | {r.val_loss:.4f} | {r.val_accuracy:.4f} | "
            f"{r.train_loss:.4f} | {r.train_accuracy:.4f} | {r.epochs} | {r.best_epoch} | {r.seconds:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _history_rows(r: HeadResult) -> list[list[Any]]:
    """``epoch, loss, accuracy, val_loss, val_accuracy`` per epoch of one head (epochs 1-based)."""
    return [[i + 1, *(f"{r.history[k][i]:.6g}" for k in HISTORY_COLUMNS[2:])] for i in range(r.epochs)]


def _csv_text(header: tuple[str, ...], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_history_csv(path: Path, results: list[HeadResult]) -> None:
    """``head,epoch,loss,accuracy,val_loss,val_accuracy`` rows of every head, one table (atomic)."""
    rows = [[r.name, *row] for r in results for row in _history_rows(r)]
    atomic_write_text(path, _csv_text(HISTORY_COLUMNS, rows))


def write_head_csvs(layout: Layout, results: list[HeadResult]) -> list[Path]:
    """``layout.top_head_history(head)`` per head (``epoch,loss,accuracy,val_loss,val_accuracy``): ``dvc plots``
    colours series by file, so each head is its own series. CSVs of heads no longer trained are removed."""
    folder = layout.top_heads_plots
    folder.mkdir(parents=True, exist_ok=True)
    written = [layout.top_head_history(r.name) for r in results]
    for r, path in zip(results, written, strict=True):
        atomic_write_text(path, _csv_text(HISTORY_COLUMNS[1:], _history_rows(r)))
    for stale in set(folder.glob("*.csv")) - set(written):
        stale.unlink()
    return written


def check_head_names(cfg: TopConfig) -> None:
    """Every head name is a plain file name (it names ``plots/top_heads/<head>.csv``)."""
    bad = [h.name for h in cfg.heads if not FILE_NAME.fullmatch(h.name)]
    if bad:
        raise InputError(
            f"top.heads: head names name files ({Layout().top_head_history('<name>')}): expected letters, digits, "
            f"'_', '-' and '.', not starting with '.', '_' or '-', got {bad!r}"
        )


def head_summary(r: HeadResult) -> dict[str, Any]:
    """The JSON-able part of a result (without the per-epoch history)."""
    return {k: v for k, v in asdict(r).items() if k != "history"}


# per-head figures that compare heads in `dvc metrics show` / `dvc exp show` (metrics/top.json); the rest of each
# head's summary (train figures, epochs, params, seconds) is in the run record and reports/top_comparison.md
HEAD_METRICS = ("val_loss", "val_accuracy")


def top_metrics(manifest: TopManifest) -> dict[str, Any]:
    """``metrics/top.json``: the best head and every head's figures, no timings or paths."""
    return {
        "best_head": manifest.best_head,
        "val_loss": manifest.val_loss,
        "val_accuracy": manifest.val_accuracy,
        "train_samples": manifest.train_samples,
        "val_samples": manifest.val_samples,
        "heads": {h["name"]: {k: h[k] for k in HEAD_METRICS} for h in manifest.heads},
    }


def top_run_record(manifest: TopManifest, cache_key: str, seconds: float) -> dict[str, Any]:
    """``reports/runs/train_top.json``: what the run took (seconds; each head's whole summary, its seconds
    included) and what it read and wrote."""
    return {
        "seconds": round(seconds, 3),
        "heads": {h["name"]: {k: v for k, v in h.items() if k != "name"} for h in manifest.heads},
        "features_cache_key": cache_key,
        "head_file": manifest.head_file,
    }
