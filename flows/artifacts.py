"""Prefect artifacts the flows publish: feature-extraction progress, per-class metrics, the run summary, PNG links.

Functions here are called from inside a flow or task run (Prefect attaches the artifact to it). Rendering is
split from publishing: ``*_markdown`` / ``*_rows`` are pure and unit-testable.

The dashboard cannot open the workspace's files (a ``file://`` link from an http page is blocked, and the server
serves no files), so the run summary embeds the report images as ``data:`` URIs: both Prefect 3.8.8 UIs (``/``
and ``/v2``) render ``![alt](data:image/png;base64,...)`` in a markdown artifact (checked with a real server and
headless Chromium), and the API took a 5 MB markdown artifact. Each image is flattened to RGB and downscaled to
:data:`EMBED_MAX_WIDTH`; a lossless PNG is kept for charts, a JPEG where the PNG is large (photo grids).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

from tasks.layout import Layout

PER_CLASS_FIELDS = ("precision", "recall", "f1")
EMBED_MAX_WIDTH = 800
# a lossless PNG up to this size is kept (charts stay crisp); above it the smaller of PNG and JPEG
EMBED_PNG_MAX_BYTES = 128_000
EMBED_JPEG_QUALITY = 85
# base64 characters of all the images one summary embeds; images past it are named by path instead
EMBED_TOTAL_CHARS = 2_000_000


# the evaluate stage's PNGs first, in reading order; any other PNG in reports/ after them, by name
def report_order(layout: Layout) -> tuple[str, ...]:
    """The evaluate stage's PNGs, most read first (other PNGs in ``reports/`` follow by name)."""
    return tuple(p.name for p in (layout.training_curves_png, layout.confusion_png, layout.predictions_png))


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


def per_class_markdown(metrics: Mapping[str, Any], split: str = "test") -> str:
    """A markdown table of :func:`per_class_rows` (empty string when the metrics have no per-class fields)."""
    rows = per_class_rows(metrics, split)
    if not rows:
        return ""
    lines = [f"| class | {' | '.join(PER_CLASS_FIELDS)} |", "|---|" + "---:|" * len(PER_CLASS_FIELDS)]
    lines += [
        f"| {_fmt(row['class'])} | " + " | ".join(_fmt(row.get(f, "")) for f in PER_CLASS_FIELDS) + " |"
        for row in rows
    ]
    overall = [
        f"{label} {_fmt(metrics[key])}"
        for label, key in ((f"{split} accuracy", f"{split}_accuracy"), ("macro F1", f"{split}_macro_f1"))
        if isinstance(metrics.get(key), int | float)
    ]
    return "\n".join(([", ".join(overall), ""] if overall else []) + lines)


def _evaluate_metrics(layout: Layout) -> dict[str, Any]:
    """``metrics/evaluate.json`` when the workspace has a readable one, else ``{}`` (the summary still renders)."""
    from tasks.models.registry import RegistryError, read_evaluate_metrics

    try:
        return read_evaluate_metrics(layout)
    except (RegistryError, OSError, ValueError):
        return {}


def _without_verdict(reason: Any) -> str:
    """``"skipped: data unchanged"`` -> ``"data unchanged"``: the status is said once, by the caller."""
    text = str(reason or "").strip()
    head, sep, rest = text.partition(": ")
    return rest if sep and head in ("skipped", "promoted", "rejected") else text


def summary_title(summary: Mapping[str, Any]) -> str:
    """One line for the artifact's description and heading: ``retrain skipped: <reason>`` for a skipped run (so a
    scheduled run that trained nothing does not read like a retrain), ``retrain <status>: <reason>`` otherwise."""
    status = summary.get("status", "?")
    reason = _without_verdict(summary.get("reason"))
    return f"retrain {status}: {reason}" if reason else f"retrain {status}"


