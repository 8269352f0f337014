"""Prefect flows: one small flow per stage (what ``dvc repro`` runs) and the ``retrain`` flow that chains them.

Tasks are thin wrappers around the stages' plain ``run_<stage>(params, layout)`` functions (imported lazily:
TensorFlow is only paid for when a stage runs); they exchange a ``Params``, a ``Layout`` and small JSON-able
manifests, never arrays. Flows only wire: load params, hold the workspace lock, call tasks, publish artifacts,
and keep DVC in step (``dvc commit`` of the stages that ran) so a following ``dvc repro`` is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Completed, State

from flows import artifacts, dvc_ops
from flows.console import log_display, tee
from tasks.config import DEFAULT_PARAMS_FILE, Params, load_params
from tasks.io.locking import workspace_lock
from tasks.layout import Layout
from tasks.progress import Reporter

STAGES: tuple[str, ...] = ("index", "features", "train_top", "finetune", "evaluate")


# --------------------------------------------------------------------------------- the stages, lazily
# Each runner gets a progress reporter (tasks.progress): inside a flow, plain lines with a rate and an ETA go
# through the run logger, so they reach the terminal and the dashboard's logs alike.
def _run_index(params: Params, layout: Layout, progress: Reporter) -> Any:
    from tasks.stages.run_index import run_index

    return run_index(params, layout, progress=progress)


def _run_features(params: Params, layout: Layout, progress: Reporter) -> Any:
    from tasks.stages.run_features import run_features

    artifact = artifacts.ProgressReporter(
        artifacts.start_progress("feature-extraction", "Feature extraction: images through the base")
    )
    manifest = run_features(
        params,
        layout,
        progress=tee(progress, lambda step: step.task == "features" and artifact(step.done, step.total or 0)),
        map_chunks=_map_chunks(params),
    )
    artifact(1, 1)
    logger = get_run_logger()
    logger.info(manifest.summary())
    for warning in manifest.warnings:
        logger.warning(warning)
    return manifest


def _map_chunks(params: Params) -> Any:
    """``features.runner: dask``: the chunks as task runs on Dask (:mod:`flows.scale`); local: None."""
    if params.features.runner != "dask":
        return None
    from flows.scale import map_chunks_on_dask

    return map_chunks_on_dask(params.features)


def _run_train_top(params: Params, layout: Layout, progress: Reporter) -> Any:
    from tasks.stages.run_train_top import run_train_top

    return run_train_top(params, layout, progress=progress)


def _run_finetune(params: Params, layout: Layout, progress: Reporter) -> Any:
    from tasks.stages.run_finetune import run_finetune

    return run_finetune(params, layout, progress=progress)


def _run_evaluate(params: Params, layout: Layout, progress: Reporter) -> Any:
    from tasks.stages.run_evaluate import run_evaluate

    manifest = run_evaluate(params, layout, progress=progress)
    from tasks.models.registry import read_evaluate_metrics

    artifacts.publish_metrics_table(read_evaluate_metrics(layout))  # the report images go in the run summary
    return manifest


STAGE_RUNNERS: dict[str, Callable[[Params, Layout, Reporter], Any]] = {
    "index": _run_index,
    "features": _run_features,
    "train_top": _run_train_top,
    "finetune": _run_finetune,
    "evaluate": _run_evaluate,
}
# Retries where I/O can fail transiently (reading many files); training is deterministic: a failure repeats.
STAGE_RETRIES: dict[str, int] = {"index": 1, "features": 1, "train_top": 0, "finetune": 0, "evaluate": 1}


def _make_stage_task(name: str):
    runner = STAGE_RUNNERS[name]

    def stage(params: Params, layout: Layout) -> dict[str, Any]:
        logger = get_run_logger()
        logger.info("stage %s: workspace %s", name, layout.root)
        manifest = artifacts.manifest_dict(runner(params, layout, log_display(logger.info)))
        logger.info(
            "stage %s done: %s", name, {k: v for k, v in manifest.items() if not isinstance(v, dict | list)}
        )
        return manifest

    stage.__name__ = f"{name}_stage"
    stage.__doc__ = f"Run the {name} stage (``run_{name}``) and return its manifest as a dict."
    return task(
        stage,
        name=name,
        tags=["retrainflow", f"stage:{name}"],
        retries=STAGE_RETRIES[name],
        retry_delay_seconds=5,
        cache_policy=NO_CACHE,
        persist_result=False,
    )


STAGE_TASKS = {name: _make_stage_task(name) for name in STAGES}


@task(
    name="promote",
    tags=["retrainflow", "stage:promote"],
    retries=0,  # a gate decision, not transient I/O (a repeat of the same candidate records nothing new)
    cache_policy=NO_CACHE,
)
def promote_task(params: Params, layout: Layout, extra: dict[str, Any], commit: str | None) -> dict[str, Any]:
    """Gate the candidate against the champion and record it in the registry (``commit``: the git commit the run
    started from)."""
    from tasks.models.registry import run_promote

    manifest = run_promote(params, layout, flow_run_id=_flow_run_id(), extra=extra, commit=commit).to_json()
    get_run_logger().info("promotion: %s", manifest["reason"])
    return manifest


@task(name="dvc-sync", tags=["retrainflow", "dvc"], retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def dvc_sync_task(root: Path, remote: bool) -> dict[str, list[str]]:
    """Record data the workspace changed (``dvc commit`` of its ``.dvc`` file); with a ``remote``, pull only
    what the workspace lacks. Never overwrites a user's files."""
    plan = dvc_ops.sync(root, remote=remote)
    get_run_logger().info(
        "DVC: recorded %s, pulled %s, kept as in the workspace %s",
        list(plan.record) or "nothing",
        list(plan.pull) or "nothing",
        list(plan.keep) or "nothing",
    )
    return plan.to_json()


