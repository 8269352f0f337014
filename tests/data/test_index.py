"""The index stage: sources, bad files, duplicates and conflicts, stable splits, path safety, outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tasks.config import DataConfig, Params, SplitFractions
from tasks.data.index_table import COLUMNS, ClassInfo, read_classes, read_index
from tasks.data.indexing import assign_split, build_index
from tasks.errors import DatasetError
from tasks.layout import Layout
from tasks.progress import Step
from tasks.stages.run_index import run_index


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(root=root, workers=2, **kw)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def reject_reasons(result) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in result.report["rejects"]}


# ---------------------------------------------------------------------------------------------- split rule
def test_assign_split_is_stable_and_follows_fractions():
    fr = SplitFractions(train=0.7, val=0.15, test=0.15)
    hashes = [f"{i:064x}" for i in range(3000)]
    first = [assign_split(h, fr, 0) for h in hashes]
    assert first == [assign_split(h, fr, 0) for h in hashes]
    share = {s: first.count(s) / len(first) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.7) < 0.04 and abs(share["val"] - 0.15) < 0.03
    other_seed = [assign_split(h, fr, 1) for h in hashes]
    assert other_seed != first


def test_assign_split_validates_arguments():
    fr = SplitFractions()
    with pytest.raises(ValueError, match="got 'abc'"):
        assign_split("abc", fr, 0)
    with pytest.raises(ValueError, match="got -1"):
        assign_split("0" * 64, fr, -1)


def test_split_stability_when_20_percent_new_images_are_added(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=20)
    before = build_index(root, cfg(root)).table.set_index("sha256")["split"]
    imagegen.make_class_folders(tmp_path / "more", ["red", "blue"], per_class=4, seed=7)
    for f in (tmp_path / "more").rglob("*.png"):
        shutil.copy(f, root / f.parent.name / f"new_{f.name}")
    after = build_index(root, cfg(root)).table.set_index("sha256")["split"]
    assert len(after) == 48
    assert (after.loc[before.index] == before).all()  # no existing image moved


# ---------------------------------------------------------------------------------------------- directory
def test_directory_source_outputs_and_readers(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue", "green"], per_class=8)
    write(
        root / "red" / "nested" / "deeper" / "deep red.png",
        (root / "red" / "red_0.png").read_bytes()[:-1] + b"",
    )
    imagegen.coloured_image((200, 0, 0), seed=99).save(
        root / "red" / "nested" / "deeper" / "ünïcode näme.png"
    )
    layout = Layout(tmp_path / "ws")
    params = Params(data=cfg(root))
    manifest = run_index(params, layout)
    table = read_index(layout)
    assert list(table.columns) == list(COLUMNS)
    assert list(table["path"]) == sorted(table["path"])
    assert "red/nested/deeper/ünïcode näme.png" in set(table["path"])
    assert not any(p.startswith("/") or "\\" in p for p in table["path"])
    classes = read_classes(layout)
    assert classes == ClassInfo(("blue", "green", "red"), "categorical") and classes.num_classes == 3
    assert (table["class_id"] == table["label"].map({"blue": 0, "green": 1, "red": 2})).all()
    assert manifest.images == len(table) == 25
    report = json.loads(layout.index_report.read_text())
    assert report["counts"]["red"]["total"] == 9
    assert manifest.rejects == 1 and report["rejects"][0]["path"] == "red/nested/deeper/deep red.png"
    assert not list(layout.index_dir.glob("*.tmp"))  # atomic writes leave no temp files


def test_binary_mode_for_two_classes_and_explicit_class_order(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=6)
    result = build_index(root, cfg(root, classes=("red", "blue")))
    assert result.classes == ClassInfo(("red", "blue"), "binary")
    assert set(result.table.loc[result.table["label"] == "red", "class_id"]) == {0}


def test_label_not_in_explicit_classes_is_a_reject_not_silently_dropped(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue", "green"], per_class=4)
    result = build_index(root, cfg(root, classes=("red", "blue")))
    reasons = reject_reasons(result)
    assert len(reasons) == 4 and all("'green' is not in data.classes" in r for r in reasons.values())
    assert set(result.table["label"]) == {"red", "blue"}


def test_bad_files_are_rejected_with_reasons_and_never_indexed(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=4)
    for name, data in imagegen.bad_image_files().items():
        write(root / "red" / name, data)
    result = build_index(root, cfg(root, max_pixels=1_000_000))
    reasons = reject_reasons(result)
    assert set(reasons) == {f"red/{n}" for n in imagegen.bad_image_files()}
    assert "empty file" in reasons["red/zero_bytes.jpg"]
    assert "text or HTML" in reasons["red/page.jpg"]
    assert "TensorFlow cannot decode" in reasons["red/truncated.png"]
    assert "max_pixels" in reasons["red/bomb.png"]
    assert not set(result.table["path"]) & set(reasons)
    assert result.report["rejects_by_kind"]["empty"] == 1


def test_odd_valid_files_are_indexed_with_upright_sizes(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=3)
    for name, data in imagegen.good_odd_image_files().items():
        write(root / "blue" / name, data)
    result = build_index(root, cfg(root))
    assert result.report["rejects"] == []
    table = result.table.set_index("path")
    rotated = table.loc["blue/rotated.jpg"]
    assert (rotated["width"], rotated["height"], rotated["orientation"]) == (24, 32, 6)
    assert table.loc["blue/one_pixel.png", "width"] == 1
    assert table.loc["blue/still.webp", "format"] == "WEBP"
    assert table.loc["blue/cmyk.jpg", "format"] == "JPEG"


def test_decompression_bomb_uses_the_configured_limit(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=2, size=40)
    imagegen.make_class_folders(tmp_path / "small", ["red", "blue"], per_class=2, size=32, seed=1)
    for f in (tmp_path / "small").rglob("*.png"):
        shutil.copy(f, root / f.parent.name / f"small_{f.name}")
    result = build_index(root, cfg(root, max_pixels=1599))  # 40 x 40 = 1600 pixels: over the limit
    assert result.report["rejects_by_kind"] == {"too_large": 4}
    assert set(result.table["width"]) == {32}
    with pytest.raises(DatasetError, match=r"no valid images.*too_large: 8"):
        build_index(root, cfg(root, max_pixels=1000))


def test_hidden_junk_and_stray_files_are_skipped_and_reported(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=3)
    write(root / "red" / ".DS_Store", b"\0junk")
    write(root / "blue" / "Thumbs.db", b"\0junk")
    write(root / ".hidden_class" / "x.png", (root / "red" / "red_0.png").read_bytes())
    write(root / "README.txt", b"hello")
    (root / "__MACOSX").mkdir()
    result = build_index(root, cfg(root))
    skipped = {s["path"]: s["reason"] for s in result.report["skipped"]}
    assert set(skipped) == {"red/.DS_Store", "blue/Thumbs.db", ".hidden_class", "README.txt", "__MACOSX"}
    assert result.classes.names == ("blue", "red")
    assert len(result.table) == 6


def test_symlinks_not_followed_by_default_loops_do_not_hang_and_never_leave_root(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=3)
    outside = write(tmp_path / "outside.png", (root / "red" / "red_0.png").read_bytes()[::-1])
    imagegen.coloured_image((1, 2, 3), seed=5).save(outside)
    os.symlink(outside, root / "red" / "escape.png")
    os.symlink(root / "red", root / "red" / "loop")  # a loop back to its own folder
    os.symlink(root / "blue" / "blue_0.png", root / "red" / "inside_link.png")
    os.symlink(root / "blue", root / "zz_blue_again")  # a second link to a class folder: not a new class

    result = build_index(root, cfg(root))
    reasons = reject_reasons(result)
    assert "data.follow_symlinks is false" in reasons["red/escape.png"]
    assert "data.follow_symlinks is false" in reasons["red/loop"]
    assert len(result.table) == 6

    result = build_index(root, cfg(root, follow_symlinks=True))
    reasons = reject_reasons(result)
    assert "outside the data root" in reasons["red/escape.png"]
    skipped = {s["path"]: s["reason"] for s in result.report["skipped"]}
    assert "symlink loop" in skipped["red/loop"]
    assert "second link" in skipped["zz_blue_again"]
    assert result.classes.names == ("blue", "red")
    # the in-root link has the bytes of blue_0.png under another label: a conflict, both excluded
    assert result.report["conflicts"][0]["paths"] == {"blue/blue_0.png": "blue", "red/inside_link.png": "red"}


def test_duplicates_collapse_and_conflicts_exclude_every_copy(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=5)
    shutil.copy(root / "red" / "red_1.png", root / "red" / "zz_copy_of_red_1.png")
    (root / "red" / "sub").mkdir()
    shutil.copy(root / "red" / "red_1.png", root / "red" / "sub" / "another.png")
    shutil.copy(root / "red" / "red_2.png", root / "blue" / "mislabelled.png")
    result = build_index(root, cfg(root))
    paths = set(result.table["path"])
    dup = result.report["duplicates"]
    assert dup == [
        {
            "sha256": dup[0]["sha256"],
            "label": "red",
            "kept": "red/red_1.png",
            "dropped": ["red/sub/another.png", "red/zz_copy_of_red_1.png"],
        }
    ]
    assert "red/red_1.png" in paths and "red/zz_copy_of_red_1.png" not in paths
    assert {"red/red_2.png", "blue/mislabelled.png"}.isdisjoint(paths)
    assert result.report["conflicts"][0]["labels"] == ["blue", "red"]
    assert len(result.table) == 10 - 1


def test_empty_class_single_class_and_no_images_are_errors(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "a", ["red", "blue"], per_class=3)
    (root / "green").mkdir()
    write(root / "green" / "broken.jpg", b"not an image")
    with pytest.raises(DatasetError, match=r"no valid image: \['green'\]"):
        build_index(root, cfg(root))
    single = imagegen.make_class_folders(tmp_path / "b", ["red"], per_class=3)
    with pytest.raises(DatasetError, match="only one class"):
        build_index(single, cfg(single))
    (tmp_path / "c" / "red").mkdir(parents=True)
    (tmp_path / "c" / "blue").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no valid images"):
        build_index(tmp_path / "c", cfg(tmp_path / "c"))
    with pytest.raises(DatasetError, match="data.root"):
        build_index(tmp_path / "missing", cfg(tmp_path / "missing"))
    three = imagegen.make_class_folders(tmp_path / "d", ["red", "blue", "green"], per_class=2)
    with pytest.raises(DatasetError, match="needs exactly 2 classes, got 3"):
        build_index(three, cfg(three, class_mode="binary"))


def test_small_class_warns(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", {"red": 30, "blue": 2})
    result = build_index(root, cfg(root, min_per_split=2))
    assert any("class 'blue'" in w and "data.min_per_split=2" in w for w in result.report["warnings"])


# ---------------------------------------------------------------------------------------------- CSV/DataFrame
def test_csv_source_with_configured_columns_and_every_bad_row(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=4)
    (tmp_path / "secret.png").write_bytes((root / "red" / "red_0.png").read_bytes())
    os.symlink(tmp_path / "secret.png", root / "red" / "link_out.png")
    rows = [(f"red/red_{i}.png", "warm") for i in range(4)] + [
        (f"blue/blue_{i}.png", "cold") for i in range(4)
    ]
    rows += [
        ("red/red_0.png", "warm"),  # duplicate row
        ("blue/blue_3.png", "warm"),  # the same path under another label
        ("red/missing.png", "warm"),
        ("../secret.png", "warm"),
        (str(tmp_path / "secret.png"), "warm"),
        (str(root / "red" / "red_1.png"), "warm"),  # absolute but inside the root: fine
        ("red/link_out.png", "warm"),
        ("", "warm"),
        ("red/red_2.png", " "),
        ("red/../../imgs/red/red_3.png", "warm"),  # leaves and re-enters: normalised, inside
    ]
    csv = tmp_path / "list.csv"
    pd.DataFrame(rows, columns=["file", "cls"]).to_csv(csv, index=False)
    result = build_index(csv, cfg(root, source="csv", csv=csv, path_column="file", label_column="cls"))
    reasons = reject_reasons(result)
    assert reasons["red/missing.png"] == "file not found"
    assert "leaves the data root" in reasons["../secret.png"]
    assert "leaves the data root" in reasons[str(tmp_path / "secret.png")]
    assert "outside the data root" in reasons["red/link_out.png"]
    assert "blank path" in reasons["<row 17>"] and "blank label" in reasons["red/red_2.png"]
    assert result.report["duplicate_rows"][0]["path"] == "red/red_0.png"
    assert result.report["conflicts"] == [
        {"kind": "path", "path": "blue/blue_3.png", "labels": ["cold", "warm"], "rows": [9, 11]}
    ]
    assert sorted(result.table["path"]) == [
        "blue/blue_0.png",
        "blue/blue_1.png",
        "blue/blue_2.png",
        "red/red_0.png",
        "red/red_1.png",
        "red/red_2.png",  # its blank-label row is rejected; its first row is fine
        "red/red_3.png",
    ]
    assert result.classes.names == ("cold", "warm")


def test_csv_missing_columns_and_missing_file(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=2)
    csv = tmp_path / "bad.csv"
    csv.write_text("filename,label\nred/red_0.png,red\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['path'\].*'filename'"):
        build_index(csv, cfg(root, source="csv", csv=csv))
    params = Params(data=cfg(root, source="csv", csv=tmp_path / "nope.csv"))
    with pytest.raises(DatasetError, match="data.csv: file not found"):
        run_index(params, Layout(tmp_path / "ws"))


def test_dataframe_source_through_run_index(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=3)
    (root / "red" / "rot.jpg").write_bytes(imagegen.exif_rotated_jpeg(8))
    frame = pd.DataFrame(
        {"path": [p.relative_to(root).as_posix() for p in sorted(root.rglob("*.*"))]}
    ).assign(label=lambda d: d["path"].str.split("/").str[0])
    layout = Layout(tmp_path / "ws")
    manifest = run_index(Params(data=cfg(root)), layout, dataframe=frame)
    assert manifest.images == 7 and manifest.class_mode == "binary"
    table = read_index(layout).set_index("path")
    assert table.loc["red/rot.jpg", "orientation"] == 8
    assert json.loads(layout.index_report.read_text())["source"] == "dataframe"


def test_readers_explain_a_missing_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="retrainflow index"):
        read_index(Layout(tmp_path))
    with pytest.raises(FileNotFoundError, match="retrainflow index"):
        read_classes(Layout(tmp_path))


def test_non_utf8_file_name_is_rejected_not_fatal(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=3)
    bad_name = os.path.join(os.fsencode(root / "red"), b"caf\xe9.png")
    with open(bad_name, "wb") as handle:
        handle.write((root / "red" / "red_0.png").read_bytes()[::-1])
    layout = Layout(tmp_path / "ws")
    manifest = run_index(Params(data=cfg(root)), layout)
    report = json.loads(layout.index_report.read_text(encoding="utf-8"))
    assert manifest.images == 6
    assert [r["kind"] for r in report["rejects"]] == ["bad_name"]


def test_csv_with_byte_order_mark(tmp_path, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=2)
    csv = tmp_path / "bom.csv"
    lines = ["path,label"] + [f"{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(2)]
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    result = build_index(csv, cfg(root, source="csv", csv=csv))
    assert len(result.table) == 4


def test_run_index_reports_progress_steps_and_prints_nothing(tmp_path, capsys, imagegen):
    root = imagegen.make_class_folders(tmp_path / "imgs", ["red", "blue"], per_class=3)
    (root / "red" / "bad.jpg").write_bytes(b"<html></html>")
    steps: list[Step] = []
    manifest = run_index(Params(data=cfg(root)), Layout(tmp_path / "ws"), progress=steps.append)
    assert manifest.images == 6 and manifest.rejects == 1
    assert steps[0] == Step("index", 0, 7, "img")
    assert steps[-1] == Step("index", 7, 7, "img", final=True)
    assert [s.final for s in steps].count(True) == 1
    assert [s.done for s in steps] == sorted(s.done for s in steps)
    assert {(s.task, s.total, s.unit) for s in steps} == {("index", 7, "img")}
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # display is the CLI's


def test_progress_steps_are_throttled_to_one_percent_or_a_fifth_of_a_second(monkeypatch):
    import tasks.data.indexing

    clock = [100.0]
    monkeypatch.setattr(tasks.data.indexing.time, "monotonic", lambda: clock[0])
    steps: list[Step] = []
    advance = tasks.data.indexing._progress_counter(steps.append, 1000)
    for _ in range(1000):  # a fast run: the clock stands still
        advance(1)
    assert [s.done for s in steps] == list(range(10, 1001, 10))  # every 1 %
    assert steps[-1].final and not any(s.final for s in steps[:-1])
    steps.clear()
    advance = tasks.data.indexing._progress_counter(steps.append, 1000)
    for _ in range(5):  # a slow run: 0.25 s per image, each one is shown
        clock[0] += 0.25
        advance(1)
    assert [s.done for s in steps] == [1, 2, 3, 4, 5]
    steps.clear()
    advance = tasks.data.indexing._progress_counter(steps.append, 1000)
    for _ in range(5):  # 0.125 s per image: every other one
        clock[0] += 0.125
        advance(1)
    assert [s.done for s in steps] == [2, 4]


def test_no_progress_listener_is_fine_and_an_empty_scan_closes_at_once(tmp_path):
    root = tmp_path / "imgs"
    (root / "red").mkdir(parents=True)
    (root / "blue").mkdir()
    steps: list[Step] = []
    with pytest.raises(DatasetError, match="no valid images"):
        build_index(root, cfg(root), progress=steps.append)
    assert steps == [Step("index", 0, 0, "img", final=True)]


# ------------------------------------------------------------------------------------- newcomer messages
def test_data_root_that_does_not_exist_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as err:
        build_index(Path("my_images"), cfg(Path("my_images")))
    assert str(err.value) == f"data.root: folder does not exist, got 'my_images' ({tmp_path / 'my_images'})"
    with pytest.raises(DatasetError, match="data.root: folder does not exist"):
        run_index(Params(data=cfg(tmp_path / "nowhere")), Layout(tmp_path / "ws"))


def test_data_root_that_is_a_file_or_has_no_class_folders_says_why(tmp_path, imagegen):
    a_file = write(tmp_path / "notes.txt", b"hello")
    with pytest.raises(DatasetError) as err:
        run_index(Params(data=cfg(a_file)), Layout(tmp_path / "ws"))
    assert str(err.value) == (
        f"data.root: expected a folder with one subfolder per class, got {str(a_file)!r} "
        "(it is a file, not a folder)"
    )
    flat = imagegen.make_class_folders(tmp_path / "flat", ["red"], per_class=4)
    for f in (flat / "red").iterdir():
        f.rename(flat / f.name)
    (flat / "red").rmdir()
    write(flat / ".DS_Store", b"\0")
    with pytest.raises(DatasetError) as err:
        build_index(flat, cfg(flat))
    message = str(err.value)
    assert message.startswith(f"data.root: expected a folder with one subfolder per class, got {str(flat)!r}")
    assert "it has no class subfolders" in message
    assert (
        "file at the top level, not inside a class folder: 4, e.g. 'red_0.png', 'red_1.png', 'red_2.png'"
        in (message)
    )
    assert "hidden file or folder: 1, e.g. '.DS_Store'" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"subfolder per class, got '.*empty' \(it is empty\)"):
        build_index(tmp_path / "empty", cfg(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="folder does not exist"):
        build_index(pd.DataFrame({"path": ["a.png"], "label": ["a"]}), cfg(tmp_path / "gone"))


def test_no_valid_images_says_why_each_file_was_skipped_or_rejected(tmp_path):
    root = tmp_path / "imgs"
    for name in (".a.png", ".b.png", "Thumbs.db"):
        write(root / "red" / name, b"\0")
    write(root / "blue" / "page.jpg", b"<html></html>")
    with pytest.raises(DatasetError) as err:
        build_index(root, cfg(root))
    message = str(err.value)
    assert "1 rejected - not_image: 1, e.g. 'blue/page.jpg'" in message
    assert (
        "3 skipped - hidden file or folder: 2, e.g. 'red/.a.png', 'red/.b.png'; OS junk file: 1, e.g. "
        in (message)
    )
    assert "\n" not in message


# --------------------------------------------------------------------------------------- where data.csv is
def _csv_inside_root(tmp_path: Path, imagegen) -> Path:
    root = imagegen.make_class_folders(tmp_path / "my_images", ["red", "blue"], per_class=2)
    lines = ["path,label"] + [f"{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(2)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_relative_csv_is_found_inside_data_root(tmp_path, monkeypatch, imagegen):
    """The README's ``--set data.csv=labels.csv --set data.root=my_images``: the CSV is in the image folder."""
    _csv_inside_root(tmp_path, imagegen)
    monkeypatch.chdir(tmp_path)
    params = Params(data=cfg(Path("my_images"), source="csv", csv=Path("labels.csv")))
    manifest = run_index(params, Layout(tmp_path / "ws"))
    assert manifest.images == 4
    assert json.loads(Layout(tmp_path / "ws").index_report.read_text())["source"] == "csv"


