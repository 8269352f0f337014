"""`retrainflow serve --cron` registers the retrain deployment; its schedule reads back through the API."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.deploy import deployment_parameters, validate_cron

PROJECT = Path(__file__).resolve().parents[2]


def test_validate_cron_echoes_bad_values() -> None:
    assert validate_cron(" 0 3 * * * ") == "0 3 * * *"
    with pytest.raises(ValueError, match="'daily'"):
        validate_cron("daily")
    with pytest.raises(ValueError, match="'61 3 \\* \\* \\*'"):
        validate_cron("61 3 * * *")


def test_deployment_parameters_are_absolute(tmp_path: Path) -> None:
    got = deployment_parameters(Path("params.yaml"), ["top.lr=0.1"], tmp_path, force=True)
    assert Path(got["params_file"]).is_absolute() and got["workdir"] == str(tmp_path.resolve())
    assert got["overrides"] == ["top.lr=0.1"] and got["force"] is True


def test_serve_cli_rejects_bad_cron() -> None:
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("retrainflow")), "serve", "--cron", "every day"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "every day" in proc.stderr


@pytest.mark.slow
def test_serve_registers_cron_deployment(tmp_path: Path, prefect_api_url, prefect_client_env) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = prefect_api_url
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("retrainflow")),
            "serve",
            "--cron",
            "0 3 * * *",
            "--name",
            "test-nightly",
            "--workdir",
            str(tmp_path),
        ],
        cwd=PROJECT,
        env=prefect_client_env(api),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deployment = None
    try:
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    deployment = client.read_deployment_by_name("retrain/test-nightly")
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert deployment is not None, f"deployment never appeared; serve output:\n{out[-3000:]}"
    crons = [s.schedule.cron for s in deployment.schedules]
    assert crons == ["0 3 * * *"]
    assert deployment.parameters["workdir"] == str(tmp_path.resolve())
    assert deployment.entrypoint == "flows.flows.retrain"


@pytest.mark.slow
def test_prefect_yaml_deploys_to_a_work_pool(prefect_api_url, prefect_client_env) -> None:
    """`prefect deploy` reads prefect.yaml: the deployment lands on the pool with its cron and parameters."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = prefect_api_url
    env = {**prefect_client_env(api), "PWD": str(PROJECT)}
    prefect = str(Path(sys.executable).with_name("prefect"))
    for cmd in (
        [prefect, "work-pool", "create", "retrainflow-pool", "--type", "process", "--overwrite"],
        [prefect, "--no-prompt", "deploy", "--name", "scheduled-retrain"],
    ):
        proc = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/scheduled-retrain")
    assert deployment.work_pool_name == "retrainflow-pool"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.entrypoint == "flows/flows.py:retrain"
    assert deployment.parameters == {
        "params_file": "params.yaml",
        "overrides": [],
        "force": False,
        "workdir": ".",
    }
    assert deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(
        PROJECT
    )


@pytest.mark.slow
def test_dashboard_command_prints_url_and_serves(tmp_path: Path, prefect_server_env) -> None:
    """The dashboard on another port than 4200 serves a UI that talks to that port, even with a
    PREFECT_API_URL for 4200 in the environment (the UI once pointed there: "Can't connect to Server API")."""
    import json
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **prefect_server_env(tmp_path),
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",
    }
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("retrainflow")), "dashboard", "--port", str(port)],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    healthy = False
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"Prefect dashboard: http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not healthy and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as resp:  # noqa: S310
                    healthy = resp.status == 200
            except OSError:
                time.sleep(0.5)
        assert healthy
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as resp:  # noqa: S310
            ui_settings = json.loads(resp.read())
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert ui_settings["api_url"] == f"http://127.0.0.1:{port}/api"
