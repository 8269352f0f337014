"""The scheduled deployment on a process work pool: a worker picks up a scheduled run and completes it.

Against the session's real Prefect server, with no mocks, the three commands the README documents, run in a
temporary project folder: a tiny workspace (``make_workspace``: params.yaml and generated images) holding the
project's ``prefect.yaml`` copied verbatim and the code (``flows/`` and ``tasks/`` as symlinks to this checkout),
as a clone of the project used as a workspace would hold them.

    prefect work-pool create POOL --type process
    prefect deploy --name NAME --pool POOL      # from the folder; $PWD is what the pull step records
    prefect deployment run retrain/NAME         # a flow run scheduled for now
    prefect worker start --pool POOL --run-once

``NAME`` and ``POOL`` are unique per test, so nothing collides with ``test_serve.py``'s ``scheduled-retrain`` on
the same server. The deployment is still prefect.yaml's: with ``--no-prompt`` and a single deployment in the
file, Prefect deploys that configuration under the name given by ``--name``, and ``--pool`` overrides its
``work_pool``. The test checks that the deployment carries prefect.yaml's parameters, schedule and pull step.
``--run-once`` makes the worker poll once, wait for the runs it submitted and exit. Otherwise it is the
documented ``prefect worker start --pool POOL``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _kill_tree(proc: subprocess.Popen) -> None:
    """Stop the worker and the flow-run processes it started (the process worker starts each in a new session,
    so the worker's process group does not include them)."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait(timeout=20)


def _project_copy(root: Path, make_workspace) -> Path:
    """A tiny workspace laid out as the project folder: prefect.yaml verbatim, the code, params, images."""
    ws = make_workspace(root)
    shutil.copy(PROJECT / "prefect.yaml", ws / "prefect.yaml")
    for name in ("flows", "tasks"):
        (ws / name).symlink_to(PROJECT / name, target_is_directory=True)
    return ws


@pytest.mark.slow
def test_worker_runs_the_scheduled_deployment(
    tmp_path: Path, make_workspace, prefect_api_url, prefect_client_env
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.layout import Layout
    from tasks.models.registry import read_registry

    api = prefect_api_url
    ws = _project_copy(tmp_path / "project", make_workspace)
    suffix = uuid.uuid4().hex[:8]
    pool, name = f"test-pool-{suffix}", f"test-work-pool-{suffix}"
    # PWD is what `{{ $PWD }}` in the pull step reads: a shell sets it, subprocess's cwd= does not
    env = {
        **prefect_client_env(api),
        "PWD": str(ws),
        "PREFECT_HOME": str(tmp_path / "prefect_home"),  # no profile or local storage shared with ~/.prefect
    }

    def prefect(*args: str) -> str:
        proc = subprocess.run(
            [PREFECT, "--no-prompt", *args], cwd=ws, env=env, capture_output=True, text=True, timeout=180
        )
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        return proc.stdout

    prefect("work-pool", "create", pool, "--type", "process")
    prefect("deploy", "--name", name, "--pool", pool)
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"retrain/{name}")
        assert deployment.work_pool_name == pool
        assert deployment.entrypoint == "flows/flows.py:retrain"
        assert deployment.parameters == {
            "params_file": "params.yaml",
            "overrides": [],
            "force": False,
            "workdir": ".",
        }
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ws)}}
        ]

    prefect("deployment", "run", f"retrain/{name}")  # a Scheduled state, start time now
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]))
        )
    # the cron's own runs (auto-scheduled by the server for 03:00 UTC) are not the one just created
    manual = [r for r in runs if not r.auto_scheduled]
    assert len(manual) == 1, runs
    flow_run = manual[0]
    assert flow_run.state is not None and flow_run.state.type.value == "SCHEDULED", flow_run.state
    assert flow_run.work_pool_name == pool

    log_path = tmp_path / "worker.log"
    state = None
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", pool, "--run-once"],
            cwd=ws,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
                deadline, worker_gone = time.monotonic() + 240, None
                while time.monotonic() < deadline:
                    state = client.read_flow_run(flow_run.id).state
                    if state is not None and state.type.value in FINAL:
                        break
                    if worker.poll() is not None:  # gone: a few seconds for its last state to show
                        worker_gone = worker_gone or time.monotonic()
                        if time.monotonic() - worker_gone > 10:
                            break
                    time.sleep(1)
            try:
                worker.wait(timeout=60)  # --run-once: it exits once its flow run is done
            except subprocess.TimeoutExpired:
                pass
        finally:
            _kill_tree(worker)
    worker_log = log_path.read_text()
    assert state is not None and state.type.value == "COMPLETED" and state.name == "Completed", (
        f"flow run {flow_run.id} ended {state!r}; worker log:\n{worker_log[-6000:]}"
    )
    assert f"submitting flow run '{flow_run.id}'" in worker_log, worker_log[-6000:]
    assert worker.returncode == 0, worker_log[-6000:]

    # the run's outputs are in the workspace the pull step chose
    assert (ws / "models" / "candidate" / "model.keras").is_file()
    registry = read_registry(Layout(ws))
    assert [c.flow_run_id for c in registry.candidates] == [str(flow_run.id)]
    assert registry.champion == registry.candidates[0].id
    assert (ws / "reports" / "evaluation.json").is_file()
