"""Security (issue 7 item 2): a static scan of ``tasks/`` and ``flows/``, local-only servers, confined CSV paths.

The AST scan finds: ``exec``/``eval`` calls, any pickle-family import or load (``pickle``, ``dill``, ``joblib``,
``shelve``, ``marshal``), ``allow_pickle=True``, ``yaml.load``/``unsafe_load``, ``shell=True`` subprocesses, and
every ``load_model`` call that does not pass ``safe_mode=True``. A planted sample proves the scanner finds them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pandas as pd
import pytest

SCANNED = ("tasks", "flows")
PICKLE_MODULES = frozenset(
    {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}
)


def _name(node: ast.AST) -> str:
    """Dotted name of a call target (``np.load``, ``keras.saving.load_model``, ``eval``)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def _kw_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords
    )


def scan_source(source: str, where: str) -> list[str]:
    """Every security finding in one module's source, as ``where:line: what``."""
    findings: list[str] = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for mod in mods:
                if mod.split(".")[0] in PICKLE_MODULES:
                    findings.append(f"{where}:{line}: imports {mod}")
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in ("exec", "eval", "builtins.exec", "builtins.eval"):
            findings.append(f"{where}:{line}: calls {name}()")
        if name.split(".")[0] in PICKLE_MODULES:
            findings.append(f"{where}:{line}: calls {name}()")
        if _kw_is(node, "allow_pickle", True):
            findings.append(f"{where}:{line}: {name}(allow_pickle=True)")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            findings.append(f"{where}:{line}: {name}() (use yaml.safe_load)")
        if _kw_is(node, "shell", True):
            findings.append(f"{where}:{line}: {name}(shell=True)")
        if last == "load_model" and not _kw_is(node, "safe_mode", True):
            findings.append(f"{where}:{line}: {name}() without safe_mode=True")
        if last in ("read_pickle", "from_pickle"):
            findings.append(f"{where}:{line}: calls {name}()")
    return findings


def project_modules(project_root: Path) -> list[Path]:
    files = sorted(p for d in SCANNED for p in (project_root / d).rglob("*.py"))
    assert len(files) >= 10, f"expected the project's modules under {SCANNED}, found {files}"
    return files


def test_scanner_finds_planted_problems() -> None:
    planted = """
import pickle
from joblib import load
import numpy as np, yaml, subprocess, keras
eval("1")
exec("x = 1")
np.load("a.npy", allow_pickle=True)
yaml.load(open("p"))
subprocess.run("ls", shell=True)
keras.saving.load_model("m.keras")
keras.models.load_model("m.keras", safe_mode=False)
keras.saving.load_model("m.keras", safe_mode=True)
"""
    found = scan_source(planted, "planted.py")
    kinds = " | ".join(found)
    for needle in (
        "imports pickle",
        "imports joblib",
        "calls eval()",
        "calls exec()",
        "allow_pickle=True",
        "yaml.load()",
        "shell=True",
    ):
        assert needle in kinds, f"scanner missed {needle!r}: {found}"
    assert sum("without safe_mode=True" in f for f in found) == 2, found


def test_no_exec_eval_pickle_or_unsafe_model_loading_in_the_project(project_root) -> None:
    findings = []
    for path in project_modules(project_root):
        findings += scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(project_root)))
    assert findings == [], "security findings:\n" + "\n".join(findings)


def test_every_load_model_call_passes_safe_mode(project_root) -> None:
    """At least one model loader exists, and each one asks for Keras' safe mode."""
    calls = []
    for path in project_modules(project_root):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _name(node.func).endswith("load_model"):
                calls.append((path.name, node.lineno, _kw_is(node, "safe_mode", True)))
    assert calls, "expected the project to load .keras models somewhere (heads / train_top)"
    assert all(ok for _, _, ok in calls), calls


