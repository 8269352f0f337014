"""SIGKILL at seeded random kill points during features, train_top and finetune (see ``killpoints.py``).

A reference workspace runs every stage once, uninterrupted, counting its write events. For each stage, a few
seeded event numbers are drawn; a child process runs the stage in a copy of the workspace and kills itself at that
event. Then: nothing half-written is readable (every manifest-listed shard loads; any model file present loads),
the next run of the stage finishes, its features are bit-identical to the reference's and its models within
tolerance, and no temp file is left behind.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.config import load_params
from tasks.layout import Layout

SEED = 20261122
KILLS = {"features": 3, "train_top": 2, "finetune": 2}
KILLPOINTS_SCRIPT = Path(__file__).with_name("killpoints.py")
# what a stage needs from the reference workspace before it runs
INPUTS = {
    "features": ("index",),
    "train_top": ("index", "cache/features", "features"),
    "finetune": ("index", "cache/features", "features", "models/top"),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, imagegen, write_params, tiny_dict, killpoints):
    """Images, params and a reference workspace run uninterrupted, with each stage's write events counted."""
    from tasks.stages.run_index import run_index

    base = tmp_path_factory.mktemp("kills")
    root = imagegen.make_class_folders(base / "images", ["red", "blue"], per_class=10, size=32)
    params_file = write_params(base, tiny_dict(root, finetune={"epochs": 2}, top={"epochs": 3}))
    params = load_params(params_file)
    layout = Layout(base / "reference")
    run_index(params, layout)
    events = {
        stage: killpoints.run_counted(stage, params, layout)
        for stage in ("features", "train_top", "finetune")
    }
    return params_file, params, layout, events


def kill_points(stage: str, events: list[str]) -> list[int]:
    """Seeded, distinct event numbers (1-based) at which the stage's child is killed; for features also the last
    ``np.save``, which writes the cut-point activations' last shard (their writer is closed after the pooled one)."""
    rng = random.Random(f"{SEED}:{stage}")
    points = set(rng.sample(range(1, len(events) + 1), min(KILLS[stage], len(events))))
    if stage == "features":
        points.add(max(i for i, name in enumerate(events, 1) if name == "np.save"))
    return sorted(points)


def cached_activations(params, layout) -> np.ndarray:
    """Every cut-point activation the finetune stage reads, as the features stage's activations manifest keys them."""
    import json

    from tasks.data.index_table import read_index
    from tasks.features.activations import pairs_needed
    from tasks.features.cache import FeatureCache, KeySpec
    from tasks.inputs import cache_root

    spec = json.loads(layout.activations_manifest.read_text())["key_spec"]
    key = KeySpec(**{**spec, "image_size": tuple(spec["image_size"]), "shape": tuple(spec["shape"])})
    cache = FeatureCache.open(cache_root(params, layout), key, create=False)
    return cache.read(pairs_needed(params, read_index(layout)))


def activation_rows(params, layout) -> int:
    """Rows committed to the activations' key folder (the manifest there is the only list readers trust)."""
    import json

    from tasks.inputs import cache_root

    folders = [p for p in cache_root(params, layout).iterdir() if (p / "key.json").is_file()]
    folder = next(f for f in folders if json.loads((f / "key.json").read_text()).get("cut"))
    manifest = folder / "manifest.json"
    return sum(s["rows"] for s in json.loads(manifest.read_text())["shards"]) if manifest.is_file() else 0


