"""The base-model registry: entries, named blocks on the real Keras models, weights sources and fingerprints."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tasks.errors
import tasks.models.bases
from tasks.config import BaseConfig, ParamsError, params_from_dict
from tasks.models.bases import (
    BASE_MODELS,
    BaseSpec,
    WeightsUnavailableError,
    block_layer_names,
    block_starts,
    get_spec,
    load_base,
    resolve_image_size,
    weights_fingerprint,
)

MOBILENET_025 = "mobilenet_2_5_224_tf_no_top.h5"
MOBILENET_025_SHA = "dbdb03ee2a22fd895301636cd328b234bb3a9952358f436d82f46b81e0d5b0bf"
TINY = {"mobilenet_v2": 0.35, "mobilenet": 0.25}


def test_registry_has_the_five_bases_and_config_validates_against_it():
    assert {"mobilenet_v2", "mobilenet", "efficientnet_b0", "resnet50", "vgg16"} <= set(BASE_MODELS)
    assert BaseConfig().name == "mobilenet_v2"
    for name, spec in BASE_MODELS.items():
        assert spec.name == name and spec.default_size == (224, 224) and spec.blocks
    with pytest.raises(ParamsError, match="base.name"):
        params_from_dict({"base": {"name": "inception"}})


# name -> (preprocess mode, default size, feature dim, blocks: count, first, last, alphas, default alpha, min size)
REGISTRY = {
    "mobilenet_v2": (
        "tf",
        (224, 224),
        1280,
        19,
        "Conv1",
        "Conv_1",
        (0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
        1.0,
        32,
    ),
    "mobilenet": ("tf", (224, 224), 1024, 14, "conv1", "conv_dw_13", (0.25, 0.5, 0.75, 1.0), 1.0, 32),
    "efficientnet_b0": ("none", (224, 224), 1280, 18, "stem", "top", (), None, 32),
    "resnet50": ("caffe", (224, 224), 2048, 17, "conv1", "conv5_block3", (), None, 32),
    "vgg16": ("caffe", (224, 224), 512, 5, "block1", "block5", (), None, 32),
}


def test_registry_entries_keep_their_facts():
    assert set(BASE_MODELS) == set(REGISTRY)
    for name, spec in BASE_MODELS.items():
        facts = (
            spec.preprocess_mode,
            spec.default_size,
            spec.feature_dim,
            len(spec.blocks),
            spec.blocks[0],
            spec.blocks[-1],
            spec.alphas,
            spec.default_alpha,
            spec.min_size,
        )
        assert facts == REGISTRY[name], name
        assert callable(spec.constructor) and callable(spec.preprocess) and callable(spec.imagenet_file)


def test_registry_entries_are_frozen_and_built_with_keywords_only():
    spec = BASE_MODELS["vgg16"]
    values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(BaseSpec)}
    assert BaseSpec(**values) == spec
    with pytest.raises(TypeError):
        BaseSpec(*values.values())  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.feature_dim = 1  # type: ignore[misc]


def test_the_registry_does_not_import_the_config():
    """One-way: tasks.config validates against the registry; tasks.models.bases imports no tasks module but the leaf
    tasks.errors (not lazily, not under TYPE_CHECKING), and loads a base from anything with name, weights and
    alpha."""
    tree = ast.parse(Path(tasks.models.bases.__file__).read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m == "tasks" or m.startswith("tasks.")} <= {"tasks.errors"}
    leaf = ast.parse(Path(tasks.errors.__file__).read_text())
    assert not [
        n for n in ast.walk(leaf) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("tasks")
    ]
    choice = type("Choice", (), {"name": "mobilenet", "weights": "none", "alpha": 0.25})()
    assert tasks.models.bases.weights_source(choice, (32, 32)) is None


def test_importing_the_registry_does_not_import_tensorflow():
    code = "import sys, tasks.models.bases, tasks.config; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_alpha_and_size_are_validated_with_the_value_echoed():
    assert get_spec("mobilenet").resolve_alpha(None) == 1.0
    assert get_spec("mobilenet").resolve_alpha(0.25) == 0.25
    with pytest.raises(ValueError, match=r"base\.alpha.*got 0\.3"):
        get_spec("mobilenet").resolve_alpha(0.3)
    with pytest.raises(ValueError, match="resnet50 takes no alpha.*0.5"):
        get_spec("resnet50").resolve_alpha(0.5)
    with pytest.raises(ValueError, match=r"base\.name.*'nope'"):
        get_spec("nope")
    assert resolve_image_size(None, get_spec("vgg16")) == (224, 224)
    with pytest.raises(ValueError, match=r"image\.size.*\(16, 16\)"):
        resolve_image_size((16, 16), get_spec("mobilenet"))
    assert get_spec("mobilenet").feature_dim_for(0.25) == 256
    assert get_spec("mobilenet_v2").feature_dim_for(0.35) == 1280
    assert get_spec("mobilenet_v2").feature_dim_for(1.4) == 1792


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BASE_MODELS))
def test_named_blocks_match_the_real_keras_models(name: str):
    spec = BASE_MODELS[name]
    loaded = load_base(BaseConfig(name=name, weights="none", alpha=TINY.get(name)), (32, 32))
    model = loaded.model
    assert model.output_shape[-1] == spec.feature_dim_for(TINY.get(name))
    assert not model.trainable and not any(layer.trainable_weights for layer in model.layers)
    starts = block_starts(model, spec)
    assert starts == sorted(starts) and len(set(starts)) == len(spec.blocks)
    bounds = [*starts, len(model.layers)]
    for prefix, lo, hi in zip(spec.blocks, bounds, bounds[1:], strict=False):
        block = model.layers[lo:hi]
        assert block[0].name == prefix or block[0].name.startswith(prefix + "_")
        assert any(layer.weights for layer in block), f"{name}: block {prefix} holds no weights"
    # nothing with weights precedes the first block except input normalisation constants
    assert all(not layer.trainable_weights for layer in model.layers[: starts[0]])
    last_two = block_layer_names(model, spec, 2)
    assert last_two == [layer.name for layer in model.layers[starts[-2] :]]
    assert block_layer_names(model, spec, 0) == []
    assert len(block_layer_names(model, spec, 999)) == len(model.layers) - starts[0]


def test_block_prefixes_do_not_confuse_block_1_with_block_10():
    spec = get_spec("mobilenet")
    model = load_base(BaseConfig(name="mobilenet", weights="none", alpha=0.25), (32, 32)).model
    names = block_layer_names(model, spec, 4)  # conv_dw_10 .. conv_dw_13
    assert names[0] == "conv_dw_10" and names[-1] == "conv_pw_13_relu"
    assert "conv_dw_9" not in names and "conv_pw_10" in names
    with pytest.raises(ValueError, match="unfreeze_blocks.*-1"):
        block_layer_names(model, spec, -1)


def test_random_init_is_deterministic_and_fingerprinted():
    cfg = BaseConfig(name="mobilenet", weights="none", alpha=0.25)
    a = load_base(cfg, (32, 32))
    b = load_base(cfg, (32, 32))
    assert a.weights_sha256 == b.weights_sha256 == weights_fingerprint(cfg, (32, 32))
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    other = load_base(BaseConfig(name="mobilenet", weights="none", alpha=0.5), (32, 32))
    assert other.weights_sha256 != a.weights_sha256


def test_preprocess_leaves_the_input_alone_and_maps_to_the_base_range():
    x = np.array([[[0.0, 127.5, 255.0]]], dtype=np.float32)
    out = np.asarray(get_spec("mobilenet_v2").preprocess(x))
    np.testing.assert_allclose(out, [[[-1.0, 0.0, 1.0]]], atol=1e-6)
    assert x[0, 0, 2] == 255.0  # Keras' numpy preprocessing works in place; ours must not
    caffe = np.asarray(get_spec("vgg16").preprocess(x))
    np.testing.assert_allclose(caffe[0, 0], [255.0 - 103.939, 127.5 - 116.779, 0.0 - 123.68], atol=1e-3)


def _offline_get_file(calls: list[tuple[str, str]]):
    """A stand-in for ``keras.utils.get_file`` that fails as Keras does offline, without touching the network."""

    def get_file(fname=None, origin=None, *args, **kwargs):
        calls.append((fname, origin))
        raise Exception(  # Keras raises a bare Exception (keras/src/utils/file_utils.py)
            f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name resolution"
        )

    return get_file


def test_offline_imagenet_error_names_the_file_the_folder_and_the_remedies(
    keras_home: Path, monkeypatch: pytest.MonkeyPatch
):
    import keras

    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(keras.utils, "get_file", _offline_get_file(calls))  # hermetic: never downloads
    cfg = BaseConfig(name="mobilenet", weights="imagenet", alpha=0.25)
    with pytest.raises(WeightsUnavailableError) as info:
        load_base(cfg, (224, 224))
    assert [fname for fname, _ in calls] == [MOBILENET_025]  # the download was attempted, and failed
    text = str(info.value)
    assert MOBILENET_025 in text
    assert str(keras_home / "models") in text
    assert "KERAS_HOME" in text and "base.weights" in text
    assert "URL fetch failure" not in text.split("(")[0]  # Keras' bare message is only quoted as the cause
    assert calls[0][1] in text  # the URL it could not fetch
    with pytest.raises(
        WeightsUnavailableError, match="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96"
    ):
        weights_fingerprint(BaseConfig(name="mobilenet_v2", weights="imagenet", alpha=0.35), (96, 96))
    assert len(calls) == 2 and not any((keras_home / "models").iterdir())  # nothing was written to the cache


@pytest.mark.shared
def test_imagenet_from_the_keras_cache_and_by_path(keras_home: Path, shared_path):
    source = shared_path("weights", MOBILENET_025)
    (keras_home / "models" / MOBILENET_025).symlink_to(source)
    cached = load_base(BaseConfig(name="mobilenet", weights="imagenet", alpha=0.25), (32, 32))
    by_path = load_base(BaseConfig(name="mobilenet", weights=str(source), alpha=0.25), (32, 32))
    assert cached.weights_sha256 == by_path.weights_sha256 == MOBILENET_025_SHA
    assert hashlib.sha256(source.read_bytes()).hexdigest() == MOBILENET_025_SHA
    for wa, wb in zip(cached.model.get_weights(), by_path.model.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    random = load_base(BaseConfig(name="mobilenet", weights="none", alpha=0.25), (32, 32))
    assert random.weights_sha256 != MOBILENET_025_SHA
    assert not np.array_equal(random.model.get_weights()[0], by_path.model.get_weights()[0])
