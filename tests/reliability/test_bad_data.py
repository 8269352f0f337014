"""Bad data through the whole pipeline: every kind of bad or awkward input gets a clear report line or error, the
run completes where it can, and no bad file reaches training (the feature cache and the training rows hold only
the sha256s of good images)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from tasks.layout import Layout

JUNK = {
    ".DS_Store": b"\x00\x00\x00\x01Bud1",
    "Thumbs.db": b"\xd0\xcf\x11\xe0junk",
    "._red_0.png": b"\x00\x05",
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def messy_dataset(root: Path, imagegen) -> tuple[set[str], set[str], dict[str, str]]:
    """red/blue class folders with every bad file, odd-but-good file, junk, a symlink loop and awkward names.

    Returns (good sha256s, bad sha256s, expected reject kind by relative path).
    """
    imagegen.make_class_folders(root, ["red", "blue"], per_class=8, size=32)
    good = {_sha(p.read_bytes()) for p in root.rglob("*.png")}
    bad: set[str] = set()
    kinds: dict[str, str] = {}
    for name, data in imagegen.bad_image_files().items():
        (root / "red" / name).write_bytes(data)
        kinds[f"red/{name}"] = ""
        bad.add(_sha(data))
    for name, data in imagegen.good_odd_image_files().items():
        (root / "blue" / name).write_bytes(data)
        good.add(_sha(data))
    odd_names = {
        "red/with space é ü 日本.png": imagegen.coloured_image((200, 40, 40), 32, seed=901),
        "red/nested/deeper/ünïcode name.jpg": imagegen.coloured_image((200, 40, 40), 32, seed=902),
        "blue/-leading dash.png": imagegen.coloured_image((40, 60, 200), 32, seed=903),
    }
    for rel, image in odd_names.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        data = imagegen.encode(image, "JPEG" if rel.endswith(".jpg") else "PNG")
        (root / rel).write_bytes(data)
        good.add(_sha(data))
    for name, data in JUNK.items():
        (root / "red" / name).write_bytes(data)
        bad.add(_sha(data))
    (root / ".hidden_class").mkdir()
    hidden = imagegen.encode(imagegen.coloured_image((1, 2, 3), 32, seed=904), "PNG")
    (root / ".hidden_class" / "x.png").write_bytes(hidden)
    bad.add(_sha(hidden))
    (root / "red" / "loop").symlink_to("..", target_is_directory=True)  # red/loop -> data root: a loop
    (root / "blue" / "self").symlink_to(".", target_is_directory=True)
    not_utf8 = imagegen.encode(imagegen.coloured_image((200, 40, 40), 32, seed=906), "PNG")
    fd = os.open(os.fsencode(str(root / "red")) + b"/latin1-\xe9t\xe9.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, not_utf8)
    os.close(fd)
    bad.add(_sha(not_utf8))
    (root / "stray.png").write_bytes(imagegen.encode(imagegen.coloured_image((9, 9, 9), 32, seed=905), "PNG"))
    return good, bad, kinds


def all_cached_shas(cache_dir: Path) -> set[str]:
    """Every sha256 stored in any shard of the feature cache (committed or not)."""
    out: set[str] = set()
    for ids in cache_dir.rglob("*.ids.npy"):
        out |= {s.decode() for s in np.load(ids, allow_pickle=False)["sha256"]}
    return out


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory, imagegen, tiny_params):
    """index -> features -> train_top -> finetune on the messy folder, with symlinks followed (loops!)."""
    from tasks.stages.run_features import run_features
    from tasks.stages.run_finetune import run_finetune
    from tasks.stages.run_index import run_index
    from tasks.stages.run_train_top import run_train_top

    tmp = tmp_path_factory.mktemp("messy")
    root = tmp / "images"
    good, bad, _ = messy_dataset(root, imagegen)
    params = tiny_params(root, data={"follow_symlinks": True}, augment={"passes": 0})
    layout = Layout(tmp / "work")
    index = run_index(params, layout)
    features = run_features(params, layout)
    top = run_train_top(params, layout)
    ft = run_finetune(params, layout)
    return params, layout, good, bad, index, features, top, ft


@pytest.mark.slow
def test_run_completes_and_only_good_images_reach_training(messy_run) -> None:
    from tasks.data.index_table import read_index
    from tasks.features.read import read_features

    params, layout, good, bad, index, features, top, ft = messy_run
    table = read_index(layout)
    assert set(table["sha256"]) <= good and not set(table["sha256"]) & bad
    # every good file is in (exact duplicates collapse: the generated set has none)
    assert set(table["sha256"]) == good, sorted(good - set(table["sha256"]))[:3]
    assert index.images == len(good) and index.classes == ("blue", "red")
    trained: set[str] = set()
    for split in ("train", "val", "test"):
        fs = read_features(params, layout, split)
        assert np.isfinite(fs.x).all()
        trained |= set(fs.sha256.tolist())
    assert trained == set(table["sha256"])
    assert all_cached_shas(Path(features.cache_dir)) <= good
    assert layout.candidate_model.is_file() and ft.epochs_run == 1
    # the head was trained on exactly the good images' features (one head configured: linear)
    train, val = read_features(params, layout, "train"), read_features(params, layout, "val", views="clean")
    assert top.best_head == "linear" and [h["name"] for h in top.heads] == ["linear"]
    assert top.train_samples == len(train.x) == int((table["split"] == "train").sum()) > 0
    assert top.val_samples == len(val.x) == int((table["split"] == "val").sum()) > 0
    assert top.feature_dim == train.x.shape[1] and np.isfinite(top.val_loss)


@pytest.mark.slow
def test_every_bad_file_has_a_reason(messy_run, imagegen) -> None:
    _, layout, *_ = messy_run
    report = json.loads(layout.index_report.read_text())
    rejects = {r["path"]: r for r in report["rejects"]}
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    for name in imagegen.bad_image_files():
        assert f"red/{name}" in rejects, (name, sorted(rejects))
        assert rejects[f"red/{name}"]["reason"].strip()
    expected_kind = {
        "red/zero_bytes.jpg": "empty",
        "red/text.jpg": "not_image",
        "red/page.jpg": "not_image",
        "red/bomb.png": "too_large",
        "red/image.tiff": "unsupported",
        "red/truncated.jpg": "undecodable",
        "red/truncated.png": "undecodable",
    }
    for path, kind in expected_kind.items():
        assert rejects[path]["kind"] == kind, rejects[path]
    assert "HTML" in rejects["red/page.jpg"]["reason"]
    assert [r["kind"] for r in rejects.values()].count("bad_name") == 1
    for junk in (*JUNK,):
        assert f"red/{junk}" in skipped, (junk, skipped)
    assert ".hidden_class" in skipped and "stray.png" in skipped
    assert any("loop" in reason for reason in skipped.values()), skipped
    assert "red/loop" in skipped or "blue/self" in skipped


@pytest.mark.slow
def test_odd_but_valid_formats_are_rgb_in_training_input(messy_run, imagegen) -> None:
    from tasks.data.index_table import read_index
    from tasks.data.pipeline import view_dataset
    from tasks.inputs import ImageSpec

    params, layout, *_ = messy_run
    table = read_index(layout)
    odd = table[table["path"].isin([f"blue/{n}" for n in imagegen.good_odd_image_files()])]
    assert len(odd) == len(imagegen.good_odd_image_files())
    assert set(odd["format"]) == {"JPEG", "PNG", "GIF", "WEBP", "BMP"}
    row = odd[odd["path"] == "blue/one_pixel.png"].iloc[0]
    assert (row["width"], row["height"]) == (1, 1)
    batches = list(view_dataset(odd, params.data.root, ImageSpec((32, 32)), batch_size=64))
    pixels = np.concatenate([b.numpy() for b in batches])
    assert pixels.shape == (len(odd), 32, 32, 3) and np.isfinite(pixels).all()
    assert pixels.min() >= 0 and pixels.max() <= 255


def test_odd_formats_decode_to_the_same_rgb_as_pillow(imagegen) -> None:
    """CMYK, grey, 16-bit, palette+transparency, alpha, GIF, WebP, BMP: the one decoder gives Pillow's RGB."""
    import io

    from tasks.data.images import decode_rgb

    for name, data in imagegen.good_odd_image_files().items():
        with Image.open(io.BytesIO(data)) as image:
            expected = np.asarray(image.convert("RGB"), dtype=np.float32)
        got = decode_rgb(data).numpy().astype(np.float32)
        assert got.shape == expected.shape, name
        assert np.abs(got - expected).mean() < 2.5, name


