"""Finetune: the full model (preprocessing inside, raw pixels in), partial unfreezing, saving, kill-and-resume."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import BaseConfig, FinetuneConfig, HeadSpec

TINY_BASE = BaseConfig(name="mobilenet", weights="none", alpha=0.25)
SIZE = (32, 32)


@pytest.fixture(scope="module")
def tiny():
    """A tiny MobileNet 0.25 base at 32 px (random init), a head with batchnorm, and the full model."""
    from tasks.models.bases import load_base
    from tasks.models.full_model import build_full_model
    from tasks.models.heads import build_head

    loaded = load_base(TINY_BASE, SIZE)
    head = build_head(HeadSpec(name="h", type="dense", units=(8,), batchnorm=True), 256, "categorical", 3)
    model = build_full_model(loaded.model, "mobilenet", head, SIZE, "avg")
    return model, loaded


def test_full_model_takes_raw_pixels_and_matches_features_plus_head(tiny):
    model, loaded = tiny
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, *SIZE, 3)).astype("float32")
    features = loaded.model(loaded.spec.preprocess(pixels), training=False).numpy().mean(axis=(1, 2))
    head = model.get_layer("head")
    np.testing.assert_allclose(model(pixels).numpy(), head(features).numpy(), rtol=1e-4, atol=1e-5)


def test_unfreezing_trains_exactly_the_last_blocks_and_no_batchnorm(tiny):
    import keras

    from tasks.models.bases import block_layer_names
    from tasks.models.finetuning import set_trainable
    from tasks.models.heads import iter_layers

    model, loaded = tiny
    base = loaded.model
    trainable = set_trainable(model, base, loaded.spec, FinetuneConfig(unfreeze_blocks=2))
    expected = {
        layer.name
        for layer in base.layers
        if layer.name in set(block_layer_names(base, loaded.spec, 2))
        and layer.weights
        and not isinstance(layer, keras.layers.BatchNormalization)
    }
    assert set(trainable) == expected
    assert {n.split("_bn")[0].split("_relu")[0] for n in trainable} == {
        "conv_dw_13",
        "conv_pw_13",
        "conv_dw_12",
        "conv_pw_12",
    }
    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable, layer.name
    trainable_base = {layer.name for layer in base.layers if layer.trainable and layer.weights}
    assert trainable_base == expected
    head_dense = [layer for layer in model.get_layer("head").layers if isinstance(layer, keras.layers.Dense)]
    assert all(layer.trainable for layer in head_dense)
    # the trainable variables are exactly those layers' kernels plus the head's dense weights
    n_vars = sum(len(base.get_layer(n).trainable_weights) for n in expected) + sum(
        len(layer.trainable_weights) for layer in head_dense
    )
    assert len(model.trainable_weights) == n_vars


def test_layer_regex_alternative_and_zero_blocks(tiny):
    from tasks.models.finetuning import set_trainable

    model, loaded = tiny
    assert set_trainable(model, loaded.model, loaded.spec, FinetuneConfig(layer_regex=r"^conv_pw_13$")) == [
        "conv_pw_13"
    ]
    assert set_trainable(model, loaded.model, loaded.spec, FinetuneConfig(unfreeze_blocks=0)) == []
    with pytest.raises(ValueError, match="'nomatch_xyz'"):
        set_trainable(model, loaded.model, loaded.spec, FinetuneConfig(layer_regex="nomatch_xyz"))


def test_saved_bundle_loads_in_safe_mode_and_predicts_the_same(tiny, tmp_path):
    from tasks.models.full_model import load_bundle, save_bundle

    model, _ = tiny
    path = save_bundle(model, tmp_path / "m" / "model.keras", ("a", "b", "c"), "categorical")
    assert (tmp_path / "m" / "classes.json").is_file()
    bundle = load_bundle(path)
    assert bundle.names == ("a", "b", "c") and bundle.image_size == SIZE
    pixels = np.random.default_rng(1).integers(0, 256, (3, *SIZE, 3)).astype("float32")
    np.testing.assert_allclose(
        bundle.model.predict(pixels, verbose=0), model.predict(pixels, verbose=0), atol=1e-6
    )
    assert not any(type(layer).__name__ == "Lambda" for layer in bundle.model.layers)


CHILD = r"""
import os, signal, sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.getcwd())
import keras
import tensorflow as tf

