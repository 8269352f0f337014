"""`retrainflow index` through the CLI: options, exit codes, and the real flowers photos end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import shared_path
from imagegen import make_class_folders
from typer.testing import CliRunner

import flows.cli_index  # noqa: F401  (registers the command on the shared app)
from flows.cli_common import app
from flows.cli_index import index_overrides
from tasks.index import read_classes, read_index
from tasks.layout import Layout

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["index", "--params", str(PARAMS), *args])


def test_help_explains_every_option():
    result = runner.invoke(app, ["index", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--params", "--set", "--workdir", "--root", "--csv", "--classes", "--workers", "--json"):
        assert option in result.output
    assert "Exit codes" in result.output


def test_overrides_are_yaml_safe():
    assert index_overrides(Path("yes"), None, None, None) == ['data.root="yes"']
    assert index_overrides(None, Path("a b.csv"), "cats, dogs", 3) == [
        "data.source=csv",
        'data.csv="a b.csv"',
        'data.classes=["cats", "dogs"]',
        "data.workers=3",
    ]


def test_index_folder_writes_outputs_under_workdir(tmp_path):
    root = make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=5)
    ws = tmp_path / "ws"
    result = invoke("--root", str(root), "--workdir", str(ws), "--json", "--classes", "red,blue")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["images"] == 10 and manifest["classes"] == ["red", "blue"]
    assert read_classes(Layout(ws)).names == ("red", "blue")
    assert len(read_index(Layout(ws))) == 10


def test_index_csv_option(tmp_path):
    root = make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=3)
    csv = tmp_path / "files.csv"
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    pd.DataFrame(
        {"path": paths + ["../escape.png"], "label": [p.split("/")[0] for p in paths] + ["red"]}
    ).to_csv(csv, index=False)
    ws = tmp_path / "ws"
    result = invoke("--root", str(root), "--csv", str(csv), "-w", str(ws))
    assert result.exit_code == 0, result.output
    report = json.loads(Layout(ws).index_report.read_text())
    assert report["source"] == "csv" and report["images"] == 6
    assert report["rejects"][0]["path"] == "../escape.png"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("single", "only one class"),
        ("empty", "no valid images"),
        ("columns", "missing column(s)"),
    ],
)
def test_dataset_errors_exit_1_with_one_clear_line(tmp_path, setup, message):
    root = tmp_path / "imgs"
    args = ["--root", str(root), "-w", str(tmp_path / "ws")]
    if setup == "single":
        make_class_folders(root, ["red"], per_class=3)
    elif setup == "empty":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
    else:
        make_class_folders(root, ["red", "blue"], per_class=2)
        (tmp_path / "x.csv").write_text("file,label\nred/red_0.png,red\n")
        args += ["--csv", str(tmp_path / "x.csv")]
    result = invoke(*args)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not Layout(tmp_path / "ws").index_table.exists()


def test_bad_params_exit_2(tmp_path):
    result = invoke("--set", "data.split.train=2", "-w", str(tmp_path))
    assert result.exit_code == 2
    assert "data.split.train" in result.stderr


@pytest.mark.slow
@pytest.mark.shared
def test_index_flowers_end_to_end(tmp_path):
    """The real photos: 5 classes, the 4 rose/tulip byte-identical conflicts excluded (all 8 copies), the 2
    duplicate pairs inside sunflower collapsed to one copy each."""
    flowers = shared_path("datasets", "flowers")
    total = sum(1 for p in flowers.rglob("*") if p.is_file())
    ws = tmp_path / "ws"
    result = invoke("--root", str(flowers), "--workdir", str(ws), "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["classes"] == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert manifest["class_mode"] == "categorical"
    report = json.loads(Layout(ws).index_report.read_text())
    conflicts = report["conflicts"]
    assert len(conflicts) == 4
    excluded = {p for c in conflicts for p in c["paths"]}
    assert len(excluded) == 8
    assert all(c["labels"] == ["rose", "tulip"] for c in conflicts)
    assert len(report["duplicates"]) == 2
    assert all(d["label"] == "sunflower" and len(d["dropped"]) == 1 for d in report["duplicates"])
    table = read_index(Layout(ws))
    assert excluded.isdisjoint(set(table["path"]))
    assert table["sha256"].is_unique
    assert len(table) == total - 8 - 2 == manifest["images"]
    assert report["rejects"] == []
    assert not any(Path(p).is_absolute() for p in table["path"])
