"""The head registry: shapes, output layers per class mode, argument validation."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import HeadSpec
from tasks.heads import HEADS, build_head, freeze_batchnorm, iter_layers, output_spec


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
