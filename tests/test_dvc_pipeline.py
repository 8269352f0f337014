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
    for csv in ("plots/top_history.csv", "plots/finetune_history.csv"):
        assert plots[csv]["x"] == "epoch" and "val_accuracy" in plots[csv]["y"]
    for stage in DVC_YAML["stages"].values():
        for kind in ("metrics", "plots"):
            for item in stage.get(kind, []):
                assert next(iter(item.values())) == {"cache": False}


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


@pytest.fixture
def dvc_repo(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A git + DVC repo holding the pipeline's code, dvc.yaml, tiny params and data tracked by data.dvc."""
    from imagegen import make_class_folders

    repo = tmp_path / "repo"
    shutil.copytree(PROJECT / "tasks", repo / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(PROJECT / ".gitignore", repo / ".gitignore")
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    make_class_folders(repo / "data" / "images", ["red", "blue"], per_class=10, size=32)
    env = client_env(local_server())
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("RETRAINFLOW_LOCK_HOLDER", None)
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
def test_repro_noop_param_change_and_prefect_agree(dvc_repo: tuple[Path, dict[str, str]]) -> None:
    repo, env = dvc_repo
    dvc = [sys.executable, "-m", "dvc"]

    first = _run([*dvc, "repro"], repo, env)
    assert _ran(first) == list(STAGES)
    assert json.loads((repo / "metrics" / "evaluate.json").read_text())["test_count"] > 0
    assert _ran(_run([*dvc, "repro"], repo, env)) == []  # no-op
    assert json.loads(_run([*dvc, "status", "--json"], repo, env).strip() or "{}") == {}

    # a top.* change: only train_top and what follows; not one feature computed
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "repro"], repo, env)
    features_before = (repo / "features" / "features.json").read_bytes()
    cache_before = _tree(repo / "cache" / "features")
    exp = _run([*dvc, "exp", "run", "-S", "top.lr=0.02"], repo, env)
    assert _ran(exp) == ["train_top", "finetune", "evaluate"]
    assert (repo / "features" / "features.json").read_bytes() == features_before
    assert _tree(repo / "cache" / "features") == cache_before
    assert yaml.safe_load((repo / "params.yaml").read_text())["top"]["lr"] == 0.02

    shown = json.loads(_run([*dvc, "plots", "show", "--json"], repo, env))
    for plot_id in ("plots/top_history.csv", "plots/finetune_history.csv", "confusion"):
        assert plot_id in shown and not shown[plot_id][0].get("errors"), shown.get(plot_id)

    # a Prefect run of the whole pipeline, then DVC agrees: status clean and repro a no-op
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.flows import retrain

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        summary = retrain(params_file=str(repo / "params.yaml"), workdir=str(repo), force=True)
    assert summary["dvc_committed"] and summary["ran"] == list(STAGES)
    assert json.loads(_run([*dvc, "status", "--json"], repo, env).strip() or "{}") == {}
    assert _ran(_run([*dvc, "repro"], repo, env)) == []