def killed_workspaces(
    stage: str, reference, base: Path, killpoints, quiet_env
) -> list[tuple[Layout, int, str]]:
    """Copies of the reference inputs, each with the stage killed (in a child) at one kill point."""
    params_file, _, ref, events = reference
    points = kill_points(stage, events[stage])
    procs = []
    for n in points:
        work = base / f"{stage}-{n}"
        for rel in INPUTS[stage]:
            shutil.copytree(ref.root / rel, work / rel)
        cmd = [sys.executable, str(KILLPOINTS_SCRIPT), stage, str(work), str(params_file), str(n)]
        procs.append(
            (work, n, subprocess.Popen(cmd, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        )
    out = []
    killed = []
    for work, n, proc in procs:
        _, stderr = proc.communicate(timeout=300)
        event = events[stage][n - 1]
        assert proc.returncode == -9, (
            f"{stage} child for kill point {n} ({event}) was not killed (exit {proc.returncode}):\n"
            f"{stderr.decode()[-3000:]}"
        )
        # killed at the intended point: the child's n-th write event is the reference's n-th
        assert killpoints.killed_line(n, event) in stderr.decode(), stderr.decode()[-3000:]
        killed.append(n)
        out.append((Layout(work), n, event))
    assert killed == points and len(killed) >= min(KILLS[stage], len(events[stage])), (stage, killed)
    return out


def val_features(params, layout):
    from tasks.features.read import read_features

    return read_features(params, layout, "val", views="clean").x


@pytest.mark.slow
def test_kill_during_features(
    reference, tmp_path, killpoints, quiet_env, check_cache_consistent, leftover_temp_files
) -> None:
    from tasks.features.read import read_features
    from tasks.inputs import cache_root
    from tasks.stages.run_features import run_features

    _, params, ref, events = reference
    last_activation_write = max(i for i, name in enumerate(events["features"], 1) if name == "np.save")
    expected_activations = cached_activations(params, ref)
    for layout, n, event in killed_workspaces("features", reference, tmp_path, killpoints, quiet_env):
        where = f"kill point {n} ({event})"
        check_cache_consistent(
            cache_root(params, layout), orphans_allowed=True
        )  # nothing half-written listed
        if n == last_activation_write:  # killed while writing the activations' last shard
            assert activation_rows(params, layout) < activation_rows(params, ref), where
        run_features(params, layout)
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(
                read_features(params, layout, split).x, read_features(params, ref, split).x, err_msg=where
            )
        np.testing.assert_array_equal(cached_activations(params, layout), expected_activations, err_msg=where)
        check_cache_consistent(cache_root(params, layout))  # the rerun removed the killed writer's orphans
        assert leftover_temp_files(layout.root) == [], where


@pytest.mark.slow
def test_kill_during_train_top(reference, tmp_path, killpoints, quiet_env, leftover_temp_files) -> None:
    from tasks.models.heads import load_head
    from tasks.stages.run_train_top import run_train_top

    _, params, ref, _ = reference
    x_val = val_features(params, ref)
    expected = np.asarray(load_head(ref)(x_val))
    for layout, n, event in killed_workspaces("train_top", reference, tmp_path, killpoints, quiet_env):
        where = f"kill point {n} ({event})"
        run_train_top(params, layout)
        got = np.asarray(load_head(layout)(x_val))
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=where)
        assert leftover_temp_files(layout.root) == [], where


@pytest.mark.slow
def test_train_top_killed_while_saving_leaves_no_half_written_head(
    reference, tmp_path, killpoints, leftover_temp_files, quiet_env
) -> None:
    """Kill at the moment the head's .keras file is opened for writing: the head on disk must still load."""
    from tasks.models.heads import load_head

    params_file, _, ref, events = reference
    n = events["train_top"].index("zip-open") + 1
    work = tmp_path / "saving"
    for rel in INPUTS["train_top"]:
        shutil.copytree(ref.root / rel, work / rel)
    shutil.copytree(ref.top_dir, work / "models" / "top")  # a previous good head, as in a retrain
    cmd = [sys.executable, str(KILLPOINTS_SCRIPT), "train_top", str(work), str(params_file), str(n)]
    proc = subprocess.run(cmd, env=quiet_env(), capture_output=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert killpoints.killed_line(n, "zip-open") in proc.stderr.decode()
    layout = Layout(work)
    assert layout.top_head_model.is_file()
    load_head(layout)  # the old head or the new one, never a torn file
    from tasks.models.heads import read_head_info

    assert read_head_info(layout)["feature_dim"] > 0  # head.json whole too
    from tasks.config import load_params
    from tasks.stages.run_train_top import run_train_top

    run_train_top(load_params(params_file), layout)  # the next run cleans the killed writer's temp file
    assert leftover_temp_files(layout.root) == []


@pytest.mark.slow
def test_kill_during_finetune(reference, tmp_path, killpoints, quiet_env, leftover_temp_files) -> None:
    from tasks.data.index_table import read_index
    from tasks.data.pipeline import view_dataset
    from tasks.inputs import ImageSpec
    from tasks.models.full_model import load_bundle
    from tasks.stages.run_finetune import run_finetune

    _, params, ref, _ = reference
    table = read_index(ref)
    rows = table[table["split"] == "val"]
    images = np.concatenate(
        [b.numpy() for b in view_dataset(rows, params.data.root, ImageSpec((32, 32)), batch_size=64)]
    )
    expected = np.asarray(load_bundle(ref.candidate_model).model(images))
    for layout, n, event in killed_workspaces("finetune", reference, tmp_path, killpoints, quiet_env):
        where = f"kill point {n} ({event})"
        if layout.candidate_model.exists():  # a model left by the killed run must be whole
            load_bundle(layout.candidate_model)
        manifest = run_finetune(params, layout)
        assert manifest.epochs_run == 2 and manifest.path == "tail", where
        got = np.asarray(load_bundle(layout.candidate_model).model(images))
        np.testing.assert_allclose(got, expected, atol=0.05, err_msg=where)
        assert leftover_temp_files(layout.root) == [], (where, leftover_temp_files(layout.root))
        assert not layout.finetune_checkpoints.exists(), where


@pytest.mark.slow
def test_kill_during_index_never_pairs_a_new_table_with_old_classes(
    tmp_path, imagegen, write_params, killpoints, tiny_dict, leftover_temp_files, quiet_env
) -> None:
    """A new class arrives; the index run is killed between its three file writes. The stages that read the index
    get either a consistent (table, classes) pair or a clear error, never silently shifted class ids."""
    from tasks.data.index_table import read_classes, read_index
    from tasks.stages.run_index import run_index

    root = imagegen.make_class_folders(tmp_path / "images", ["red", "blue"], per_class=4, size=32)
    params_file = write_params(tmp_path, tiny_dict(root))
    params = load_params(params_file)
    ref = Layout(tmp_path / "ref")
    run_index(params, ref)
    imagegen.make_class_folders(
        root, ["green"], per_class=4, size=32, seed=5
    )  # "blue" < "green" < "red": ids shift
    events = killpoints.run_counted("index", params, Layout(tmp_path / "counted"))
    replaces = [i + 1 for i, name in enumerate(events) if name == "replace"]
    assert len(replaces) == 3, events
    procs = []
    for n in replaces[1:]:  # after index.csv, after classes.json: the two torn states
        work = tmp_path / f"index-{n}"
        shutil.copytree(ref.index_dir, work / "index")
        cmd = [sys.executable, str(KILLPOINTS_SCRIPT), "index", str(work), str(params_file), str(n)]
        procs.append(
            (work, n, subprocess.Popen(cmd, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        )
    outcomes = []
    for work, n, proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -9, err.decode()[-2000:]
        assert killpoints.killed_line(n, "replace") in err.decode()
        layout = Layout(work)
        try:
            table, classes = read_index(layout), read_classes(layout)
        except ValueError as error:
            assert "re-run `retrainflow index`" in str(error)
            outcomes.append("refused")
        else:
            assert [classes.names[i] for i in table["class_id"]] == table["label"].tolist()
            outcomes.append("consistent")
        run_index(params, layout)
        assert read_classes(layout).names == ("blue", "green", "red")
        assert len(read_index(layout)) == 12
        assert leftover_temp_files(work) == [], n
    assert "refused" in outcomes, outcomes  # killed after index.csv: the new table with the old classes.json


@pytest.mark.slow
def test_finetune_killed_while_writing_its_backup_resumes(
    reference, tmp_path, killpoints, leftover_temp_files, quiet_env
) -> None:
    """Kill at the moment Keras' BackupAndRestore has opened its weights file for writing (a torn backup on disk):
    the next run must not read the torn file; it finishes with a whole model."""
    from tasks.models.full_model import load_bundle
    from tasks.stages.run_finetune import run_finetune

    params_file, params, ref, events = reference
    n = events["finetune"].index("h5-open") + 1
    work = tmp_path / "backup"
    for rel in INPUTS["finetune"]:
        shutil.copytree(ref.root / rel, work / rel)
    cmd = [sys.executable, str(KILLPOINTS_SCRIPT), "finetune", str(work), str(params_file), str(n)]
    proc = subprocess.run(cmd, env=quiet_env(), capture_output=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert killpoints.killed_line(n, "h5-open") in proc.stderr.decode()
    layout = Layout(work)
    manifest = run_finetune(params, layout)
    assert manifest.epochs_run == 2
    load_bundle(layout.candidate_model)
    assert leftover_temp_files(layout.root) == []


def _stand_in_candidate(layout: Layout, payload: bytes, accuracy: float) -> None:
    """A candidate as finetune + evaluate leave it (the registry only copies the model file)."""
    import json

    layout.candidate_dir.mkdir(parents=True, exist_ok=True)
    (layout.candidate_dir / "model.keras").write_bytes(payload)
    (layout.candidate_dir / "classes.json").write_text('{"names": ["blue", "red"], "class_mode": "binary"}')
    layout.metrics_dir.mkdir(parents=True, exist_ok=True)
    (layout.metrics_dir / "evaluate.json").write_text(json.dumps({"test_accuracy": accuracy}))


def test_kill_during_promotion_keeps_registry_and_champion_in_step(
    tmp_path, imagegen, write_params, killpoints, tiny_dict, quiet_env
) -> None:
    """At every write event of a promotion, a kill leaves the registry's champion and models/champion/ naming the
    same model (the champion folder never holds a model the registry does not call champion)."""
    import json

    from tasks.models.registry import read_registry, run_promote
    from tasks.stages.run_index import run_index

    root = imagegen.make_class_folders(tmp_path / "images", ["red", "blue"], per_class=3, size=32)
    params_file = write_params(tmp_path, tiny_dict(root))
    params = load_params(params_file)
    base = Layout(tmp_path / "base")
    run_index(params, base)
    _stand_in_candidate(base, b"model A", 0.6)
    run_promote(params, base)  # A is the champion
    _stand_in_candidate(base, b"model B", 0.9)  # B is better: its promotion is what gets killed
    events = killpoints.run_counted("promote", params, Layout(shutil.copytree(base.root, tmp_path / "count")))
    assert events, "a promotion writes something"
    procs = []
    for n in range(1, len(events) + 1):
        work = shutil.copytree(base.root, tmp_path / f"promote-{n}")
        cmd = [sys.executable, str(KILLPOINTS_SCRIPT), "promote", str(work), str(params_file), str(n)]
        procs.append(
            (n, work, subprocess.Popen(cmd, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        )
    torn = []
    for n, work, proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -9, err.decode()[-2000:]
        assert killpoints.killed_line(n, events[n - 1]) in err.decode()
        layout = Layout(work)
        registry = read_registry(layout)  # whole JSON
        info, model = layout.champion_dir / "champion.json", layout.champion_dir / "model.keras"
        on_disk = json.loads(info.read_text())["id"] if info.is_file() else None
        held = model.read_bytes() if model.is_file() else None
        expected = {c.id: c for c in registry.candidates}[registry.champion]
        if on_disk != registry.champion or held != (b"model A" if expected.score == 0.6 else b"model B"):
            torn.append((n, events[n - 1], registry.champion, on_disk, held))
    assert torn == [], f"champion folder and registry disagree after a kill (events {events}): {torn}"
