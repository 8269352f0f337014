"""features.runner dask: chunks as Prefect task runs on a real distributed.LocalCluster, bit-identical to the
local runner whatever the number of workers, a SIGKILLed worker retried, and a second run computing nothing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tasks.config import load_params
from tasks.layout import Layout

pytestmark = pytest.mark.slow

FEATURES = {"batch_size": 8, "shard_size": 8, "chunk_size": 16, "dtype": "float32", "engine": "keras"}


@pytest.fixture(scope="module")
def api(prefect_api_url) -> str:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api_url}):
        yield prefect_api_url


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, make_workspace) -> Path:
    """A tiny workspace, indexed once (24 images, one augmented pass: 36 views)."""
    from tasks.stages.run_index import run_index

    root = make_workspace(tmp_path_factory.mktemp("dask-src"), per_class=12)
    run_index(load_params(root / "params.yaml", [f"data.root={root / 'data' / 'images'}"]), Layout(root))
    return root


def workspace(indexed: Path, dest: Path, **features: Any) -> tuple[Any, Layout]:
    shutil.copytree(indexed, dest)
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    raw["data"]["root"] = str(dest / "data" / "images")
    raw["features"] = {**raw["features"], **FEATURES, **features}
    (dest / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(dest / "params.yaml", ()), Layout(dest)


def run(params: Any, layout: Layout) -> Any:
    from flows.scale import map_chunks_on_dask
    from tasks.stages.run_features import run_features

    map_chunks = map_chunks_on_dask(params.features) if params.features.runner == "dask" else None
    return run_features(params, layout, map_chunks=map_chunks)


def stored(manifest: Any) -> dict[tuple[str, str], np.ndarray]:
    """Every (sha256, view) row of the run's cache key, as stored."""
    from tasks.features.cache import FeatureCache, KeySpec

    cache = FeatureCache.open(Path(manifest.cache_dir), KeySpec(**manifest.key_spec), create=False)
    pairs = sorted(cache.locations())
    return dict(zip(pairs, cache.read(pairs), strict=True))


@pytest.fixture(scope="module")
def local(indexed, tmp_path_factory) -> tuple[Any, dict]:
    params, layout = workspace(indexed, tmp_path_factory.mktemp("local") / "ws")
    manifest = run(params, layout)
    return manifest, stored(manifest)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_dask_features_are_bit_identical_to_local(api, indexed, local, tmp_path: Path, workers: int) -> None:
    local_manifest, local_rows = local
    params, layout = workspace(indexed, tmp_path / "ws", runner="dask", dask_workers=workers)
    first = run(params, layout)
    assert first.computed == local_manifest.computed == local_manifest.pairs == 36
    assert first.extra["chunks"] == 3  # train: 2 views of 12 images in 16-row chunks (1 + 1), val/test share
    assert first.content_hash == local_manifest.content_hash
    rows = stored(first)
    assert rows.keys() == local_rows.keys()
    assert all(np.array_equal(rows[pair], local_rows[pair]) for pair in rows)
    second = run(params, layout)
    assert (second.computed, second.reused) == (0, 36)


def test_chunk_task_runs_are_recorded_in_prefect(api, indexed, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    params, layout = workspace(indexed, tmp_path / "ws", runner="dask", dask_workers=2)
    before = time.time()
    run(params, layout)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="extract-chunk-"))
        )
    recent = [r for r in runs if r.start_time is None or r.start_time.timestamp() >= before - 5]
    assert {r.name for r in recent} >= {"extract-chunk-0", "extract-chunk-1", "extract-chunk-2"}
    assert all(r.state is not None and r.state.is_completed() for r in recent if r.name.startswith("extract"))


def test_a_worker_killed_mid_chunk_is_retried_and_nothing_half_written_is_read(
    api, indexed, local, tmp_path: Path
) -> None:
    _, local_rows = local
    params, layout = workspace(indexed, tmp_path / "ws", runner="dask", dask_workers=2, chunk_size=24)
    from tasks.inputs import resolve_inputs

    shards = resolve_inputs(params, layout).cache_root
    killed: list[int] = []

    def kill_first_writer() -> None:  # SIGKILL the first worker seen writing a shard (name: <ns>-<pid>-<id>)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for path in shards.rglob("*.npy") if shards.is_dir() else []:
                match = re.search(r"-(\d+)-[0-9a-f]{8}", path.name)
                if match and int(match.group(1)) != os.getpid():
                    killed.append(int(match.group(1)))
                    os.kill(killed[0], signal.SIGKILL)
                    return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_first_writer, daemon=True)
    watcher.start()
    manifest = run(params, layout)
    watcher.join(timeout=5)
    assert killed, "no worker was seen writing a shard"
    rows = stored(manifest)
    assert rows.keys() == local_rows.keys()
    assert all(np.array_equal(rows[pair], local_rows[pair]) for pair in rows)
    assert (run(params, layout).computed, manifest.computed) == (0, 36)


def _retrainflow(args: list[str], cwd: Path, env: dict[str, str]) -> Any:
    import subprocess
    import sys

    command = [str(Path(sys.executable).with_name("retrainflow")), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "command",
    [
        ["features", "--runner", "dask", "--workers", "2", "--no-progress", "--json"],
        ["stage", "features", "--set", "features.runner=dask", "--set", "features.dask_workers=2", "--json"],
    ],
    ids=["features-cli", "stage-flow"],
)
def test_dask_runner_from_the_command_line(
    prefect_api_url, prefect_client_env, indexed, local, tmp_path: Path, command: list[str]
) -> None:
    """`retrainflow features --runner dask --workers 2` and the features flow (what `dvc repro` runs) on a
    LocalCluster: the same content as the local runner's."""
    import json

    local_manifest, _ = local
    params, layout = workspace(indexed, tmp_path / "ws")
    assert params.features.runner == "local"  # the command line chooses dask
    done = _retrainflow(command, layout.root, prefect_client_env(prefect_api_url))
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads(layout.features_manifest.read_text())
    assert written["content_hash"] == local_manifest.content_hash
    record = json.loads(layout.run_record("features").read_text())
    assert record["computed"] == 36 and record["extra"]["chunks"] == 3


def test_a_bad_runner_names_the_key_and_the_value(indexed, tmp_path: Path) -> None:
    _, layout = workspace(indexed, tmp_path / "ws")
    done = _retrainflow(["features", "--runner", "spark", "--workers", "0"], layout.root, dict(os.environ))
    assert done.returncode == 2
    assert "features.runner" in done.stdout + done.stderr and "spark" in done.stdout + done.stderr
    assert "features.dask_workers" in done.stdout + done.stderr
