"""The tf.data input pipeline on tiny generated images: order, determinism, epochs, labels, value ranges."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import tasks.data.pipeline
from tasks.data.augment import AugmentPolicy
from tasks.data.labels import encode_labels
from tasks.data.pipeline import (
    _group_spans,
    _source_columns,
    _worthwhile_ratios,
    jpeg_ratio,
    training_dataset,
    view_dataset,
)
from tasks.inputs import ImageSpec

SIZE = (16, 16)
POLICY = AugmentPolicy(
    seed=5,
    rotation_range=30,
    width_shift_range=0.1,
    height_shift_range=0.1,
    shear_range=10,
    zoom_range=(0.8, 1.2),
    horizontal_flip=True,
    fill_mode="reflect",
    channel_shift_range=10,
)


def _write(path: Path, array: np.ndarray, fmt: str) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return {
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "width": array.shape[1],
        "height": array.shape[0],
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """10 small images (PNG and JPEG), each a distinct flat grey level with a noisy texture; index-shaped rows."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    records = []
    for i in range(10):
        level = 20 + 22 * i
        array = np.clip(level + rng.normal(0, 4, (24 + 2 * i, 30, 3)), 0, 255).astype(np.uint8)
        fmt = "PNG" if i % 2 else "JPEG"
        rel = f"c{i % 3}/img_{i}.{fmt.lower()}"
        info = _write(root / rel, array, fmt)
        records.append(
            {"path": rel, "class_id": i % 3, "orientation": 1, "format": fmt, "level": level, **info}
        )
    return root, pd.DataFrame(records)


def collect(dataset) -> np.ndarray:
    return np.concatenate([np.asarray(batch) for batch in dataset])


# ------------------------------------------------------------------------------------------------ labels
def test_encode_labels_in_each_class_mode():
    ids = np.array([0, 2, 1, 2])
    np.testing.assert_array_equal(encode_labels(ids, "sparse", 3), [0, 2, 1, 2])
    assert encode_labels(ids, "sparse", 3).dtype == np.int32
    onehot = encode_labels(ids, "categorical", 3)
    assert onehot.dtype == np.float32 and onehot.shape == (4, 3)
    np.testing.assert_array_equal(onehot.argmax(1), ids)
    np.testing.assert_array_equal(onehot.sum(1), 1)
    binary = encode_labels(np.array([1, 0, 1]), "binary", 2)
    assert binary.dtype == np.float32 and binary.tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("ids", "mode", "n", "match"),
    [
        ([0, 1], "onehot", 2, "'onehot'"),
        ([0, 2], "binary", 3, "num_classes == 2"),
        ([0, 3], "categorical", 3, "from 0 to 3"),
        ([-1, 0], "sparse", 3, "from -1 to 0"),
        ([0.5], "sparse", 3, "integer class ids"),
    ],
)
def test_encode_labels_rejects_bad_input(ids, mode, n, match):
    with pytest.raises(ValueError, match=match):
        encode_labels(np.array(ids), mode, n)


# ------------------------------------------------------------------------------------------------ views
def test_view_dataset_is_ordered_float32_at_the_target_size(images):
    root, rows = images
    batches = list(view_dataset(rows, root, ImageSpec(SIZE), batch_size=4))
    assert [b.shape[0] for b in batches] == [4, 4, 2]  # final partial batch kept
    x = collect(batches)
    assert x.dtype == np.float32 and x.shape == (10, *SIZE, 3)
    assert 0 <= x.min() and x.max() <= 255
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), rows["level"], atol=3)  # row order


def test_views_do_not_depend_on_batch_size_or_order(images):
    root, rows = images
    kwargs = {"image": ImageSpec(SIZE), "policy": POLICY, "pass_number": 1}
    a = collect(view_dataset(rows, root, batch_size=3, **kwargs))
    b = collect(view_dataset(rows, root, batch_size=10, **kwargs))
    np.testing.assert_array_equal(a, b)
    reversed_rows = rows.iloc[::-1].reset_index(drop=True)
    c = collect(view_dataset(reversed_rows, root, batch_size=4, **kwargs))[::-1]
    np.testing.assert_array_equal(a, c)
    again = collect(view_dataset(rows, root, batch_size=3, **kwargs))
    np.testing.assert_array_equal(a, again)
    # one worker thread instead of AUTOTUNE's pool: the same views
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.autotune.enabled = False
    single = collect(view_dataset(rows, root, batch_size=3, **kwargs).with_options(options))
    np.testing.assert_array_equal(a, single)


