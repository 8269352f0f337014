"""The ``finetune`` stage (``retrainflow stage finetune``): fine-tune the top-only model, save the candidate.

A thin shell around :mod:`tasks.models.finetuning` and :mod:`tasks.models.full_model`: it resolves the inputs once
(:func:`tasks.inputs.resolve_inputs`), builds the top-only full model from the head train_top saved, fine-tunes it
on the train split's images (validated on val) unless ``finetune.epochs`` is 0, and writes through ``layout``:
``models/candidate/`` (the bundle), ``metrics/finetune.json`` (:data:`tasks.models.finetuning.FINETUNE_METRIC_KEYS`),
``plots/finetune_history.csv`` and the run record ``reports/runs/finetune.json`` (the rest of the manifest, with
the saved model's sha256 so evaluate can tell the record describes the model it reads).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from tasks.config import Params
from tasks.data.augment import CLEAN_VIEW
from tasks.errors import InputError
from tasks.features.activations import (
    ACTIVATION_SPLITS,
    activation_rows,
    activation_views,
    finetune_path,
    open_activations,
)
from tasks.inputs import Inputs, resolve_inputs
from tasks.io.atomic import atomic_write_json
from tasks.layout import Layout
from tasks.models.bases import CutPoint, cut_point, sha256_file
from tasks.models.finetuning import (
    FINETUNE_METRIC_KEYS,
    STAGE,
    FinetuneManifest,
    cached_training_views,
    cached_view,
    finetune_manifest,
    finetune_model,
    labelled_view,
    run_fingerprint,
    training_views,
    write_history_csv,
)
from tasks.progress import Reporter

VAL_BATCH_MIN = 64  # the tail path's validation batch (a cut-point activation batch of 64 is about 1 MB)


def tail_data(
    params: Params, layout: Layout, inputs: Inputs, cut: CutPoint, classes: Any
) -> tuple[Callable[[int], tuple[Any, int]], Any]:
    """The tail path's training views (``finetune.augment``: epoch e reads cached pass e mod ``augment.passes``,
    else the clean view) and val's clean view, as cut-point activations from the features stage's cache."""
    from tasks.data.index_table import read_index
    from tasks.data.labels import encode_labels

    index = read_index(layout)
    cache = open_activations(layout, params, inputs, cut, index)
    views = activation_views(params)
    rows = {}
    for split in ACTIVATION_SPLITS:
        sub = index[index["split"] == split].reset_index(drop=True)
        if len(sub) == 0:
            raise InputError(f"finetune needs train and val images, got no {split} images")
        labels = encode_labels(sub["class_id"].to_numpy(), classes.class_mode, classes.num_classes)
        rows[split] = activation_rows(cache, [str(s) for s in sub["sha256"]], views[split], labels)
    augmented = [view for view in views["train"] if view != CLEAN_VIEW]
    epoch_views = augmented if params.finetune.augment and augmented else [CLEAN_VIEW]
    train = cached_training_views(
        rows["train"], epoch_views, batch_size=params.finetune.batch_size, seed=params.seed
    )
    # validation is inference only: a larger batch changes no result and saves per-step overhead
    val_batch = max(VAL_BATCH_MIN, params.finetune.batch_size)
    return train, cached_view(rows["val"], CLEAN_VIEW, val_batch)


def full_data(
    params: Params, layout: Layout, inputs: Inputs, image: Any, classes: Any
) -> tuple[Callable[[int], tuple[Any, int]], Any]:
    """The full path's training views (decoded images; ``finetune.augment``: fresh passes the cache does not hold)
    and val's clean view, for the raw-pixels model (``image``: :func:`tasks.models.full_model.raw_pixels`)."""
    from tasks.data.augment import policy_from_config
    from tasks.data.index_table import read_index
    from tasks.data.labels import encode_labels

    cfg = params.finetune
    index = read_index(layout)
    train_rows, val_rows = (index[index["split"] == s].reset_index(drop=True) for s in ("train", "val"))
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise InputError(f"finetune needs train and val images, got {len(train_rows)} and {len(val_rows)}")
    train = training_views(
        train_rows,
        inputs.data_root,
        image,
        batch_size=cfg.batch_size,
        class_mode=classes.class_mode,
        num_classes=classes.num_classes,
        seed=params.seed,
        policy=policy_from_config(params.augment) if cfg.augment else None,
        first_pass=params.augment.passes,  # fresh views: the head was fitted to passes 0..passes-1
    )
    val_labels = encode_labels(val_rows["class_id"].to_numpy(), classes.class_mode, classes.num_classes)
    return train, labelled_view(val_rows, inputs.data_root, image, cfg.batch_size, val_labels)


