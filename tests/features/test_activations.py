"""Cut-point activations: the path choice, the cut per base, and the activations the features stage caches beside
the pooled features (same store, own key), computed once per (image, view, cut) and read back as a stream."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.config import params_from_dict


def _params(root, cache, **sections):
    base = {
        "seed": 1,
        "data": {"root": str(root), "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "image": {"size": [32, 32]},
        "augment": {"passes": 1},
        "base": {"name": "mobilenet", "weights": "none", "alpha": 0.25},
        "features": {
            "batch_size": 8,
            "shard_size": 8,
            "cache_dir": str(cache),
            "dtype": "float32",
            "engine": "keras",
        },
        "top": {"heads": [{"name": "linear", "type": "linear"}], "epochs": 2, "batch_size": 8},
        "finetune": {"epochs": 2, "unfreeze_blocks": 1, "batch_size": 8},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return params_from_dict(base)


# ------------------------------------------------------------------------------------------ the path choice
@pytest.mark.parametrize(
    ("finetune", "path"),
    [
        ({}, "tail"),
        ({"epochs": 0}, "skipped"),
        ({"path": "full"}, "full"),
        ({"layer_regex": "conv_pw_13"}, "full"),
        ({"unfreeze_blocks": 99}, "full"),
        ({"unfreeze_blocks": 0}, "tail"),
    ],
)
def test_the_path_is_chosen_once_from_the_params(tmp_path, finetune, path):
    from tasks.features.activations import finetune_path

    chosen = finetune_path(_params(tmp_path, tmp_path / "c", finetune=finetune))
    assert chosen.path == path and chosen.reason
    assert chosen.wants_activations == (path == "tail")


def test_tail_with_a_layer_regex_or_every_block_is_refused_naming_the_key(tmp_path):
    from tasks.config import ParamsError
    from tasks.errors import InputError
    from tasks.features.activations import finetune_path

    with pytest.raises(ParamsError, match=r"finetune\.path.*layer_regex"):
        _params(tmp_path, tmp_path / "c", finetune={"path": "tail", "layer_regex": "conv"})
    with pytest.raises(InputError, match=r"unfreezes all 14 blocks.*Received: 'tail'"):
        finetune_path(_params(tmp_path, tmp_path / "c", finetune={"path": "tail", "unfreeze_blocks": 14}))


# ------------------------------------------------------------------------------------------ cut per base
@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet", "efficientnet_b0", "resnet50", "vgg16"])
def test_every_registry_base_has_one_cut_tensor_per_block_count(name):
    """The cut for N blocks is the single tensor the N-th last block reads; running the base up to it and then
    the tail from it gives the base's output."""
    import keras

    from tasks.models.bases import BASE_MODELS, block_layer_names, cut_point

    spec = BASE_MODELS[name]
    model = spec.constructor(include_top=False, weights=None, input_shape=(32, 32, 3))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    full = np.asarray(model(x, training=False))
    for blocks in (1, 2, 3):
        cut = cut_point(model, spec, blocks)
        assert cut.base == name and cut.blocks == blocks
        assert cut.block == spec.blocks[-blocks]
        assert cut.layer not in block_layer_names(model, spec, blocks)  # frozen: before the unfrozen blocks
        tensor = model.get_layer(cut.layer).output
        assert tuple(tensor.shape[1:]) == cut.shape
        head, tail = keras.Model(model.input, tensor), keras.Model(tensor, model.output)
        np.testing.assert_allclose(np.asarray(tail(head(x), training=False)), full, atol=1e-5)
    assert cut_point(model, spec, 0).layer == model.layers[-1].name  # 0 blocks: the base's own output


def test_an_ambiguous_cut_names_the_base_and_the_block():
    """A skip connection across the block boundary: the first unfrozen block reads two frozen tensors."""
    import keras

    from tasks.errors import CutPointError
    from tasks.models.bases import BASE_MODELS, BaseSpec, cut_point

    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="stem_conv")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", name="mid_conv")(a)
    out = keras.layers.Add(name="last_add")([a, b])
    model = keras.Model(inputs, out)
    base = BASE_MODELS["vgg16"]
    spec = BaseSpec(**{**base.__dict__, "name": "toy", "blocks": ("stem", "mid", "last")})
    with pytest.raises(CutPointError, match=r"toy: block 'last' reads 2 tensors.*ambiguous"):
        cut_point(model, spec, 1)
    with pytest.raises(CutPointError, match=r"toy: finetune.unfreeze_blocks 3 unfreezes all 3 blocks"):
        cut_point(model, spec, 3)


# ------------------------------------------------------------------------------------------ the stage
@pytest.fixture(scope="module")
def indexed(tmp_path_factory, imagegen):
    from tasks.layout import Layout
    from tasks.stages.run_index import run_index

    root = tmp_path_factory.mktemp("acts")
    data = imagegen.make_class_folders(root / "images", ["blue", "red"], per_class=6, size=32)
    params = _params(data, root / "cache")
    layout = Layout(root / "work")
    run_index(params, layout)
    return data, root, layout


def _activation_cache(manifest):
    """The store of a features run's activations, opened from the key spec its manifest records."""
    from tasks.features.cache import FeatureCache, KeySpec

    data = dict(manifest.activations["key_spec"])
    spec = KeySpec(**{**data, "image_size": tuple(data["image_size"]), "shape": tuple(data["shape"])})
    return FeatureCache.open(manifest.cache_dir, spec, create=False)