def test_passes_and_seeds_give_different_views_and_clean_differs(images):
    root, rows = images
    one = collect(view_dataset(rows, root, ImageSpec(SIZE), batch_size=5, policy=POLICY, pass_number=0))
    two = collect(view_dataset(rows, root, ImageSpec(SIZE), batch_size=5, policy=POLICY, pass_number=1))
    other_seed = dataclasses.replace(POLICY, seed=6)
    three = collect(view_dataset(rows, root, ImageSpec(SIZE), batch_size=5, policy=other_seed, pass_number=0))
    clean = collect(view_dataset(rows, root, ImageSpec(SIZE), batch_size=5))
    for other in (two, three, clean):
        assert not np.array_equal(one, other)
    # augmentation keeps each image's content: mean level still matches its row
    np.testing.assert_allclose(one.mean(axis=(1, 2, 3)), rows["level"], atol=12)


def test_rescale_and_preprocess_apply_to_every_image(images):
    root, rows = images
    raw = collect(view_dataset(rows, root, ImageSpec(SIZE), batch_size=4))
    scaled = collect(view_dataset(rows, root, ImageSpec(SIZE, rescale=1 / 255), batch_size=4))
    np.testing.assert_allclose(scaled, raw / 255, atol=1e-5)
    shifted = collect(view_dataset(rows, root, ImageSpec(SIZE), batch_size=4, preprocess=lambda x: x - 100.0))
    np.testing.assert_allclose(shifted, raw - 100, atol=1e-4)


# Expected ranges after each registry base's preprocessing (keras.applications preprocess_input).
EXPECTED_RANGE = {
    "mobilenet_v2": (-1.0, 1.0),  # tf mode
    "mobilenet": (-1.0, 1.0),
    "efficientnet_b0": (0.0, 255.0),  # passthrough: the model rescales itself
    "resnet50": (-123.68, 255 - 103.939),  # caffe mode: BGR, ImageNet means subtracted
    "vgg16": (-123.68, 255 - 103.939),
}


def test_value_range_after_each_bases_preprocessing(images):
    from tasks.models.bases import BASE_MODELS

    root, rows = images
    rows = rows.iloc[[0, 9]].reset_index(drop=True)  # darkest and brightest
    raw = collect(view_dataset(rows, root, ImageSpec(SIZE), batch_size=2))
    assert set(BASE_MODELS) <= set(EXPECTED_RANGE), "add the new base's expected range here"
    for name, spec in BASE_MODELS.items():
        low, high = EXPECTED_RANGE[name]
        x = collect(view_dataset(rows, root, ImageSpec(SIZE), batch_size=2, preprocess=spec.preprocess))
        assert x.shape == raw.shape and x.dtype == np.float32, name
        assert low - 1e-3 <= x.min() and x.max() <= high + 1e-3, (name, x.min(), x.max())
        if name.startswith("mobilenet"):
            np.testing.assert_allclose(x, raw / 127.5 - 1, atol=1e-5)
        elif name == "efficientnet_b0":
            np.testing.assert_allclose(x, raw, atol=1e-4)
        else:  # caffe: channels reversed (BGR), then the ImageNet BGR means subtracted
            np.testing.assert_allclose(x, raw[..., ::-1] - np.array([103.939, 116.779, 123.68]), atol=1e-3)


def test_jpeg_ratio_keeps_the_target_covered():
    assert jpeg_ratio(500, 375, (224, 224)) == 1
    assert jpeg_ratio(1000, 750, (224, 224)) == 2
    assert jpeg_ratio(4000, 3000, (224, 224)) == 8
    assert jpeg_ratio(256, 192, (32, 32)) == 4
    assert jpeg_ratio(20, 20, (32, 32)) == 1


def test_jpeg_ratio_covers_the_aspect_crop():
    # the centred 375 x 375 crop of a 1000 x 375 photo must still cover 224 px after the DCT reduction
    assert jpeg_ratio(1000, 750, (224, 224), crop_to_aspect_ratio=True) == 2
    assert jpeg_ratio(2000, 450, (224, 224)) == 2
    assert jpeg_ratio(2000, 450, (224, 224), crop_to_aspect_ratio=True) == 2
    assert jpeg_ratio(2000, 450, (224, 448), crop_to_aspect_ratio=True) == 2
    assert jpeg_ratio(2000, 450, (448, 224), crop_to_aspect_ratio=True) == 1  # the crop is 450 high, 225 wide