def summary_markdown(
    summary: Mapping[str, Any], layout: Layout, *, embed_images: bool = True, max_width: int = EMBED_MAX_WIDTH
) -> str:
    """The run summary, most read first: status and versions, the promotion decision, per-class test metrics,
    image counts, the report images (embedded as ``data:`` URIs unless ``embed_images`` is false), the comparison
    reports, then each stage's manifest.

    A skipped run trained nothing: its heading says ``skipped: <reason>`` and it shows no metrics or reports (the
    workspace's are an earlier run's)."""
    status = summary.get("status", "?")
    skipped = status == "skipped"
    title = summary_title(summary)
    out = [f"# {title}" if skipped else "# retrainflow run summary", ""]
    out.append(f"**Status:** {status}  ")
    for key in ("reason", "data_version", "index_hash", "params_hash", "git_commit", "flow_run_id"):
        if summary.get(key) is not None:
            out.append(f"**{key.replace('_', ' ')}:** `{summary[key]}`  ")
    if skipped:
        out += [
            "",
            "Nothing was trained, evaluated or promoted in this run; the champion is unchanged. The metrics and "
            "reports in the workspace are from the run that trained it: see that run's summary.",
        ]
    promote = summary.get("promote")
    if isinstance(promote, Mapping):
        verdict = "PROMOTED" if promote.get("promoted") else "NOT promoted"
        out += ["", "## Promotion", "", f"**{verdict}** — {promote.get('reason', '')}", ""]
        out.append(
            f"candidate `{promote.get('candidate_id')}`: test {promote.get('metric')} = "
            f"{_fmt(promote.get('score'))}; champion before: {_fmt(promote.get('champion_score'))}; "
            f"champion now: `{promote.get('champion')}`"
        )
    if not skipped:
        per_class = per_class_markdown(_evaluate_metrics(layout))
        if per_class:
            out += ["", "## Per-class test metrics", "", per_class]
    counts = index_counts_markdown(layout)
    if counts:
        out += ["", "## Images", "", counts]
    if not skipped:
        reports = reports_markdown(layout, embed=embed_images, max_width=max_width)
        if reports:
            out += ["", reports]
        for heading, path in (
            ("Head comparison", layout.top_report),
            ("Top-only vs fine-tuned", layout.model_comparison),
        ):
            if path.is_file():
                body = "\n".join(
                    ("##" + line) if line.startswith("#") else line for line in path.read_text().splitlines()
                )
                out += ["", f"## {heading}", "", body.strip()[:20_000]]
    stages = summary.get("stages") or {}
    for name, manifest in stages.items():
        if not isinstance(manifest, Mapping):
            continue
        items = _scalar_items(manifest)
        if not items:
            continue
        out += ["", f"## {name}", "", "| field | value |", "|---|---|"]
        out += [f"| {k} | {_fmt(v)} |" for k, v in items]
    return "\n".join(out) + "\n"


def image_data_uri(path: Path, max_width: int = EMBED_MAX_WIDTH) -> str:
    """``data:image/...;base64,...`` of the image at ``path``: flattened onto white, at most ``max_width`` px wide,
    a lossless PNG when that is at most :data:`EMBED_PNG_MAX_BYTES`, else the smaller of the PNG and a JPEG."""
    from PIL import Image

    with Image.open(path) as src:
        src.load()
        if src.mode in ("RGBA", "LA", "P"):
            rgba = src.convert("RGBA")
            image = Image.new("RGB", rgba.size, "white")
            image.paste(rgba, mask=rgba.getchannel("A"))
        else:
            image = src.convert("RGB")
    if image.width > max_width:
        image = image.resize(
            (max_width, max(1, round(image.height * max_width / image.width))), Image.LANCZOS
        )
    png = io.BytesIO()
    image.save(png, "PNG", optimize=True)
    data, mime = png.getvalue(), "image/png"
    if len(data) > EMBED_PNG_MAX_BYTES:
        jpeg = io.BytesIO()
        image.save(jpeg, "JPEG", quality=EMBED_JPEG_QUALITY, optimize=True)
        if len(jpeg.getvalue()) < len(data):
            data, mime = jpeg.getvalue(), "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def reports_markdown(
    layout: Layout, *, embed: bool = True, max_width: int = EMBED_MAX_WIDTH, budget: int = EMBED_TOTAL_CHARS
) -> str:
    """``## Reports``: each report PNG as an embedded image (``### name``, the image, its workspace path), in
    :func:`report_order`; past ``budget`` base64 characters, or when ``embed`` is false or an image cannot be
    read, the PNG is named by path only. Empty string when there are no PNG reports."""
    pngs = report_pngs(layout)
    if not pngs:
        return ""
    rank = {name: i for i, name in enumerate(report_order(layout))}
    pngs.sort(key=lambda p: (rank.get(p.name, len(rank)), p.name))
    out = ["## Reports"]
    used = 0
    for png in pngs:
        uri = ""
        note = ""
        if embed:
            try:
                uri = image_data_uri(png, max_width)
            except (OSError, ValueError) as err:
                note = f" (not embedded: {err})"
            if uri and used + len(uri) > budget:
                uri, note = "", f" (not embedded: over the {budget:,}-character budget for images)"
        out += ["", f"### {png.stem.replace('_', ' ')}", ""]
        if uri:
            used += len(uri)
            out += [f"![{png.stem}]({uri})", ""]
        out.append(f"`{png}`{note}")
    return "\n".join(out)


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


def publish_summary(summary: Mapping[str, Any], layout: Layout) -> UUID:
    """Markdown artifact ``run-summary`` (the report images embedded); its description is :func:`summary_title`,
    e.g. ``retrain skipped: <reason>``. Returns the artifact's id (its dashboard page is
    ``<UI>/artifacts/artifact/<id>``)."""
    from prefect.artifacts import create_markdown_artifact

    return create_markdown_artifact(
        markdown=summary_markdown(summary, layout),
        key="run-summary",
        description=summary_title(summary),
    )


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
