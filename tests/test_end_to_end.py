"""A tiny end-to-end run on generated colour images: index -> features -> top -> finetune -> evaluate -> predict."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.config import params_from_dict
from tasks.layout import Layout

CLASSES = ["red", "green", "blue"]
MOBILENET_025 = "mobilenet_2_5_224_tf_no_top.h5"


def tiny_params(data_root, weights, **finetune):
    return params_from_dict(
        {
            "seed": 1,
            "data": {"root": str(data_root), "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
            "image": {"size": 32},
            "augment": {"passes": 1, "horizontal_flip": True, "rotation_range": 10},
            "base": {"name": "mobilenet", "weights": str(weights), "alpha": 0.25},
            "features": {"batch_size": 16, "engine": "keras"},
            "top": {
                "heads": [
                    {"name": "linear", "type": "linear"},
                    {"name": "dense16", "type": "dense", "units": 16, "dropout": 0.2},
                ],
                "epochs": 40,
                "lr": 0.01,
                "batch_size": 16,
                "patience": 6,
            },
            "finetune": {"epochs": 2, "unfreeze_blocks": 1, "batch_size": 8, "lr": 1e-5, **finetune},
            "evaluate": {"batch_size": 16, "preview_images": 8},
        }
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, imagegen, shared_path):
    """The whole pipeline once on 3 colour classes x 20 images (MobileNet 0.25 at 32 px).

    The base is the 2 MB ImageNet MobileNet 0.25 from ../shared: a random-init base (``weights: none``) is useless
    here, its frozen BatchNorm statistics make the pooled features vanish (about 1e-17, zero in float16).
    """
    from tasks.stages.run_evaluate import run_evaluate
    from tasks.stages.run_features import run_features
    from tasks.stages.run_finetune import run_finetune
    from tasks.stages.run_index import run_index
    from tasks.stages.run_train_top import run_train_top

    root = tmp_path_factory.mktemp("e2e")
    weights = shared_path("weights", MOBILENET_025)
    data = imagegen.make_class_folders(root / "images", CLASSES, per_class=20, size=40)
    layout = Layout(root / "work")
    params = tiny_params(data, weights)
    run_index(params, layout)
    run_features(params, layout)
    top = run_train_top(params, layout)
    ft = run_finetune(params, layout)
    ev = run_evaluate(params, layout)
    return params, layout, data, top, ft, ev


@pytest.mark.slow
@pytest.mark.shared
def test_pipeline_learns_colours_well_above_chance(workspace):
    params, layout, _, top, ft, ev = workspace
    assert top.val_accuracy >= 0.8
    assert ev.test_images >= 6
    assert ev.test_accuracy >= 0.8 and ev.top_only_test_accuracy >= 0.8  # chance is 1/3
    metrics = json.loads((layout.metrics_dir / "evaluate.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(ev.test_accuracy)
    assert {"test_loss", "test_macro_f1", "val_accuracy", "top_only_test_accuracy", "test_f1_red"} <= set(
        metrics
    )
    assert all(isinstance(v, int | float | str) for v in metrics.values())  # flat, for dvc metrics
    # fine-tuning keeps the best val loss, where epoch 0 is the top-only model: never worse on val
    assert ft.val_loss <= ft.top_only_val_loss + 1e-6
    assert not ft.skipped and ft.epochs_run >= 1 and ft.trainable_layers
    assert not layout.finetune_checkpoints.exists()  # cleaned up on success


@pytest.mark.slow
@pytest.mark.shared
def test_stage_outputs_exist(workspace):
    _, layout, *_ = workspace
    for path in (
        layout.top_dir / "head.keras",
        layout.metrics_dir / "top.json",
        layout.reports_dir / "top_comparison.md",
        layout.plots_dir / "top_history.csv",
        layout.candidate_model,
        layout.candidate_dir / "classes.json",
        layout.metrics_dir / "finetune.json",
        layout.plots_dir / "finetune_history.csv",
        layout.plots_dir / "confusion.csv",
        layout.reports_dir / "model_comparison.md",
        layout.reports_dir / "training_curves.png",
        layout.reports_dir / "confusion_matrix.png",
        layout.reports_dir / "predictions.png",
    ):
        assert path.is_file(), path
    top = json.loads((layout.metrics_dir / "top.json").read_text())
    assert set(top["heads"]) == {"linear", "dense16"}
    confusion = (layout.plots_dir / "confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and all(r.split(",")[0] in CLASSES for r in confusion[1:])
    comparison = (layout.reports_dir / "model_comparison.md").read_text()
    assert "top-only" in comparison and "fine-tuned" in comparison


@pytest.mark.slow
@pytest.mark.shared
def test_predict_on_the_data_folder(workspace):
    from tasks.models.predict import predict_paths

    _, layout, data, *_ = workspace
    preds = predict_paths(layout.candidate_model, [data])
    assert len(preds) == 60 and not any(p.error for p in preds)
    right = sum(p.label == p.path.split("/")[-2] for p in preds)
    assert right / len(preds) >= 0.8


@pytest.mark.slow
@pytest.mark.shared
def test_finetune_epochs_zero_gives_the_top_only_model(workspace):
    from tasks.inputs import resolve_inputs
    from tasks.models.full_model import load_bundle, load_top_model
    from tasks.stages.run_finetune import run_finetune

    params, layout, *_ = workspace
    skip = tiny_params(params.data.root, params.base.weights, epochs=0)
    manifest = run_finetune(skip, layout)
    assert manifest.skipped and manifest.epochs_run == 0
    bundle = load_bundle(layout.candidate_model)
    top_only, _, _ = load_top_model(skip, layout, resolve_inputs(skip, layout))
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(bundle.model.predict(x, verbose=0), top_only.predict(x, verbose=0), atol=1e-5)
    rows = (layout.plots_dir / "finetune_history.csv").read_text().splitlines()
    assert rows == ["epoch,loss,accuracy,val_loss,val_accuracy"]


@pytest.mark.slow
@pytest.mark.shared
def test_evaluate_writes_every_dvc_output_even_without_preview_images(workspace):
    """reports/predictions.png is an output of the evaluate stage: DVC fails a stage whose output is missing."""
    from tasks.stages.run_evaluate import run_evaluate

    params, layout, *_ = workspace
    grid = layout.reports_dir / "predictions.png"
    grid.unlink()
    no_previews = params.model_copy(
        update={"evaluate": params.evaluate.model_copy(update={"preview_images": 0})}
    )
    run_evaluate(no_previews, layout)
    assert grid.is_file() and grid.read_bytes().startswith(b"\x89PNG")
