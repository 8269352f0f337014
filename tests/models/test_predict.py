"""Predict on files and folders (corrupt files get an error row), CSV/JSON output, the CLI, SavedModel export."""

from __future__ import annotations

import json

import numpy as np
import pytest

NAMES = ("blue", "red")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny model (MobileNet 0.25, 32 px, random base, linear head) in memory, and saved + classes.json."""
    import keras

    from tasks.config import BaseConfig, HeadSpec
    from tasks.models.bases import load_base
    from tasks.models.full_model import build_full_model, save_bundle
    from tasks.models.heads import build_head

    loaded = load_base(BaseConfig(name="mobilenet", weights="none", alpha=0.25), (32, 32))
    keras.utils.set_random_seed(3)
    head = build_head(HeadSpec(name="lin", type="linear"), 256, "binary", 2)
    model = build_full_model(loaded.model, "mobilenet", head, (32, 32), "avg")
    return model, save_bundle(model, tmp_path_factory.mktemp("model") / "model.keras", NAMES, "binary")


@pytest.fixture(scope="module")
def bundle_path(tiny_model):
    return tiny_model[1]


@pytest.fixture
def folder(tmp_path, imagegen):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(("blue", "red", "blue")):
        imagegen.coloured_image(imagegen.CLASS_COLOURS[name], 40, seed=i).save(root / f"img_{i}.png")
    imagegen.coloured_image(imagegen.CLASS_COLOURS["red"], 48, seed=9).save(root / "sub" / "deep.jpg", "JPEG")
    good = (root / "img_0.png").read_bytes()
    (root / "broken.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(good)  # hidden: skipped
    return root


def test_folder_with_corrupt_files_gives_error_rows_not_a_crash(bundle_path, folder):
    from tasks.models.predict import predict_paths

    preds = predict_paths(bundle_path, [folder], batch_size=2)
    by_name = {p.path.rsplit("/", 1)[-1]: p for p in preds}
    assert sorted(by_name) == ["broken.png", "deep.jpg", "img_0.png", "img_1.png", "img_2.png", "notes.txt"]
    for bad in ("broken.png", "notes.txt"):
        assert by_name[bad].error and by_name[bad].label is None
    for good in ("img_0.png", "img_1.png", "img_2.png", "deep.jpg"):
        p = by_name[good]
        assert p.error is None and p.label in NAMES
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.confidence == pytest.approx(max(p.probabilities.values()))


def test_missing_file_is_an_error_row(bundle_path, tmp_path):
    from tasks.models.predict import predict_paths

    (p,) = predict_paths(bundle_path, [tmp_path / "nope.png"])
    assert "nope.png" in p.path and "FileNotFoundError" in p.error


def test_loaded_model_predicts_like_in_memory_one_and_batching_does_not_matter(folder, tmp_path):
    import keras

    from tasks.models.full_model import BasePreprocess, load_bundle, save_bundle
    from tasks.models.predict import expand_paths, predict_files

    # a model whose output follows the pixels (a random-init base's features are ~1e-17: every image would
    # score the same, and a load that lost the weights would go unnoticed)
    keras.utils.set_random_seed(5)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(BasePreprocess("mobilenet", rescale=0.5)(inputs))
    outputs = keras.layers.Dense(1, activation="sigmoid", kernel_initializer="random_normal")(x)
    in_memory = keras.Model(inputs, outputs)
    in_memory.get_layer(index=-1).set_weights(
        [np.array([[4.0], [-1.0], [-4.0]], "float32"), np.zeros(1, "float32")]
    )
    loaded = load_bundle(save_bundle(in_memory, tmp_path / "m" / "model.keras", NAMES, "binary")).model

    files = expand_paths([folder])
    a = predict_files(in_memory, NAMES, files, batch_size=32)
    b = predict_files(loaded, NAMES, files, batch_size=3)
    scores = {x.path.rsplit("/", 1)[-1]: x.probabilities["red"] for x in a if x.error is None}
    assert len(scores) == 4 and scores["img_1.png"] > 0.8 > 0.3 > scores["img_0.png"]  # red vs blue images
    for x, y in zip(a, b, strict=True):
        assert x.path == y.path and x.label == y.label and x.error == y.error
        for name in x.probabilities:
            assert x.probabilities[name] == pytest.approx(y.probabilities[name], abs=1e-5)


def test_cli_predict_json_and_csv(bundle_path, folder, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    out = tmp_path / "preds.json"
    result = runner.invoke(
        app, ["predict", str(folder), "--model", str(bundle_path), "--format", "json", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert len(rows) == 6 and sum(1 for r in rows if r["error"]) == 2
    result = runner.invoke(app, ["predict", str(folder / "img_1.png"), "--model", str(bundle_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "path,label,confidence,p_blue,p_red,error"
    assert lines[1].split(",")[1] in NAMES
    bad = runner.invoke(app, ["predict", str(folder), "--model", str(bundle_path), "--format", "xml"])
    assert bad.exit_code == 2


def test_export_saved_model_serves_the_same_outputs(bundle_path, tmp_path):
    import tensorflow as tf

    from tasks.models.full_model import load_bundle
    from tasks.models.predict import export_model

    out = export_model(bundle_path, tmp_path / "export")
    exported = json.loads((out / "classes.json").read_text())
    beside_model = json.loads((bundle_path.parent / "classes.json").read_text())
    assert exported["names"] == list(NAMES) and exported["interpolation"] == "bilinear"
    # the bundle's writer: the same record, without the .keras file's hash (there is none in a SavedModel)
    assert exported == {k: v for k, v in beside_model.items() if k != "model_sha256"}
    assert not list(tmp_path.glob(".*tmp*"))  # built beside the target and renamed into place
    served = tf.saved_model.load(str(out))
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype("float32")
    expected = load_bundle(bundle_path).model.predict(x, verbose=0)
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), expected, atol=1e-5)
    with pytest.raises(FileExistsError, match="not empty"):
        export_model(bundle_path, out)


def test_default_model_is_the_champion_when_promoted(tmp_path):
    from flows.cli.model import default_model
    from tasks.layout import Layout

    layout = Layout(tmp_path)
    assert default_model(layout) == layout.candidate_model
    layout.champion_dir.mkdir(parents=True)
    (layout.champion_dir / "model.keras").write_bytes(b"x")
    assert default_model(layout) == layout.champion_dir / "model.keras"


def test_bundle_records_the_training_resize_and_predict_uses_it(bundle_path, folder, tmp_path, monkeypatch):
    import shutil

    from tasks.models import predict
    from tasks.models.full_model import load_bundle

    assert load_bundle(bundle_path).interpolation == "bilinear"
    copy = tmp_path / "nearest"
    shutil.copytree(bundle_path.parent, copy)
    classes = json.loads((copy / "classes.json").read_text())
    assert classes["interpolation"] == "bilinear"
    assert classes["crop_to_aspect_ratio"] is False
    (copy / "classes.json").write_text(
        json.dumps({**classes, "interpolation": "nearest", "crop_to_aspect_ratio": True})
    )
    assert load_bundle(copy / "model.keras").interpolation == "nearest"

    import tasks.data.pipeline  # predict imports view_dataset lazily from here

    seen = []
    original = tasks.data.pipeline.view_dataset

    def recording(*args, **kwargs):
        image = kwargs.get("image", args[2] if len(args) > 2 else None)
        seen.append((image.interpolation, image.crop_to_aspect_ratio))
        return original(*args, **kwargs)

    monkeypatch.setattr(tasks.data.pipeline, "view_dataset", recording)
    preds = predict.predict_paths(copy / "model.keras", [folder / "img_0.png"])
    assert preds[0].error is None and seen == [("nearest", True)]

    (copy / "classes.json").write_text(json.dumps({**classes, "interpolation": "cubic"}))
    with pytest.raises(ValueError, match="interpolation.*'cubic'"):
        load_bundle(copy / "model.keras")


def test_model_option_help_shows_its_default():
    """Rich markup would eat an unescaped "[default: ...]" (it printed "beside it .")."""
    from typer.testing import CliRunner

    from flows.cli import app

    for command in ("predict", "export"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        assert "beside it [default: the promoted champion, else the candidate]." in text, result.output
    assert "[default: models/export/<model folder name>, plus -tflite for tflite]." in text, result.output


def test_predict_uses_the_index_stages_pixel_limit():
    from tasks.config import params_from_dict
    from tasks.models.predict import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS == params_from_dict({}).data.max_pixels


def test_cli_predict_exits_1_when_no_file_could_be_predicted(bundle_path, folder, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    out = tmp_path / "preds.csv"
    args = ["predict", str(folder / "broken.png"), str(folder / "notes.txt"), "--model", str(bundle_path)]
    failed = runner.invoke(app, [*args, "-o", str(out)])
    assert failed.exit_code == 1, failed.output
    reason = [line for line in failed.output.splitlines() if line.startswith("error:")]
    assert (
        len(reason) == 1
        and "none of the 2 files could be predicted" in reason[0]
        and "broken.png" in reason[0]
    )
    assert len(out.read_text().splitlines()) == 3  # the error rows are still written
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = runner.invoke(app, ["predict", str(empty), "--model", str(bundle_path)])
    assert nothing.exit_code == 1 and f"no files found in {empty}" in nothing.output


def test_cli_predict_partial_failures_exit_0_and_say_how_many_failed(bundle_path, folder, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    out = tmp_path / "preds.json"
    result = CliRunner().invoke(
        app, ["predict", str(folder), "--model", str(bundle_path), "-f", "json", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last == f"predicted 4 of 6 files; 2 failed (see the error column); wrote json to {out}"


def test_predict_and_export_in_an_empty_workspace_say_no_model_was_found(tmp_path, folder):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    for args in (["predict", str(folder)], ["export"]):
        result = runner.invoke(app, [*args, "-w", str(tmp_path)], env={"COLUMNS": "300"})
        assert result.exit_code == 1, result.output
        text = " ".join(result.output.split())
        assert (
            f"error: no model found: expected {tmp_path}/models/champion/model.keras or "
            f"{tmp_path}/models/candidate/model.keras; run `retrainflow run` (or `make demo`) first, or pass --model"
        ) in text, result.output
        assert "classes" not in text
    missing = runner.invoke(app, ["predict", str(folder), "--model", str(tmp_path / "nope.keras")])
    assert missing.exit_code == 1 and f"model file not found: {tmp_path / 'nope.keras'}" in missing.output


def test_predict_reports_files_done_after_each_batch(tiny_model, folder):
    from tasks.models.predict import expand_paths, predict_files
    from tasks.progress import Step

    model, _ = tiny_model
    steps: list[Step] = []
    files = expand_paths([folder])  # 6 files, 2 of them fail their check
    preds = predict_files(model, NAMES, files, batch_size=3, progress=steps.append)
    assert sum(p.error is None for p in preds) == 4
    assert [(s.task, s.done, s.total, s.final) for s in steps] == [
        ("predict", 5, 6, False),
        ("predict", 6, 6, True),
    ]


def test_cli_export_ends_with_what_it_wrote(bundle_path, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    target = tmp_path / "served"
    result = CliRunner().invoke(
        app, ["export", "--model", str(bundle_path), "-o", str(target)], env={"COLUMNS": "300"}
    )
    assert result.exit_code == 0, result.output
    assert (
        result.output.strip().splitlines()[-1]
        == f"exported {bundle_path} to {target} (SavedModel + classes.json)"
    )


def test_predict_rejects_the_files_the_index_rejects_for_size_and_pixels(tiny_model, tmp_path, imagegen):
    """One check (tasks.data.images.check_image_file) for both: a file too big for any image within data.max_pixels
    (never read) and a header over data.max_pixels are reject rows in the index and error rows in predict."""
    from tasks.data.images import max_file_bytes
    from tasks.data.indexing import Candidate, check_file
    from tasks.models.predict import predict_files

    limit = 1000
    imagegen.coloured_image(imagegen.CLASS_COLOURS["red"], 30, seed=1).save(
        tmp_path / "small.png"
    )  # 900 pixels: kept
    imagegen.coloured_image(imagegen.CLASS_COLOURS["blue"], 40, seed=2).save(
        tmp_path / "over.png"
    )  # 1600 pixels: over the limit
    with (tmp_path / "huge.jpg").open(
        "wb"
    ) as fh:  # sparse: larger than any image within the limit, never read
        fh.truncate(max_file_bytes(limit) + 1)
    names = ("small.png", "over.png", "huge.jpg")
    index_kinds = {
        name: check_file(Candidate(rel=name, label="red", full=tmp_path / name), limit).kind for name in names
    }
    assert index_kinds == {"small.png": "", "over.png": "too_large", "huge.jpg": "too_large"}
    preds = predict_files(tiny_model[0], NAMES, [tmp_path / n for n in names], max_pixels=limit)
    by_name = {p.path.rsplit("/", 1)[-1]: p for p in preds}
    assert by_name["small.png"].error is None and by_name["small.png"].label in NAMES
    assert "exceeds data.max_pixels=1000" in by_name["over.png"].error and by_name["over.png"].label is None
    assert "not read" in by_name["huge.jpg"].error and by_name["huge.jpg"].label is None


def test_export_tflite_predicts_what_the_keras_model_predicts(bundle_path, tmp_path):
    """`retrainflow export --format tflite`: model.tflite + classes.json, run by LiteRT, equal to Keras."""
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.models.engines import litert_classifier
    from tasks.models.full_model import load_bundle

    out = tmp_path / "lite"
    result = CliRunner().invoke(
        app, ["export", "--model", str(bundle_path), "--format", "tflite", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "model.tflite + classes.json" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "model.tflite"]
    assert json.loads((out / "classes.json").read_text())["names"] == list(NAMES)
    x = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3)).astype("float32")
    expected = load_bundle(bundle_path).model.predict(x, verbose=0)
    np.testing.assert_allclose(litert_classifier(out / "model.tflite")(x), expected, atol=1e-4)
    bad = CliRunner().invoke(app, ["export", "--model", str(bundle_path), "--format", "onnx"])
    assert bad.exit_code == 2 and "expected one of ('savedmodel', 'tflite')" in bad.output
