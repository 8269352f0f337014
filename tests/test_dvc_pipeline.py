"""dvc.yaml against the code and Layout, and the real pipeline in a temp git + DVC repo.

repro runs everything; a second repro is a no-op; `dvc exp run -S top.lr=...` reruns only train_top and what
follows (no feature is computed); `dvc plots show` renders; a Prefect `retrain` run leaves `dvc status` clean.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect_api import client_env, local_server
from test_flows import TINY_PARAMS

from tasks.layout import Layout

PROJECT = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
STAGES = ("index", "features", "train_top", "finetune", "evaluate")
INFRA = {"config", "layout"}  # params and paths: tracked through `params` and the outs themselves


def _outs(stage: dict, *kinds: str) -> list[str]:
    paths = []
    for kind in kinds or ("outs", "metrics", "plots"):
        for item in stage.get(kind, []):
            paths.append(item if isinstance(item, str) else next(iter(item)))
    return paths


def _task_imports(module: str) -> set[str]:
    tree = ast.parse((PROJECT / "tasks" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tasks."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tasks.")}
    return found


def _closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        mod = todo.pop()
        if mod not in seen and mod not in INFRA:
            seen.add(mod)
            todo += sorted(_task_imports(mod))
    return seen


# -------------------------------------------------------------------------------------- static checks
def test_stages_run_through_prefect_stage_command() -> None:
    assert tuple(DVC_YAML["stages"]) == STAGES
    for name, stage in DVC_YAML["stages"].items():
        assert stage["cmd"] == f"retrainflow stage {name}"


@pytest.mark.parametrize("name", STAGES)
def test_code_deps_are_exactly_the_stage_import_closure(name: str) -> None:
    """Every tasks module the stage imports (transitively, lazy imports included) and nothing else."""
    deps = {d for d in DVC_YAML["stages"][name]["deps"] if isinstance(d, str) and d.startswith("tasks/")}
    assert deps == {f"tasks/{m}.py" for m in _closure(name)}


def test_outs_match_layout() -> None:
    layout = Layout(Path("."))
    outs = {o for stage in DVC_YAML["stages"].values() for o in _outs(stage)}
    for path in (
        layout.index_table,
        layout.classes_file,
        layout.index_report,
        layout.features_manifest,
        layout.features_metrics,
        layout.features_cache,
        layout.top_dir,
        layout.candidate_dir,
        layout.metrics_dir / "evaluate.json",
    ):
        assert path.as_posix() in outs, path
    roots = [layout.index_dir, layout.features_manifest.parent, layout.features_cache, layout.models_dir]
    roots += [layout.metrics_dir, layout.plots_dir, layout.reports_dir]
    for out in outs:
        assert any(Path(out).is_relative_to(r) for r in roots), out
    cache = next(i for i in DVC_YAML["stages"]["features"]["outs"] if isinstance(i, dict))
    assert cache == {"cache/features": {"persist": True, "cache": False}}


def test_plots_have_axes_and_metrics_are_git_tracked() -> None:
    plots = {next(iter(p)): p[next(iter(p))] for p in DVC_YAML["plots"]}
    assert plots["confusion"]["template"] == "confusion"
    assert plots["confusion"]["y"] == {"plots/confusion.csv": "actual"}
    plots_files = {"plots/top_history.csv", "plots/finetune_history.csv", "plots/confusion.csv"}
    for csv in ("plots/top_history.csv", "plots/finetune_history.csv"):
        assert plots[csv]["x"] == "epoch" and "val_accuracy" in plots[csv]["y"]
    small = {"metrics/features.json", "metrics/top.json", "metrics/finetune.json", "metrics/evaluate.json"}
    small |= plots_files
    for stage in DVC_YAML["stages"].values():
        for item in stage.get("outs", []) + stage.get("metrics", []):
            if isinstance(item, dict) and next(iter(item)) in small:
                assert next(iter(item.values())) == {"cache": False}  # small: tracked by git
    outs = {o for stage in DVC_YAML["stages"].values() for o in _outs(stage)}
    assert small <= outs


# ------------------------------------------------------------------------------------------ real DVC
def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


def _tree(folder: Path) -> dict[str, int]:
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def full_tiny_params() -> dict:
    """The project's params.yaml (DVC needs every key a stage lists) with the tiny test values on top."""
    return _deep_merge(yaml.safe_load((PROJECT / "params.yaml").read_text()), TINY_PARAMS)