@task(name="dvc-push", tags=["retrainflow", "dvc"], retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def dvc_push_task(root: Path) -> None:
    """Push the data and pipeline outputs to the DVC remote."""
    dvc_ops.push(root)


@task(name="dvc-commit", tags=["retrainflow", "dvc"], retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def dvc_commit_task(root: Path, targets: list[str]) -> list[str]:
    """``dvc commit -f`` the stages a flow ran, so ``dvc status`` is clean and ``dvc repro`` a no-op."""
    dvc_ops.commit(root, *targets)
    return targets


# ------------------------------------------------------------------------------------------------ helpers
def _push(root: Path, summary: dict[str, Any]) -> None:
    """``dvc push``, last: a remote that fails (gone, read-only, full) after the task's retries leaves the local
    run whole (model, registry and ``dvc.lock`` are already written); the summary says it was not pushed and why,
    and the next run pushes."""
    try:
        dvc_push_task(root)
    except dvc_ops.DvcError as err:
        summary["dvc_pushed"] = False
        summary["dvc_not_pushed_because"] = dvc_ops.failure_reason(err)
        get_run_logger().warning(
            "not pushed to the DVC remote: %s; the next run pushes", summary["dvc_not_pushed_because"]
        )
    else:
        summary["dvc_pushed"] = True


def _flow_run_id() -> str | None:
    run_id = runtime_flow_run.get_id()
    return str(run_id) if run_id else None


def _load(params_file: str | Path, overrides: list[str] | None) -> Params:
    return load_params(Path(params_file), overrides or ())


@contextmanager
def in_workspace(workdir: str | Path) -> Iterator[Layout]:
    """Run the body with the workspace as the current directory (as DVC runs stage commands).

    Stage code resolves relative params paths (``data.root``, ``features.cache_dir``) against the current
    directory, so a flow for ``--workdir X`` works from X. Yields the workspace ``Layout`` (absolute root).
    """
    root = Path(workdir).resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"workdir: expected an existing folder, got {str(workdir)!r}")
    previous = Path.cwd()
    os.chdir(root)
    try:
        yield Layout(root)
    finally:
        os.chdir(previous)


def dvc_commit_allowed(layout: Layout, params_file: str | Path, overrides: list[str] | None) -> str | None:
    """None when the run's outputs may be committed to DVC, else why not (a sentence for the log).

    DVC records params from ``params.yaml`` beside ``dvc.yaml``; a run with another file or with overrides
    produced outputs that ``params.yaml`` does not describe, so committing them would lie in ``dvc.lock``.
    """
    root = layout.root
    if not dvc_ops.is_dvc_repo(root):
        return f"{root.resolve()} is not a DVC project (no .dvc/ or dvc.yaml)"
    if overrides:
        return f"the run used overrides {overrides!r} that params.yaml does not record"
    if Path(params_file).resolve() != (root / DEFAULT_PARAMS_FILE).resolve():
        return f"the run read {params_file}, not {root / DEFAULT_PARAMS_FILE}"
    return None


def commit_targets(ran: list[str], *, data_changed: bool) -> list[str]:
    """The stages a run may ``dvc commit``: those it ran, less the index when the data folder changed during the
    run. DVC hashes a stage's deps when it commits; committing the index then would record files the index never
    saw, ``dvc status`` would call it up to date, and the new images would wait for some later change. Stages
    after the index are committed: they depend on ``index/index.csv``, which changes when the index reruns."""
    return [name for name in ran if not (data_changed and name == "index")]


def changed_stages(root: Path) -> set[str]:
    """The pipeline stages ``dvc status`` reports changed (deps, params or outs differ from ``dvc.lock``)."""
    return set(dvc_ops.status(root)) & set(STAGES)


def stage_due(root: Path, name: str, changed_at_start: set[str], ran: list[str]) -> bool:
    """Whether ``dvc repro`` would run stage ``name`` now: as ``dvc status`` said at the start while nothing ran,
    else as ``dvc status NAME`` says now (a stage that ran may have left its outputs, hence this one, unchanged:
    a features run that computed nothing new does not make train_top stale)."""
    if not ran:
        return name in changed_at_start
    return bool(dvc_ops.status(root, name))


# ------------------------------------------------------------------------------------------ per-stage flows
def _make_stage_flow(name: str):
    stage_task = STAGE_TASKS[name]

    def stage_flow(
        params_file: str = str(DEFAULT_PARAMS_FILE), overrides: list[str] | None = None, workdir: str = "."
    ) -> dict[str, Any]:
        params_path = Path(params_file).resolve()
        params = _load(params_path, overrides)
        with in_workspace(workdir) as layout:
            with workspace_lock(layout, command=f"retrainflow stage {name} (flow run {_flow_run_id()})"):
                return stage_task(params, layout)

    stage_flow.__name__ = f"{name}_flow"
    stage_flow.__doc__ = (
        f"Run the {name} stage inside Prefect (what `dvc repro` calls as `retrainflow stage {name}`)."
    )
    return flow(
        stage_flow, name=f"stage-{name.replace('_', '-')}", log_prints=True, validate_parameters=False
    )


STAGE_FLOWS = {name: _make_stage_flow(name) for name in STAGES}


# --------------------------------------------------------------------------------------------- retrain
@flow(name="retrain", log_prints=True, validate_parameters=False)
def retrain(
    params_file: str = str(DEFAULT_PARAMS_FILE),
    overrides: list[str] | None = None,
    force: bool = False,
    workdir: str = ".",
) -> dict[str, Any] | State:
    """index -> features -> train_top -> finetune -> evaluate -> promote, under the workspace lock.

    In a DVC project, data the user changed in the workspace (images dropped into or removed from ``data/``) is
    recorded first (``dvc commit`` of ``data.dvc``), and with a DVC remote only what the workspace lacks is
    pulled, so a run never overwrites new files. Run with ``params.yaml`` as is, stages that ``dvc status``
    reports up to date are not run again (a stage runs when it is changed, judged again with ``dvc status NAME``
    once an upstream stage has run); the stages that ran are
    ``dvc commit``ted, so ``dvc status`` is clean afterwards and ``dvc repro`` a no-op. After the index, the run
    skips cleanly when neither the data nor the params changed since the champion (the flow run's state is then
    named ``Skipped``; the call still returns the summary). When the data folder changed
    during the run, the index stage is left uncommitted, so the next run indexes the new files. ``force`` runs
    every stage and gates the result even when nothing changed. Pushes the data and outputs last when a remote is
    configured.
    """
    from tasks.inputs import resolve_inputs
    from tasks.models.registry import (
        data_version,
        git_commit,
        index_content_hash,
        read_registry,
        unchanged_reason,
    )

    logger = get_run_logger()
    params_path = Path(params_file).resolve()
    params = _load(params_path, overrides)
    summary: dict[str, Any] = {
        "flow_run_id": _flow_run_id(),
        "stages": {},
        "params_hash": params.section_hash(),
    }
    with (
        in_workspace(workdir) as layout,
        workspace_lock(layout, command=f"retrainflow run (flow run {summary['flow_run_id']})"),
    ):
        root = layout.root
        # before this run's own writes (dvc commit rewrites data.dvc and dvc.lock)
        summary["git_commit"] = git_commit(root)
        dvc_repo = dvc_ops.is_dvc_repo(root)
        remote = dvc_repo and bool(dvc_ops.remotes(root))
        if dvc_repo:
            summary["dvc_sync"] = dvc_sync_task(root, remote=remote)
        no_commit = dvc_commit_allowed(layout, params_path, overrides)
        if no_commit:
            logger.warning("not committing to DVC: %s", no_commit)
        ran: list[str] = []
        every = bool(force or no_commit)
        changed = set(STAGES) if every else changed_stages(root)
        if not every:
            logger.info("DVC: changed at the start: %s", sorted(changed) or "no stage")
        up_to_date: list[str] = []
        summary["up_to_date"] = up_to_date

        def run_if_due(name: str) -> None:
            if every or stage_due(root, name, changed, ran):
                summary["stages"][name] = STAGE_TASKS[name](params, layout)
                ran.append(name)
            else:
                up_to_date.append(name)

        images = resolve_inputs(params, layout).data_root
        data_before = dvc_ops.tree_fingerprint(images) if no_commit is None else ""
        run_if_due("index")
        summary["index_hash"] = index_content_hash(layout)
        summary["ran"] = ran
        reason = (
            None
            if force
            else unchanged_reason(read_registry(layout), summary["index_hash"], params.section_hash())
        )
        if not reason:
            for name in STAGES[1:]:
                run_if_due(name)
        if no_commit is None:
            data_changed = dvc_ops.tree_fingerprint(images) != data_before
            if data_changed and "index" in ran:
                logger.warning(
                    "%s changed during the run: the index stage is left uncommitted in dvc.lock, so the next "
                    "run (or `dvc repro`) indexes the new files",
                    images,
                )
            summary["data_changed_during_run"] = data_changed
            dvc_commit_task(root, commit_targets(ran, data_changed=data_changed))
        summary["data_version"] = data_version(layout, images)
        summary["dvc_committed"] = no_commit is None
        summary["dvc_not_committed_because"] = no_commit
        if reason:
            logger.info(reason)
            summary.update(status="skipped", reason=reason)
            artifacts.publish_summary(summary, layout)
            if remote:  # what an earlier run could not push (dvc push sends only what the remote lacks)
                _push(root, summary)
            # a state of its own in the dashboard (type COMPLETED): a skipped run never looks like a retrain
            return Completed(name="Skipped", message=reason, data=summary)

        summary["promote"] = promote_task(
            params,
            layout,
            {"stages": {k: v for k, v in summary["stages"].items() if k != "evaluate"}},
            summary["git_commit"],
        )
        if remote:
            _push(root, summary)
        summary.update(status="promoted" if summary["promote"]["promoted"] else "not promoted")
        summary["reason"] = summary["promote"]["reason"]
        artifacts.publish_summary(summary, layout)
        logger.info("retrain finished: %s", summary["reason"])
        return summary
