"""The retrain flow against a real Prefect API: every task run completes, artifacts exist, reruns skip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest

from flows.artifacts import artifact_key, per_class_rows, summary_markdown
from tasks.layout import Layout

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def prefect_api(prefect_api_url) -> str:
    """The session's Prefect server, made current for flows run in this process."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = prefect_api_url
    with temporary_settings({PREFECT_API_URL: url}):
        yield url


# ------------------------------------------------------------------------------------------------- pure parts
def test_per_class_rows_from_flat_metrics() -> None:
    rows = per_class_rows(
        {
            "test_precision_cat": 0.5,
            "test_recall_cat": 1.0,
            "test_f1_cat": 0.6667,
            "val_f1_cat": 0.1,
            "test_f1_dog": 0,
        }
    )
    assert rows == [
        {"class": "cat", "precision": 0.5, "recall": 1.0, "f1": 0.6667},
        {"class": "dog", "f1": 0.0},
    ]


def test_artifact_key_is_prefect_safe() -> None:
    assert artifact_key("report", "Confusion_Matrix.test") == "report-confusion-matrix-test"


def test_summary_markdown_names_the_decision(tmp_path: Path) -> None:
    summary = {
        "status": "not promoted",
        "data_version": "abc.dir",
        "promote": {"promoted": False, "reason": "rejected: too low", "metric": "accuracy", "score": 0.5},
        "stages": {"features": {"computed": 10, "reused": 4, "views": {"train": ["clean"]}}},
    }
    text = summary_markdown(summary, Layout(tmp_path))
    assert "NOT promoted" in text and "rejected: too low" in text and "`abc.dir`" in text
    assert "| computed | 10 |" in text and "| reused | 4 |" in text


# ------------------------------------------------------------------------------------------------ real runs
def _task_runs_and_artifacts(flow_run_id: UUID) -> tuple[list, list]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
        return client.read_task_runs(flow_run_filter=flt), client.read_artifacts(flow_run_filter=flt)


@pytest.mark.slow
def test_retrain_flow_completes_publishes_and_skips_unchanged(
    prefect_api: str, tmp_path: Path, make_workspace
) -> None:
    from flows.flows import retrain
    from tasks.models.registry import read_registry

    ws = make_workspace(tmp_path)
    state = retrain(params_file=str(ws / "params.yaml"), workdir=str(ws), return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    # no champion yet and evaluate.min_accuracy 0: the gate promotes whatever the tiny model scores
    assert summary["status"] == "promoted" and summary["ran"] == [
        "index",
        "features",
        "train_top",
        "finetune",
        "evaluate",
    ]

    task_runs, arts = _task_runs_and_artifacts(state.state_details.flow_run_id)
    done = {
        tag.removeprefix("stage:"): tr.state.type.value
        for tr in task_runs
        for tag in tr.tags
        if tag.startswith("stage:")
    }
    for name in ("index", "features", "train_top", "finetune", "evaluate", "promote"):
        assert done.get(name) == "COMPLETED", done
    keys = {a.key for a in arts if a.key}
    assert {"run-summary", "per-class-metrics", "feature-extraction"} <= keys, keys
    progress = [a for a in arts if a.key == "feature-extraction"]
    assert progress and float(progress[0].data) == 100.0
    table = next(a for a in arts if a.key == "per-class-metrics")
    assert {row["class"] for row in json.loads(table.data)} == {"red", "blue"}
    summary_md = next(a for a in arts if a.key == "run-summary").data
    assert "## Promotion" in summary_md and summary["promote"]["reason"] in summary_md
    # the PNG reports the evaluate stage wrote are embedded in the summary (file:// links open nothing in a browser)
    pngs = sorted(p.name for p in (ws / "reports").glob("*.png"))
    assert {"training_curves.png", "confusion_matrix.png", "predictions.png"} <= set(pngs)
    assert summary_md.count("](data:image/") == len(pngs), summary_md[:2000]
    assert not [a for a in arts if a.key and a.key.startswith("report-")]

    reg = read_registry(Layout(ws))
    assert len(reg.candidates) == 1 and reg.candidates[0].flow_run_id == str(state.state_details.flow_run_id)
    assert reg.champion == reg.candidates[0].id

    # nothing changed since the champion: the next run skips cleanly, records no candidate
    skipped = retrain(params_file=str(ws / "params.yaml"), workdir=str(ws), return_state=True)
    assert skipped.name == "Skipped" and skipped.is_completed(), skipped  # its own state in the dashboard
    again = skipped.result()
    assert again["status"] == "skipped" and "unchanged" in again["reason"], again
    assert skipped.message == again["reason"]
    assert again["ran"] == ["index"] and "promote" not in again  # no DVC here: the index tells what changed
    assert len(read_registry(Layout(ws)).candidates) == 1


def test_stage_cli_reports_lock_holder(
    prefect_api: str, tmp_path: Path, make_workspace, prefect_client_env
) -> None:
    """A second writer gets a clear message naming the holder's PID (exit code 3), before any work starts."""
    from tasks.io.locking import workspace_lock

    ws = make_workspace(tmp_path, per_class=2)
    env = prefect_client_env(prefect_api)
    with workspace_lock(Layout(ws), command="test holder"):
        proc = subprocess.run(
            [
                str(Path(sys.executable).with_name("retrainflow")),
                "stage",
                "index",
                "-p",
                str(ws / "params.yaml"),
                "-w",
                str(ws),
            ],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 3, proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr and "test holder" in proc.stderr
    assert not (ws / "index").exists()
