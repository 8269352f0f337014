"""dvc.yaml against the code and Layout, and the real pipeline in a temp git + DVC repo.

A fresh `dvc repro` runs every stage (index and features too) and a second is a no-op; each stage lists exactly
the params it reads (features.batch_size reruns only features, computing nothing; evaluate.tolerance, the gate's,
reruns nothing), and `retrainflow run` agrees with DVC on what is stale; `dvc exp run -S top.lr=...` reruns only
train_top and what follows; `dvc plots show` renders each head's curves as its own series, the confusion data and
the PNG reports (image plots, which the HTML shows offline: its vega scripts come from a CDN); a Prefect `retrain` run
leaves `dvc status` clean; with a remote, images dropped into data/ are recorded and pushed, never pulled over.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tasks.layout import Layout

PROJECT = Path(__file__).resolve().parents[2]
TOP_HEADS_DIR = Layout(Path(".")).top_heads_plots.relative_to("plots").as_posix()
DVC_YAML = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
STAGES = ("index", "features", "train_top", "finetune", "evaluate")
INFRA = {"config", "layout"}  # params and paths: tracked through `params` and the outs themselves


def _outs(stage: dict, *kinds: str) -> list[str]:
    paths = []
    for kind in kinds or ("outs", "metrics", "plots"):
        for item in stage.get(kind, []):
            paths.append(item if isinstance(item, str) else next(iter(item)))
    return paths


def _module_file(module: str) -> Path:
    """``data.images`` -> ``tasks/data/images.py`` (modules are named by their dotted path under ``tasks``)."""
    return Path("tasks", *module.split(".")).with_suffix(".py")


def _task_imports(module: str) -> set[str]:
    tree = ast.parse((PROJECT / _module_file(module)).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tasks."):
            found.add(node.module.removeprefix("tasks."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("tasks.") for a in node.names if a.name.startswith("tasks.")}
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


def _stage_module(name: str) -> str:
    """The tasks module the flows' ``STAGE_RUNNERS[name]`` takes ``run_<name>`` from (what
    ``retrainflow stage NAME`` runs): read from flows/flows.py's source, nothing imported."""
    tree = ast.parse((PROJECT / "flows" / "flows.py").read_text())
    registry = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.AnnAssign | ast.Assign)
        and "STAGE_RUNNERS"
        in ast.unparse(node.target if isinstance(node, ast.AnnAssign) else node.targets[0])
    )
    assert isinstance(registry, ast.Dict)
    runners = {ast.literal_eval(k): v.id for k, v in zip(registry.keys, registry.values, strict=True)}
    runner = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == runners[name])
    modules = [
        node.module
        for node in ast.walk(runner)
        if isinstance(node, ast.ImportFrom)
        and node.module
        and node.module.startswith("tasks.")
        and any(alias.name == f"run_{name}" for alias in node.names)
    ]
    assert len(modules) == 1, f"{runners[name]} imports run_{name} from {modules}"
    return modules[0].removeprefix("tasks.")


@pytest.mark.parametrize("name", STAGES)
def test_code_deps_are_exactly_the_stage_import_closure(name: str) -> None:
    """Every tasks module the stage imports (transitively, lazy imports included) and nothing else, starting
    from the module the stage command takes ``run_<name>`` from."""
    deps = {d for d in DVC_YAML["stages"][name]["deps"] if isinstance(d, str) and d.startswith("tasks/")}
    assert deps == {_module_file(m).as_posix() for m in _closure(_stage_module(name))}


def _stages_depending_on(path: str) -> set[str]:
    return {name for name, stage in DVC_YAML["stages"].items() if path in stage["deps"]}