def test_activations_are_computed_once_and_only_for_what_changes(indexed, tmp_path, imagegen):
    from tasks.stages.run_features import run_features

    data, root, layout = indexed
    params = _params(data, tmp_path / "cache")
    first = run_features(params, layout)
    train, val = first.rows["train"], first.rows["val"]
    assert first.activations_computed == 2 * train + val > 0  # train: clean + 1 pass; val: clean; test: none
    assert first.activations["cut"] == "conv_pw_12_relu" and first.activations["shape"] == [1, 1, 256]
    assert "activations conv_pw_12_relu: computed" in first.summary()
    recorded = json.loads(layout.activations_manifest.read_text())
    assert recorded["cache_key"] == first.activations["cache_key"] != first.cache_key
    assert recorded["views"]["val"] == ["clean"] and len(recorded["views"]["train"]) == 2

    again = run_features(params, layout)
    assert (again.computed, again.activations_computed) == (0, 0)
    assert again.activations_reused == first.activations_computed

    # a finetune lr, epochs, patience or augment change computes nothing
    for change in ({"lr": 0.01}, {"epochs": 7}, {"patience": 1}, {"augment": True}):
        same = run_features(_params(data, tmp_path / "cache", finetune=change), layout)
        assert (same.computed, same.activations_computed) == (0, 0), change

    # a new cut: only its activations, no pooled feature
    deeper = run_features(_params(data, tmp_path / "cache", finetune={"unfreeze_blocks": 2}), layout)
    assert deeper.computed == 0 and deeper.activations_computed == first.activations_computed
    assert deeper.activations["cache_key"] != first.activations["cache_key"]

    # no fine-tuning (or the full path): no activations, and the manifest says why
    skipped = run_features(_params(data, tmp_path / "cache", finetune={"epochs": 0}), layout)
    assert skipped.activations == {} and skipped.activations_computed == 0
    assert json.loads(layout.activations_manifest.read_text()) == {
        "path": "skipped",
        "reason": "finetune.epochs is 0",
    }

    # new images: only theirs
    more = imagegen.make_class_folders(tmp_path / "more", ["blue"], per_class=2, size=32, seed=9)
    for path in (more / "blue").iterdir():
        path.rename(data / "blue" / f"new_{path.name}")
    from tasks.stages.run_index import run_index

    run_index(params, layout)
    grown = run_features(params, layout)
    assert 0 < grown.activations_computed < first.activations_computed
    assert grown.activations_reused == first.activations_computed


def test_activations_match_the_base_run_to_the_cut_and_read_back_as_a_stream(indexed, tmp_path):
    import keras

    from tasks.data.index_table import read_index
    from tasks.data.pipeline import view_dataset
    from tasks.features.activations import activation_rows, batches
    from tasks.inputs import resolve_inputs
    from tasks.models.bases import load_base
    from tasks.stages.run_features import run_features

    data, root, layout = indexed
    params = _params(data, tmp_path / "cache")
    manifest = run_features(params, layout)
    cache = _activation_cache(manifest)
    inputs = resolve_inputs(params, layout)
    loaded = load_base(params.base, inputs.image_size)
    prefix = keras.Model(loaded.model.input, loaded.model.get_layer(manifest.activations["cut"]).output)
    val = read_index(layout).query("split == 'val'").reset_index(drop=True)
    images = np.concatenate(
        [
            b.numpy()
            for b in view_dataset(val, data, inputs.image, batch_size=8, preprocess=loaded.spec.preprocess)
        ]
    )
    expected = np.asarray(prefix(images, training=False)).reshape(len(val), -1)
    got = cache.read([(sha, "clean") for sha in val["sha256"]])
    np.testing.assert_allclose(got, expected, atol=1e-5)

    # the stream gathers the same rows in any order, one batch at a time, in the cut's shape
    rows = activation_rows(cache, list(val["sha256"]), ["clean"], np.arange(len(val)))
    order = np.random.default_rng(0).permutation(len(val))
    out = list(batches(rows, "clean", order, batch_size=2))
    assert [len(x) for x, _ in out] == [2] * (len(val) // 2) + ([1] if len(val) % 2 else [])
    assert out[0][0].shape[1:] == (1, 1, 256)
    streamed = np.concatenate([x.reshape(len(x), -1) for x, _ in out])
    np.testing.assert_array_equal(streamed, got[order])
    np.testing.assert_array_equal(np.concatenate([y for _, y in out]), order)


def test_cache_list_and_prune_know_the_activation_keys(indexed, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.stages.run_features import run_features

    data, root, layout = indexed
    cache = tmp_path / "cache"
    params = _params(data, cache)
    manifest = run_features(params, layout)
    old_cut = run_features(_params(data, cache, finetune={"unfreeze_blocks": 2}), layout)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(params.model_dump(mode="json")))
    runner = CliRunner()
    args = ["-p", str(params_file), "-w", str(layout.root)]
    listed = runner.invoke(app, ["cache", "list", *args, "--json"])
    assert listed.exit_code == 0, listed.output
    current = {row["key"]: row["current"] for row in json.loads(listed.output)}
    assert current == {
        manifest.cache_key: True,
        manifest.activations["cache_key"]: True,
        old_cut.activations["cache_key"]: False,
    }
    table = runner.invoke(app, ["cache", "list", *args], env={"COLUMNS": "300"})
    assert "cut=conv_pw_12_relu 1x1x256" in table.output
    pruned = runner.invoke(app, ["cache", "prune", *args])
    assert pruned.exit_code == 0, pruned.output
    assert f"removed {old_cut.activations['cache_key']}" in pruned.output
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [manifest.cache_key, manifest.activations["cache_key"]]
    )