def test_exif_orientation_is_honoured_in_index_training_input_and_predict(
    tmp_path: Path, imagegen, tiny_params
) -> None:
    """A JPEG stored 32x24 with EXIF orientation 6 is 24 wide and 32 high everywhere, and its pixels are the
    upright ones (as Pillow's exif_transpose shows them) in the training input and in predict."""
    import keras

    from tasks.data.indexing import build_index
    from tasks.data.pipeline import view_dataset
    from tasks.inputs import ImageSpec
    from tasks.models.predict import predict_files

    root = imagegen.make_class_folders(tmp_path / "data", ["red", "blue"], per_class=3, size=32)
    rotated = imagegen.exif_rotated_jpeg(6, height=24, width=32, seed=7)
    (root / "red" / "rotated.jpg").write_bytes(rotated)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(root / "red" / "rotated.jpg")).convert("RGB"))
    assert upright.shape == (32, 24, 3)
    stored = np.asarray(Image.open(root / "red" / "rotated.jpg").convert("RGB"))
    (tmp_path / "upright.png").write_bytes(imagegen.encode(Image.fromarray(upright), "PNG"))
    (tmp_path / "stored.png").write_bytes(imagegen.encode(Image.fromarray(stored), "PNG"))

    result = build_index(root, tiny_params(root).data)
    row = result.table[result.table["path"] == "red/rotated.jpg"].iloc[0]
    assert (row["width"], row["height"], row["orientation"]) == (24, 32, 6)

    (batch,) = list(view_dataset(result.table.loc[[row.name]], root, ImageSpec((32, 24)), batch_size=1))
    seen = batch.numpy()[0]
    assert np.abs(seen - upright).mean() < 6, "training input does not show the upright picture"

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 24, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    files = [root / "red" / "rotated.jpg", tmp_path / "upright.png", tmp_path / "stored.png"]
    preds = predict_files(model, ("a", "b", "c"), files, batch_size=1)
    assert all(p.error is None for p in preds), preds
    probs = [np.array(list(p.probabilities.values())) for p in preds]
    same = np.abs(probs[0] - probs[1]).max()
    assert same < 0.05, (probs, "predict did not apply the EXIF orientation like the index")
    assert np.abs(probs[0] - probs[2]).max() > max(0.02, 3 * same), (probs, "the model cannot tell rotations")


