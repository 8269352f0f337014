"""flows/artifacts.py: the run summary's markdown (decision, per-class table, embedded report images, skipped runs)
rendered alone, and published to a real Prefect server and read back through the client."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from uuid import UUID

import numpy as np
import pytest
from PIL import Image

from flows.artifacts import (
    EMBED_MAX_WIDTH,
    image_data_uri,
    per_class_markdown,
    reports_markdown,
    summary_markdown,
    summary_title,
)
from tasks.layout import Layout

DATA_URI = re.compile(r"!\[([^\]]*)\]\((data:(image/(?:png|jpeg));base64,([A-Za-z0-9+/=]+))\)")

METRICS = {
    "metric": "accuracy",
    "test_count": 30,
    "test_accuracy": 0.9,
    "test_macro_f1": 0.8989,
    "test_precision_daisy": 1.0,
    "test_recall_daisy": 0.8,
    "test_f1_daisy": 0.8889,
    "test_precision_rose": 0.8333,
    "test_recall_rose": 1.0,
    "test_f1_rose": 0.9091,
    "test_precision_tulip": 0.9,
    "test_recall_tulip": 0.9,
    "test_f1_tulip": 0.9,
    "val_f1_daisy": 0.5,
    "score": 0.9,
}

PROMOTED = {
    "flow_run_id": "00000000-0000-0000-0000-000000000000",
    "params_hash": "p1234567",
    "git_commit": "abc1234",
    "index_hash": "i7654321",
    "data_version": "dvc:0123abcd.dir",
    "ran": ["index", "features", "train_top", "finetune", "evaluate"],
    "stages": {
        "index": {"kept": 60, "rejected": 0},
        "features": {"computed": 60, "reused": 0, "views": {"train": ["clean"]}},
        "evaluate": {"metric": "accuracy", "score": 0.9, "test_accuracy": 0.9},
    },
    "promote": {
        "promoted": True,
        "reason": "promoted: no champion yet and test accuracy 0.9000 >= min_accuracy 0.5000",
        "candidate_id": "20260101T000000000000Z-p12345",
        "metric": "accuracy",
        "score": 0.9,
        "champion_score": None,
        "champion": "20260101T000000000000Z-p12345",
    },
    "status": "promoted",
    "reason": "promoted: no champion yet and test accuracy 0.9000 >= min_accuracy 0.5000",
}

SKIPPED_REASON = (
    "skipped: data (index i7654321) and params (p1234567) unchanged since champion 20260101T-p12345"
)
SKIPPED = {
    "flow_run_id": "00000000-0000-0000-0000-000000000001",
    "params_hash": "p1234567",
    "index_hash": "i7654321",
    "ran": ["index"],
    "stages": {"index": {"kept": 60, "rejected": 0}},
    "status": "skipped",
    "reason": SKIPPED_REASON,
}


def make_outputs(root: Path) -> Layout:
    """What a finished run leaves for the summary: index table, evaluate metrics, two .md reports, a small chart
    PNG with transparency and a wide photo-like PNG (random noise: too big as a lossless PNG)."""
    layout = Layout(root)
    layout.index_dir.mkdir(parents=True)
    rows = ["path,label,class_id,split"]
    for cid, label in enumerate(("daisy", "rose", "tulip")):
        for i in range(20):
            split = "train" if i < 10 else "val" if i < 15 else "test"
            rows.append(f"{label}/{i}.jpg,{label},{cid},{split}")
    layout.index_table.write_text("\n".join(rows) + "\n")
    layout.metrics_dir.mkdir()
    (layout.metrics_dir / "evaluate.json").write_text(json.dumps(METRICS))
    layout.reports_dir.mkdir()
    (layout.reports_dir / "top_comparison.md").write_text(
        "# Top model comparison\n\n| head |\n|---|\n| linear |\n"
    )
    (layout.reports_dir / "model_comparison.md").write_text(
        "# Top-only vs fine-tuned\n\n| model |\n|---|\n| x |\n"
    )
    chart = Image.new("RGBA", (120, 80), (0, 0, 0, 0))
    chart.paste((200, 30, 30, 255), (10, 10, 60, 70))
    chart.save(layout.reports_dir / "confusion_matrix.png")
    noise = np.random.default_rng(0).integers(0, 256, (500, 1600, 3), dtype=np.uint8)
    Image.fromarray(noise, "RGB").save(layout.reports_dir / "predictions.png")
    return layout


def embedded(markdown: str) -> dict[str, Image.Image]:
    """``{alt text: decoded image}`` for every ``![alt](data:...)`` in ``markdown``."""
    out = {}
    for alt, _uri, mime, payload in DATA_URI.findall(markdown):
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        assert image.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[mime]
        out[alt] = image
    return out


def check_promoted_markdown(text: str, layout: Layout) -> None:
    """The decision, the per-class table and the embedded images, as the dashboard will show them."""
    assert "# retrainflow run summary" in text and "**Status:** promoted" in text
    assert "**PROMOTED** — promoted: no champion yet and test accuracy 0.9000" in text
    assert "## Per-class test metrics" in text and "test accuracy 0.9000, macro F1 0.8989" in text
    assert "| class | precision | recall | f1 |" in text
    for row in (
        "| daisy | 1.0000 | 0.8000 | 0.8889 |",
        "| rose | 0.8333 | 1.0000 | 0.9091 |",
        "| tulip | 0.9000 | 0.9000 | 0.9000 |",
    ):
        assert row in text
    assert "| **all** | 30 | 15 | 15 | 60 |" in text  # image counts from index.csv
    assert "## Head comparison" in text and "## Top-only vs fine-tuned" in text
    # most read first: the decision, per-class figures, counts, images, the comparisons, then stage details
    order = ["## Promotion", "## Per-class", "## Images", "## Reports", "## Head comparison", "## features"]
    assert [text.index(h) for h in order] == sorted(text.index(h) for h in order)
    images = embedded(text)
    assert set(images) == {"confusion_matrix", "predictions"}, set(images)
    # the chart: small, kept as a lossless PNG at its own size, transparency flattened onto white
    chart = images["confusion_matrix"]
    assert chart.format == "PNG" and chart.size == (120, 80) and chart.mode == "RGB"
    assert chart.getpixel((0, 0)) == (255, 255, 255) and chart.getpixel((30, 30)) == (200, 30, 30)
    # the wide noisy one: downscaled to the embed width (aspect kept), a JPEG because the PNG would be larger
    photo = images["predictions"]
    assert photo.format == "JPEG" and photo.size == (EMBED_MAX_WIDTH, 250)
    # the evaluate stage's order (curves, confusion, predictions), each with its workspace path
    assert text.index("![confusion_matrix]") < text.index("![predictions]")
    for name in ("confusion_matrix.png", "predictions.png"):
        assert f"`{(layout.reports_dir / name).resolve()}`" in text


# ------------------------------------------------------------------------------------------------- pure parts
def test_summary_markdown_embeds_reports_and_per_class_table(tmp_path: Path) -> None:
    layout = make_outputs(tmp_path)
    text = summary_markdown(PROMOTED, layout)
    check_promoted_markdown(text, layout)
    assert len(text) < 600_000, len(text)


def test_summary_markdown_without_embedding_names_the_files(tmp_path: Path) -> None:
    layout = make_outputs(tmp_path)
    text = summary_markdown(PROMOTED, layout, embed_images=False)
    assert "data:" not in text and f"`{(layout.reports_dir / 'predictions.png').resolve()}`" in text


def test_reports_over_budget_are_named_not_embedded(tmp_path: Path) -> None:
    layout = make_outputs(tmp_path)
    small = len(image_data_uri(layout.reports_dir / "confusion_matrix.png"))
    text = reports_markdown(layout, budget=small + 10)
    assert set(embedded(text)) == {"confusion_matrix"}
    assert "predictions.png` (not embedded: over the" in text


def test_unreadable_png_is_named_not_embedded(tmp_path: Path) -> None:
    layout = make_outputs(tmp_path)
    (layout.reports_dir / "training_curves.png").write_bytes(b"not a png")
    text = reports_markdown(layout)
    assert set(embedded(text)) == {"confusion_matrix", "predictions"}
    assert "training_curves.png` (not embedded:" in text
    assert text.index("### training curves") < text.index("### confusion matrix")  # report_order


def test_image_data_uri_keeps_small_charts_lossless(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    Image.new("RGB", (900, 300), "white").save(path)
    uri = image_data_uri(path)
    assert uri.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert image.size == (EMBED_MAX_WIDTH, 267)


def test_per_class_markdown_is_empty_without_per_class_metrics() -> None:
    assert per_class_markdown({"test_accuracy": 0.5}) == ""


def test_skipped_summary_says_so_and_shows_no_stale_reports(tmp_path: Path) -> None:
    layout = make_outputs(tmp_path)  # an earlier run's outputs are in the workspace
    assert summary_title(SKIPPED) == (
        "retrain skipped: data (index i7654321) and params (p1234567) unchanged since champion 20260101T-p12345"
    )
    text = summary_markdown(SKIPPED, layout)
    assert text.startswith(f"# {summary_title(SKIPPED)}\n")
    assert "Nothing was trained, evaluated or promoted in this run" in text
    assert "data:" not in text and "## Per-class" not in text and "## Promotion" not in text
    assert "## Reports" not in text and "## Head comparison" not in text
    assert "| **all** | 30 | 15 | 15 | 60 |" in text  # the index this run checked is current


def test_summary_title_says_the_status_once() -> None:
    assert summary_title(PROMOTED).startswith("retrain promoted: no champion yet and test accuracy")
    rejected = {"status": "not promoted", "reason": "rejected: test accuracy 0.4 is below min_accuracy 0.5"}
    assert summary_title(rejected) == "retrain not promoted: test accuracy 0.4 is below min_accuracy 0.5"
    assert summary_title({"status": "promoted"}) == "retrain promoted"


# ------------------------------------------------------------------------------------------------ real server
@pytest.fixture(scope="module")
def prefect_api(prefect_api_url) -> str:
    """The session's Prefect server (the ``prefect_api_url`` fixture), made current for flows run in this process."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = prefect_api_url
    with temporary_settings({PREFECT_API_URL: url}):
        yield url