def test_crop_to_aspect_ratio_shows_the_centre_undistorted(tmp_path):
    """A wide image with a bright centre square: cropped, the square fills the view; stretched, it does not."""
    array = np.zeros((64, 128, 3), np.uint8)
    array[:, 32:96] = 220  # the centred 64 x 64 square
    info = _write(tmp_path / "wide.png", array, "PNG")
    rows = pd.DataFrame([{"path": "wide.png", "class_id": 0, "orientation": 1, **info}])
    cropped = collect(
        view_dataset(rows, tmp_path, ImageSpec((32, 32), crop_to_aspect_ratio=True), batch_size=1)
    )
    stretched = collect(view_dataset(rows, tmp_path, ImageSpec((32, 32)), batch_size=1))
    assert cropped[0].min() > 200
    assert stretched[0, :, :6].max() < 30 and stretched[0, :, 10:22].min() > 200


def test_dct_reduced_decoding_keeps_the_geometry(tmp_path):
    """A big JPEG decoded at 1/4 scale gives the same view as the full decode (only finer detail differs)."""
    array = np.zeros((192, 256, 3), np.uint8)
    array[:, :96] = 230  # bright left part: the edge must stay at 96/256 of the width
    array[120:, :, 2] = 180
    info = _write(tmp_path / "big.jpg", array, "JPEG")
    row = {"path": "big.jpg", "class_id": 0, "orientation": 1, **info}
    reduced = pd.DataFrame([{**row, "format": "JPEG"}])  # ratio 4 is chosen for 32 px
    full = pd.DataFrame([{**row, "format": "unknown"}])  # not known as JPEG: decoded at full size
    assert _source_columns(reduced, tmp_path, (32, 32))["ratio"].tolist() == [4]
    assert _source_columns(full, tmp_path, (32, 32))["ratio"].tolist() == [1]
    for policy in (None, POLICY):
        a = collect(view_dataset(reduced, tmp_path, ImageSpec((32, 32)), batch_size=1, policy=policy))
        b = collect(view_dataset(full, tmp_path, ImageSpec((32, 32)), batch_size=1, policy=policy))
        assert np.abs(a - b).mean() < 4, policy
    clean = collect(view_dataset(reduced, tmp_path, ImageSpec((32, 32)), batch_size=1))[0]
    assert clean[:, :11].mean() > 200 and clean[:, 13:, 0].mean() < 30  # the edge at 12 = 32 * 96 / 256


def test_mixed_dct_ratios_are_kept_only_when_they_save_more_than_the_switch_costs():
    ones = np.ones(4, np.int32)
    small = np.array([500, 300, 320, 310]), np.array([500, 300, 240, 300])
    mixed = np.array([2, 1, 1, 1], np.int32)  # one 500x500 photo reducible 2x: 47k pixels saved over 4 rows
    np.testing.assert_array_equal(_worthwhile_ratios(mixed, *small), mixed)
    many = (
        np.concatenate([np.full(2, 500), np.full(30, 300)]),
        np.concatenate([np.full(2, 500), np.full(30, 300)]),
    )
    two_of_32 = np.array(
        [2, 2] + [1] * 30, np.int32
    )  # 188k pixels saved over 32 rows: under the switch's cost
    np.testing.assert_array_equal(_worthwhile_ratios(two_of_32, *many), np.ones(32, np.int32))
    huge = np.array([4000] + [300] * 31), np.array([3000] + [300] * 31)
    one_big = np.array([8] + [1] * 31, np.int32)  # one 12-Mpixel photo at 1/8: worth the switch
    np.testing.assert_array_equal(_worthwhile_ratios(one_big, *huge), one_big)
    np.testing.assert_array_equal(_worthwhile_ratios(ones * 4, *small), ones * 4)  # one ratio: always kept
    assert _worthwhile_ratios(np.zeros(0, np.int32), np.zeros(0), np.zeros(0)).size == 0


def test_group_spans_cover_every_row_once():
    assert _group_spans(19) == [(0, 16, 8), (16, 19, 3)]
    assert _group_spans(16) == [(0, 16, 8)]
    assert _group_spans(5) == [(0, 5, 5)]
    assert _group_spans(0) == [(0, 0, 1)]  # no rows: one empty span keeps the dataset's structure


