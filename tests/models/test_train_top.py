"""Training heads on (synthetic) features: learning, early stopping, selection, reproducibility, outputs."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import HeadSpec, TopConfig
from tasks.errors import InputError
from tasks.models.top_training import (
    HeadResult,
    comparison_markdown,
    select_best,
    train_heads,
    write_history_csv,
)


def separable(n: int, dim: int = 12, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around well-separated class centres."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 3, (classes, dim))
    ids = rng.integers(0, classes, n)
    return (centres[ids] + rng.normal(0, 1, (n, dim))).astype("float32"), ids


def one_hot(ids: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes, dtype="float32")[ids]


HEADS3 = (
    HeadSpec(name="linear", type="linear"),
    HeadSpec(name="dense", type="dense", units=(16,), dropout=0.3),
    HeadSpec(name="dense_bn", type="dense", units=(8,), dropout=0.2, batchnorm=True),
)


@pytest.fixture(scope="module")
def data():
    x, ids = separable(240)
    vx, vids = separable(60, seed=1)
    return (x, one_hot(ids, 3)), (vx, one_hot(vids, 3))


def test_heads_learn_separable_features_and_best_is_kept(data):
    train, val = data
    cfg = TopConfig(heads=HEADS3, epochs=15, batch_size=32, lr=0.01, patience=3)
    model, best, results = train_heads(train, val, "categorical", 3, cfg, seed=1)
    assert [r.name for r in results] == ["linear", "dense", "dense_bn"]
    assert all(r.val_accuracy >= 0.9 for r in results), [(r.name, r.val_accuracy) for r in results]
    assert best.val_loss == min(r.val_loss for r in results)
    # the returned model carries the restored (best epoch) weights
    import keras

    model.compile(loss="categorical_crossentropy", metrics=["accuracy"])
    loss, _ = model.evaluate(*val, verbose=0)
    assert loss == pytest.approx(best.val_loss, rel=1e-4)
    for r in results:
        assert 1 <= r.best_epoch <= r.epochs <= 15
        assert len(r.history["val_loss"]) == r.epochs
    keras.backend.clear_session()


def test_early_stopping_stops_before_max_epochs():
    x, ids = separable(120, seed=3)
    vx, vids = separable(40, seed=4)
    cfg = TopConfig(heads=(HeadSpec(name="big", type="dense", units=(64,)),), epochs=300, lr=0.05, patience=2)
    _, best, _ = train_heads((x, one_hot(ids, 3)), (vx, one_hot(vids, 3)), "categorical", 3, cfg, seed=0)
    assert best.epochs < 300
    assert best.epochs - best.best_epoch <= 2


def test_training_is_reproducible_with_the_seed():
    x, ids = separable(100, classes=2, seed=5)
    vx, vids = separable(30, classes=2, seed=6)
    y, vy = ids.astype("float32")[:, None], vids.astype("float32")[:, None]
    cfg = TopConfig(heads=(HEADS3[1],), epochs=4, batch_size=16)
    runs = [train_heads((x, y), (vx, vy), "binary", 2, cfg, seed=7)[1] for _ in range(2)]
    assert runs[0].history == runs[1].history
    other = train_heads((x, y), (vx, vy), "binary", 2, cfg, seed=8)[1]
    assert other.history != runs[0].history


def _result(name, loss, acc):
    hist = {"loss": [1.0], "accuracy": [0.5], "val_loss": [loss], "val_accuracy": [acc]}
    return HeadResult(name, "dense", loss, acc, 1.0, 0.5, 1, 1, 0.1, 10, hist)


def test_select_best_by_metric():
    results = [_result("a", 0.30, 0.90), _result("b", 0.20, 0.88), _result("c", 0.25, 0.90)]
    assert select_best(results, "val_loss").name == "b"
    assert select_best(results, "val_accuracy").name == "c"  # tie on accuracy: lower loss wins
    with pytest.raises(ValueError, match="'f1'"):
        select_best(results, "f1")


def test_report_and_history_csv(tmp_path):
    results = [_result("a", 0.3, 0.9), _result("b", 0.2, 0.8)]
    md = comparison_markdown(results, results[1], TopConfig())
    assert "| b (best) |" in md and "| a |" in md
    write_history_csv(tmp_path / "h.csv", results)
    lines = (tmp_path / "h.csv").read_text().splitlines()
    assert lines[0] == "head,epoch,loss,accuracy,val_loss,val_accuracy"
    assert lines[1].startswith("a,1,1,0.5,0.3,0.9")


def test_head_and_its_json_stay_paired_when_a_save_is_killed_between_them(tmp_path, monkeypatch):
    import json

    import tasks.models.heads
    from tasks.layout import Layout
    from tasks.models.heads import build_head, load_head, read_head_info, save_head, sha256_file

    layout = Layout(tmp_path)
    spec = HEADS3[0]
    x = np.ones((2, 12), "float32")
    first = build_head(spec, 12, "categorical", 3)
    save_head(first, spec, layout, {"feature_dim": 12, "classes": ["a", "b", "c"]})
    info = read_head_info(layout)
    assert info["model_sha256"] == sha256_file(layout.top_head_model) and info["feature_dim"] == 12
    np.testing.assert_allclose(np.asarray(load_head(layout)(x)), np.asarray(first(x)), atol=1e-6)
    assert sorted(p.name for p in layout.top_dir.iterdir()) == [
        layout.top_head_info.name,
        layout.top_head_model.name,
    ]

    def killed(tmp, target):
        raise KeyboardInterrupt  # stands in for SIGKILL just before the model is renamed into place

    monkeypatch.setattr(tasks.models.heads, "publish_model", killed)
    with pytest.raises(KeyboardInterrupt):
        save_head(build_head(spec, 16, "binary", 2), spec, layout, {"feature_dim": 16})
    monkeypatch.undo()
    assert read_head_info(layout)["feature_dim"] == 16  # the new json beside the old head ...
    with pytest.raises(InputError, match="interrupted.*retrainflow train-top"):
        load_head(layout)  # ... is refused, never loaded as a pair

    # a head.json from before the hash was recorded is still accepted
    save_head(first, spec, layout, {"feature_dim": 12})
    legacy = {k: v for k, v in read_head_info(layout).items() if k != "model_sha256"}
    layout.top_head_info.write_text(json.dumps(legacy))
    load_head(layout)


# ------------------------------------------------------------------------------------ the stage on features
@pytest.fixture
def featured(tmp_path, imagegen):
    """A workspace whose index and features ran (tiny random base, 2 augmented passes), and its params file."""
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app

    root = imagegen.make_class_folders(tmp_path / "images", ["blue", "red"], per_class=8, size=40)
    raw = {
        "data": {"root": str(root), "min_per_split": 0},
        "image": {"size": 32},
        "base": {"name": "mobilenet", "alpha": 0.25, "weights": "none"},
        "features": {"batch_size": 8, "dtype": "float32", "engine": "keras"},
        "augment": {"passes": 2, "rotation_range": 10},
        "top": {
            "epochs": 3,
            "patience": 5,
            "heads": [{"name": "linear", "type": "linear"}, {"name": "small", "type": "dense", "units": [8]}],
        },
    }
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    common = ["--params", str(params_file), "--workdir", str(tmp_path / "ws")]
    for command in ("index", "features"):
        result = CliRunner().invoke(
            app, [command, *common, *(["--no-progress"] if command == "features" else [])]
        )
        assert result.exit_code == 0, result.output
    return tmp_path / "ws", params_file, common


def test_run_train_top_reports_epochs_per_head_and_keeps_timings_out_of_metrics(featured):
    import csv
    import json

    from tasks.config import load_params
    from tasks.layout import Layout
    from tasks.progress import Step
    from tasks.stages.run_train_top import run_train_top

    ws, params_file, _ = featured
    layout = Layout(ws)
    stale = layout.top_heads_plots / "gone.csv"  # a head of an earlier run
    stale.parent.mkdir(parents=True)
    stale.write_text("epoch\n")
    seen: list[Step] = []
    manifest = run_train_top(load_params(params_file), layout, progress=seen.append)

    for head in ("linear", "small"):
        steps = [s for s in seen if s.task == f"train_top {head}"]
        assert [s.done for s in steps] == [0, 1, 2, 3] and {(s.total, s.unit) for s in steps} == {
            (3, "epoch")
        }
        assert steps[-1].final and "val_loss" in steps[1].info
    metrics = json.loads((layout.metrics_dir / "top.json").read_text())
    assert set(metrics["heads"]) == {"linear", "small"}  # narrow: `dvc exp show` gets 2 columns a head
    assert metrics["heads"]["small"] == {k: manifest.heads[1][k] for k in ("val_loss", "val_accuracy")}
    assert "seconds" not in json.dumps(metrics) and "head_file" not in metrics
    record = json.loads(layout.run_record("train_top").read_text())
    assert record["seconds"] > 0 and set(record["heads"]) == {"linear", "small"}
    assert record["heads"]["small"]["seconds"] > 0 and record["heads"]["small"]["epochs"] == 3
    assert record["features_cache_key"] == json.loads(layout.features_manifest.read_text())["cache_key"]
    assert record["head_file"] == manifest.head_file

    # one CSV per head, the same rows as the one table (dvc plots colours series by file)
    per_head = sorted(p.name for p in (layout.top_heads_plots).iterdir())
    assert per_head == ["linear.csv", "small.csv"]  # the stale one is gone
    with (layout.plots_dir / "top_history.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    with (layout.top_heads_plots / "small.csv").open(newline="") as fh:
        small = list(csv.DictReader(fh))
    assert small == [{k: v for k, v in r.items() if k != "head"} for r in table if r["head"] == "small"]
    assert len(small) == 3


def test_train_top_with_other_params_than_the_features_is_one_clear_line(featured):
    from typer.testing import CliRunner

    from flows.cli import app

    ws, _, common = featured
    result = CliRunner().invoke(app, ["train-top", *common, "--set", "augment.passes=3"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines == [
        "error: train_top: the features were computed with augment.passes=2 but the params say 3; run "
        "`retrainflow features` with the same params first"
    ]
    assert not (ws / "models" / "top").exists()


def test_head_names_that_cannot_name_a_file_are_refused_before_training(tmp_path):
    from tasks.config import params_from_dict
    from tasks.layout import Layout
    from tasks.stages.run_train_top import run_train_top

    params = params_from_dict({"top": {"heads": [{"name": "a/b", "type": "linear"}]}})
    with pytest.raises(ValueError, match=r"top\.heads: .*got \['a/b'\]"):
        run_train_top(params, Layout(tmp_path))