def run_finetune(params: Params, layout: Layout, *, progress: Reporter | None = None) -> FinetuneManifest:
    """Build the full model from the trained head, fine-tune it (unless ``finetune.epochs`` is 0) and save it.

    ``progress`` gets one :class:`tasks.progress.Step` per epoch (task "finetune", unit "epoch")."""
    from tasks.data.index_table import read_classes
    from tasks.models.full_model import (
        load_top_model,
        raw_pixels,
        read_bundle_model_sha256,
        save_bundle,
        tail_model,
    )
    from tasks.reports.plots import write_run_record

    start = time.perf_counter()
    cfg = params.finetune
    inputs = resolve_inputs(params, layout)
    image = raw_pixels(inputs.image)  # the model applies augment.rescale and the base's preprocessing itself
    classes = read_classes(layout)
    model, base, spec = load_top_model(params, layout, inputs)
    work_dir = layout.finetune_checkpoints
    history: list[dict[str, str]] = []
    path = finetune_path(params)
    cut = cut_point(base, spec, cfg.unfreeze_blocks) if path.path == "tail" else None
    if path.path == "skipped":
        shutil.rmtree(work_dir, ignore_errors=True)
        summary: dict[str, Any] = {
            "trainable_layers": [],
            "trainable_params": 0,
            "resumed_from_epoch": 0,
            "state": {"best_epoch": 0, "epochs_done": 0},
        }
    else:
        if cut is not None:
            train, val = tail_data(params, layout, inputs, cut, classes)
        else:
            train, val = full_data(params, layout, inputs, image, classes)
        summary = finetune_model(
            model,
            base,
            spec,
            train,
            val,
            cfg,
            classes.class_mode,
            classes.num_classes,
            work_dir,
            params.seed,
            run_fingerprint(params, layout),
            fit_model=tail_model(model, base, cut.layer) if cut is not None else None,
            progress=progress,
        )
        history = summary["history"]
    save_bundle(
        model,
        layout.candidate_model,
        tuple(classes.names),
        classes.class_mode,
        image.interpolation,
        image.crop_to_aspect_ratio,
    )
    shutil.rmtree(work_dir, ignore_errors=True)
    manifest = finetune_manifest(
        layout,
        cfg,
        summary,
        history,
        time.perf_counter() - start,
        path=path.path,
        path_reason=path.reason,
        cut=cut.layer if cut is not None else None,
    )

    # metrics/finetune.json (model-quality figures), the history CSV and the run record (the rest, with the saved
    # model's sha256)
    fields = asdict(manifest)
    metrics = {key: fields[key] for key in FINETUNE_METRIC_KEYS}
    metrics["trainable_layers"] = len(manifest.trainable_layers)
    layout.metrics_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.finetune_metrics, metrics)
    write_history_csv(layout.finetune_history, history)
    record = {key: value for key, value in fields.items() if key not in FINETUNE_METRIC_KEYS}
    record.update(
        min_improvement=cfg.min_improvement,
        model_sha256=read_bundle_model_sha256(layout.candidate_model),
        top_head_sha256=sha256_file(layout.top_head_model),  # the head this candidate was built from
    )
    write_run_record(layout.run_record(STAGE), record)
    return manifest