def test_mixed_orientations_give_each_row_its_own_upright_view(images):
    """Rows with different EXIF orientations (in one group: the orientation is a per-image tensor) give the same
    views as each row alone (a static orientation): the dynamic path applies the same rotation."""
    root, rows = images
    mixed = rows.copy()
    mixed.loc[0, "orientation"] = 6  # stored landscape, shown rotated: the index keeps the upright size
    mixed.loc[0, ["width", "height"]] = [rows.loc[0, "height"], rows.loc[0, "width"]]
    kwargs = {"image": ImageSpec(SIZE), "batch_size": 4, "policy": POLICY, "pass_number": 1}
    together = collect(view_dataset(mixed, root, **kwargs))
    for i in (0, 1):
        alone = collect(view_dataset(mixed.iloc[[i]], root, **kwargs))[0]
        np.testing.assert_array_equal(together[i], alone)
    unrotated = collect(view_dataset(rows.iloc[[0]], root, **kwargs))[0]
    assert not np.array_equal(together[0], unrotated)


def test_group_size_changes_nothing_but_speed(images, monkeypatch):
    """Images are decoded and resampled in groups (one numpy_function call each), the rows left over in one
    shorter group: views, batches and epochs are the same with groups of 1, 3 (10 rows: 3 + 3 + 3 + 1) or 8."""
    root, rows = images
    rows = rows.assign(class_id=np.arange(len(rows)))
    common = {"image": ImageSpec(SIZE), "batch_size": 4}
    train = {**common, "class_mode": "sparse", "num_classes": len(rows), "seed": 3, "policy": POLICY}

    def run() -> tuple[list, list]:
        views = [np.asarray(b) for b in view_dataset(rows, root, policy=POLICY, pass_number=1, **common)]
        ds, steps = training_dataset(rows, root, **train)
        return views, [(np.asarray(x), np.asarray(y)) for x, y in ds.take(2 * steps)]

    views, epochs = run()
    assert len(views) == int(view_dataset(rows, root, **common).cardinality())  # known: Keras sizes progress
    assert [v.shape[0] for v in views] == [4, 4, 2] and [y.shape[0] for _, y in epochs] == [4, 4, 2] * 2
    for group in (1, 3):
        monkeypatch.setattr(tasks.data.pipeline, "GROUP_SIZE", group)
        other_views, other_epochs = run()
        for a, b in zip(views, other_views, strict=True):
            np.testing.assert_array_equal(a, b)
        for (xa, ya), (xb, yb) in zip(epochs, other_epochs, strict=True):
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(xa, xb)


def test_view_dataset_validates_arguments(images):
    root, rows = images
    with pytest.raises(ValueError, match="image_size"):
        view_dataset(rows, root, ImageSpec((0, 16)), batch_size=2)
    with pytest.raises(ValueError, match="batch_size >= 1, got 0"):
        view_dataset(rows, root, ImageSpec(SIZE), batch_size=0)
    with pytest.raises(ValueError, match="pass_number >= 0, got -1"):
        view_dataset(rows, root, ImageSpec(SIZE), batch_size=2, pass_number=-1)
    with pytest.raises(ValueError, match="missing \\['sha256'\\]"):
        view_dataset(rows.drop(columns=["sha256"]), root, ImageSpec(SIZE), batch_size=2)
    with pytest.raises(TypeError, match="AugmentPolicy"):
        view_dataset(rows, root, ImageSpec(SIZE), batch_size=2, policy={"rotation_range": 3})