def test_relative_csv_in_the_current_folder_comes_first(tmp_path, monkeypatch, imagegen):
    _csv_inside_root(tmp_path, imagegen)
    (tmp_path / "labels.csv").write_text("path,label\nred/red_0.png,red\nblue/blue_0.png,blue\n")
    monkeypatch.chdir(tmp_path)
    params = Params(data=cfg(Path("my_images"), source="csv", csv=Path("labels.csv")))
    assert run_index(params, Layout(tmp_path / "ws")).images == 2


def test_csv_not_found_names_every_place_looked_at(tmp_path, monkeypatch, imagegen):
    root = imagegen.make_class_folders(tmp_path / "my_images", ["red", "blue"], per_class=2)
    monkeypatch.chdir(tmp_path)
    params = Params(data=cfg(Path("my_images"), source="csv", csv=Path("labels.csv")))
    with pytest.raises(DatasetError) as err:
        run_index(params, Layout(tmp_path / "ws"))
    assert str(err.value) == (
        f"data.csv: file not found, got 'labels.csv' "
        f"(looked for {tmp_path / 'labels.csv'}, {root / 'labels.csv'})"
    )
    absent = tmp_path / "elsewhere" / "labels.csv"
    with pytest.raises(DatasetError) as err:
        run_index(Params(data=cfg(root, source="csv", csv=absent)), Layout(tmp_path / "ws"))
    assert str(err.value) == f"data.csv: file not found, got {str(absent)!r} (looked for {absent})"
