"""`retrainflow index` through the CLI: options, exit codes, and the real flowers photos end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import flows.cli.index  # noqa: F401  (registers the command on the shared app)
from flows.cli.common import app
from flows.cli.index import index_overrides, summary_line
from tasks.data.index_table import read_classes, read_index
from tasks.layout import Layout

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
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


def test_index_folder_writes_outputs_under_workdir(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=5)
    ws = tmp_path / "ws"
    result = invoke("--root", str(root), "--workdir", str(ws), "--json", "--classes", "red,blue")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["images"] == 10 and manifest["classes"] == ["red", "blue"]
    assert read_classes(Layout(ws)).names == ("red", "blue")
    assert len(read_index(Layout(ws))) == 10


def test_index_csv_option(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=3)
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
def test_dataset_errors_exit_1_with_one_clear_line(tmp_path, setup, message, imagegen):
    root = tmp_path / "imgs"
    args = ["--root", str(root), "-w", str(tmp_path / "ws")]
    if setup == "single":
        imagegen.make_class_folders(root, ["red"], per_class=3)
    elif setup == "empty":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
    else:
        imagegen.make_class_folders(root, ["red", "blue"], per_class=2)
        (tmp_path / "x.csv").write_text("file,label\nred/red_0.png,red\n")
        args += ["--csv", str(tmp_path / "x.csv")]
    result = invoke(*args)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not Layout(tmp_path / "ws").index_table.exists()


def test_index_ends_with_one_summary_line_and_draws_no_bar_for_a_few_files(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=5)
    (root / "red" / "bad.jpg").write_bytes(b"<html></html>")
    ws = tmp_path / "ws"
    result = invoke("--root", str(root), "--workdir", str(ws), "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    splits = f"{m['splits']['train']} train / {m['splits']['val']} val / {m['splits']['test']} test"
    assert lines[-1] == f"index: 10 images ({splits}), 1 rejected -> {ws / 'index' / 'index.csv'}"
    assert "index: 10 images, 2 classes (binary)" in result.stderr  # the summary table's title
    assert "red/bad.jpg: text or HTML, not an image" in result.stderr
    assert not any(line.startswith("index 0/") for line in lines)  # 11 files: below PROGRESS_MIN_FILES


def test_progress_bar_and_summary_on_a_terminal(tmp_path, monkeypatch, imagegen):
    import io

    from rich.console import Console

    out = io.StringIO()
    monkeypatch.setattr(flows.cli.index, "console", Console(file=out, force_terminal=True, width=150))
    monkeypatch.setattr(flows.cli.index, "PROGRESS_MIN_FILES", 4)
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=3)
    (root / "red" / "bad.jpg").write_bytes(b"<html></html>")
    write_junk = root / ".DS_Store"
    write_junk.write_bytes(b"\0")
    result = invoke("--root", str(root), "-w", str(tmp_path / "ws"))
    assert result.exit_code == 0, result.output
    text = out.getvalue()
    assert "7/7" in text and "img/s" in text  # flows.console's bar: done/total and a rate
    assert "index: 6 images, 2 classes (binary)" in text
    assert "red/bad.jpg: text or HTML, not an image" in text
    assert "skipped 1 file(s) (hidden file or folder: 1)" in text
    assert text.rstrip().splitlines()[-1].startswith("index: 6 images (")


def test_summary_line_names_what_was_dropped_only_when_something_was():
    from tasks.stages.run_index import IndexManifest

    base = dict(
        index_table="index/index.csv",
        classes_file="index/classes.json",
        report_file="index/index_report.json",
        images=2000,
        classes=("cats", "dogs"),
        class_mode="binary",
        splits={"train": 1367, "val": 331, "test": 302},
        rejects=0,
        skipped=0,
        duplicates=0,
        conflicts=0,
        warnings=0,
    )
    assert summary_line(IndexManifest(**base)) == (
        "index: 2000 images (1367 train / 331 val / 302 test), 0 rejected -> index/index.csv"
    )
    busy = IndexManifest(**{**base, "rejects": 3, "skipped": 2, "duplicates": 4, "conflicts": 1})
    assert summary_line(busy) == (
        "index: 2000 images (1367 train / 331 val / 302 test), 3 rejected, 2 skipped, "
        "4 duplicate(s) dropped, 1 label conflict(s) excluded -> index/index.csv"
    )


def test_readme_csv_example_with_the_csv_inside_the_image_folder(tmp_path, monkeypatch, imagegen):
    """``retrainflow index --set data.source=csv --set data.csv=labels.csv --set data.root=my_images``."""
    root = imagegen.make_class_folders(tmp_path / "my_images", ["cats", "dogs"], per_class=3)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    pd.DataFrame({"path": paths, "label": [p.split("/")[0] for p in paths]}).to_csv(
        root / "labels.csv", index=False
    )
    monkeypatch.chdir(tmp_path)
    args = ["--set", "data.source=csv", "--set", "data.csv=labels.csv", "--set", "data.root=my_images"]
    result = invoke(*args, "--set", "data.classes=dogs,cats", "-w", "ws", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 6
    assert read_classes(Layout(tmp_path / "ws")).names == ("dogs", "cats")


def test_missing_root_and_override_typos_say_what_is_wrong(tmp_path):
    result = invoke("--root", str(tmp_path / "nope"), "-w", str(tmp_path / "ws"))
    assert result.exit_code == 1
    assert f"error: data.root: folder does not exist, got {str(tmp_path / 'nope')!r}" in result.stderr
    result = invoke("--set", "data.clases=a,b", "-w", str(tmp_path / "ws"))
    assert result.exit_code == 2
    assert "invalid --set override:" in result.stderr
    assert "data.clases: unknown key, got 'a,b'; did you mean 'data.classes'?" in result.stderr


def test_bad_params_exit_2(tmp_path):
    result = invoke("--set", "data.split.train=2", "-w", str(tmp_path))
    assert result.exit_code == 2
    assert "data.split.train" in result.stderr


@pytest.mark.slow
@pytest.mark.shared
def test_index_flowers_end_to_end(tmp_path, shared_path):
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
