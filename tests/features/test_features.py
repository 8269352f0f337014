"""The features stage: incremental hit/miss accounting, reading back, kill-and-resume, exactness, real weights."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tasks.config import Params, params_from_dict
from tasks.inputs import ImageSpec
from tasks.layout import Layout

TESTS = Path(__file__).resolve().parent
CLASSES = ("blue", "red")
SPLIT_CYCLE = ("train", "train", "train", "val", "test")  # about 3 train : 1 val : 1 test
TINY = {
    "image": {"size": 32},
    "base": {"name": "mobilenet", "alpha": 0.25, "weights": "none"},
    # float32: a random-init base's pooled features are ~1e-17, which float16 would store as zeros
    "features": {"batch_size": 8, "shard_size": 8, "dtype": "float32", "engine": "keras"},
    "augment": {"passes": 2, "rotation_range": 10, "horizontal_flip": True, "fill_mode": "reflect"},
}


# ------------------------------------------------------------------------------------------------ helpers
def tiny_raw(root: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny params as a plain dict (what ``tiny_params`` validates)."""
    raw: dict[str, Any] = {k: dict(v) for k, v in TINY.items()}
    raw["data"] = {"root": str(root)}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def tiny_params(root: Path, **sections: dict[str, Any]) -> Params:
    return params_from_dict(tiny_raw(root, **sections))


def hand_index(root: Path) -> pd.DataFrame:
    """An index table in the documented columns for every PNG under ``root`` (split chosen by sha256)."""
    rows = []
    for path in sorted(root.rglob("*.png")):
        label = path.parent.name
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        rows.append(
            {
                "path": path.relative_to(root).as_posix(),
                "label": label,
                "class_id": CLASSES.index(label),
                "split": SPLIT_CYCLE[int(sha[:8], 16) % len(SPLIT_CYCLE)],  # a function of the content
                "sha256": sha,
                "width": 40,
                "height": 40,
                "bytes": path.stat().st_size,
                "orientation": 1,
                "format": "PNG",
            }
        )
    return pd.DataFrame(rows).sort_values("path").reset_index(drop=True)


def view_source(rows: Any, root: Path, image: Any, **kwargs: Any) -> Any:
    """The stage's image source, ``tasks.data.pipeline.view_dataset``."""
    from tasks.data.pipeline import view_dataset

    return view_dataset(rows, root, image, **kwargs)