from tasks.models.bases import load_base
from tasks.config import BaseConfig, FinetuneConfig, HeadSpec
from tasks.models.finetuning import finetune_model
from tasks.models.full_model import build_full_model
from tasks.models.heads import build_head

work_dir, kill_after = Path(sys.argv[1]), int(sys.argv[2])
if kill_after >= 0:  # SIGKILL this process right after the backup of epoch `kill_after` (0-based) is written
    original = keras.callbacks.BackupAndRestore.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    keras.callbacks.BackupAndRestore.on_epoch_end = on_epoch_end

loaded = load_base(BaseConfig(name="mobilenet", weights="none", alpha=0.25), (32, 32))
keras.utils.set_random_seed(0)
head = build_head(HeadSpec(name="h", type="linear"), 256, "binary", 2)
model = build_full_model(loaded.model, "mobilenet", head, (32, 32), "avg")
rng = np.random.default_rng(0)
y = np.array([0, 1] * 12, dtype="float32")
x = (rng.normal(0, 30, (24, 32, 32, 3)) + np.where(y[:, None, None, None] > 0, [40, 60, 200], [200, 40, 40])).clip(0, 255)
x = x.astype("float32")
train = tf.data.Dataset.from_tensor_slices((x, y[:, None])).shuffle(24, seed=1).repeat().batch(8)
val = tf.data.Dataset.from_tensor_slices((x[:8], y[:8, None])).batch(8)
cfg = FinetuneConfig(epochs=4, unfreeze_blocks=1, patience=10, lr=0.01)
first_epochs = []


def make_train(first_epoch):
    first_epochs.append(first_epoch)
    return train, 3


