"""Model registry and promotion gate: every candidate is recorded; the champion changes only through the gate.

The registry is one JSON file (``layout.model_registry``)::

    {"version": 1, "champion": "<candidate id or null>", "candidates": [{...}, ...]}

Each candidate records the data version (:func:`data_version`: ``dvc:<md5>`` of ``data.dvc`` when ``data.root``
lies inside the folder it tracks, else ``index:<index content hash>``), the params hash
(``Params.section_hash()``), the git commit, the test metrics, the sha256 of its ``.keras`` file and of its
metrics, whether it was promoted and why. The gate (:func:`gate`) is a pure function; :func:`run_promote` applies it
to the candidate the pipeline just produced, copies a promoted model to ``layout.champion_dir`` and appends the
record. Promotion is idempotent: a candidate whose model and metrics are already recorded is not recorded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from tasks.config import EvaluateConfig, Params
from tasks.errors import RegistryError  # noqa: F401  (raised here; defined with the other domain errors)
from tasks.io.atomic import atomic_dir, atomic_symlink, atomic_write_json, remove_stale_temps_in
from tasks.layout import Layout

REGISTRY_VERSION = 1


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict and a sentence saying why."""

    promote: bool
    reason: str


@dataclass(frozen=True)
class Candidate:
    """One registry record: a model the pipeline produced, promoted or not."""

    id: str
    created_at: str
    data_version: str
    index_hash: str
    params_hash: str
    git_commit: str | None
    metric: str
    score: float
    metrics: dict[str, Any]
    promoted: bool
    reason: str
    previous_champion: str | None = None
    model_path: str | None = None
    flow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    model_sha256: str | None = None  # the .keras file's; None in records written before it was kept
    metrics_sha256: str | None = None  # of the evaluate metrics, as :func:`metrics_sha256` computes it


@dataclass(frozen=True)
class Registry:
    champion: str | None
    candidates: tuple[Candidate, ...]

    def champion_entry(self) -> Candidate | None:
        """The current champion's record, or None when nothing was ever promoted."""
        for cand in reversed(self.candidates):
            if cand.id == self.champion:
                return cand
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": REGISTRY_VERSION,
            "champion": self.champion,
            "candidates": [asdict(c) for c in self.candidates],
        }


@dataclass(frozen=True)
class PromoteManifest:
    """What :func:`run_promote` decided (JSON-able)."""

    candidate_id: str
    promoted: bool
    reason: str
    metric: str
    score: float
    champion_score: float | None
    champion: str | None
    registry: str
    already_registered: bool = False  # the same model and metrics were recorded before: nothing was written

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- the gate
def gate(score: float, champion_score: float | None, cfg: EvaluateConfig) -> GateDecision:
    """Promote iff ``score >= cfg.min_accuracy`` and ``score >= champion_score - cfg.tolerance``.

    ``score`` is the candidate's test value of ``cfg.metric``; ``champion_score`` is None when there is no
    champion yet. Pure: no I/O.
    """
    if not isinstance(score, int | float) or isinstance(score, bool) or score != score:
        raise RegistryError(f"expected a numeric candidate score, got {score!r}")
    if champion_score is not None and (
        not isinstance(champion_score, int | float) or isinstance(champion_score, bool)
    ):
        raise RegistryError(f"expected a numeric champion score or None, got {champion_score!r}")
    name = cfg.metric
    if score < cfg.min_accuracy:
        return GateDecision(
            False, f"rejected: test {name} {score:.4f} is below evaluate.min_accuracy {cfg.min_accuracy:.4f}"
        )
    if champion_score is None:
        return GateDecision(
            True,
            f"promoted: no champion yet and test {name} {score:.4f} >= min_accuracy {cfg.min_accuracy:.4f}",
        )
    floor = champion_score - cfg.tolerance
    if score < floor:
        return GateDecision(
            False,
            f"rejected: test {name} {score:.4f} < champion {champion_score:.4f} - tolerance "
            f"{cfg.tolerance:.4f} = {floor:.4f}",
        )
    return GateDecision(
        True,
        f"promoted: test {name} {score:.4f} >= champion {champion_score:.4f} - tolerance {cfg.tolerance:.4f}"
        f" and >= min_accuracy {cfg.min_accuracy:.4f}",
    )