class Recorder:
    """Wraps the image source and records which (view, sha256) the stage asked it for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.rescales: list[tuple[str, Any]] = []  # (view, the rescale= it was asked with)
        self.crops: list[Any] = []  # the crop_to_aspect_ratio= of each call

    def __call__(self, rows: Any, root: Path, image: Any, **kwargs: Any) -> Any:
        from tasks.data.augment import view_id

        view = view_id(kwargs.get("policy"), kwargs.get("pass_number", 0))
        self.calls.append((view, list(rows["sha256"])))
        self.rescales.append((view, image.rescale))
        self.crops.append(image.crop_to_aspect_ratio)
        return view_source(rows, root, image, **kwargs)

    def asked(self) -> set[tuple[str, str]]:
        return {(view, sha) for view, shas in self.calls for sha in shas}


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    import tasks.features.extract

    rec = Recorder()
    monkeypatch.setattr(tasks.features.extract, "_view_dataset", rec)
    return rec


@pytest.fixture
def workspace(tmp_path: Path, imagegen) -> tuple[Path, Layout]:
    root = imagegen.make_class_folders(tmp_path / "images", CLASSES, per_class=10, size=40)
    return root, Layout(tmp_path / "ws")


def counts(index: pd.DataFrame, passes: int) -> dict[str, int]:
    n = index["split"].value_counts().to_dict()
    return {"train": n.get("train", 0), "val": n.get("val", 0), "test": n.get("test", 0), "passes": passes}


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.slow
def test_incremental_accounting(workspace, recorder: Recorder, capsys: pytest.CaptureFixture, imagegen):
    from tasks.stages.run_features import run_features

    root, layout = workspace
    index = hand_index(root)
    c = counts(index, 2)
    params = tiny_params(root)
    total = c["train"] * 3 + c["val"] + c["test"]

    # 1. first run computes every view: clean + 2 augmented per train image, clean for val/test
    first = run_features(params, layout, index=index)
    assert (first.computed, first.reused, first.pairs) == (total, 0, total)
    metrics = json.loads(layout.features_metrics.read_text())  # counts only: `dvc metrics show` stays narrow
    activations = c["train"] * 3 + c["val"]  # fine-tuning's views: train's clean + passes, val's clean
    assert metrics == {
        "pairs": total,
        "computed": total,
        "reused": 0,
        "images_computed": len(index),
        "activations_computed": activations,
        "activations_reused": 0,
    }
    record = json.loads(layout.run_record("features").read_text())  # timings and cache details
    assert record["seconds"] > 0 and record["key_spec"] == first.key_spec and record["shards_written"] > 0
    assert record["cache_dir"] == first.cache_dir and record["images_per_second"] > 0
    stable_bytes = layout.features_manifest.read_bytes()
    stable = json.loads(stable_bytes)
    assert "computed" not in stable and "seconds" not in stable and stable["cache_key"] == first.cache_key
    assert first.summary() == (
        f"features {first.cache_key}: computed {total}, reused 0 ({total} views of 20 images) on keras; "
        f"activations {first.activations['cut']}: computed {activations}, reused 0"
    )
    assert capsys.readouterr().err == ""  # display is the caller's: the stage prints nothing
    assert first.views["train"][0] == "clean" and len(first.views["train"]) == 3
    assert first.views["val"] == ["clean"]

    # 2. a second run computes nothing and asks the input pipeline for nothing
    recorder.calls.clear()
    second = run_features(params, layout, index=index)
    assert (second.computed, second.reused) == (0, total)
    assert recorder.calls == [] and second.content_hash == first.content_hash
    assert layout.features_manifest.read_bytes() == stable_bytes  # DVC sees no change: train_top is not rerun
    assert json.loads(layout.features_metrics.read_text())["computed"] == 0
    assert f"computed 0, reused {total}" in second.summary() and capsys.readouterr().err == ""

    # 3. +10% images (2 of 20): only their views are computed
    new_files = []
    for i, name in enumerate(CLASSES):
        imagegen.coloured_image(imagegen.CLASS_COLOURS[name], 40, seed=9_000 + i).save(
            root / name / f"{name}_new.png"
        )
        new_files.append(f"{name}/{name}_new.png")
    grown = hand_index(root)
    new = grown[grown["path"].isin(new_files)]
    assert len(new) == 2 and set(grown["sha256"]) > set(index["sha256"])
    new_views = sum(3 if s == "train" else 1 for s in new["split"])
    recorder.calls.clear()
    third = run_features(params, layout, index=grown)
    assert (third.computed, third.reused) == (new_views, total)
    assert {sha for _, sha in recorder.asked()} == set(new["sha256"])

    # 4. top / finetune / evaluate params do not touch the features
    other = tiny_params(
        root, top={"lr": 0.5, "epochs": 3}, finetune={"unfreeze_blocks": 5}, evaluate={"batch_size": 4}
    )
    fourth = run_features(other, layout, index=grown)
    assert (fourth.computed, fourth.cache_key) == (0, first.cache_key)

    # 5. another augmentation recomputes exactly the augmented views, never the clean ones
    c = counts(grown, 2)
    all_views = c["train"] * 3 + c["val"] + c["test"]
    recorder.calls.clear()
    aug = tiny_params(root, augment={"rotation_range": 20})
    fifth = run_features(aug, layout, index=grown)
    assert (fifth.computed, fifth.reused) == (c["train"] * 2, all_views - c["train"] * 2)
    assert all(view != "clean" for view, _ in recorder.asked())
    assert fifth.cache_key == first.cache_key

    # 6. another base recomputes everything under a new key
    base = tiny_params(root, augment={"rotation_range": 20}, base={"name": "mobilenet_v2", "alpha": 0.35})
    sixth = run_features(base, layout, index=grown)
    assert (sixth.computed, sixth.reused) == (all_views, 0) and sixth.cache_key != first.cache_key

    # 7. the same index with no augmented passes needs only clean views: all cached
    clean_only = tiny_params(root, augment={"passes": 0})
    seventh = run_features(clean_only, layout, index=grown)
    assert (seventh.computed, seventh.reused) == (0, len(grown))


def test_read_features_shapes_order_and_guard(workspace, recorder: Recorder):
    from tasks.errors import FeaturesMismatchError
    from tasks.features.read import read_features
    from tasks.progress import Step
    from tasks.stages.run_features import run_features

    root, layout = workspace
    index = hand_index(root)
    params = tiny_params(root)
    seen: list[Step] = []
    manifest = run_features(params, layout, index=index, progress=seen.append)
    assert {(s.task, s.total, s.unit) for s in seen} == {("features", manifest.computed, "img")}
    done = [s.done for s in seen]
    assert done == sorted(done) and done[0] == 0 and done[-1] == manifest.computed and len(done) > 2
    assert [s.final for s in seen] == [False] * (len(seen) - 1) + [True]
    n_train = int((index["split"] == "train").sum())
    train = read_features(params, layout, "train", "all", index=index)
    assert train.x.shape == (n_train * 3, 256) and train.x.dtype == np.float32
    assert list(train.view_ids[:n_train]) == ["clean"] * n_train
    assert len(set(train.view_ids)) == 3
    train_rows = index[index["split"] == "train"]
    np.testing.assert_array_equal(train.class_ids, np.tile(train_rows["class_id"].to_numpy(), 3))
    assert list(train.sha256[:n_train]) == list(train_rows["sha256"])
    clean = read_features(params, layout, "train", "clean", index=index)
    np.testing.assert_array_equal(clean.x, train.x[:n_train])
    assert np.abs(train.x).max() > 0
    assert not np.array_equal(train.x[:n_train], train.x[n_train : 2 * n_train])  # augmented views differ
    val = read_features(params, layout, "val", "all", index=index)  # val has only the clean view
    assert set(val.view_ids) == {"clean"} and len(val) == int((index["split"] == "val").sum())

    with pytest.raises(ValueError, match="run `retrainflow features`"):
        read_features(tiny_params(root, features={"pooling": "max"}), layout, "val", index=index)
    with pytest.raises(
        FeaturesMismatchError, match=r"augment\.rotation_range=10\.0 but the params say 30\.0"
    ):
        read_features(tiny_params(root, augment={"rotation_range": 30}), layout, "train", index=index)
    with pytest.raises(ValueError, match="split.*'holdout'"):
        read_features(params, layout, "holdout", index=index)


def test_clean_view_features_equal_the_model_output(workspace, recorder: Recorder):
    from tasks.features.read import read_features
    from tasks.models.bases import load_base
    from tasks.stages.run_features import run_features

    root, layout = workspace
    index = hand_index(root)
    params = tiny_params(root, features={"pooling": "max"})
    run_features(params, layout, index=index)
    got = read_features(params, layout, "test", "clean", index=index)

    rows = index[index["split"] == "test"].reset_index(drop=True)
    pixels = np.concatenate(
        list(view_source(rows, root, ImageSpec((32, 32)), batch_size=4).as_numpy_iterator())
    )
    loaded = load_base(params.base, (32, 32))
    expected = np.asarray(loaded.model(loaded.spec.preprocess(pixels), training=False)).max(axis=(1, 2))
    scale = np.abs(expected).max()
    assert scale > 0
    # Batched vs one-shot inference differ by float rounding: compare relative to the features' own scale
    # (a random-init base gives values near 1e-17, where a fixed rtol on each element is noise).
    np.testing.assert_allclose(got.x, expected, rtol=1e-4, atol=1e-4 * scale)


def test_crop_to_aspect_ratio_reaches_every_view_and_is_part_of_the_key(workspace, recorder: Recorder):
    from tasks.stages.run_features import run_features

    root, layout = workspace
    index = hand_index(root)
    stretched = tiny_params(root, image={"size": [32, 32], "crop_to_aspect_ratio": False})
    cropped = tiny_params(root, image={"size": [32, 32], "crop_to_aspect_ratio": True})
    first = run_features(stretched, layout, index=index)
    assert set(recorder.crops) == {False} and "/crop" not in first.key_spec["preprocessing"]
    recorder.crops.clear()
    second = run_features(cropped, layout, index=index)
    assert second.cache_key != first.cache_key and second.key_spec["preprocessing"].endswith("/crop")
    assert (second.computed, second.reused) == (first.pairs, 0) and set(recorder.crops) == {True}


def test_rescale_scales_every_view_before_the_base_and_is_part_of_the_key(workspace, recorder: Recorder):
    from tasks.features.read import read_features
    from tasks.models.bases import load_base
    from tasks.stages.run_features import run_features

    root, layout = workspace
    index = hand_index(root)
    plain = tiny_params(root, features={"pooling": "max"})
    halved = tiny_params(root, features={"pooling": "max"}, augment={"rescale": 0.5})
    first = run_features(plain, layout, index=index)
    recorder.calls.clear()
    recorder.rescales.clear()
    second = run_features(halved, layout, index=index)
    # a new key: nothing is reused across rescale values, the clean view included
    assert second.cache_key != first.cache_key and "rescale=0.5" in second.key_spec["preprocessing"]
    assert (second.computed, second.reused) == (first.pairs, 0)
    assert {v for v, _ in recorder.rescales} >= {"clean", *second.views["train"][1:]}
    assert {r for _, r in recorder.rescales} == {0.5}  # every view, clean and augmented, is scaled

    rows = index[index["split"] == "test"].reset_index(drop=True)
    pixels = np.concatenate(
        list(view_source(rows, root, ImageSpec((32, 32)), batch_size=4).as_numpy_iterator())
    )
    loaded = load_base(halved.base, (32, 32))

    def base_features(x: np.ndarray) -> np.ndarray:
        return np.asarray(loaded.model(loaded.spec.preprocess(x), training=False)).max(axis=(1, 2))

    expected = base_features(0.5 * pixels)
    scale = np.abs(expected).max()
    got = read_features(halved, layout, "test", "clean", index=index).x
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)
    assert run_features(plain, layout, index=index).computed == 0  # its own key, still cached
    unscaled = read_features(plain, layout, "test", "clean", index=index).x
    np.testing.assert_allclose(unscaled, base_features(pixels), rtol=1e-4, atol=1e-4 * scale)
    assert np.abs(got - unscaled).max() > 0.01 * scale  # the factor really changed the features


# The child's whole program (it imports only the project): the params and the index table come from a JSON file.
KILL_SCRIPT = """
import json, sys, time
from pathlib import Path
import pandas as pd
from tasks.config import params_from_dict
from tasks.layout import Layout
from tasks.stages.run_features import run_features
inputs, ws, delay = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2], float(sys.argv[3])
run_features(params_from_dict(inputs["params"]), Layout(Path(ws)), index=pd.DataFrame(inputs["index"]),
             progress=lambda step: time.sleep(delay))