@pytest.fixture
def dvc_repo(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A git + DVC repo holding the pipeline's code, dvc.yaml, tiny params and data tracked by data.dvc."""
    from imagegen import make_class_folders

    repo = tmp_path / "repo"
    shutil.copytree(PROJECT / "tasks", repo / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(PROJECT / ".gitignore", repo / ".gitignore")
    (repo / "params.yaml").write_text(yaml.safe_dump(full_tiny_params(), sort_keys=False))
    make_class_folders(repo / "data" / "images", ["red", "blue"], per_class=10, size=32)
    env = client_env(local_server())
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    dvc = [sys.executable, "-m", "dvc"]
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    _run(["git", "init", "-q"], repo, env)
    _run([*dvc, "init", "-q"], repo, env)
    _run([*dvc, "config", "core.analytics", "false"], repo, env)
    _run([*dvc, "config", "core.check_update", "false"], repo, env)
    _run([*dvc, "add", "-q", "data"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run([*git, "commit", "-qm", "pipeline"], repo, env)
    return repo, env


@pytest.mark.slow
def test_prefect_run_then_dvc_agrees_and_param_change_reruns_only_downstream(
    dvc_repo: tuple[Path, dict[str, str]],
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.flows import retrain
    from tasks.model_registry import read_registry

    repo, env = dvc_repo
    dvc = [sys.executable, "-m", "dvc"]

    # 1. the whole pipeline as a Prefect flow run; then DVC agrees: status clean, repro a no-op
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        first = retrain(params_file=str(repo / "params.yaml"), workdir=str(repo))
    assert first["dvc_committed"] and first["ran"] == list(STAGES)
    assert json.loads((repo / "metrics" / "evaluate.json").read_text())["test_count"] > 0
    assert json.loads(_run([*dvc, "status", "--json"], repo, env).strip() or "{}") == {}
    assert _ran(_run([*dvc, "repro"], repo, env)) == []

    # 2. a top.* change through `dvc exp run`: DVC runs only train_top and what follows (stage commands in
    #    Prefect flows); not one feature is computed
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "run"], repo, env)
    features_before = (repo / "features" / "features.json").read_bytes()
    cache_before = _tree(repo / "cache" / "features")
    exp = _run([*dvc, "exp", "run", "-S", "top.lr=0.02"], repo, env)
    assert _ran(exp) == ["train_top", "finetune", "evaluate"]
    assert (repo / "features" / "features.json").read_bytes() == features_before
    assert _tree(repo / "cache" / "features") == cache_before
    assert yaml.safe_load((repo / "params.yaml").read_text())["top"]["lr"] == 0.02
    assert _ran(_run([*dvc, "repro"], repo, env)) == []

    # 3. dvc plots renders the training curves and the confusion matrix
    shown = json.loads(_run([*dvc, "plots", "show", "--json"], repo, env))["data"]
    assert set(shown) == {"plots/top_history.csv", "plots/finetune_history.csv", "confusion"}
    for plot_id in shown:
        assert plot_id in shown and shown[plot_id][0]["content"]["data"]["values"], plot_id

    # 4. with a DVC remote: the next Prefect run pulls, finds every stage up to date in DVC, only gates the
    #    new candidate, and pushes the data and outputs
    remote = repo.parent / "remote"
    _run([*dvc, "remote", "add", "-d", "store", str(remote)], repo, env)
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        second = retrain(params_file=str(repo / "params.yaml"), workdir=str(repo))
    assert second["ran"] == [] and second["up_to_date"] == list(STAGES)
    assert second["data_version"] == yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert sum(1 for p in remote.rglob("*") if p.is_file()) >= 20  # at least the 20 images
    reg = read_registry(Layout(repo))
    assert [c.params_hash for c in reg.candidates] == [first["params_hash"], second["params_hash"]]
    assert json.loads(_run([*dvc, "status", "--json"], repo, env).strip() or "{}") == {}