# ---------------------------------------------------------------------------------------------- training
def test_training_epochs_cover_every_sample_once_and_reshuffle(images):
    root, rows = images
    rows = rows.assign(class_id=np.arange(len(rows)))  # sparse labels identify the samples
    ds, steps = training_dataset(
        rows,
        root,
        ImageSpec(SIZE),
        batch_size=4,
        class_mode="sparse",
        num_classes=len(rows),
        seed=3,
        policy=POLICY,
    )
    assert steps == 3
    batches = list(ds.take(3 * steps))
    assert [int(x.shape[0]) for x, _ in batches] == [4, 4, 2] * 3  # final partial batch kept in every epoch
    epochs = [
        np.concatenate([np.asarray(y) for _, y in batches[e * steps : (e + 1) * steps]]) for e in range(3)
    ]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(10))  # each sample exactly once
    assert len({tuple(order.tolist()) for order in epochs}) == 3  # a new order every epoch
    # labels travel with their images: image mean level matches the sample's row
    x0 = np.concatenate([np.asarray(x) for x, _ in batches[:steps]])
    np.testing.assert_allclose(x0.mean(axis=(1, 2, 3)), rows["level"].to_numpy()[epochs[0]], atol=12)
    # epoch e shows view pass e of each image: the same sample looks different in the next epoch
    x1 = np.concatenate([np.asarray(x) for x, _ in batches[steps : 2 * steps]])
    first_view = x0[np.argsort(epochs[0])]
    second_view = x1[np.argsort(epochs[1])]
    assert all(not np.array_equal(a, b) for a, b in zip(first_view, second_view, strict=True))
    pass_one = collect(view_dataset(rows, root, ImageSpec(SIZE), batch_size=5, policy=POLICY, pass_number=1))
    np.testing.assert_allclose(second_view, pass_one, atol=1e-4)
    # reproducible from the seed; a different seed gives another order
    again, _ = training_dataset(
        rows, root, ImageSpec(SIZE), batch_size=4, class_mode="sparse", num_classes=10, seed=3, policy=POLICY
    )
    first = np.concatenate([np.asarray(y) for _, y in again.take(steps)])
    np.testing.assert_array_equal(first, epochs[0])
    other, _ = training_dataset(
        rows, root, ImageSpec(SIZE), batch_size=4, class_mode="sparse", num_classes=10, seed=4, policy=POLICY
    )
    assert np.concatenate([np.asarray(y) for _, y in other.take(steps)]).tolist() != epochs[0].tolist()


def test_training_first_pass_shifts_the_views(images):
    """finetune starts at ``augment.passes``: epoch 0 then shows view pass 2, never a cached pass 0 / 1 view."""
    root, rows = images
    rows = rows.assign(class_id=np.arange(len(rows)))
    ds, steps = training_dataset(
        rows,
        root,
        ImageSpec(SIZE),
        batch_size=5,
        class_mode="sparse",
        num_classes=len(rows),
        seed=3,
        policy=POLICY,
        first_pass=2,
    )
    batches = list(ds.take(steps))
    order = np.concatenate([np.asarray(y) for _, y in batches])
    x = np.concatenate([np.asarray(b) for b, _ in batches])[np.argsort(order)]
    pass_two = collect(view_dataset(rows, root, ImageSpec(SIZE), batch_size=5, policy=POLICY, pass_number=2))
    pass_zero = collect(view_dataset(rows, root, ImageSpec(SIZE), batch_size=5, policy=POLICY, pass_number=0))
    np.testing.assert_allclose(x, pass_two, atol=1e-4)
    assert not np.allclose(x, pass_zero, atol=1e-4)
    with pytest.raises(ValueError, match="first_pass"):
        training_dataset(
            rows,
            root,
            ImageSpec(SIZE),
            batch_size=2,
            class_mode="sparse",
            num_classes=10,
            seed=0,
            first_pass=-1,
        )