"""


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_one(workspace, tmp_path: Path):
    from tasks.features.read import read_features
    from tasks.inputs import cache_root
    from tasks.stages.run_features import run_features

    root, layout = workspace
    index = hand_index(root)
    raw = tiny_raw(root, features={"batch_size": 4, "shard_size": 4})
    params = params_from_dict(raw)
    inputs = tmp_path / "kill_inputs.json"
    inputs.write_text(json.dumps({"params": raw, "index": index.to_dict("records")}))
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(inputs), str(layout.root), "0.3"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=TESTS.parent,
    )
    manifest = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(cache_root(params, layout).glob("*/manifest.json"))
            if found and len(json.loads(found[0].read_text())["shards"]) >= 2:
                manifest = found[0]
                break
            time.sleep(0.02)
        assert manifest is not None, (
            f"no shard committed before the child ended: {proc.stderr.read()[-2000:]!r}"
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert not layout.features_manifest.exists()  # the kill landed mid-extraction
    committed = sum(s["rows"] for s in json.loads(manifest.read_text())["shards"])

    resumed = run_features(params, layout, index=index)
    assert resumed.reused >= committed > 0 and resumed.computed == resumed.pairs - resumed.reused

    clean_ws = Layout(tmp_path / "uninterrupted")
    run_features(params, clean_ws, index=index)
    for split in ("train", "val", "test"):
        a = read_features(params, layout, split, index=index)
        b = read_features(params, clean_ws, split, index=index)
        np.testing.assert_array_equal(a.view_ids, b.view_ids)
        assert np.abs(a.x).max() > 0
        # recomputed views come in other batches than the uninterrupted run's: equal to float32 rounding
        # (a random-init base's features are about 1e-17, so the tolerance is relative to the largest)
        np.testing.assert_allclose(a.x, b.x, rtol=1e-5, atol=1e-6 * np.abs(b.x).max())


@pytest.mark.slow
@pytest.mark.shared
def test_real_mobilenet_weights_by_path(workspace, recorder: Recorder, shared_path):
    from tasks.features.read import read_features
    from tasks.stages.run_features import run_features

    root, layout = workspace
    index = hand_index(root)
    weights = shared_path("weights", "mobilenet_2_5_224_tf_no_top.h5")
    params = tiny_params(root, base={"weights": str(weights)}, augment={"passes": 1})
    first = run_features(params, layout, index=index)
    assert first.key_spec["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert first.computed == first.pairs and first.reused == 0
    again = run_features(params, layout, index=index)
    assert (again.computed, again.reused) == (0, first.pairs)
    random = run_features(tiny_params(root, augment={"passes": 1}), layout, index=index)
    assert random.cache_key != first.cache_key and random.computed == random.pairs

    # pretrained features separate the two colour classes with a nearest-centroid rule on clean views
    tr = read_features(params, layout, "train", "clean", index=index)
    te = read_features(params, layout, "test", index=index)
    centroids = np.stack([tr.x[tr.class_ids == k].mean(axis=0) for k in (0, 1)])
    predicted = np.argmin(((te.x[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == te.class_ids).mean() >= 0.75


@pytest.mark.slow
def test_cli_features_then_cache_list_and_prune(tmp_path: Path, imagegen):
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app

    root = imagegen.make_class_folders(tmp_path / "images", CLASSES, per_class=8, size=40)
    raw: dict[str, Any] = {k: dict(v) for k, v in TINY.items()}
    raw["data"] = {"root": str(root), "min_per_split": 0}
    raw["finetune"] = {
        "epochs": 0
    }  # pooled features only (tests/features/test_activations.py: the cut's keys)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    common = ["--params", str(params_file), "--workdir", str(tmp_path / "ws")]
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, [*args, *common])
        assert result.exit_code == 0, result.output
        return result.stdout

    run("index")
    first = run("features", "--no-progress").strip()
    assert first.startswith("features ") and "\n" not in first  # one summary line of what it wrote
    key = first.split()[1].rstrip(":")
    computed = int(first.split("computed ")[1].split(",")[0])
    assert computed > 16 and f"computed {computed}, reused 0 ({computed} views of 16 images)" in first
    ws = (tmp_path / "ws").as_posix()
    assert "activations" not in first.split("; wrote ")[0]  # finetune.epochs 0: no cut-point activations
    assert first.split("; wrote ")[1].split(", ") == [
        f"{ws}/cache/features/{key}",
        f"{ws}/features/features.json",
        f"{ws}/features/activations.json",
        f"{ws}/metrics/features.json",
        f"{ws}/reports/runs/features.json",
    ]
    assert f"computed 0, reused {computed} " in run("features", "--no-progress")
    other = run("features", "--no-progress", "--set", "features.pooling=max", "--json")
    assert json.loads(other)["computed"] == computed

    listing = run("cache", "list")
    current = [line for line in listing.splitlines() if line.startswith("* ")]
    assert len(current) == 1 and f"{computed} rows" in current[0] and "2 keys" in listing
    assert listing.splitlines()[-1].startswith("2 keys, ") and f" in {ws}/cache/features;" in listing
    current_key = current[0].split()[1]
    keys = {entry["key"] for entry in json.loads(run("cache", "list", "--json"))}
    assert len(keys) == 2 and current_key in keys
    (stale,) = keys - {current_key}

    dry = run("cache", "prune", "--dry-run")
    assert f"would remove {stale}" in dry and (tmp_path / "ws" / "cache" / "features" / stale).is_dir()
    pruned = run("cache", "prune").splitlines()
    assert f"removed {stale}" in pruned[0]
    assert pruned[-1].startswith("removed 1 keys, ") and pruned[-1].endswith(
        f"{ws}/cache/features; kept {key}"
    )
    assert not (tmp_path / "ws" / "cache" / "features" / stale).exists()
    assert {e["key"] for e in json.loads(run("cache", "list", "--json"))} == {current_key}
    assert f"computed 0, reused {computed} " in run("features", "--no-progress")


def test_float16_underflow_of_a_random_base_is_reported(workspace, recorder, capsys: pytest.CaptureFixture):
    from tasks.features.read import read_features
    from tasks.stages.run_features import run_features

    root, layout = workspace
    index = hand_index(root).iloc[:6].reset_index(drop=True)
    params = tiny_params(root, features={"dtype": "float16", "cache_dir": "elsewhere"}, augment={"passes": 0})
    manifest = run_features(params, layout, index=index)
    assert manifest.computed == 6 and manifest.key_spec["dtype"] == "float16"
    assert (
        layout.root / "elsewhere" / manifest.cache_key / "manifest.json"
    ).is_file()  # relative to workspace
    # the layout's cache folder (a DVC out) holds only the file naming where the cache is
    assert [p.name for p in layout.features_cache.iterdir()] == [layout.features_cache_pointer.name]
    assert str(layout.root / "elsewhere") in layout.features_cache_pointer.read_text()
    (warning,) = manifest.warnings  # for the caller to show; the stage prints nothing
    assert "underflow float16" in warning and capsys.readouterr().err == ""
    assert json.loads(layout.run_record("features").read_text())["warnings"] == [warning]
    split = index["split"].iloc[0]
    assert read_features(params, layout, split, index=index).x.dtype == np.float32


def test_augment_grid_gives_every_sampled_policy_its_passes():
    from tasks.config import params_from_dict
    from tasks.features.read import split_views

    params = params_from_dict(
        {
            "augment": {
                "passes": 2,
                "grid": {"rotation_range": [0, 10, 20], "fill_mode": ["nearest", "wrap"]},
                "grid_samples": 3,
            }
        }
    )
    views = split_views(params, "train")
    assert views[0][0] == "clean"
    augmented = views[1:]
    assert len(augmented) == 3 * 2
    assert len({v for v, _, _ in augmented}) == 6  # distinct view ids: policy hash + pass
    assert len({p.short_hash for _, p, _ in augmented}) == 3
    assert [v for v, _, _ in split_views(params, "val")] == ["clean"]
    assert split_views(params, "train") == views  # reproducible sampling


WORKSPACE_LOCK_HOLDER = """
import sys, time
from pathlib import Path
from tasks.layout import Layout
from tasks.io.locking import workspace_lock
with workspace_lock(Layout(Path(sys.argv[1])), command="retrainflow run (test holder)"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_cache_prune_takes_the_workspace_lock_and_skips_a_key_in_use(tmp_path: Path):
    from dataclasses import replace

    import yaml
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.features.cache import FeatureCache, KeySpec, list_keys
    from tasks.inputs import cache_root

    raw: dict[str, Any] = {k: dict(v) for k, v in TINY.items()}
    raw["data"] = {"root": str(tmp_path / "images")}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    layout = Layout(tmp_path / "ws")
    root = cache_root(tiny_params(tmp_path / "images"), layout)
    stale = KeySpec("mobilenet", 0.25, "ab" * 32, (32, 32), "tf/bilinear", "avg", "float32", 256)
    busy, idle = stale, replace(stale, pooling="max")
    for spec in (busy, idle):
        FeatureCache.open(root, spec).write_shard(["0" * 64], ["clean"], ["a"], np.ones((1, 256)))
    runner = CliRunner()
    args = ["cache", "prune", "--params", str(params_file), "--workdir", str(layout.root)]

    # another workspace's features run is writing `busy` (a shared cache): it is skipped and reported
    with FeatureCache.open(root, busy).in_use():
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"removed {idle.key}" in result.stdout
    assert f"skipped {busy.key}: in use" in result.stdout and "skipped 1 in use" in result.stdout
    assert [k.key for k in list_keys(root)] == [busy.key]

    # a run holding the workspace lock: prune refuses (exit 3, the holder named) and removes nothing
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKSPACE_LOCK_HOLDER, str(layout.root)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=TESTS.parent,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        result = runner.invoke(app, args)
        assert result.exit_code == 3, result.output
        assert "test holder" in result.output
        assert [k.key for k in list_keys(root)] == [busy.key]
        dry = runner.invoke(app, [*args, "--dry-run"])  # only reads: allowed while the lock is held
        assert dry.exit_code == 0 and f"would remove {busy.key}" in dry.stdout, dry.output
    finally:
        proc.kill()
        proc.wait()
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and f"removed {busy.key}" in result.stdout, result.output
    assert list_keys(root) == []


def test_cache_keys_are_those_of_earlier_releases():
    """Existing caches stay valid: the key of a given spec never changes (a rerun computes nothing)."""
    from tasks.features.read import key_spec_for
    from tasks.inputs import resolve_inputs

    def key_spec(params):
        return key_spec_for(resolve_inputs(params, Layout()), params.features, "ab" * 32)

    params = tiny_params(Path("/data"))
    assert (key_spec(params).key, resolve_inputs(params, Layout()).preprocessing_id) == (
        "mobilenet-a5da02ef4046ce66",
        "tf/bilinear/crop",
    )
    scaled = tiny_params(Path("/data"), augment={"rescale": 0.5}, image={"crop_to_aspect_ratio": False})
    assert key_spec(scaled).key == "mobilenet-20337f93d344e692"


def test_features_of_other_params_name_each_param_that_differs(workspace, recorder: Recorder):
    """train_top with other params than the features stage had: one line naming the params, a ValueError (the
    CLI's one-line error), instead of a KeyError about (sha256, view) pairs."""
    from tasks.errors import FeaturesMismatchError
    from tasks.features.read import RERUN, read_features
    from tasks.stages.run_features import run_features

    root, layout = workspace
    index = hand_index(root)
    run_features(tiny_params(root), layout, index=index)

    def refused(split: str = "train", **sections: dict[str, Any]) -> str:
        with pytest.raises(FeaturesMismatchError) as err:
            read_features(tiny_params(root, **sections), layout, split, index=index, stage="train_top")
        assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
        return str(err.value)

    assert refused(augment={"passes": 3}) == (
        f"train_top: the features were computed with augment.passes=2 but the params say 3; {RERUN}"
    )
    assert "image.size=[32, 32] but the params say [48, 48]" in refused(image={"size": 48})
    assert "augment.rescale=null but the params say 0.5" in refused("val", augment={"rescale": 0.5})
    assert "image.interpolation=bilinear but the params say nearest" in refused(
        image={"interpolation": "nearest"}
    )
    assert refused("val", features={"pooling": "max", "dtype": "float16"}).startswith(
        "train_top: the features were computed with features.pooling=avg, features.dtype=float32 but the params "
        "say features.pooling=max, features.dtype=float16;"
    )
    assert "augment.seed=0 but the params say 5" in refused(augment={"seed": 5})
    # fewer passes than computed: every view it needs is cached
    assert len(read_features(tiny_params(root, augment={"passes": 1}), layout, "train", index=index)) > 0

    grown = pd.concat([index, index.iloc[[0]].assign(sha256="f" * 64, path="red/extra.png")])
    split = index["split"].iloc[0]
    with pytest.raises(
        FeaturesMismatchError,
        match=f"{3 if split == 'train' else 1} of .* {split} .* not in feature cache .* index changed",
    ):
        read_features(tiny_params(root), layout, split, index=grown.reset_index(drop=True), stage="train_top")
