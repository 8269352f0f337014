"""Tail fine-tuning: the unfrozen blocks + pooling + head trained on cached cut-point activations, sharing the full
model's layers, so the full raw-pixels model is what is trained, saved and evaluated."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.config import BaseConfig, FinetuneConfig, HeadSpec, params_from_dict

SIZE = (32, 32)


def _tiny_full_model(blocks: int):
    import keras

    from tasks.models.bases import cut_point, load_base
    from tasks.models.full_model import build_full_model, tail_model
    from tasks.models.heads import build_head

    loaded = load_base(BaseConfig(name="mobilenet", weights="none", alpha=0.25), SIZE)
    keras.utils.set_random_seed(0)
    head = build_head(HeadSpec(name="h", type="dense", units=(8,), batchnorm=True), 256, "categorical", 3)
    model = build_full_model(loaded.model, "mobilenet", head, SIZE, "avg")
    cut = cut_point(loaded.model, loaded.spec, blocks)
    return model, loaded, cut, tail_model(model, loaded.model, cut.layer)


def _to_cut(loaded, cut, pixels):
    """What the features stage stores for ``pixels``: the base's own layers up to the cut."""
    import keras

    from tasks.models.full_model import BasePreprocess

    inner = keras.Model(loaded.model.input, loaded.model.get_layer(cut.layer).output)
    return np.asarray(inner(BasePreprocess("mobilenet")(pixels), training=False))


def test_tail_and_full_model_agree_before_and_after_training_the_tail():
    import keras

    from tasks.models.finetuning import compile_for_finetune, set_trainable

    model, loaded, cut, tail = _tiny_full_model(blocks=2)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, *SIZE, 3)).astype("float32")
    acts = _to_cut(loaded, cut, pixels)
    before = np.asarray(model(pixels))
    np.testing.assert_allclose(np.asarray(tail(acts)), before, atol=1e-5)

    cfg = FinetuneConfig(epochs=1, unfreeze_blocks=2, optimizer="adam", lr=0.01)
    trainable = set_trainable(model, loaded.model, loaded.spec, cfg)
    assert trainable and {w.path for w in tail.trainable_weights} == {w.path for w in model.trainable_weights}
    compile_for_finetune(tail, cfg, "categorical", 3)
    labels = keras.utils.to_categorical(rng.integers(0, 3, 12), 3)
    tail.fit(acts, labels, epochs=3, batch_size=4, verbose=0)

    after = np.asarray(model(pixels))
    assert np.abs(after - before).max() > 1e-3  # training the tail trained the full model (shared layers)
    np.testing.assert_allclose(np.asarray(tail(acts)), after, atol=1e-5)
    # the frozen part did not move: the cut activations are still what the cache holds
    np.testing.assert_allclose(_to_cut(loaded, cut, pixels), acts, atol=1e-6)