def unchanged_reason(registry: Registry, index_hash: str, params_hash: str) -> str | None:
    """A sentence when neither the data nor the params changed since the champion; None when a retrain is due."""
    champ = registry.champion_entry()
    if champ is None:
        return None
    if champ.index_hash == index_hash and champ.params_hash == params_hash:
        return f"skipped: data (index {index_hash}) and params ({params_hash}) unchanged since champion {champ.id}"
    return None


# --------------------------------------------------------------------------------------------- registry I/O
def read_registry(layout: Layout) -> Registry:
    """The registry at ``layout.model_registry`` (an empty one when the file does not exist)."""
    path = layout.model_registry
    if not path.exists():
        return Registry(champion=None, candidates=())
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RegistryError(f"{path}: not a readable registry ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("candidates"), list):
        raise RegistryError(f"{path}: expected an object with a 'candidates' list, got {str(raw)[:200]!r}")
    fields = set(Candidate.__dataclass_fields__)
    cands = []
    for item in raw["candidates"]:
        if not isinstance(item, dict) or "id" not in item:
            raise RegistryError(f"{path}: expected candidate objects with an 'id', got {item!r}")
        cands.append(Candidate(**{k: v for k, v in item.items() if k in fields}))
    registry = Registry(champion=raw.get("champion"), candidates=tuple(cands))
    _reconcile_champion_link(layout, registry.champion)
    return registry


def _reconcile_champion_link(layout: Layout, champion: str | None) -> None:
    """Recovery on open: the registry is the commit point of a promotion. A run killed after writing it but
    before swapping the ``models/champion`` link left the link on the previous champion: point it right."""
    if champion is None or not champion_model(layout, champion).is_file():
        return
    link = layout.champion_dir
    if link.is_symlink() and Path(os.readlink(link)).name == champion:
        return
    _activate_champion(layout, champion)


def write_registry(layout: Layout, registry: Registry) -> Path:
    """Write the registry atomically (:func:`tasks.io.atomic.atomic_write_json`)."""
    return atomic_write_json(layout.model_registry, registry.to_json())


def record(layout: Layout, candidate: Candidate) -> Registry:
    """Append ``candidate``; it becomes the champion when it was promoted."""
    reg = read_registry(layout)
    if any(c.id == candidate.id for c in reg.candidates):
        raise RegistryError(f"candidate id {candidate.id!r} is already in {layout.model_registry}")
    new = Registry(
        champion=candidate.id if candidate.promoted else reg.champion,
        candidates=(*reg.candidates, candidate),
    )
    write_registry(layout, new)
    return new


# ------------------------------------------------------------------------------------------ identity facts
def _dvc_out(dvc_file: Path) -> dict[str, Any] | None:
    """``outs[0]`` of a ``.dvc`` file, or None when the file is absent or unreadable."""
    if not dvc_file.is_file():
        return None
    try:
        out = (yaml.safe_load(dvc_file.read_text()) or {})["outs"][0]
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        return None
    return out if isinstance(out, dict) else None


def data_dvc_hash(dvc_file: Path) -> str | None:
    """The md5 recorded in a ``.dvc`` file (``outs[0].md5``), or None when absent/unreadable."""
    md5 = (_dvc_out(dvc_file) or {}).get("md5")
    return str(md5) if md5 else None


def dvc_tracked_folder(dvc_file: Path) -> Path | None:
    """The folder a ``.dvc`` file tracks (``outs[0].path``, relative to the ``.dvc`` file's folder), absolute."""
    path = (_dvc_out(dvc_file) or {}).get("path")
    return (dvc_file.parent / str(path)).resolve() if path else None


def index_content_hash(layout: Layout) -> str:
    """sha256 (16 hex) over the index's ``path,label,split,sha256`` rows: the data identity without DVC."""
    import pandas as pd  # light enough, but only needed here

    table = layout.index_table
    if not table.is_file():
        raise RegistryError(f"{table}: index table not found; run the index stage first")
    frame = pd.read_csv(table, usecols=["path", "label", "split", "sha256"], dtype=str)
    frame = frame.sort_values("path", kind="stable")
    blob = frame.to_csv(index=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def data_version(layout: Layout, data_root: Path | None = None) -> str:
    """What the indexed data is: ``dvc:<md5>`` (``layout.data_dvc``'s hash) when ``data_root`` (``data.root`` as
    the index read it) lies inside the folder that file tracks, else ``index:<index content hash>``.

    Without ``data_root`` nothing says the index read the DVC-tracked folder, so the index hash is used.
    """
    md5 = data_dvc_hash(layout.data_dvc)
    tracked = dvc_tracked_folder(layout.data_dvc)
    if md5 and tracked is not None and data_root is not None:
        if Path(data_root).resolve().is_relative_to(tracked):
            return f"dvc:{md5}"
    return f"index:{index_content_hash(layout)}"


def git_commit(root: Path) -> str | None:
    """``git rev-parse HEAD`` in ``root`` (with ``+dirty`` when tracked files changed), None outside git.

    A run rewrites tracked files itself (``dvc commit`` updates ``data.dvc`` and ``dvc.lock``), so the retrain
    flow captures this before its first write: ``+dirty`` then means the user's checkout had uncommitted edits.
    """
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


# ---------------------------------------------------------------------------------------------- promotion
def candidate_score(metrics: dict[str, Any], metric: str) -> float:
    """The test value of ``metric`` in the evaluate metrics: flat ``test_<metric>`` (what the evaluate stage
    writes), else nested ``test.<metric>``, else top-level ``<metric>``."""
    flat = metrics.get(f"test_{metric}")
    if isinstance(flat, int | float) and not isinstance(flat, bool):
        return float(flat)
    for holder in (metrics.get("test"), metrics):
        if isinstance(holder, dict) and isinstance(holder.get(metric), int | float):
            return float(holder[metric])
    raise RegistryError(f"no numeric test {metric!r} in the evaluate metrics; keys: {sorted(metrics)}")


def read_evaluate_metrics(layout: Layout) -> dict[str, Any]:
    """``metrics/evaluate.json`` as written by the evaluate stage."""
    path = layout.evaluate_metrics
    if not path.is_file():
        raise RegistryError(f"{path}: not found; run the evaluate stage first")
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: expected a JSON object, got {raw!r}")
    return raw


def champion_model(layout: Layout, candidate_id: str) -> Path:
    """The immutable model file of a promoted candidate: ``layout.champion_model(id)``."""
    return layout.champion_model(candidate_id)


def _store_champion(layout: Layout, candidate: Candidate) -> Path:
    """Copy the candidate bundle into its own immutable ``champions/<id>/`` with ``champion.json`` beside it
    (:func:`tasks.io.atomic.atomic_dir`: built in a temp folder, fsynced, renamed into place)."""
    if not layout.candidate_model.is_file():
        raise RegistryError(f"{layout.candidate_model}: candidate model not found; run finetune first")
    final = layout.champion_folder(candidate.id)
    record = layout.champion_record(candidate.id).name
    remove_stale_temps_in(layout.champions_dir)  # what killed promotions left (each had its own id)

    def fill(tmp: Path) -> None:
        shutil.copytree(layout.candidate_dir, tmp)
        (tmp / record).write_text(
            json.dumps(asdict(candidate), indent=2) + "\n"
        )  # inside the folder's commit

    return atomic_dir(final, fill)


def _activate_champion(layout: Layout, candidate_id: str) -> None:
    """Point ``models/champion`` at ``champions/<id>`` with one atomic rename of a fresh symlink."""
    link = layout.champion_dir
    if link.is_dir() and not link.is_symlink():  # a folder from an older layout
        shutil.rmtree(link)
    target = layout.champion_folder(candidate_id).relative_to(link.parent)
    atomic_symlink(link, target)


def model_sha256(layout: Layout) -> str:
    """sha256 of the candidate's ``.keras`` file (what the registry recognises a model by)."""
    from tasks.models.bases import sha256_file

    path = layout.candidate_model
    if not path.is_file():
        raise RegistryError(f"{path}: candidate model not found; run finetune first")
    return sha256_file(path)


def metrics_sha256(metrics: dict[str, Any]) -> str:
    """sha256 of the evaluate metrics as canonical JSON (sorted keys): the same figures give the same hash."""
    return hashlib.sha256(json.dumps(metrics, sort_keys=True, default=str).encode()).hexdigest()


def champion_score(registry: Registry, metric: str) -> float | None:
    """The champion's test ``metric`` (None without a champion)."""
    champ = registry.champion_entry()
    if champ is None:
        return None
    return champ.score if champ.metric == metric else candidate_score(champ.metrics, metric)


def registered(registry: Registry, model_hash: str, metrics_hash: str) -> Candidate | None:
    """The record of the same model with the same metrics, when the registry already has one."""
    for cand in registry.candidates:
        if cand.model_sha256 == model_hash and cand.metrics_sha256 == metrics_hash:
            return cand
    return None


def _already_registered(
    layout: Layout, registry: Registry, cand: Candidate, metric: str, score: float
) -> PromoteManifest:
    """The manifest of a promotion that found its candidate recorded already (nothing written)."""
    verdict = "promoted" if cand.promoted else "rejected"
    return PromoteManifest(
        candidate_id=cand.id,
        promoted=cand.promoted,
        reason=f"already registered as {cand.id} ({verdict}): the same model and metrics; nothing recorded",
        metric=metric,
        score=score,
        champion_score=champion_score(registry, metric),
        champion=registry.champion,
        registry=str(layout.model_registry),
        already_registered=True,
    )


def new_candidate_id(now: datetime, params_hash: str) -> str:
    """``20261122T031500Z-<params hash[:6]>``: sortable and readable."""
    return f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{params_hash[:6]}"


def run_promote(
    params: Params,
    layout: Layout,
    *,
    metrics: dict[str, Any] | None = None,
    flow_run_id: str | None = None,
    extra: dict[str, Any] | None = None,
    commit: str | None = None,
) -> PromoteManifest:
    """Gate the candidate in ``layout.candidate_dir`` against the champion; record it; copy it when promoted.

    ``commit`` is the git commit the candidate was produced from, as captured by the caller before the run's own
    writes (see :func:`git_commit`); None captures it now. A promoted candidate's ``model_path`` is its immutable
    copy ``champions/<id>/model.keras`` (``models/champion`` is a link that moves with the next promotion).

    Idempotent: when the registry already records this model (the ``.keras`` file's sha256) with these metrics,
    nothing is written and the manifest says ``already registered as <id> (promoted|rejected)``.
    """
    from tasks.inputs import resolve_inputs

    metrics = metrics if metrics is not None else read_evaluate_metrics(layout)
    cfg = params.evaluate
    score = candidate_score(metrics, cfg.metric)
    reg = read_registry(layout)
    model_hash, metrics_hash = model_sha256(layout), metrics_sha256(metrics)
    earlier = registered(reg, model_hash, metrics_hash)
    if earlier is not None:
        return _already_registered(layout, reg, earlier, cfg.metric, score)
    champ_score = champion_score(reg, cfg.metric)
    decision = gate(score, champ_score, cfg)
    params_hash = params.section_hash()
    now = datetime.now(UTC)
    cand_id = new_candidate_id(now, params_hash)
    cand = Candidate(
        id=cand_id,
        created_at=now.isoformat(timespec="seconds"),
        data_version=data_version(layout, resolve_inputs(params, layout).data_root),
        index_hash=index_content_hash(layout),
        params_hash=params_hash,
        git_commit=commit if commit is not None else git_commit(layout.root),
        metric=cfg.metric,
        score=score,
        metrics=metrics,
        promoted=decision.promote,
        reason=decision.reason,
        previous_champion=reg.champion,
        model_path=str(champion_model(layout, cand_id)) if decision.promote else None,
        flow_run_id=flow_run_id,
        extra=dict(extra or {}),
        model_sha256=model_hash,
        metrics_sha256=metrics_hash,
    )
    # Order matters for a kill at any point: (1) the immutable copy, (2) the registry (the commit point),
    # (3) the link swap. Before (2) the old champion stands; after it, read_registry repairs a stale link.
    if decision.promote:
        _store_champion(layout, cand)
    new = record(layout, cand)
    if decision.promote:
        _activate_champion(layout, cand.id)
    return PromoteManifest(
        candidate_id=cand.id,
        promoted=decision.promote,
        reason=decision.reason,
        metric=cfg.metric,
        score=score,
        champion_score=champ_score,
        champion=new.champion,
        registry=str(layout.model_registry),
    )
