"""Evaluation metrics (numpy, checked against hand-computed values) and the evaluate stage's outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.inputs import ImageSpec
from tasks.models.evaluation import (
    SCORE_METRICS,
    ModelInput,
    Preview,
    compute_metrics,
    confusion_matrix,
    evaluate_split,
    roc_auc,
    score_of,
)
from tasks.models.full_model import probability_matrix


def test_confusion_matrix_rows_are_actual_columns_predicted():
    m = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_confusion_matrix_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)


def test_roc_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(scores, labels) == pytest.approx(pairwise)
    assert roc_auc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert roc_auc(np.array([0.1, 0.9]), np.array([True, True])) is None


def test_binary_sigmoid_column_becomes_two_probabilities():
    p = probability_matrix(np.array([[0.2], [0.9]]), 2)
    np.testing.assert_allclose(p, [[0.8, 0.2], [0.1, 0.9]])
    with pytest.raises(ValueError, match="expected 3 columns"):
        probability_matrix(np.ones((2, 2)), 3)


def test_compute_metrics_multiclass_by_hand():
    names = ("a", "b", "c")
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # a -> a
            [0.3, 0.6, 0.1],  # a -> b
            [0.1, 0.8, 0.1],  # b -> b
            [0.1, 0.1, 0.8],  # c -> c
            [0.5, 0.2, 0.3],  # c -> a
        ]
    )
    actual = np.array([0, 0, 1, 2, 2])
    m = compute_metrics(probs, actual, names)
    assert m.count == 5
    assert m.accuracy == pytest.approx(3 / 5)
    assert m.confusion == ((1, 1, 0), (0, 1, 0), (1, 0, 1))
    a, b, c = m.per_class
    assert (a.precision, a.recall, a.support) == (pytest.approx(0.5), pytest.approx(0.5), 2)
    assert (b.precision, b.recall) == (pytest.approx(0.5), pytest.approx(1.0))
    assert (c.precision, c.recall) == (pytest.approx(1.0), pytest.approx(0.5))
    assert b.f1 == pytest.approx(2 / 3) and c.f1 == pytest.approx(2 / 3)
    assert m.macro_f1 == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    expected_loss = -np.mean(np.log([0.7, 0.3, 0.8, 0.8, 0.3]))
    assert m.loss == pytest.approx(expected_loss)
    assert m.roc_auc is None
    flat = m.flat("test")
    assert flat["test_accuracy"] == pytest.approx(0.6) and flat["test_f1_b"] == pytest.approx(2 / 3)
    assert all(isinstance(v, int | float) for v in flat.values())


def test_compute_metrics_binary_has_auc_and_keras_matching_loss():
    import keras

    p = np.array([0.1, 0.4, 0.35, 0.8, 0.95])
    y = np.array([0, 0, 1, 1, 1])
    m = compute_metrics(p[:, None], y, ("neg", "pos"))
    assert m.roc_auc == pytest.approx(5 / 6)
    keras_loss = float(
        keras.losses.binary_crossentropy(y[:, None].astype("float32"), p[:, None]).numpy().mean()
    )
    assert m.loss == pytest.approx(keras_loss, rel=1e-4)
    assert m.accuracy == pytest.approx(0.8)


def test_compute_metrics_empty_split_is_nan_not_crash():
    m = compute_metrics(np.zeros((0, 2)), np.zeros(0, dtype=int), ("a", "b"))
    assert m.count == 0 and math.isnan(m.accuracy)


def test_report_pngs_are_written(tmp_path):
    from PIL import Image

    from tasks.reports.plots import plot_confusion, plot_prediction_grid, plot_training_curves

    top = [
        {"head": "h", "epoch": str(e), "loss": "1", "accuracy": "0.5", "val_loss": "1", "val_accuracy": "0.5"}
        for e in (1, 2)
    ]
    ft = [{"epoch": "1", "loss": "0.5", "accuracy": "0.8", "val_loss": "0.6", "val_accuracy": "0.7"}]
    outs = [
        plot_training_curves(top, "h", ft, tmp_path / "curves.png"),
        plot_confusion([[3, 1], [0, 4]], ("a", "b"), tmp_path / "confusion.png"),
        plot_prediction_grid(
            [np.zeros((8, 8, 3), np.uint8)] * 3,
            ["a", "b", "a"],
            ["a", "a", "a"],
            [0.9, 0.6, 0.7],
            tmp_path / "grid.png",
        ),
    ]
    for out in outs:
        with Image.open(out) as im:
            assert im.format == "PNG" and im.size[0] > 100
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        plot_confusion([[1]], ("a", "b"), tmp_path / "bad.png")


def test_score_comes_from_an_explicit_table():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    m = compute_metrics(probs, np.array([0, 1, 1, 1]), ("a", "b"))
    assert set(SCORE_METRICS) == {"accuracy", "macro_f1"}
    assert score_of(m, "accuracy") == pytest.approx(0.75)
    assert score_of(m, "macro_f1") == pytest.approx((2 / 3 + 0.8) / 2)
    with pytest.raises(ValueError, match="evaluate.metric.*'loss'"):
        score_of(m, "loss")  # a SplitMetrics attribute, but not a score


class RecordingModel:
    """Stands in for a Keras model: takes ``[B, size, size, 3]``, records every batch, predicts 0.5."""

    def __init__(self, size: int):
        self.input_shape = (None, size, size, 3)
        self.batches: list[np.ndarray] = []

    def predict_on_batch(self, batch):
        x = np.asarray(batch)
        assert x.shape[1:] == self.input_shape[1:], x.shape  # what a real model would raise on
        self.batches.append(x)
        return np.full((len(x), 1), 0.5, np.float32)


@pytest.fixture
def test_rows(tmp_path, imagegen):
    import hashlib

    import pandas as pd
    from PIL import Image

    rows = []
    for i in range(5):
        path = tmp_path / f"img_{i}.png"
        Image.fromarray(imagegen.noisy_array(40 + 3 * i, 52, seed=i)).save(path)
        rows.append(
            {"path": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "class_id": i % 2}
        )
    return tmp_path, pd.DataFrame(rows)


def test_each_model_is_fed_at_its_own_size_with_its_own_interpolation(test_rows, monkeypatch):
    import tasks.data.pipeline
    from tasks.data.pipeline import view_dataset

    root, rows = test_rows
    candidate, top_only = RecordingModel(32), RecordingModel(48)
    models = {
        "candidate": ModelInput.of(candidate, "nearest", True),  # as its bundle records
        "top_only": ModelInput.of(top_only, "bilinear", False),  # as its features were computed
    }
    preview = Preview(10)
    seen: list[int] = []
    out = evaluate_split(models, rows, root, 2, preview, seen.append)
    assert list(out) == ["candidate", "top_only"] and all(v.shape == (5, 1) for v in out.values())

    def pixels(size, interpolation, crop=False):
        ds = view_dataset(rows, root, ImageSpec((size, size), interpolation, crop), batch_size=2)
        return np.concatenate([np.asarray(b) for b in ds])

    np.testing.assert_array_equal(np.concatenate(candidate.batches), pixels(32, "nearest", crop=True))
    np.testing.assert_array_equal(np.concatenate(top_only.batches), pixels(48, "bilinear"))
    assert not np.array_equal(pixels(32, "nearest"), pixels(32, "bilinear"))  # the interpolation matters
    assert not np.array_equal(pixels(32, "nearest", crop=True), pixels(32, "nearest"))  # and the crop
    shown = [item.image for item in preview.chosen()]
    assert len(shown) == 5 and all(image.shape == (32, 32, 3) for image in shown)  # the candidate's inputs
    assert seen == [2, 2, 1, 2, 2, 1]  # each batch of each of the two input pipeline passes

    # models that agree on size and interpolation share one pass of the input pipeline
    calls = []
    original = tasks.data.pipeline.view_dataset

    def counting(*args, **kwargs):
        image = kwargs.get("image", args[2] if len(args) > 2 else None)
        calls.append((image.size, image.interpolation))
        return original(*args, **kwargs)

    monkeypatch.setattr(tasks.data.pipeline, "view_dataset", counting)
    same = {
        "candidate": ModelInput.of(RecordingModel(32), "nearest", True),
        "top_only": ModelInput.of(RecordingModel(32), "nearest", True),
    }
    evaluate_split(same, rows, root, 2, None)
    assert calls == [((32, 32), "nearest")]


def _offer_split(preview: Preview, truth: list[int], mistakes: set[int]) -> None:
    """Offer a test split: image ``i`` has true class ``truth[i]``, predicted wrong when ``i`` is in ``mistakes``."""
    for i, actual in enumerate(truth):
        predicted = 1 - actual if i in mistakes else actual
        preview.offer(i, np.full((4, 4, 3), i, np.uint8), actual, predicted, 0.9)


def test_prediction_grid_is_class_balanced_and_mixes_right_and_wrong():
    """cats_vs_dogs: cats first in split order, one mistake on a dog; the old grid showed that mistake and six
    correct cats, and no correctly classified dog."""
    truth = [0] * 20 + [1] * 20
    preview = Preview(6)
    _offer_split(preview, truth, mistakes={3, 5, 21})
    chosen = preview.chosen()
    assert [c.actual for c in chosen] == [0, 0, 0, 1, 1, 1]  # round-robin: three of each class
    dogs = [c for c in chosen if c.actual == 1]
    assert any(c.wrong for c in dogs) and any(not c.wrong for c in dogs)  # a correct dog and the wrong one
    cats = [c for c in chosen if c.actual == 0]
    assert any(c.wrong for c in cats) and any(not c.wrong for c in cats)
    assert [c.position for c in chosen] == [0, 3, 5, 20, 21, 22]  # grouped by class, split order within
    again = Preview(6)
    _offer_split(again, truth, mistakes={3, 5, 21})
    assert [c.position for c in again.chosen()] == [c.position for c in chosen]  # deterministic


def test_prediction_grid_fills_from_other_classes_and_keeps_few_images():
    three = Preview(8)
    _offer_split(three, [0] * 10 + [1] * 10 + [2] * 1, mistakes=set())
    chosen = three.chosen()
    assert len(chosen) == 8 and [c.actual for c in chosen].count(2) == 1  # class 2 has one image: others fill
    assert (
        sum(len(bucket) for bucket in three.kept.values()) <= 2 * 8
    )  # memory bounded by the grid, not the split
    many = Preview(4)  # more classes than slots: the first four classes, one image each, kinds mixed
    _offer_split(many, [c for c in range(50) for _ in range(3)], mistakes={0, 4, 7, 10})
    picked = many.chosen()
    assert [c.actual for c in picked] == [0, 1, 2, 3] and len(many.classes()) <= 4
    assert {c.wrong for c in picked} == {True, False}
    assert Preview(0).chosen() == []


def test_comparison_says_which_weights_were_kept():
    from tasks.models.evaluation import comparison_markdown

    m = compute_metrics(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]), ("a", "b"))
    results = {"candidate": {"test": m, "val": m}, "top_only": {"test": m, "val": m}}
    sentence = (
        "kept the top-only weights: no fine-tuning epoch lowered val loss 0.0327 by 5% (best epoch 2: 0.0315)"
    )
    text = comparison_markdown(results, ("top-only", sentence))
    assert f"**Candidate:** {sentence} (the two rows are the same weights)." in text
    tuned = comparison_markdown(results, ("fine-tuned", "kept the fine-tuned weights of epoch 1: ..."))
    assert "kept the fine-tuned weights of epoch 1" in tuned and "same weights" not in tuned
    assert "Candidate" not in comparison_markdown(
        results
    )  # unknown (no matching finetune record): nothing said


def test_streaming_preview_picks_what_the_whole_split_would_give():
    """Pruning while streaming keeps exactly what dealing from every image of the split at once would pick."""
    from tasks.models.evaluation import Shown

    rng = np.random.default_rng(0)
    for trial in range(40):
        n, classes, limit = int(rng.integers(1, 60)), int(rng.integers(2, 6)), int(rng.integers(1, 13))
        truth = rng.integers(0, classes, n).tolist()
        mistakes = set(np.flatnonzero(rng.random(n) < 0.3).tolist())
        streamed = Preview(limit)
        _offer_split(streamed, truth, mistakes)
        everything: dict[tuple[int, bool], list[Shown]] = {}
        for i, actual in enumerate(truth):
            predicted = 1 - actual if i in mistakes else actual
            shown = Shown(i, np.zeros((1, 1, 3), np.uint8), actual, predicted, 0.9)
            everything.setdefault((actual, shown.wrong), []).append(shown)
        whole = Preview(limit, everything).chosen()
        assert [c.position for c in streamed.chosen()] == [c.position for c in whole], trial
        assert len(whole) == min(limit, n)
