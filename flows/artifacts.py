"""Prefect artifacts the flows publish: feature-extraction progress, per-class metrics, the run summary, PNG links.

Functions here are called from inside a flow or task run (Prefect attaches the artifact to it). Rendering is
split from publishing: ``*_markdown`` / ``*_rows`` are pure and unit-testable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

from tasks.layout import Layout

PER_CLASS_FIELDS = ("precision", "recall", "f1")


# ----------------------------------------------------------------------------------------------- pure parts
def per_class_rows(metrics: Mapping[str, Any], split: str = "test") -> list[dict[str, Any]]:
    """Rows ``{class, precision, recall, f1}`` from flat evaluate metrics (``test_precision_<class>`` ...)."""
    classes: dict[str, dict[str, Any]] = {}
    for field in PER_CLASS_FIELDS:
        prefix = f"{split}_{field}_"
        for key, value in metrics.items():
            if key.startswith(prefix):
                name = key[len(prefix) :]
                classes.setdefault(name, {"class": name})[field] = round(float(value), 4)
    return [classes[name] for name in sorted(classes)]


def _scalar_items(manifest: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in manifest.items() if isinstance(v, str | int | float | bool) or v is None]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def index_counts_markdown(layout: Layout) -> str:
    """Images per class and split, from the index table (empty string when there is no index yet)."""
    if not layout.index_table.is_file():
        return ""
    import pandas as pd

    frame = pd.read_csv(layout.index_table, usecols=["label", "split"])
    counts = frame.groupby(["label", "split"]).size().unstack(fill_value=0)
    splits = [s for s in ("train", "val", "test") if s in counts.columns]
    lines = ["| class | " + " | ".join(splits) + " | total |", "|---|" + "---|" * (len(splits) + 1)]
    for label, row in counts.iterrows():
        lines.append(
            f"| {label} | " + " | ".join(str(int(row[s])) for s in splits) + f" | {int(row.sum())} |"
        )
    lines.append(
        "| **all** | " + " | ".join(str(int(counts[s].sum())) for s in splits) + f" | {len(frame)} |"
    )
    return "\n".join(lines)


def summary_markdown(summary: Mapping[str, Any], layout: Layout) -> str:
    """The run summary: data version, image counts, per-stage manifests, reports, and the promotion decision."""
    out = ["# retrainflow run summary", ""]
    status = summary.get("status", "?")
    out.append(f"**Status:** {status}  ")
    for key in ("reason", "data_version", "index_hash", "params_hash", "git_commit", "flow_run_id"):
        if summary.get(key) is not None:
            out.append(f"**{key.replace('_', ' ')}:** `{summary[key]}`  ")
    promote = summary.get("promote")
    if isinstance(promote, Mapping):
        verdict = "PROMOTED" if promote.get("promoted") else "NOT promoted"
        out += ["", "## Promotion", "", f"**{verdict}** — {promote.get('reason', '')}", ""]
        out.append(
            f"candidate `{promote.get('candidate_id')}`: test {promote.get('metric')} = "
            f"{_fmt(promote.get('score'))}; champion before: {_fmt(promote.get('champion_score'))}; "
            f"champion now: `{promote.get('champion')}`"
        )
    counts = index_counts_markdown(layout)
    if counts:
        out += ["", "## Images", "", counts]
    stages = summary.get("stages") or {}
    for name, manifest in stages.items():
        if not isinstance(manifest, Mapping):
            continue
        items = _scalar_items(manifest)
        if not items:
            continue
        out += ["", f"## {name}", "", "| field | value |", "|---|---|"]
        out += [f"| {k} | {_fmt(v)} |" for k, v in items]
    for title, path in (
        ("Head comparison", layout.reports_dir / "top_comparison.md"),
        ("Top-only vs fine-tuned", layout.reports_dir / "model_comparison.md"),
    ):
        if path.is_file():
            body = "\n".join(
                ("##" + line) if line.startswith("#") else line for line in path.read_text().splitlines()
            )
            out += ["", f"## {title}", "", body.strip()[:20_000]]
    pngs = report_pngs(layout)
    if pngs:
        out += ["", "## Reports", ""] + [f"- `{p}`" for p in pngs]
    return "\n".join(out) + "\n"


def report_pngs(layout: Layout) -> list[Path]:
    """The PNG reports the evaluate stage wrote (absolute paths, sorted)."""
    if not layout.reports_dir.is_dir():
        return []
    return sorted(p.resolve() for p in layout.reports_dir.glob("*.png"))


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    raw = "-".join(parts).lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in raw).strip("-")[:100]


# ------------------------------------------------------------------------------------------------ publishing
def start_progress(key: str, description: str) -> UUID | None:
    """A progress artifact at 0 %, or None when not inside a Prefect run."""
    from prefect.artifacts import create_progress_artifact

    try:
        return create_progress_artifact(progress=0.0, key=artifact_key(key), description=description)
    except Exception:  # noqa: BLE001 - artifacts are best effort: never fail a stage over a dashboard widget
        return None


def update_progress(artifact_id: UUID | None, fraction: float) -> None:
    """Set the progress artifact to ``fraction`` (0–1) as a percentage."""
    if artifact_id is None:
        return
    from prefect.artifacts import update_progress_artifact

    update_progress_artifact(artifact_id=artifact_id, progress=round(100.0 * max(0.0, min(1.0, fraction)), 1))


class ProgressReporter:
    """A ``(done, total)`` callback that moves a progress artifact in steps of at least ``step`` (0–1)."""

    def __init__(self, artifact_id: UUID | None, step: float = 0.02):
        if not 0 < step <= 1:
            raise ValueError(f"expected a step in (0, 1], got {step!r}")
        self.artifact_id = artifact_id
        self.step = step
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        fraction = done / total if total > 0 else 1.0
        if fraction >= 1.0 or fraction - self.last >= self.step:
            self.last = fraction
            update_progress(self.artifact_id, fraction)


def publish_metrics_table(metrics: Mapping[str, Any]) -> None:
    """Table artifact ``per-class-metrics``: precision / recall / F1 per class on the test split."""
    from prefect.artifacts import create_table_artifact

    rows = per_class_rows(metrics)
    if rows:
        create_table_artifact(
            table=rows,
            key="per-class-metrics",
            description=f"Per-class test metrics (accuracy {_fmt(metrics.get('test_accuracy'))}, "
            f"macro F1 {_fmt(metrics.get('test_macro_f1'))})",
        )


def publish_summary(summary: Mapping[str, Any], layout: Layout) -> None:
    """Markdown artifact ``run-summary``."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        markdown=summary_markdown(summary, layout),
        key="run-summary",
        description=f"retrain: {summary.get('status')}",
    )


def publish_report_links(layout: Layout) -> list[Path]:
    """One link artifact per PNG report (``file://`` URLs of the workspace files)."""
    from prefect.artifacts import create_link_artifact

    pngs = report_pngs(layout)
    for png in pngs:
        create_link_artifact(
            link=png.as_uri(), link_text=png.name, key=artifact_key("report", png.stem), description=str(png)
        )
    return pngs


def manifest_dict(manifest: Any) -> dict[str, Any]:
    """A stage manifest (dataclass, pydantic model, mapping) as a JSON-able dict."""
    import dataclasses

    if dataclasses.is_dataclass(manifest) and not isinstance(manifest, type):
        raw: Any = dataclasses.asdict(manifest)
    elif hasattr(manifest, "model_dump"):
        raw = manifest.model_dump(mode="json")
    elif isinstance(manifest, Mapping):
        raw = dict(manifest)
    elif manifest is None:
        raw = {}
    else:
        raw = {"value": repr(manifest)}
    return json.loads(json.dumps(raw, default=str))