def test_training_first_epoch_continues_the_sequence_of_a_fresh_dataset(images):
    """A fit resumed at epoch k (BackupAndRestore) must get epoch k's order and views, not epoch 0's again."""
    root, rows = images
    rows = rows.assign(class_id=np.arange(len(rows)))  # sparse labels identify the samples
    common = dict(
        image=ImageSpec(SIZE),
        batch_size=4,
        class_mode="sparse",
        num_classes=len(rows),
        seed=3,
        policy=POLICY,
        first_pass=1,
    )

    def epochs(ds, steps: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        batches = list(ds.take(count * steps))
        out = []
        for e in range(count):
            chunk = batches[e * steps : (e + 1) * steps]
            out.append(
                (
                    np.concatenate([np.asarray(x) for x, _ in chunk]),
                    np.concatenate([np.asarray(y) for _, y in chunk]),
                )
            )
        return out

    fresh, steps = training_dataset(rows, root, **common)
    fresh_epochs = epochs(fresh, steps, 3)
    resumed, resumed_steps = training_dataset(rows, root, **common, first_epoch=2)
    assert resumed_steps == steps
    (first, second) = epochs(resumed, steps, 2)
    np.testing.assert_array_equal(first[1], fresh_epochs[2][1])  # epoch 2's shuffle order
    np.testing.assert_allclose(first[0], fresh_epochs[2][0], atol=1e-4)  # and its augmentation pass
    assert first[1].tolist() != fresh_epochs[0][1].tolist()  # not a replay of epoch 0
    # epoch 2 shows view pass first_pass + 2 of every image
    shown = first[0][np.argsort(first[1])]
    pass_three = collect(
        view_dataset(rows, root, ImageSpec(SIZE), batch_size=5, policy=POLICY, pass_number=3)
    )
    np.testing.assert_allclose(shown, pass_three, atol=1e-4)
    # and the sequence goes on from there: the resumed dataset's next epoch is epoch 3
    third, _ = training_dataset(rows, root, **common, first_epoch=3)
    np.testing.assert_array_equal(second[1], epochs(third, steps, 1)[0][1])
    with pytest.raises(ValueError, match="first_epoch"):
        training_dataset(rows, root, **common, first_epoch=-1)


def test_training_labels_follow_the_class_mode(images):
    root, rows = images
    ds, steps = training_dataset(
        rows, root, ImageSpec(SIZE), batch_size=10, class_mode="categorical", num_classes=3, seed=0
    )
    assert steps == 1
    x, y = next(iter(ds))
    assert x.shape == (10, *SIZE, 3) and y.shape == (10, 3)
    np.testing.assert_array_equal(np.asarray(y).sum(1), 1)
    levels = np.asarray(x).mean(axis=(1, 2, 3))
    # the one-hot class of each sample is the class of the row whose level it shows
    by_level = {int(r.level): r.class_id for r in rows.itertuples()}
    got = [by_level[min(by_level, key=lambda lv, m=m: abs(lv - m))] for m in levels]
    np.testing.assert_array_equal(np.asarray(y).argmax(1), got)


def test_training_dataset_validates_arguments(images):
    root, rows = images
    with pytest.raises(ValueError, match="class_mode"):
        training_dataset(rows, root, ImageSpec(SIZE), batch_size=2, class_mode="multi", num_classes=3, seed=0)
    with pytest.raises(ValueError, match="empty"):
        training_dataset(
            rows.iloc[:0], root, ImageSpec(SIZE), batch_size=2, class_mode="sparse", num_classes=3, seed=0
        )


def test_nearest_interpolation_only_copies_source_pixels(images):
    root, rows = images
    png = rows[rows["format"] == "PNG"].iloc[:1].reset_index(drop=True)
    source = np.asarray(Image.open(root / png.loc[0, "path"]).convert("RGB")).reshape(-1, 3)
    known = {tuple(p) for p in source.tolist()}
    for policy in (None, AugmentPolicy(rotation_range=25, fill_mode="wrap")):
        x = collect(
            view_dataset(png, root, ImageSpec(SIZE, interpolation="nearest"), batch_size=1, policy=policy)
        )
        assert {tuple(p) for p in x.reshape(-1, 3).astype(int).tolist()} <= known
    rotate = AugmentPolicy(rotation_range=25, fill_mode="wrap")
    blended = collect(view_dataset(png, root, ImageSpec(SIZE), batch_size=1, policy=rotate))
    assert not {tuple(p) for p in blended.reshape(-1, 3).astype(int).tolist()} <= known  # bilinear blends


def test_datasets_run_with_fixed_parallelism_and_no_autotune(images):
    """The measured configuration (BENCHMARKS.md): the autotuner sometimes ran whole passes on one worker."""
    import os

    root, rows = images
    cores = len(os.sched_getaffinity(0))
    view = view_dataset(rows, root, ImageSpec(SIZE), batch_size=4)
    train, _ = training_dataset(
        rows, root, ImageSpec(SIZE), batch_size=4, class_mode="sparse", num_classes=3, seed=0
    )
    for dataset in (view, train):
        options = dataset.options()
        assert options.autotune.enabled is False
        assert options.threading.private_threadpool_size == cores


def test_allocator_tuning_applies_on_glibc_and_can_be_switched_off(monkeypatch):
    import platform

    from tasks.data import pipeline

    pipeline.tune_allocator.cache_clear()
    monkeypatch.setenv("RETRAINFLOW_MALLOC_TUNING", "0")
    assert pipeline.tune_allocator() is False
    pipeline.tune_allocator.cache_clear()
    monkeypatch.delenv("RETRAINFLOW_MALLOC_TUNING")
    assert pipeline.tune_allocator() is (platform.libc_ver()[0] == "glibc")