def _run_artifacts(flow_run_id: UUID) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["run-summary", "per-class-metrics"])),
        )
    return {a.key: a for a in arts}


@pytest.mark.slow
def test_published_summary_reads_back_from_a_real_server(prefect_api: str, tmp_path: Path) -> None:
    from prefect import flow

    from flows.artifacts import publish_metrics_table, publish_summary
    from tasks.models.registry import read_evaluate_metrics

    @flow(name="publish-summary-test")
    def publish(workdir: str, summary: dict) -> str:
        layout = Layout(Path(workdir))
        if summary["status"] != "skipped":
            publish_metrics_table(read_evaluate_metrics(layout))
        return str(publish_summary(summary, layout))

    layout = make_outputs(tmp_path)
    state = publish(str(tmp_path), PROMOTED, return_state=True)
    assert state.is_completed(), state
    arts = _run_artifacts(state.state_details.flow_run_id)
    assert set(arts) == {"run-summary", "per-class-metrics"}, set(arts)
    summary = arts["run-summary"]
    assert str(summary.id) == state.result()  # publish_summary returns the id the dashboard page is named by
    assert summary.type == "markdown" and summary.description == summary_title(PROMOTED)
    check_promoted_markdown(summary.data, layout)  # the server stored the images whole
    table = json.loads(arts["per-class-metrics"].data)
    assert [row["class"] for row in table] == ["daisy", "rose", "tulip"]
    assert table[1] == {"class": "rose", "precision": 0.8333, "recall": 1.0, "f1": 0.9091}

    state = publish(str(tmp_path), SKIPPED, return_state=True)
    assert state.is_completed(), state
    arts = _run_artifacts(state.state_details.flow_run_id)
    assert set(arts) == {"run-summary"}, set(arts)
    skipped = arts["run-summary"]
    assert skipped.description == f"retrain skipped: {SKIPPED_REASON.removeprefix('skipped: ')}"
    assert skipped.data.startswith(f"# {skipped.description}\n") and "data:" not in skipped.data
