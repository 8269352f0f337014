"""Fixtures of the reliability suite: tiny params, the CLI in a subprocess, leftover temp files, cache checks, and
the kill points' counting (``killpoints.py``) for the parent process.

Everything is sized for a busy 2-core machine: 32 px images, MobileNet 0.25 with random weights, 1-2 epochs.
Tests take these as fixtures and never import this module.
"""

from __future__ import annotations

import copy
import json
import os
import runpy
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[2]
RETRAINFLOW = Path(sys.executable).with_name("retrainflow")
KILLPOINTS_SCRIPT = Path(__file__).with_name("killpoints.py")

# A tiny pipeline: random-weight MobileNet 0.25 at 32 px, one linear head, 2 + 1 epochs.
TINY: dict[str, Any] = {
    "seed": 3,
    "data": {"root": "data/images", "split": {"train": 0.5, "val": 0.25, "test": 0.25}, "workers": 2},
    "image": {"size": [32, 32]},
    "augment": {"passes": 1, "horizontal_flip": True},
    "base": {"name": "mobilenet", "weights": "none", "alpha": 0.25},
    "features": {"batch_size": 8, "shard_size": 8, "engine": "keras"},
    "top": {"heads": [{"name": "linear", "type": "linear"}], "epochs": 2, "batch_size": 8, "lr": 0.01},
    "finetune": {"epochs": 1, "unfreeze_blocks": 1, "batch_size": 8},
    "evaluate": {"batch_size": 16, "preview_images": 0},
}


# ------------------------------------------------------------------------------------------------ the helpers
def merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``extra`` merged in (nested dicts merge, other values replace)."""
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_dict(data_root: str | Path = "data/images", **sections: Any) -> dict[str, Any]:
    """The tiny params as a plain dict, ``data.root`` set, sections merged (``tiny_dict(r, top={"epochs": 1})``)."""
    return merged(merged(TINY, {"data": {"root": str(data_root)}}), sections)


def tiny_params(data_root: str | Path, **sections: Any) -> Any:
    """The tiny params as a validated :class:`tasks.config.Params`."""
    from tasks.config import params_from_dict

    return params_from_dict(tiny_dict(data_root, **sections))


def write_params(workdir: Path, params: Mapping[str, Any]) -> Path:
    """``workdir/params.yaml`` holding ``params``."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(dict(params), sort_keys=False))
    return path


