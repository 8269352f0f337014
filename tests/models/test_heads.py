"""The head registry: shapes, output layers per class mode, argument validation."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import HeadSpec
from tasks.errors import InputError
from tasks.models.heads import HEADS, build_head, freeze_batchnorm, iter_layers, output_spec


def test_registry_is_explicit_and_covers_config_types():
    assert set(HEADS) == {"linear", "dense"}


@pytest.mark.parametrize(
    ("class_mode", "num_classes", "units", "activation", "loss"),
    [
        ("binary", 2, 1, "sigmoid", "binary_crossentropy"),
        ("categorical", 4, 4, "softmax", "categorical_crossentropy"),
        ("sparse", 3, 3, "softmax", "sparse_categorical_crossentropy"),
    ],
)
def test_output_spec(class_mode, num_classes, units, activation, loss):
    out = output_spec(class_mode, num_classes)
    assert (out.units, out.activation, out.loss) == (units, activation, loss)


def test_output_spec_errors_echo_value():
    with pytest.raises(ValueError, match="'multi'"):
        output_spec("multi", 3)
    with pytest.raises(ValueError, match="num_classes=3"):
        output_spec("binary", 3)


def test_linear_head_is_one_dense_layer():
    head = build_head(HeadSpec(name="lin", type="linear"), 8, "categorical", 3)
    assert [type(layer).__name__ for layer in head.layers] == ["Dense"]
    assert head.count_params() == 8 * 3 + 3
    out = head(np.ones((5, 8), "float32"))
    np.testing.assert_allclose(np.asarray(out).sum(axis=1), 1.0, rtol=1e-5)


def test_dense_head_with_batchnorm_and_dropout():
    spec = HeadSpec(name="d", type="dense", units=(16, 4), dropout=0.5, batchnorm=True)
    head = build_head(spec, 10, "binary", 2)
    kinds = [type(layer).__name__ for layer in head.layers]
    assert kinds == ["Dense", "BatchNormalization", "ReLU", "Dropout"] * 2 + ["Dense"]
    assert head.output_shape == (None, 1)
    assert freeze_batchnorm(head) == 2
    assert not any(layer.trainable for layer in iter_layers(head) if "batchnorm" in layer.name)


def test_bad_specs_are_rejected_with_the_value():
    with pytest.raises(ValueError, match=r"units=\[8\]"):
        build_head(HeadSpec(name="x", type="linear", units=(8,)), 4, "binary", 2)
    with pytest.raises(ValueError, match="at least one entry"):
        build_head(HeadSpec(name="y", type="dense"), 4, "binary", 2)
    with pytest.raises(ValueError, match="input_dim.*0"):
        build_head(HeadSpec(name="z", type="linear"), 0, "binary", 2)


# ------------------------------------------------------------------------------ preprocessing and the bundle
def tiny_classifier(rescale: float | None = None, size: int = 8):
    """Raw pixels -> BasePreprocess(mobilenet, rescale) -> mean pooling -> a sigmoid unit: a saveable full model."""
    import keras

    from tasks.models.full_model import BasePreprocess

    inputs = keras.Input((size, size, 3), name="image")
    x = BasePreprocess("mobilenet", rescale=rescale, name="preprocess")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="predictions")(x)
    return keras.Model(inputs, outputs)


def test_base_preprocess_applies_rescale_first_and_round_trips_in_safe_mode(tmp_path):
    import keras

    from tasks.models.bases import get_spec
    from tasks.models.full_model import BasePreprocess

    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    scaled = np.asarray(BasePreprocess("mobilenet", rescale=0.5)(x))
    np.testing.assert_allclose(scaled, np.asarray(get_spec("mobilenet").preprocess(0.5 * x)), atol=1e-6)
    plain = np.asarray(BasePreprocess("mobilenet")(x))
    np.testing.assert_allclose(plain, np.asarray(get_spec("mobilenet").preprocess(x)), atol=1e-6)
    assert not np.allclose(scaled, plain)
    assert BasePreprocess("mobilenet", rescale=0.5).get_config()["rescale"] == 0.5
    # a config from before rescale existed still builds (no scaling)
    old = {k: v for k, v in BasePreprocess("mobilenet").get_config().items() if k != "rescale"}
    assert BasePreprocess.from_config(old).rescale is None
    with pytest.raises(ValueError, match="rescale.*'half'"):
        BasePreprocess("mobilenet", rescale="half")

    model = tiny_classifier(rescale=1 / 255)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True, compile=False)
    assert loaded.get_layer("preprocess").rescale == pytest.approx(1 / 255)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


def test_save_bundle_validates_first_and_records_the_model_hash(tmp_path):
    import json

    from tasks.models.full_model import load_bundle, save_bundle
    from tasks.models.heads import sha256_file

    path = tmp_path / "candidate" / "model.keras"
    with pytest.raises(ValueError, match="interpolation.*'cubic'"):
        save_bundle(tiny_classifier(), path, ("a", "b"), "binary", "cubic")
    assert not (tmp_path / "candidate").exists()  # validated before anything was written
    with pytest.raises(ValueError, match="crop_to_aspect_ratio.*'yes'"):
        save_bundle(tiny_classifier(), path, ("a", "b"), "binary", "nearest", "yes")
    assert not (tmp_path / "candidate").exists()
    save_bundle(tiny_classifier(), path, ("a", "b"), "binary", "nearest", True)
    classes = json.loads((path.parent / "classes.json").read_text())
    assert classes == {
        "names": ["a", "b"],
        "class_mode": "binary",
        "num_classes": 2,
        "interpolation": "nearest",
        "crop_to_aspect_ratio": True,
        "model_sha256": sha256_file(path),
    }
    assert sorted(p.name for p in path.parent.iterdir()) == ["classes.json", "model.keras"]  # no temp files
    bundle = load_bundle(path)
    assert bundle.interpolation == "nearest" and bundle.crop_to_aspect_ratio is True
    # a bundle saved before the crop rule was recorded was stretched
    del classes["crop_to_aspect_ratio"]
    (path.parent / "classes.json").write_text(json.dumps(classes))
    assert load_bundle(path).crop_to_aspect_ratio is False


def test_a_save_killed_between_its_two_writes_is_refused_not_paired(tmp_path, monkeypatch):
    """Killed after classes.json is replaced but before the model is renamed in: new classes, old model."""
    import tasks.models.heads
    from tasks.models.full_model import load_bundle, save_bundle

    path = tmp_path / "model.keras"
    save_bundle(tiny_classifier(), path, ("a", "b"), "binary")
    old_model = path.read_bytes()

    def killed(tmp, target):
        raise KeyboardInterrupt  # stands in for SIGKILL at the commit rename

    monkeypatch.setattr(tasks.models.heads, "publish_model", killed)
    with pytest.raises(KeyboardInterrupt):
        save_bundle(tiny_classifier(), path, ("x", "y"), "binary", "nearest")
    monkeypatch.undo()
    assert path.read_bytes() == old_model  # the old model is still in place, beside the new classes.json
    with pytest.raises(InputError, match="interrupted.*retrainflow finetune"):
        load_bundle(path)
    save_bundle(tiny_classifier(), path, ("x", "y"), "binary", "nearest")  # the next save repairs it
    assert load_bundle(path).names == ("x", "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.json", "model.keras"]


def test_class_modes_have_one_definition():
    import tasks.data.labels
    import tasks.models.heads

    assert tasks.models.heads.CLASS_MODES is tasks.data.labels.CLASS_MODES


def test_bundle_model_sha256_is_the_saved_files(tmp_path):
    import json

    from tasks.models.bases import sha256_file
    from tasks.models.full_model import read_bundle_model_sha256, save_bundle

    head = build_head(HeadSpec(name="lin", type="linear"), 4, "binary", 2)
    path = save_bundle(head, tmp_path / "m" / "model.keras", ("a", "b"), "binary")
    assert read_bundle_model_sha256(path) == sha256_file(path)
    classes = path.parent / "classes.json"
    record = json.loads(classes.read_text())
    del record["model_sha256"]  # a bundle saved before the hash was recorded
    classes.write_text(json.dumps(record))
    assert read_bundle_model_sha256(path) is None
