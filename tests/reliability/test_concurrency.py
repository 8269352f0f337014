"""Two runs at once. In one workspace the workspace lock lets one proceed and makes the other exit 3 with a clear
message naming the holder; two workspaces sharing one feature cache both finish and the cache is never corrupted;
concurrent promotions never corrupt the registry."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.io.locking import read_holder, workspace_lock
from tasks.layout import Layout

KILLPOINTS_SCRIPT = Path(__file__).with_name("killpoints.py")


@pytest.fixture
def workspace(tmp_path: Path, imagegen, write_params, tiny_dict) -> Path:
    imagegen.make_class_folders(tmp_path / "data" / "images", ["red", "blue"], per_class=6, size=32)
    write_params(tmp_path, tiny_dict())
    return tmp_path


@pytest.mark.slow
def test_two_pipeline_runs_at_once_in_one_workspace(
    workspace: Path,
    prefect_api_url,
    quiet_env,
    tiny_params,
    check_cache_consistent,
    leftover_temp_files,
    retrainflow_executable,
) -> None:
    """Two `retrainflow run` (the retrain flow) started together on tiny data: one runs the pipeline and promotes,
    the other exits 3 naming the winner's PID (or, had it started after the first finished, skips as unchanged);
    afterwards the feature cache, the registry and the champion are consistent and the lock is free."""
    from tasks.inputs import cache_root
    from tasks.models.registry import read_registry

    env = quiet_env({"PREFECT_API_URL": prefect_api_url})
    procs = [
        subprocess.Popen(
            [str(retrainflow_executable), "run", "--json"],
            cwd=workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p, *p.communicate(timeout=900)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes in ([0, 0], [0, 3]), [(p.returncode, err[-3000:]) for p, _, err in results]
    winners = [(p, out) for p, out, _ in results if p.returncode == 0]
    statuses = sorted(json.loads(out)["status"] for _, out in winners)
    if codes == [0, 3]:
        (winner, _), (_, _, err) = winners[0], next(r for r in results if r[0].returncode == 3)
        text = " ".join(err.split())
        assert "busy: another retrainflow run holds the workspace lock" in text, text
        assert f"pid {winner.pid}" in text and "retrainflow run" in text, text
        assert statuses == ["promoted"]
    else:  # serialised: the second found nothing changed since the champion
        assert statuses == ["promoted", "skipped"]

    layout = Layout(workspace)
    params = tiny_params(workspace / "data" / "images")
    rows = check_cache_consistent(cache_root(params, layout))
    manifest = json.loads(layout.features_manifest.read_text())
    counts = json.loads(layout.features_metrics.read_text())
    activations = (
        counts["activations_computed"] + counts["activations_reused"]
    )  # fine-tuning's cut-point views
    assert activations > 0
    assert rows == manifest["pairs"] + activations  # every pair the run needed, in each of the two keys, once
    registry = read_registry(layout)
    assert len(registry.candidates) == 1 and registry.candidates[0].promoted
    assert registry.champion == registry.candidates[0].id
    assert (layout.champions_dir / registry.champion / "model.keras").is_file()
    assert layout.champion_dir.resolve() == (layout.champions_dir / registry.champion).resolve()
    assert (layout.index_table.read_text().count("\n")) == 13  # header + 12 images
    assert leftover_temp_files(workspace) == []
    assert read_holder(layout.lock_file) == {}, "the lock file still names a holder"


def test_second_run_exits_with_a_clear_message_while_the_lock_is_held(workspace: Path, cli) -> None:
    """The workspace is busy (held here, as a running pipeline would): every writing command refuses, exit 3."""
    with workspace_lock(Layout(workspace), command="retrainflow run (test holder)"):
        for command in (["index"], ["features"], ["run"], ["promote"]):
            proc = cli(command, workspace)
            assert proc.returncode == 3, (command, proc.stderr)
            text = " ".join(proc.stderr.split())
            assert "busy" in text and "another retrainflow run holds the workspace lock" in text, text
            import os

            assert f"pid {os.getpid()}" in text and "test holder" in text, text
    assert not (workspace / "index").exists(), "a refused command wrote anyway"
    assert cli(["index"], workspace).returncode == 0  # released: the next run proceeds


@pytest.mark.slow
def test_two_cli_runs_at_once_in_one_workspace(
    workspace: Path, leftover_temp_files, retrainflow_executable, quiet_env
) -> None:
    """Two `retrainflow index` started together: one indexes, the other waits or exits 3 naming the holder."""
    procs = [
        subprocess.Popen(
            [str(retrainflow_executable), "index", "--json"],
            cwd=workspace,
            env=quiet_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 3]), results
    for code, _, err in results:
        if code == 3:
            assert "holds the workspace lock" in " ".join(err.split())
    table = (workspace / "index" / "index.csv").read_text()
    assert table.count("\n") == 13  # header + 12 images: written whole, once
    assert leftover_temp_files(workspace) == []
    assert read_holder(Layout(workspace).lock_file) == {}, "the lock file still names a holder"


@pytest.mark.slow
def test_two_workspaces_share_one_feature_cache(
    tmp_path: Path, imagegen, write_params, check_cache_consistent, tiny_dict, leftover_temp_files, quiet_env
) -> None:
    """The feature cache is shared between workspaces (features.cache_dir): two writers at once, same pairs."""
    from tasks.config import load_params
    from tasks.features.read import read_features
    from tasks.stages.run_features import run_features
    from tasks.stages.run_index import run_index

    root = imagegen.make_class_folders(tmp_path / "images", ["red", "blue"], per_class=10, size=32)
    cache = tmp_path / "shared_cache"
    params_file = write_params(tmp_path, tiny_dict(root, features={"cache_dir": str(cache), "shard_size": 4}))
    params = load_params(params_file)
    works = [tmp_path / "a", tmp_path / "b"]
    for work in works:
        run_index(params, Layout(work))
    procs = [
        subprocess.Popen(
            [sys.executable, str(KILLPOINTS_SCRIPT), "features", str(work), str(params_file), "0"],
            env=quiet_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for work in works
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
    rows = check_cache_consistent(cache)
    assert rows >= len(read_features(params, Layout(works[0]), "train").x)
    reference = Layout(tmp_path / "reference")
    run_index(params, reference)
    params_private = load_params(params_file, [f"features.cache_dir={tmp_path / 'private'}"])
    run_features(params_private, reference)
    for work in works:
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(
                read_features(params, Layout(work), split).x,
                read_features(params_private, reference, split).x,
            )
    assert leftover_temp_files(tmp_path) == []


def test_concurrent_promotions_never_corrupt_the_registry(
    workspace: Path, leftover_temp_files, retrainflow_executable, quiet_env
) -> None:
    """Four `retrainflow promote` at once on a hand-made candidate: each succeeds or exits 3; the registry is whole
    JSON with exactly one entry per success and a champion that exists."""
    from tasks.config import load_params
    from tasks.stages.run_index import run_index

    layout = Layout(workspace)
    run_index(load_params(workspace / "params.yaml", [f"data.root={workspace / 'data' / 'images'}"]), layout)
    layout.candidate_dir.mkdir(parents=True)
    (layout.candidate_dir / "model.keras").write_bytes(b"stand-in model bytes")
    (layout.candidate_dir / "classes.json").write_text('{"names": ["blue", "red"], "class_mode": "binary"}')
    layout.metrics_dir.mkdir()
    (layout.metrics_dir / "evaluate.json").write_text(json.dumps({"test_accuracy": 0.9}))
    procs = []
    for _ in range(4):
        procs.append(
            subprocess.Popen(
                [str(retrainflow_executable), "promote"],
                cwd=workspace,
                env=quiet_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        time.sleep(0.05)
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = [code for code, _, _ in results]
    assert set(codes) <= {0, 3} and 0 in codes, results
    registry = json.loads(layout.model_registry.read_text())
    # promotion is idempotent: the same model and metrics are recorded once, the other winners say so
    assert len(registry["candidates"]) == 1
    already = [out for code, out, _ in results if code == 0 and '"already_registered": true' in out]
    assert len(already) == codes.count(0) - 1, results
    assert registry["champion"] in {c["id"] for c in registry["candidates"]}
    assert len({c["id"] for c in registry["candidates"]}) == len(registry["candidates"])
    assert (layout.champion_dir / "model.keras").read_bytes() == b"stand-in model bytes"
    assert not list(layout.models_dir.glob("*.tmp")) and not list(layout.models_dir.glob("*.old"))
    assert leftover_temp_files(workspace) == []