def test_stages_stand_on_libraries_not_on_each_other() -> None:
    """Training on cached features needs neither the decoder nor the resampler; indexing needs no resampler."""
    assert _stages_depending_on("tasks/data/resample.py") == {"features", "finetune", "evaluate"}
    assert _stages_depending_on("tasks/data/images.py") == {"index", "features", "finetune", "evaluate"}
    for library in ("tasks/data/pipeline.py", "tasks/features/extract.py", "tasks/data/indexing.py"):
        assert "train_top" not in _stages_depending_on(library), library


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
        layout.evaluate_metrics,
        layout.top_heads_plots,
        layout.top_metrics,
        layout.top_report,
        layout.top_history,
        layout.finetune_metrics,
        layout.finetune_history,
        *(layout.run_record(stage) for stage in STAGES[1:]),
    ):
        assert path.as_posix() in outs, path
    roots = [layout.index_dir, layout.features_manifest.parent, layout.features_cache, layout.models_dir]
    roots += [layout.metrics_dir, layout.plots_dir, layout.reports_dir]
    for out in outs:
        assert any(Path(out).is_relative_to(r) for r in roots), out
    cache = next(i for i in DVC_YAML["stages"]["features"]["outs"] if isinstance(i, dict))
    assert cache == {"cache/features": {"persist": True, "cache": False}}


def _params_of(stage: str) -> set[str]:
    return set(DVC_YAML["stages"][stage]["params"])


def test_stages_list_exactly_the_params_they_read() -> None:
    """train_top reads features only through read_features (the cache key and the cache folder); evaluate does
    not read evaluate.min_accuracy / tolerance (the promotion gate's, and promote is not a DVC stage)."""
    assert {p for p in _params_of("train_top") if p.startswith("features")} == {
        "features.cache_dir",
        "features.pooling",
        "features.dtype",
    }
    assert {p for p in _params_of("evaluate") if p.startswith("evaluate")} == {
        "evaluate.batch_size",
        "evaluate.metric",
        "evaluate.preview_images",
    }
    assert "features" in _params_of("features")  # batch_size and shard_size are read by features only
    for name in ("train_top", "finetune", "evaluate"):
        assert not {"features", "features.batch_size", "features.shard_size"} & _params_of(name), name


def test_evaluate_outs_hold_every_report_it_writes() -> None:
    layout = Layout(Path("."))
    outs = set(_outs(DVC_YAML["stages"]["evaluate"]))
    for path in (
        layout.evaluation_details,
        layout.model_comparison,
        layout.training_curves_png,
        layout.confusion_png,
    ):
        assert path.as_posix() in outs, path
    assert layout.predictions_png.as_posix() in outs
    assert layout.confusion_csv.as_posix() in outs
    assert layout.evaluate_metrics.as_posix() in outs


IMAGE_PLOTS = ("reports/training_curves.png", "reports/confusion_matrix.png", "reports/predictions.png")


def test_plots_have_axes_and_metrics_are_git_tracked() -> None:
    plots = {
        p if isinstance(p, str) else next(iter(p)): None if isinstance(p, str) else p[next(iter(p))]
        for p in DVC_YAML["plots"]
    }
    assert plots["confusion"]["template"] == "confusion"
    assert plots["confusion"]["y"] == {"plots/confusion.csv": "actual"}
    plots_files = {"plots/top_history.csv", "plots/finetune_history.csv", "plots/confusion.csv"}
    for plot_csv in (f"plots/{TOP_HEADS_DIR}", "plots/finetune_history.csv"):
        assert plots[plot_csv]["x"] == "epoch" and "val_accuracy" in plots[plot_csv]["y"]
    assert "plots/top_history.csv" not in plots  # its rows mix the heads; top_heads/ has one file per head
    for png in IMAGE_PLOTS:  # the evaluate stage's PNGs, so `dvc plots show` draws something offline
        assert plots[png] is None and png in _outs(DVC_YAML["stages"]["evaluate"])
    small = {"metrics/features.json", "metrics/top.json", "metrics/finetune.json", "metrics/evaluate.json"}
    small |= plots_files | {f"plots/{TOP_HEADS_DIR}"}
    small |= {f"reports/runs/{stage}.json" for stage in STAGES[1:]}
    for stage in DVC_YAML["stages"].values():
        for item in stage.get("outs", []) + stage.get("metrics", []):
            if isinstance(item, dict) and next(iter(item)) in small:
                assert next(iter(item.values())) == {"cache": False}  # small: tracked by git
    outs = {o for stage in DVC_YAML["stages"].values() for o in _outs(stage)}
    assert small <= outs