def test_servers_listen_on_localhost_by_default(project_root) -> None:
    """No wildcard address anywhere in the code, Makefile or Prefect config; the dashboard defaults to 127.0.0.1."""
    texts = {p: p.read_text(encoding="utf-8") for p in project_modules(project_root)}
    for extra in ("Makefile", "prefect.yaml", "params.yaml"):
        if (project_root / extra).is_file():
            texts[project_root / extra] = (project_root / extra).read_text(encoding="utf-8")
    wildcard = [str(p) for p, t in texts.items() if re.search(r"0\.0\.0\.0|host\s*=\s*['\"]::['\"]", t)]
    assert wildcard == [], f"listening on every interface in {wildcard}"

    import inspect

    from flows.cli.orchestrate import dashboard_cmd

    host = inspect.signature(dashboard_cmd).parameters["host"].default
    assert host in ("127.0.0.1", "localhost"), host
    # `retrainflow serve` runs flow.serve(): no webserver of its own unless asked; Prefect's default is local.
    from prefect.settings import PREFECT_RUNNER_SERVER_HOST

    assert PREFECT_RUNNER_SERVER_HOST.value() in ("localhost", "127.0.0.1")
    deploy = (project_root / "flows" / "deploy.py").read_text(encoding="utf-8")
    assert "webserver=True" not in deploy


def test_csv_paths_are_confined_to_the_data_root(tmp_path: Path, imagegen, tiny_params) -> None:
    """``..``, absolute paths elsewhere and symlinks out are rejected with a reason; none reaches the index."""
    from tasks.layout import Layout
    from tasks.stages.run_index import run_index

    root = imagegen.make_class_folders(tmp_path / "data", ["red", "blue"], per_class=4, size=32)
    outside = imagegen.make_class_folders(tmp_path / "secret", ["red"], per_class=2, size=32)
    (root / "red" / "escape.png").symlink_to(outside / "red" / "red_0.png")
    rows = [(f"{c}/{c}_{i}.png", c) for c in ("red", "blue") for i in range(4)]
    evil = [
        ("../secret/red/red_1.png", "red"),
        (str((outside / "red" / "red_0.png").resolve()), "red"),
        ("red/../../secret/red/red_1.png", "blue"),
        ("red/escape.png", "red"),
        ("/etc/passwd", "blue"),
    ]
    frame = pd.DataFrame(rows + evil, columns=["path", "label"])
    layout = Layout(tmp_path / "work")
    manifest = run_index(tiny_params(root), layout, dataframe=frame)
    from tasks.data.index_table import read_index

    table = read_index(layout)
    assert manifest.images == 8 and len(table) == 8
    assert not any(".." in p or p.startswith("/") or "escape" in p for p in table["path"])
    report = pd.read_json(layout.index_report, typ="series")
    kinds = {r["path"]: r["kind"] for r in report["rejects"]}
    assert kinds["../secret/red/red_1.png"] == "outside_root"
    assert kinds["/etc/passwd"] == "outside_root"
    assert kinds["red/escape.png"] in ("outside_root", "symlink")
    assert sum(k == "outside_root" for k in kinds.values()) >= 4, kinds


@pytest.mark.parametrize("follow", [False, True])
def test_directory_symlink_out_of_root_never_indexed(
    tmp_path: Path, follow: bool, imagegen, tiny_params
) -> None:
    from tasks.data.indexing import build_index

    root = imagegen.make_class_folders(tmp_path / "data", ["red", "blue"], per_class=3, size=32)
    outside = imagegen.make_class_folders(tmp_path / "secret", ["green"], per_class=2, size=32)
    (root / "blue" / "leak").symlink_to(outside / "green", target_is_directory=True)
    params = tiny_params(root, data={"follow_symlinks": follow})
    result = build_index(root, params.data)
    assert len(result.table) == 6
    assert not any("leak" in p for p in result.table["path"])
    assert any(r["path"] == "blue/leak" for r in result.report["rejects"])