summary = finetune_model(model, loaded.model, loaded.spec, make_train, val, cfg, "binary", 2, work_dir, seed=0)
import json
out = {k: summary[k] for k in ("resumed_from_epoch", "history", "state")}
print("SUMMARY " + json.dumps({**out, "first_epochs": first_epochs}))
"""


@pytest.mark.slow
def test_killed_finetune_resumes_from_its_last_finished_epoch(tmp_path):
    import json
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    work = tmp_path / "ft"

    def child(kill_after: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", CHILD, str(work), str(kill_after)],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )

    killed = child(kill_after=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (work / "backup" / "training_metadata.json").is_file()
    assert json.loads((work / "backup" / "training_metadata.json").read_text())["epoch"] == 2
    assert json.loads((work / "state" / "state.json").read_text())["epochs_done"] == 2

    resumed = child(kill_after=-1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    line = next(x for x in resumed.stdout.splitlines() if x.startswith("SUMMARY "))
    summary = json.loads(line[len("SUMMARY ") :])
    assert summary["resumed_from_epoch"] == 2  # epochs 1 and 2 were not run again
    assert summary["first_epochs"] == [2]  # the data continues at epoch 2 too (not epoch 0's order and views)
    assert [r["epoch"] for r in summary["history"]] == ["1", "2", "3", "4"]  # the killed run's rows are kept
    assert summary["state"]["epochs_done"] == 4
    assert not (work / "backup").exists()  # BackupAndRestore removes its backup on success


def test_state_left_by_another_run_is_not_resumed(tmp_path):
    import json

    import keras
    import tensorflow as tf

    from tasks.models.bases import load_base
    from tasks.models.finetuning import finetune_model
    from tasks.models.full_model import build_full_model
    from tasks.models.heads import build_head

    loaded = load_base(TINY_BASE, SIZE)
    keras.utils.set_random_seed(0)
    head = build_head(HeadSpec(name="h", type="linear"), 256, "binary", 2)
    model = build_full_model(loaded.model, "mobilenet", head, SIZE, "avg")
    x = np.random.default_rng(0).integers(0, 256, (8, *SIZE, 3)).astype("float32")
    y = np.array([0, 1] * 4, "float32")[:, None]
    train = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(4)
    val = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    stale = tmp_path / "work" / "state"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text(
        json.dumps({"fingerprint": "other-run", "epochs_done": 5, "best_epoch": 3})
    )
    cfg = FinetuneConfig(epochs=1, unfreeze_blocks=1)
    out = finetune_model(
        model,
        loaded.model,
        loaded.spec,
        lambda e: (train, 2),
        val,
        cfg,
        "binary",
        2,
        tmp_path / "work",
        0,
        "this-run",
    )
    assert out["resumed_from_epoch"] == 0 and out["state"]["fingerprint"] == "this-run"
    assert [r["epoch"] for r in out["history"]] == ["1"] and out["state"]["epochs_done"] == 1


def test_an_epoch_replaces_the_best_only_by_the_relative_margin():
    from tasks.models.finetuning import improves

    assert improves(0.0346, 0.0404, 0.05)  # 14% lower: a real gain
    assert not improves(0.0396, 0.0404, 0.05)  # 2% lower: noise, the top-only weights stay
    assert improves(0.0396, 0.0404, 0.0)  # without a margin any decrease counts (Keras' EarlyStopping)
    assert not improves(0.0404, 0.0404, 0.0)
    assert FinetuneConfig().min_improvement == 0.05
    with pytest.raises(ValueError, match="min_improvement"):
        FinetuneConfig(min_improvement=1.0)


def test_the_decision_says_which_weights_were_kept_with_the_figures():
    from tasks.models.finetuning import best_tried, weights_decision

    history = [{"epoch": "1", "val_loss": "0.0340"}, {"epoch": "2", "val_loss": "0.0315"}]
    assert best_tried(history) == (2, 0.0315) and best_tried([]) is None
    kept_top = weights_decision(
        skipped=False,
        best_epoch=0,
        top_only_val_loss=0.0327,
        val_loss=0.0327,
        tried=best_tried(history),
        min_improvement=0.05,
    )
    assert kept_top == (
        "kept the top-only weights: no fine-tuning epoch lowered val loss 0.0327 by 5% (best epoch 2: 0.0315)"
    )
    kept_tuned = weights_decision(
        skipped=False,
        best_epoch=2,
        top_only_val_loss=0.0400,
        val_loss=0.0300,
        tried=(2, 0.03),
        min_improvement=0.05,
    )
    assert kept_tuned == (
        "kept the fine-tuned weights of epoch 2: val loss 0.0400 -> 0.0300 (25% lower, more than "
        "finetune.min_improvement 5%)"
    )
    no_margin = weights_decision(
        skipped=False, best_epoch=0, top_only_val_loss=0.5, val_loss=0.5, tried=(1, 0.6), min_improvement=0.0
    )
    assert (
        no_margin
        == "kept the top-only weights: no fine-tuning epoch lowered val loss 0.5000 (best epoch 1: 0.6000)"
    )
    skipped = weights_decision(
        skipped=True, best_epoch=0, top_only_val_loss=None, val_loss=None, tried=None, min_improvement=0.05
    )
    assert skipped == "kept the top-only weights: fine-tuning was skipped (finetune.epochs 0)"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, imagegen):
    """A tiny workspace through train_top (random-weight MobileNet 0.25 at 32 px, 2 classes x 8 images), and
    params whose finetune.min_improvement no epoch can beat (the top-only weights are kept)."""
    from tasks.config import params_from_dict
    from tasks.layout import Layout
    from tasks.stages.run_features import run_features
    from tasks.stages.run_index import run_index
    from tasks.stages.run_train_top import run_train_top

    root = tmp_path_factory.mktemp("ft_ws")
    data = imagegen.make_class_folders(root / "images", ["blue", "red"], per_class=8, size=32)
    params = params_from_dict(
        {
            "seed": 3,
            "data": {"root": str(data), "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
            "image": {"size": [32, 32]},
            "augment": {"passes": 1},
            "base": {"name": "mobilenet", "weights": "none", "alpha": 0.25},
            "features": {
                "batch_size": 8,
                "shard_size": 8,
                "cache_dir": str(root / "cache"),
                "engine": "keras",
            },
            "top": {"heads": [{"name": "linear", "type": "linear"}], "epochs": 2, "batch_size": 8},
            "finetune": {"epochs": 2, "unfreeze_blocks": 1, "batch_size": 8, "min_improvement": 0.99},
            "evaluate": {"batch_size": 8, "preview_images": 4},
        }
    )
    layout = Layout(root / "work")
    run_index(params, layout)
    run_features(params, layout)
    run_train_top(params, layout)
    return params, layout


def test_finetune_reports_epochs_keeps_metrics_narrow_and_records_the_run(trained):
    import json

    from tasks.models.finetuning import FINETUNE_METRIC_KEYS
    from tasks.models.full_model import read_bundle_model_sha256
    from tasks.progress import Step
    from tasks.reports.plots import read_decision
    from tasks.stages.run_finetune import run_finetune

    params, layout = trained
    steps: list[Step] = []
    manifest = run_finetune(params, layout, progress=steps.append)
    assert [(s.task, s.done, s.total, s.unit) for s in steps] == [
        ("finetune", 0, 2, "epoch"),  # before the first epoch: the display's rate and ETA start from here
        ("finetune", 1, 2, "epoch"),
        ("finetune", 2, 2, "epoch"),
    ]
    assert steps[-1].final and "val_loss" in steps[1].info
    assert manifest.kept == "top-only" and manifest.best_epoch == 0 and manifest.best_tried_epoch in (1, 2)
    assert manifest.decision.startswith(
        f"kept the top-only weights: no fine-tuning epoch lowered val loss {manifest.top_only_val_loss:.4f} by 99% "
        f"(best epoch {manifest.best_tried_epoch}: {manifest.best_tried_val_loss:.4f})"
    )
    metrics = json.loads((layout.metrics_dir / "finetune.json").read_text())
    assert set(metrics) == {*FINETUNE_METRIC_KEYS, "trainable_layers"}
    assert not {"seconds", "resumed_from_epoch", "model_file", "decision"} & set(metrics)
    record = json.loads(layout.run_record("finetune").read_text())
    assert record["seconds"] == manifest.seconds and record["decision"] == manifest.decision
    assert record["model_sha256"] == read_bundle_model_sha256(layout.candidate_model)
    assert read_decision(layout, record["model_sha256"]) == ("top-only", manifest.decision)
    assert read_decision(layout, "another model") is None  # a record of another model is not believed


def test_finetune_and_evaluate_commands_say_what_was_kept(trained):
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    params, layout = trained
    params_file = layout.root / "params.yaml"
    params_file.write_text(json.dumps(params.model_dump(mode="json")))  # JSON is YAML
    runner = CliRunner()
    args = ["-p", str(params_file), "-w", str(layout.root)]
    tuned = runner.invoke(app, ["finetune", *args], env={"COLUMNS": "300"})
    assert tuned.exit_code == 0, tuned.output
    last = tuned.output.strip().splitlines()[-1]
    assert "for 2 epochs; kept the top-only weights: no fine-tuning epoch lowered val loss" in last
    assert last.endswith(f"; wrote {layout.candidate_model.as_posix()}")
    assert "finetune 2/2 epoch" in tuned.output  # the progress display's plain lines (not a terminal)
    evaluated = runner.invoke(app, ["evaluate", *args], env={"COLUMNS": "300"})
    assert evaluated.exit_code == 0, evaluated.output
    import re

    assert re.search(r"^evaluate (\d+)/\1 img", evaluated.output, re.MULTILINE), evaluated.output
    comparison = (layout.reports_dir / "model_comparison.md").read_text()
    decision = json.loads(layout.run_record("finetune").read_text())["decision"]
    assert f"**Candidate:** {decision} (the two rows are the same weights)." in comparison
    record = json.loads(layout.run_record("evaluate").read_text())
    assert record["images_evaluated"] > 0 and record["seconds"] > 0
    # the candidate kept the top-only weights of this head: one pass, the top-only figures are the candidate's
    assert record["top_only"] == "the candidate's figures (the same weights)"
    from tasks.data.index_table import read_index

    index = read_index(layout)
    assert record["images_evaluated"] == int(index["split"].isin(["test", "val"]).sum())
    metrics = json.loads((layout.metrics_dir / "evaluate.json").read_text())
    assert not {"seconds", "images_per_second", "reports", "model_file"} & set(metrics)
    assert {"test_accuracy", "top_only_test_accuracy", "score"} <= set(metrics)