@pytest.fixture(scope="module")
def learnable(tmp_path_factory, imagegen):
    """A tiny learnable workspace through train_top with a 1-epoch head, so fine-tuning has room to help."""
    from tasks.layout import Layout
    from tasks.stages.run_features import run_features
    from tasks.stages.run_index import run_index
    from tasks.stages.run_train_top import run_train_top

    root = tmp_path_factory.mktemp("tail_ws")
    data = imagegen.make_class_folders(root / "images", ["blue", "red", "green"], per_class=10, size=32)

    def params(**finetune):
        return params_from_dict(
            {
                "seed": 5,
                "data": {"root": str(data), "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
                "image": {"size": list(SIZE)},
                "augment": {"passes": 2},
                "base": {"name": "mobilenet", "weights": "none", "alpha": 0.25},
                "features": {
                    "batch_size": 16,
                    "shard_size": 16,
                    "cache_dir": str(root / "cache"),
                    "dtype": "float32",
                    "engine": "keras",
                },
                "top": {"heads": [{"name": "linear", "type": "linear"}], "epochs": 1, "batch_size": 16},
                "finetune": {
                    "epochs": 4,
                    "unfreeze_blocks": 2,
                    "batch_size": 8,
                    "optimizer": "adam",
                    "lr": 0.003,
                    "min_improvement": 0.0,
                    "patience": 4,
                    **finetune,
                },
            }
        )

    layout = Layout(root / "work")
    run_index(params(), layout)
    run_features(params(), layout)
    run_train_top(params(), layout)
    return params, layout


def test_finetuning_from_cached_activations_lowers_val_loss_and_says_which_path_ran(learnable):
    from tasks.models.full_model import load_bundle
    from tasks.stages.run_finetune import run_finetune

    params, layout = learnable
    manifest = run_finetune(params(), layout)
    assert manifest.path == "tail" and manifest.cut == "conv_pad_12"
    assert manifest.kept == "fine-tuned" and manifest.val_loss < manifest.top_only_val_loss
    assert manifest.decision.startswith(
        f"kept the fine-tuned weights of epoch {manifest.best_epoch}: val loss"
    )
    assert manifest.decision.endswith("; tail path, on cached cut-point activations")
    assert f"val accuracy {manifest.top_only_val_accuracy * 100:.3g}% -> " in manifest.decision
    metrics = json.loads(layout.finetune_metrics.read_text())
    assert metrics["path"] == "tail" and metrics["best_epoch"] >= 1
    record = json.loads(layout.run_record("finetune").read_text())
    assert record["path_reason"] and record["seconds_per_epoch"] > 0
    # the saved candidate is the full raw-pixels model, and its val loss is the one the tail reported
    from tasks.data.index_table import read_classes, read_index
    from tasks.data.labels import encode_labels
    from tasks.data.pipeline import view_dataset
    from tasks.inputs import ImageSpec

    bundle = load_bundle(layout.candidate_model)
    val = read_index(layout).query("split == 'val'").reset_index(drop=True)
    images = np.concatenate(
        [b.numpy() for b in view_dataset(val, params().data.root, ImageSpec(SIZE), batch_size=64)]
    )
    classes = read_classes(layout)
    labels = encode_labels(val["class_id"].to_numpy(), classes.class_mode, classes.num_classes)
    probs = np.asarray(bundle.model(images))
    loss = float(-np.mean(np.sum(labels * np.log(np.clip(probs, 1e-7, 1)), axis=1)))
    assert loss == pytest.approx(manifest.val_loss, rel=1e-3, abs=1e-4)

    # fine-tuned weights: evaluate runs the top-only model too, and the val figures say what fine-tuning changed
    from tasks.stages.run_evaluate import run_evaluate

    run_evaluate(params(), layout)
    assert json.loads(layout.run_record("evaluate").read_text())["top_only"] == "evaluated"
    details = json.loads(layout.evaluation_details.read_text())
    assert details["top_only"]["val"]["loss"] == pytest.approx(manifest.top_only_val_loss, rel=1e-3)
    assert details["candidate"]["val"]["loss"] == pytest.approx(manifest.val_loss, rel=1e-3)


def test_augmented_epochs_read_the_cached_passes_and_the_full_path_stays_available(learnable):
    from tasks.stages.run_finetune import run_finetune

    params, layout = learnable
    augmented = run_finetune(params(augment=True, epochs=2), layout)
    assert augmented.path == "tail" and augmented.epochs_run == 2
    full = run_finetune(params(path="full", epochs=1), layout)
    assert full.path == "full" and full.cut is None and full.path_reason == "finetune.path is full"
    assert json.loads(layout.finetune_metrics.read_text())["path"] == "full"


def test_a_tail_run_without_its_activations_says_to_run_features(learnable, tmp_path):
    import shutil

    from tasks.errors import FeaturesMismatchError
    from tasks.layout import Layout
    from tasks.stages.run_finetune import run_finetune

    params, layout = learnable
    other = Layout(tmp_path / "ws")
    for rel in ("index", "models", "features"):
        shutil.copytree(layout.root / rel, other.root / rel)
    with pytest.raises(
        FeaturesMismatchError, match=r"activations were computed at conv_pad_12.*run `retrainflow features`"
    ):
        run_finetune(params(unfreeze_blocks=3), other)