def test_decompression_bomb_rejected_by_a_small_pixel_limit(tmp_path: Path, imagegen, tiny_params) -> None:
    """A configurable limit: data.max_pixels=5000 rejects a 100x100 image, a 20000x20000 header and a 64 GiB
    file (from its size, unread), keeps 32x32 images; memory stays small."""
    import resource

    from tasks.data.indexing import build_index

    root = imagegen.make_class_folders(tmp_path / "data", ["red", "blue"], per_class=3, size=32)
    (root / "red" / "big.png").write_bytes(
        imagegen.encode(imagegen.coloured_image((200, 40, 40), 100, seed=1), "PNG")
    )
    (root / "blue" / "bomb.png").write_bytes(imagegen.bomb_png(20000, 20000))
    (root / "blue" / "wide_bomb.png").write_bytes(imagegen.bomb_png(200000, 3))
    huge = root / "blue" / "huge.jpg"  # a 64 GiB (sparse) file: must be refused from its size, never read
    huge.write_bytes(imagegen.encode(imagegen.coloured_image((40, 60, 200), 32, seed=2), "JPEG"))
    os.truncate(huge, 64 * 2**30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = build_index(root, tiny_params(root, data={"max_pixels": 5000}).data)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    kinds = {r["path"]: r for r in result.report["rejects"]}
    assert (
        kinds["red/big.png"]["kind"] == "too_large"
        and "data.max_pixels=5000" in kinds["red/big.png"]["reason"]
    )
    assert kinds["blue/bomb.png"]["kind"] == "too_large"
    assert kinds["blue/wide_bomb.png"]["kind"] == "too_large"
    assert kinds["blue/huge.jpg"]["kind"] == "too_large" and "not read" in kinds["blue/huge.jpg"]["reason"]
    assert len(result.table) == 6
    assert grown_mib < 500, f"validation grew the process by {grown_mib:.0f} MiB (a bomb was decoded?)"


def test_one_pixel_images_train(tmp_path: Path, imagegen, tiny_params) -> None:
    from tasks.features.read import read_features
    from tasks.stages.run_features import run_features
    from tasks.stages.run_index import run_index

    root = tmp_path / "data"
    for c, colour in (("red", (250, 0, 0)), ("blue", (0, 0, 250))):
        (root / c).mkdir(parents=True)
        for i in range(4):
            (root / c / f"{i}.png").write_bytes(
                imagegen.encode(Image.new("RGB", (1, 1), (colour[0], i * 20, colour[2])), "PNG")
            )
    params = tiny_params(root, augment={"passes": 1, "rotation_range": 30})
    layout = Layout(tmp_path / "work")
    assert run_index(params, layout).images == 8
    run_features(params, layout)
    assert np.isfinite(read_features(params, layout, "train").x).all()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty_class", "no valid image"),
        ("only_bad_class", "no valid image"),
        ("single_class", "only one class"),
        ("no_images", "no valid images"),
        ("missing_root", "data.root"),
    ],
)
def test_dataset_level_errors(tmp_path: Path, case: str, message: str, imagegen, tiny_params) -> None:
    from tasks.data.indexing import build_index
    from tasks.errors import DatasetError

    root = tmp_path / "data"
    if case != "missing_root":
        imagegen.make_class_folders(
            root, ["red"] if case == "single_class" else ["red", "blue"], per_class=3, size=32
        )
    if case == "empty_class":
        (root / "green").mkdir()
    if case == "only_bad_class":
        (root / "green").mkdir()
        (root / "green" / "a.jpg").write_bytes(b"")
    if case == "no_images":
        for p in root.rglob("*.png"):
            p.write_bytes(b"<html></html>")
    with pytest.raises(DatasetError, match=message) as err:
        build_index(root, tiny_params(root).data)
    if case in ("empty_class", "only_bad_class"):
        assert "green" in str(err.value)


