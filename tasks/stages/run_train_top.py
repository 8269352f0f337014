"""The ``train_top`` stage (``retrainflow stage train_top``): read the cached features, train the heads, write.

A thin shell around :mod:`tasks.models.top_training`: it reads the class info and the features of the train (every view)
and val (clean view) splits, encodes the labels, trains every head of ``params.top`` and writes through
``layout``: the best head (``models/top/``), ``metrics/top.json``, ``reports/top_comparison.md``,
``plots/top_history.csv``, ``plots/top_heads/<head>.csv`` and the run record ``reports/runs/train_top.json``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from tasks.config import Params
from tasks.io.atomic import atomic_write_json, atomic_write_text
from tasks.layout import Layout
from tasks.models.top_training import (
    STAGE,
    TopManifest,
    check_head_names,
    comparison_markdown,
    head_summary,
    top_metrics,
    top_run_record,
    train_heads,
    write_head_csvs,
    write_history_csv,
)
from tasks.progress import Reporter


def run_train_top(params: Params, layout: Layout, *, progress: Reporter | None = None) -> TopManifest:
    """Train the candidate heads on the cached features and write the best head, metrics and reports.

    ``progress`` receives each head's epochs (``Step("train_top <head>", ...)``). Features computed with other
    params than ``params`` raise ``tasks.errors.FeaturesMismatchError`` naming the params."""
    from tasks.data.index_table import read_classes
    from tasks.data.labels import encode_labels
    from tasks.features.read import read_features, read_manifest
    from tasks.inputs import resolve_inputs
    from tasks.models.heads import save_head
    from tasks.reports.plots import write_run_record

    start = time.perf_counter()
    check_head_names(params.top)
    classes = read_classes(layout)
    inputs = resolve_inputs(params, layout)
    train_set = read_features(params, layout, "train", views="all", stage=STAGE, inputs=inputs)
    val_set = read_features(params, layout, "val", views="clean", stage=STAGE, inputs=inputs)

    def encoded(fs: Any) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(fs.x, dtype=np.float32)
        return x, encode_labels(np.asarray(fs.class_ids), classes.class_mode, classes.num_classes)

    train, val = encoded(train_set), encoded(val_set)
    cfg = params.top
    model, best, results = train_heads(
        train, val, classes.class_mode, classes.num_classes, cfg, params.seed, progress
    )
    spec = next(h for h in cfg.heads if h.name == best.name)
    feature_dim = int(train[0].shape[1])
    head_path = save_head(
        model,
        spec,
        layout,
        {
            "classes": list(classes.names),
            "class_mode": classes.class_mode,
            "feature_dim": feature_dim,
            "base": params.base.model_dump(mode="json"),
            "pooling": params.features.pooling,
            "val_loss": best.val_loss,
            "val_accuracy": best.val_accuracy,
        },
    )
    manifest = TopManifest(
        best_head=best.name,
        select_metric=cfg.select_metric,
        val_loss=best.val_loss,
        val_accuracy=best.val_accuracy,
        head_file=head_path.as_posix(),
        feature_dim=feature_dim,
        train_samples=len(train[0]),
        val_samples=len(val[0]),
        heads=[head_summary(r) for r in results],
    )
    atomic_write_json(layout.top_metrics, top_metrics(manifest))
    atomic_write_text(layout.top_report, comparison_markdown(results, best, cfg))
    write_history_csv(layout.top_history, results)
    write_head_csvs(layout, results)
    features_key = str(read_manifest(layout)["cache_key"])  # checked by read_features: the key trained on
    record = top_run_record(manifest, features_key, time.perf_counter() - start)
    write_run_record(layout.run_record(STAGE), record)
    return manifest