def test_sync_plan_records_user_data_and_pulls_only_what_is_missing(tmp_path: Path) -> None:
    """The decision `retrainflow run` takes before a pull, from `dvc status --json` as DVC 3 writes it."""
    from flows.dvc_ops import plan_sync

    (tmp_path / "data" / "images" / "red").mkdir(parents=True)
    (tmp_path / "data" / "images" / "red" / "new.png").write_bytes(b"png")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "index.csv").write_text("path\n")
    new_image = {
        "data.dvc": [{"changed outs": {"data": "modified"}}],
        "index": [{"changed deps": {"data/images": "modified"}}],
    }
    plan = plan_sync(tmp_path, new_image, remote=True, locked={"index"})
    assert (plan.record, plan.pull, plan.keep) == (("data.dvc",), (), ())
    fresh_clone = {
        "data.dvc": [{"changed outs": {"data": "deleted"}}],
        "train_top": [{"changed outs": {"models/top": "deleted", "metrics/top.json": "deleted"}}],
        "finetune": [{"changed outs": {"models/candidate": "deleted"}}],  # never recorded in dvc.lock
        "index": [{"changed outs": {"index/index.csv": "modified"}}, "always changed"],
    }
    plan = plan_sync(tmp_path, fresh_clone, remote=True, locked={"index", "train_top"})
    assert (plan.record, plan.pull, plan.keep) == ((), ("data.dvc", "train_top"), ("index",))
    assert plan_sync(tmp_path, fresh_clone, remote=False, locked={"index", "train_top"}).pull == ()
    shutil.rmtree(tmp_path / "data")
    (tmp_path / "data" / "images").mkdir(parents=True)  # an empty folder holds no data: pulled, not recorded
    plan = plan_sync(tmp_path, new_image, remote=True)
    assert (plan.record, plan.pull) == ((), ("data.dvc",))
    assert plan_sync(tmp_path, {}, remote=True).to_json() == {"record": [], "pull": [], "keep": []}


# ------------------------------------------------------------------------------------------ real DVC
DVC = [sys.executable, "-m", "dvc"]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


def _status(repo: Path, env: dict[str, str]) -> dict:
    return json.loads(_run([*DVC, "status", "--json"], repo, env).strip() or "{}")


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


TWO_HEADS = [{"name": "linear", "type": "linear"}, {"name": "dense8", "type": "dense", "units": [8]}]


def full_tiny_params(tiny: dict) -> dict:
    """The project's params.yaml (DVC needs every key a stage lists) with the tiny test values ``tiny`` on top
    (and two heads, whose curves `dvc plots` must keep apart)."""
    params = _deep_merge(yaml.safe_load((PROJECT / "params.yaml").read_text()), tiny)
    params["top"]["heads"] = TWO_HEADS
    return params