def test_cli_index_reports_unusable_dataset_without_traceback(
    tmp_path: Path, imagegen, write_params, cli, tiny_dict
) -> None:
    imagegen.make_class_folders(tmp_path / "data" / "images", ["red"], per_class=3, size=32)
    write_params(tmp_path, tiny_dict())
    proc = cli(["index"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "only one class" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "index" / "index.csv").exists()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "error: data.root: folder does not exist, got 'data/images' ({root})"),
        (
            "flat",
            "it has no class subfolders; at its top level: file at the top level, not inside a class folder: "
            "3, e.g. 'red_0.png', 'red_1.png', 'red_2.png'; put each class's images in a subfolder",
        ),
        ("hidden_only", "no valid images found in data/images (2 skipped - hidden file or folder: 2, e.g. "),
    ],
)
def test_cli_index_says_what_is_wrong_with_the_image_folder(
    tmp_path: Path, layout: str, message: str, imagegen, write_params, cli, tiny_dict
) -> None:
    """A newcomer's mistakes (real subprocess): each exits 1 with one line that says why, no traceback."""
    root = tmp_path / "data" / "images"
    if layout == "flat":  # the photos dropped straight into data.root, no class folders
        imagegen.make_class_folders(tmp_path / "tmp", ["red"], per_class=3, size=32)
        root.mkdir(parents=True)
        for f in (tmp_path / "tmp" / "red").iterdir():
            f.rename(root / f.name)
    if layout == "hidden_only":
        for name in ("red/.a.png", "blue/.b.png"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(b"\0")
    write_params(tmp_path, tiny_dict())
    proc = cli(["index"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message.format(root=root) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_csv_source_blank_labels_duplicates_missing_paths(
    tmp_path: Path, imagegen, write_params, cli, tiny_dict
) -> None:
    """The CSV cases, through `retrainflow index` in a subprocess: the run completes, each row is accounted for."""
    root = imagegen.make_class_folders(tmp_path / "data" / "images", ["red", "blue"], per_class=4, size=32)
    (root / "red" / "trunc.png").write_bytes(imagegen.bad_image_files()["truncated.png"])
    rows = [(f"{c}/{c}_{i}.png", c) for c in ("red", "blue") for i in range(4)]
    rows += [
        ("red/red_0.png", "red"),  # duplicate row, same label: kept once, reported
        ("blue/blue_1.png", "blue"),
        ("red/red_1.png", ""),  # blank label
        ("   ", "red"),  # blank path
        ("red/missing.png", "red"),  # does not exist
        ("red/trunc.png", "red"),  # a bad file listed in the CSV
        ("blue/blue_2.png", "red"),  # the same path under two labels: a conflict
    ]
    pd.DataFrame(rows, columns=["file", "cls"]).to_csv(tmp_path / "labels.csv", index=False)
    write_params(
        tmp_path,
        tiny_dict(data={"source": "csv", "csv": "labels.csv", "path_column": "file", "label_column": "cls"}),
    )
    proc = cli(["index", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    report = json.loads((tmp_path / "index" / "index_report.json").read_text())
    kinds = {r["path"]: r["kind"] for r in report["rejects"]}
    assert kinds["red/missing.png"] == "not_found"
    assert kinds["red/trunc.png"] == "undecodable"
    assert "blank_label" in kinds.values() and "blank_path" in kinds.values()
    assert {d["path"] for d in report["duplicate_rows"]} >= {"red/red_0.png", "blue/blue_1.png"}
    assert [c["path"] for c in report["conflicts"]] == ["blue/blue_2.png"]
    table = pd.read_csv(tmp_path / "index" / "index.csv")
    assert manifest["images"] == len(table) == 7  # 8 listed once, minus the conflicting path
    assert table["path"].is_unique and "blue/blue_2.png" not in set(table["path"])
    assert "rejected" in proc.stderr  # the readable summary names the rejects


def test_csv_missing_columns_is_a_clear_error(tmp_path: Path, imagegen, tiny_params) -> None:
    from tasks.data.indexing import build_index
    from tasks.errors import DatasetError

    root = imagegen.make_class_folders(tmp_path / "data", ["red", "blue"], per_class=2, size=32)
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label\nred/red_0.png,red\n")
    params = tiny_params(root, data={"source": "csv", "csv": str(csv)})
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['path'\]") as err:
        build_index(csv, params.data)
    assert "filename" in str(err.value)
    csv.write_text("")
    with pytest.raises(DatasetError, match="cannot parse"):
        build_index(csv, params.data)


def test_fifo_and_broken_symlink_never_block_or_crash(tmp_path: Path, imagegen, tiny_params) -> None:
    """A named pipe (reading it would hang) and a dangling symlink: reported, never opened."""
    from tasks.data.indexing import build_index

    root = imagegen.make_class_folders(tmp_path / "data", ["red", "blue"], per_class=3, size=32)
    os.mkfifo(root / "red" / "pipe.jpg")
    (root / "blue" / "gone.png").symlink_to(root / "blue" / "nothing.png")
    result = build_index(root, tiny_params(root, data={"follow_symlinks": True}).data)
    assert len(result.table) == 6
    skipped = {s["path"]: s["reason"] for s in result.report["skipped"]}
    rejects = {r["path"]: r["reason"] for r in result.report["rejects"]}
    assert "regular file" in skipped.get("red/pipe.jpg", rejects.get("red/pipe.jpg", ""))
    assert "broken symlink" in rejects["blue/gone.png"]


@pytest.mark.parametrize("follow", [False, True])
def test_file_symlink_loops_and_unusable_csv_paths_never_crash_the_index(
    tmp_path: Path, follow: bool, imagegen, tiny_params
) -> None:
    """Files that are symlink loops (a -> b -> a, self -> self) and CSV paths too long for the filesystem: each is
    one reject; the rest is indexed (these used to abort the whole index with RuntimeError / OSError)."""
    from tasks.data.indexing import build_index

    root = imagegen.make_class_folders(tmp_path / "data", ["red", "blue"], per_class=3, size=32)
    os.symlink("b.png", root / "red" / "a.png")
    os.symlink("a.png", root / "red" / "b.png")
    os.symlink("self.png", root / "blue" / "self.png")
    cfg = tiny_params(root, data={"follow_symlinks": follow}).data
    result = build_index(root, cfg)
    assert len(result.table) == 6
    rejects = {r["path"]: r["reason"] for r in result.report["rejects"]}
    assert set(rejects) == {"red/a.png", "red/b.png", "blue/self.png"}
    if follow:
        assert all(reason == "symlink loop" for reason in rejects.values()), rejects

    rows = [(f"{c}/{c}_{i}.png", c) for c in ("red", "blue") for i in range(3)]
    rows += [
        ("red/a.png", "red"),
        ("blue/self.png", "blue"),
        ("x" * 5000 + ".png", "red"),
        ("red/" + "y" * 300, "red"),
    ]
    result = build_index(pd.DataFrame(rows, columns=["path", "label"]), cfg)
    assert len(result.table) == 6
    kinds = sorted(r["kind"] for r in result.report["rejects"])
    assert kinds == ["bad_path", "bad_path", "symlink", "symlink"], result.report["rejects"]
    assert all("too long" in r["reason"] for r in result.report["rejects"] if r["kind"] == "bad_path")


def test_predict_gives_every_bad_file_an_error_row_and_still_predicts_the_good_ones(
    tmp_path: Path, imagegen
) -> None:
    import keras

    from tasks.models.predict import predict_files

    for name, data in {**imagegen.bad_image_files(), **imagegen.good_odd_image_files()}.items():
        (tmp_path / name).write_bytes(data)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((16, 16, 3)), keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")]
    )
    files = sorted(tmp_path.iterdir()) + [tmp_path / "does_not_exist.jpg"]
    preds = predict_files(model, ("blue", "red"), files, batch_size=4)
    errors = {Path(p.path).name for p in preds if p.error}
    assert errors == {*imagegen.bad_image_files(), "does_not_exist.jpg"}, errors
    good = [p for p in preds if not p.error]
    assert len(good) == len(imagegen.good_odd_image_files()) and all(p.label in ("blue", "red") for p in good)