def quiet_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process: offline, quiet, not inheriting a held workspace lock."""
    env = {k: v for k, v in os.environ.items() if k != "RETRAINFLOW_LOCK_HOLDER"}
    env.update(
        {
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "DVC_NO_ANALYTICS": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONPATH": str(PROJECT),
            "COLUMNS": "200",
        }
    )
    env.update(extra or {})
    return env


def cli(
    args: Sequence[str], cwd: Path, *, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``retrainflow ARGS`` in ``cwd`` and return the finished process (text output)."""
    return subprocess.run(
        [str(RETRAINFLOW), *args],
        cwd=cwd,
        env=quiet_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def leftover_temp_files(root: Path) -> list[Path]:
    """Files a writer left half-done: temp names used by the project's atomic writers."""
    out = []
    for path in root.rglob("*"):
        name = path.name
        if path.is_file() and (name.startswith(".tmp-") or ".tmp" in name or name.endswith(".partial")):
            out.append(path)
    return sorted(out)


def check_cache_consistent(cache_root: Path, *, orphans_allowed: bool = False) -> int:
    """Every shard a feature-cache manifest lists loads whole with its row count; unless ``orphans_allowed``,
    no shard file outside the manifests remains. Returns the number of committed rows."""
    rows = 0
    for manifest in cache_root.glob("*/manifest.json"):
        shards = json.loads(manifest.read_text())["shards"]
        listed = set()
        for shard in shards:
            x = np.load(manifest.parent / "shards" / f"{shard['name']}.x.npy", allow_pickle=False)
            ids = np.load(manifest.parent / "shards" / f"{shard['name']}.ids.npy", allow_pickle=False)
            assert len(x) == len(ids) == shard["rows"], shard
            listed |= {f"{shard['name']}.x.npy", f"{shard['name']}.ids.npy"}
            rows += len(x)
        on_disk = {p.name for p in (manifest.parent / "shards").iterdir()}
        if not orphans_allowed:
            assert on_disk == listed, f"orphan shard files: {sorted(on_disk - listed)}"
    return rows


# ------------------------------------------------------------------------------------------------ the fixtures
@pytest.fixture(name="merged", scope="session")
def merged_fixture() -> Callable[..., dict[str, Any]]:
    """``merged(base, extra)``: a deep copy of ``base`` with ``extra`` merged in (nested dicts merge)."""
    return merged


@pytest.fixture(name="tiny_dict", scope="session")
def tiny_dict_fixture() -> Callable[..., dict[str, Any]]:
    """``tiny_dict(data_root="data/images", **sections)``: the tiny params (random-weight MobileNet 0.25 at
    32 px, one linear head, 2 + 1 epochs) as a plain dict, sections merged in."""
    return tiny_dict


@pytest.fixture(name="tiny_params", scope="session")
def tiny_params_fixture() -> Callable[..., Any]:
    """``tiny_params(data_root, **sections)``: ``tiny_dict(...)`` as a validated ``tasks.config.Params``."""
    return tiny_params


@pytest.fixture(name="write_params", scope="session")
def write_params_fixture() -> Callable[[Path, Mapping[str, Any]], Path]:
    """``write_params(workdir, params)``: writes ``workdir/params.yaml`` holding ``params``; returns its path."""
    return write_params


@pytest.fixture(name="quiet_env", scope="session")
def quiet_env_fixture() -> Callable[..., dict[str, str]]:
    """``quiet_env(extra=None)``: the environment for a child process (offline, quiet, the project on
    PYTHONPATH, not inheriting a held workspace lock), with ``extra`` on top."""
    return quiet_env


@pytest.fixture(name="cli", scope="session")
def cli_fixture() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``cli(args, cwd, *, env=None, timeout=300)``: runs ``retrainflow ARGS`` in ``cwd`` in a quiet child
    process; returns the finished process (text output)."""
    return cli


@pytest.fixture(scope="session")
def retrainflow_executable() -> Path:
    """The ``retrainflow`` command of this environment (beside the Python running the tests)."""
    return RETRAINFLOW


@pytest.fixture(name="leftover_temp_files", scope="session")
def leftover_temp_files_fixture() -> Callable[[Path], list[Path]]:
    """``leftover_temp_files(root)``: the files under ``root`` a writer left half-done (atomic writers' temp
    names), sorted."""
    return leftover_temp_files


@pytest.fixture(name="check_cache_consistent", scope="session")
def check_cache_consistent_fixture() -> Callable[..., int]:
    """``check_cache_consistent(cache_root, *, orphans_allowed=False)``: asserts every manifest-listed shard loads
    whole (and, unless allowed, that no orphan shard file remains); returns the number of committed rows."""
    return check_cache_consistent


@dataclass(frozen=True)
class KillPoints:
    """What the ``killpoints`` fixture gives: the parent's side of ``killpoints.py``."""

    run_counted: Callable[..., list[str]]
    killed_line: Callable[[int, str], str]


@pytest.fixture(scope="session")
def killpoints() -> KillPoints:
    """``run_counted(stage, params, layout, kill_at=0)`` (run a stage here with its write events counted; their
    names in order) and ``killed_line(n, name)`` (what a child killed at event ``n`` prints on stderr).

    ``killpoints.py`` is a script: the children run it (``python killpoints.py STAGE WORKDIR PARAMS_YAML N``). The
    parent counts with the same code, run from that file here, so no test imports it."""
    code = runpy.run_path(str(KILLPOINTS_SCRIPT), run_name="killpoints")
    return KillPoints(run_counted=code["run_counted"], killed_line=code["killed_line"])