def _set_param(repo: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _git_head(repo: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


def _git_modified(repo: Path) -> list[str]:
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
    ).stdout
    return sorted(line[3:] for line in out.splitlines())


@pytest.fixture
def dvc_repo(
    tmp_path: Path, imagegen, tiny_workspace_params, prefect_client_env, prefect_api_url
) -> tuple[Path, dict[str, str]]:
    """A git + DVC repo holding the pipeline's code, dvc.yaml, tiny params and data tracked by data.dvc."""
    repo = tmp_path / "repo"
    shutil.copytree(PROJECT / "tasks", repo / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(PROJECT / ".gitignore", repo / ".gitignore")
    (repo / "params.yaml").write_text(
        yaml.safe_dump(full_tiny_params(tiny_workspace_params), sort_keys=False)
    )
    imagegen.make_class_folders(repo / "data" / "images", ["red", "blue"], per_class=10, size=32)
    env = prefect_client_env(prefect_api_url)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    _run(["git", "init", "-q"], repo, env)
    _run([*DVC, "init", "-q"], repo, env)
    _run([*DVC, "config", "core.analytics", "false"], repo, env)
    _run([*DVC, "config", "core.check_update", "false"], repo, env)
    _run([*DVC, "add", "-q", "data"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run([*GIT, "commit", "-qm", "pipeline"], repo, env)
    return repo, env


def _retrain(repo: Path, env: dict[str, str]) -> dict:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.flows import retrain

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return retrain(params_file=str(repo / "params.yaml"), workdir=str(repo))


@pytest.mark.slow
def test_fresh_repro_runs_every_stage_and_params_and_library_edits_rerun_only_their_readers(
    dvc_repo: tuple[Path, dict[str, str]],
) -> None:
    """One fresh pipeline (a full `dvc repro` costs about a minute here), then what each kind of edit reruns."""
    repo, env = dvc_repo

    # 1. a fresh repo: `dvc repro` runs every stage under DVC (index and features included); then a no-op
    assert _ran(_run([*DVC, "repro"], repo, env)) == list(STAGES)
    assert json.loads((repo / "metrics" / "features.json").read_text())["computed"] > 0
    assert _status(repo, env) == {}
    assert _ran(_run([*DVC, "repro"], repo, env)) == []
    features_json = (repo / "features" / "features.json").read_bytes()
    lock_before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]

    # 2. features.batch_size is read by the features stage only: DVC and `retrainflow run` both rerun just that
    #    stage, and it computes nothing (the cache holds every view; the features are the same)
    _set_param(repo, "features", "batch_size", 8)
    assert set(_status(repo, env)) == {"features"}
    summary = _retrain(repo, env)
    assert summary["ran"] == ["features"], summary
    assert summary["up_to_date"] == ["index", "train_top", "finetune", "evaluate"]
    assert summary["stages"]["features"]["computed"] == 0
    assert _status(repo, env) == {}
    _set_param(repo, "features", "batch_size", 4)
    assert _ran(_run([*DVC, "repro"], repo, env)) == ["features"]
    metrics = json.loads((repo / "metrics" / "features.json").read_text())
    assert metrics["computed"] == 0 and metrics["reused"] == metrics["pairs"] and "seconds" not in metrics
    record = json.loads((repo / "reports" / "runs" / "features.json").read_text())
    assert record["batch_size"] == 4 and record["seconds"] > 0 and "key_spec" in record
    assert (repo / "features" / "features.json").read_bytes() == features_json
    lock_after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for name in ("index", "train_top", "finetune", "evaluate"):
        assert lock_after[name] == lock_before[name], name  # recorded as before: not rerun

    # 3. evaluate.tolerance belongs to the promotion gate: no DVC stage reruns; the run only reaches the gate,
    #    which finds this very candidate already registered (promotion is idempotent) and records nothing
    _set_param(repo, "evaluate", "tolerance", 0.5)
    assert _status(repo, env) == {}
    assert _ran(_run([*DVC, "repro"], repo, env)) == []
    summary = _retrain(repo, env)
    assert summary["ran"] == [] and summary["up_to_date"] == list(STAGES)
    assert summary["status"] in ("promoted", "not promoted") and "already registered" in summary["reason"]
    assert _status(repo, env) == {}

    # 4. a comment edited in the resampler: `dvc status` lists exactly the stages whose code closure holds it
    #    (features, finetune, evaluate: they render images); index and train_top (which trains on cached
    #    features) stay up to date
    resample = repo / "tasks" / "data" / "resample.py"
    text = resample.read_text()
    assert (
        "# ------------------------------------------------------------------------------------------- geometry"
        in text
    )
    resample.write_text(text.replace("------- geometry", "------- geometry (edited)", 1))
    status = _status(repo, env)
    assert (
        set(status) == {"features", "finetune", "evaluate"} == _stages_depending_on("tasks/data/resample.py")
    )
    for name, changes in status.items():
        changed = {path for change in changes for path in change.get("changed deps", {})}
        assert changed == {"tasks/data/resample.py"}, (name, changes)


def _plot_values(shown: dict, plot_id: str) -> list[dict]:
    (plot,) = shown[plot_id]
    return plot["content"]["data"]["values"]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_prefect_run_then_dvc_agrees_and_param_change_reruns_only_downstream(
    dvc_repo: tuple[Path, dict[str, str]],
) -> None:
    from tasks.models.registry import champion_model, read_registry

    repo, env = dvc_repo
    head = _git_head(repo)

    # 1. the whole pipeline as a Prefect flow run; then DVC agrees: status clean, repro a no-op
    first = _retrain(repo, env)
    assert first["dvc_committed"] and first["ran"] == list(STAGES)
    assert json.loads((repo / "metrics" / "evaluate.json").read_text())["test_count"] > 0
    assert _status(repo, env) == {}
    assert _ran(_run([*DVC, "repro"], repo, env)) == []
    reg = read_registry(Layout(repo))
    (cand,) = reg.candidates
    assert cand.promoted and cand.git_commit == head == first["git_commit"]  # a clean checkout: no +dirty
    assert cand.model_path == str(champion_model(Layout(repo), cand.id))
    first_model = Path(cand.model_path).read_bytes()

    # 2. a top.* change through `dvc exp run`: DVC runs only train_top and what follows (stage commands in
    #    Prefect flows); not one feature is computed
    _run(["git", "add", "-A"], repo, env)
    _run([*GIT, "commit", "-qm", "run"], repo, env)
    features_before = (repo / "features" / "features.json").read_bytes()
    cache_before = _tree(repo / "cache" / "features")
    exp = _run([*DVC, "exp", "run", "-S", "top.lr=0.02"], repo, env)
    assert _ran(exp) == ["train_top", "finetune", "evaluate"]
    assert (repo / "features" / "features.json").read_bytes() == features_before
    assert _tree(repo / "cache" / "features") == cache_before
    assert yaml.safe_load((repo / "params.yaml").read_text())["top"]["lr"] == 0.02
    assert _ran(_run([*DVC, "repro"], repo, env)) == []

    # 3. dvc plots renders the training curves (each head its own series: its own file), the confusion matrix
    #    and the PNG reports; the HTML page shows the PNGs as <img> files beside it (no network needed)
    shown = json.loads(_run([*DVC, "plots", "show", "--json"], repo, env))["data"]
    heads = [f"plots/{TOP_HEADS_DIR}/{h['name']}.csv" for h in TWO_HEADS]
    assert set(shown) == {*heads, "plots/finetune_history.csv", "confusion", *IMAGE_PLOTS}
    for png in IMAGE_PLOTS:
        (image,) = shown[png]
        assert image["type"] == "image" and Path(image["url"]).is_file()
    _run([*DVC, "plots", "show", "-o", "page"], repo, env)
    page = (repo / "page" / "index.html").read_text()
    for png in IMAGE_PLOTS:
        src = f"static/workspace_{png.replace('/', '_')}"
        assert f'<img src="{src}"' in page and (repo / "page" / src).is_file(), png
    history = _csv_rows(repo / "plots" / "top_history.csv")
    for head, plot_id in zip(TWO_HEADS, heads, strict=True):
        values = _plot_values(shown, plot_id)
        rows = [r for r in history if r["head"] == head["name"]]
        assert len(rows) == 2 and len(values) == 4 * len(
            rows
        )  # 4 fields of this head's epochs, no other head
        drawn = [(v["epoch"], float(v["dvc_inferred_y_value"])) for v in values if v["field"] == "val_loss"]
        assert drawn == [(r["epoch"], float(r["val_loss"])) for r in rows], head
    confusion = _plot_values(shown, "confusion")
    expected = _csv_rows(repo / "plots" / "confusion.csv")
    assert Counter((v["actual"], v["predicted"]) for v in confusion) == Counter(
        (r["actual"], r["predicted"]) for r in expected
    )
    test_count = json.loads((repo / "metrics" / "evaluate.json").read_text())["test_count"]
    assert len(confusion) == test_count and {v["actual"] for v in confusion} == {"red", "blue"}
    for csv_name, epochs in (("finetune_history.csv", 1),):
        values = _plot_values(shown, f"plots/{csv_name}")
        rows = _csv_rows(repo / "plots" / csv_name)
        assert len(rows) == epochs, csv_name
        for field in ("loss", "val_loss", "accuracy", "val_accuracy"):
            drawn = [(v["epoch"], float(v["dvc_inferred_y_value"])) for v in values if v["field"] == field]
            assert drawn == [(r["epoch"], float(r[field])) for r in rows], (csv_name, field)

    # 4. with a DVC remote: the next Prefect run pulls nothing (the workspace has everything), finds every stage
    #    up to date in DVC, only gates the new candidate, and pushes the data and outputs. The experiment changed
    #    the tracked params.yaml and dvc.lock (and `dvc remote add` .dvc/config): the checkout is dirty at the
    #    start, and the registry says so.
    remote = repo.parent / "remote"
    _run([*DVC, "remote", "add", "-d", "store", str(remote)], repo, env)
    head = _git_head(repo)
    second = _retrain(repo, env)
    assert second["ran"] == [] and second["up_to_date"] == list(STAGES)
    assert second["dvc_sync"] == {"record": [], "pull": [], "keep": []}
    assert (
        second["data_version"] == "dvc:" + yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    )
    assert sum(1 for p in remote.rglob("*") if p.is_file()) >= 20  # at least the 20 images
    reg = read_registry(Layout(repo))
    assert [c.params_hash for c in reg.candidates] == [first["params_hash"], second["params_hash"]]
    assert reg.candidates[1].git_commit == f"{head}+dirty"
    assert _status(repo, env) == {}
    assert Path(reg.candidates[0].model_path).read_bytes() == first_model  # immutable, whatever came next
    if reg.candidates[1].promoted:
        assert reg.candidates[1].model_path != reg.candidates[0].model_path


def _summary(stdout: str) -> dict:
    """The JSON summary `retrainflow run` prints on stdout (logs go to stderr)."""
    return json.loads(stdout)


def _md5_in_remote(remote: Path, contents: bytes) -> Path:
    md5 = hashlib.md5(contents).hexdigest()  # noqa: S324 - DVC's content address, not security
    return remote / "files" / "md5" / md5[:2] / md5[2:]


@pytest.mark.slow
def test_new_images_with_a_remote_are_recorded_and_pushed_never_pulled_over(
    dvc_repo: tuple[Path, dict[str, str]],
    imagegen,
) -> None:
    """People drop images into data/images/<class>/: the scheduled run records them in data.dvc (a pull would
    refuse to delete them, or with --force delete them), trains on them and pushes them. A workspace without the
    data (a fresh clone) gets it from the remote."""
    from tasks.data.index_table import read_index
    from tasks.models.registry import read_registry

    repo, env = dvc_repo
    remote = repo.parent / "remote"
    _run([*DVC, "remote", "add", "-d", "store", str(remote)], repo, env)
    _run([*DVC, "push", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run([*GIT, "commit", "-qm", "remote"], repo, env)
    head = _git_head(repo)
    old_md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]

    new_image = imagegen.encode(imagegen.coloured_image((220, 20, 20), size=32, seed=4242), "PNG")
    (repo / "data" / "images" / "red" / "dropped_in.png").write_bytes(new_image)
    assert not _md5_in_remote(remote, new_image).exists()
    retrainflow = [str(Path(sys.executable).with_name("retrainflow")), "run", "--json"]

    proc = subprocess.run(retrainflow, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = _summary(proc.stdout)
    assert summary["dvc_sync"] == {"record": ["data.dvc"], "pull": [], "keep": []}
    assert summary["ran"] == list(STAGES) and summary["status"] == "promoted"
    assert (repo / "data" / "images" / "red" / "dropped_in.png").read_bytes() == new_image
    new_sha = hashlib.sha256(new_image).hexdigest()
    index = read_index(Layout(repo))
    assert new_sha in set(index["sha256"]) and len(index) == 21
    new_md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert new_md5 != old_md5 and summary["data_version"] == f"dvc:{new_md5}"
    assert _md5_in_remote(remote, new_image).is_file()  # pushed
    assert _status(repo, env) == {}
    # the run rewrote the tracked data.dvc itself; the registry names the commit it started from, clean
    assert "data.dvc" in _git_modified(repo)
    (cand,) = read_registry(Layout(repo)).candidates
    assert cand.git_commit == head and cand.data_version == f"dvc:{new_md5}"

    # a workspace without the data and without a local DVC cache: the run pulls it from the remote, new image
    # included, and skips (nothing changed since the champion)
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    proc = subprocess.run(retrainflow, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = _summary(proc.stdout)
    assert "data.dvc" in summary["dvc_sync"]["pull"] and summary["dvc_sync"]["record"] == []
    assert (repo / "data" / "images" / "red" / "dropped_in.png").read_bytes() == new_image
    assert len(list((repo / "data" / "images").rglob("*.png"))) == 21
    assert summary["ran"] == [] and summary["status"] == "skipped", summary
    assert _status(repo, env) == {}


@pytest.mark.slow
def test_an_unreachable_remote_leaves_the_run_whole_and_the_next_run_pushes(
    dvc_repo: tuple[Path, dict[str, str]],
) -> None:
    """The DVC remote goes away before the run's `dvc push` (its folder replaced by a file: every write to it
    fails, as a vanished mount or a read-only share does). The run still promotes, its model, registry and
    dvc.lock are consistent locally, and it says "not pushed" with DVC's reason. With the remote back, the next
    run (which skips: nothing changed) pushes what is missing."""
    from tasks.models.registry import champion_model, read_registry

    repo, env = dvc_repo
    remote = repo.parent / "remote"
    _run([*DVC, "remote", "add", "-d", "store", str(remote)], repo, env)
    _run([*DVC, "push", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run([*GIT, "commit", "-qm", "remote"], repo, env)
    shutil.rmtree(remote)
    remote.write_text("not a folder: the remote is unreachable\n")
    retrainflow = [str(Path(sys.executable).with_name("retrainflow")), "run", "--json"]

    proc = subprocess.run(retrainflow, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = _summary(proc.stdout)
    assert summary["status"] == "promoted" and summary["dvc_committed"], summary
    assert summary["dvc_pushed"] is False and summary["dvc_not_pushed_because"], summary
    assert "not pushed to the DVC remote" in proc.stdout + proc.stderr
    assert _status(repo, env) == {}  # dvc.lock agrees with the workspace
    (cand,) = read_registry(Layout(repo)).candidates
    model = champion_model(Layout(repo), cand.id).read_bytes()
    assert cand.promoted and hashlib.sha256(model).hexdigest() == cand.model_sha256

    remote.unlink()  # the remote is back (empty: DVC creates the folder)
    proc = subprocess.run(retrainflow, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = _summary(proc.stdout)
    assert summary["status"] == "skipped" and summary["dvc_pushed"] is True, summary
    candidate = (repo / "models" / "candidate" / "model.keras").read_bytes()
    assert _md5_in_remote(remote, candidate).is_file()  # the outputs reached the remote
    assert _status(repo, env) == {}


def test_tree_fingerprint_sees_added_removed_and_rewritten_files(tmp_path: Path) -> None:
    from flows.dvc_ops import tree_fingerprint

    folder = tmp_path / "images"
    (folder / "red").mkdir(parents=True)
    (folder / "red" / "a.png").write_bytes(b"a")
    first = tree_fingerprint(folder)
    assert first == tree_fingerprint(folder) and len(first) == 64  # stable while nothing changes
    (folder / "blue").mkdir()
    assert tree_fingerprint(folder) == first  # an empty folder holds no data (DVC hashes files)
    (folder / "blue" / "b.png").write_bytes(b"b")
    added = tree_fingerprint(folder)
    assert added != first
    os.utime(folder / "blue" / "b.png", ns=(1, 1))  # same bytes, touched: DVC would rehash it too
    assert tree_fingerprint(folder) != added
    (folder / "blue" / "b.png").unlink()
    assert tree_fingerprint(folder) == first
    assert tree_fingerprint(tmp_path / "missing") == ""


@pytest.mark.slow
def test_images_added_during_a_run_are_not_committed_as_indexed(
    dvc_repo: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch, imagegen
) -> None:
    """An image dropped in while a run is past its index stage: DVC would hash it into the index stage's deps at
    `dvc commit`, and the next run would find the index up to date and never index it. The run leaves the index
    uncommitted instead; the next run indexes the new image and leaves `dvc status` clean."""
    import flows.flows as flows_module
    from tasks.data.index_table import read_index

    repo, env = dvc_repo
    new_image = imagegen.encode(imagegen.coloured_image((20, 20, 220), size=32, seed=777), "PNG")
    real_index = flows_module.STAGE_TASKS["index"]

    def index_then_an_image_arrives(params, layout):  # noqa: ANN001, ANN202 - same signature as the stage task
        manifest = real_index(params, layout)
        (repo / "data" / "images" / "blue" / "arrived_late.png").write_bytes(new_image)
        return manifest

    monkeypatch.setitem(flows_module.STAGE_TASKS, "index", index_then_an_image_arrives)
    first = _retrain(repo, env)
    assert first["ran"] == list(STAGES) and first["data_changed_during_run"] is True
    assert len(read_index(Layout(repo))) == 20  # the index ran before the image arrived
    assert set(_status(repo, env)) == {"index", "data.dvc"}  # stale, as it is: the next run must index it
    monkeypatch.setitem(flows_module.STAGE_TASKS, "index", real_index)

    second = _retrain(repo, env)
    assert second["dvc_sync"]["record"] == ["data.dvc"] and second["data_changed_during_run"] is False
    assert "index" in second["ran"] and second["status"] != "skipped"
    index = read_index(Layout(repo))
    assert len(index) == 21 and hashlib.sha256(new_image).hexdigest() in set(index["sha256"])
    assert _status(repo, env) == {}


def _experiments(shown: list[dict]) -> dict[str, dict]:
    """``dvc exp show --json``: experiment name -> its data (params, metrics), for the baseline's experiments."""
    found: dict[str, dict] = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                found[rev.get("name") or rev["rev"]] = rev.get("data") or {}
    return found


def _wait_for_queue(repo: Path, env: dict[str, str], timeout: float = 900) -> str:
    """Poll `dvc queue status` until nothing is queued or running; its last output."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _run([*DVC, "queue", "status"], repo, env)
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        time.sleep(2)
    raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}")


@pytest.mark.slow
def test_queued_experiments_run_in_parallel_and_share_the_feature_cache(
    dvc_repo: tuple[Path, dict[str, str]],
) -> None:
    """`dvc exp run --queue -S top.lr=...` twice, then `dvc queue start -j 2`: DVC runs each in its own copy of
    the repo (.dvc/tmp/exps/...), two at once; both read the origin's feature cache (0 features computed, not one
    shard added), the workspace's registry and cache stay as they were, and `dvc exp show` lists both."""
    repo, env = dvc_repo
    first = _retrain(repo, env)
    assert first["dvc_committed"]
    _run(["git", "add", "-A"], repo, env)
    _run([*GIT, "commit", "-qm", "run"], repo, env)
    cache_before = _tree(repo / "cache" / "features")
    registry_before = (repo / "models" / "registry.json").read_bytes()

    for lr in ("0.02", "0.05"):
        _run([*DVC, "exp", "run", "--queue", "-S", f"top.lr={lr}", "-n", f"lr-{lr}"], repo, env)
    _run([*DVC, "queue", "start", "-j", "2"], repo, env)
    status = _wait_for_queue(repo, env)
    logs = {name: _run([*DVC, "queue", "logs", name], repo, env) for name in ("lr-0.02", "lr-0.05")}
    assert len(re.findall(r"\bSuccess\b", status)) == 2, f"{status}\n{logs}"
    shown = _experiments(json.loads(_run([*DVC, "exp", "show", "--json"], repo, env)))
    assert {"lr-0.02", "lr-0.05"} <= set(shown), status
    for name, log in logs.items():
        assert _ran(log) == ["features", "train_top", "finetune", "evaluate"], log
        assert ".dvc/tmp/exps/" in log  # its own copy of the repo
        assert re.search(r"computed 0, reused \d+ \(", log), log  # the origin's cache: nothing recomputed
        data = shown[name]
        assert data["params"]["params.yaml"]["data"]["top"]["lr"] == float(name.removeprefix("lr-"))
        counts = data["metrics"]["metrics/features.json"]["data"]
        assert counts["computed"] == 0 and counts["reused"] == counts["pairs"] > 0, counts
        assert data["metrics"]["metrics/evaluate.json"]["data"]["test_count"] > 0
    spans = [_log_span(log) for log in logs.values()]
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans  # they ran at the same time
    assert _tree(repo / "cache" / "features") == cache_before
    assert (repo / "models" / "registry.json").read_bytes() == registry_before


def _log_span(log: str) -> tuple[float, float]:
    """Seconds of the day of a queued experiment's first and last Prefect log line (``HH:MM:SS.mmm | ...``)."""
    stamps = [
        int(h) * 3600 + int(m) * 60 + float(sec)
        for h, m, sec in re.findall(r"^(\d\d):(\d\d):(\d\d\.\d+) \|", log, flags=re.MULTILINE)
    ]
    assert stamps, log
    return stamps[0], stamps[-1]
