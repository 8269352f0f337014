"""The CLI edge: its own quiet, offline defaults, --version, the Prefect API it picks, and a newcomer's cold first
run (no byte-code, a fresh Prefect home, Prefect's temporary API) finishing with one clear summary line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import defaults as cli_defaults
from flows.cli import prefect_api as prefect_server

PROJECT = Path(__file__).resolve().parents[2]
RETRAINFLOW = Path(sys.executable).with_name("retrainflow")
TF_NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cpu_feature_guard", "Traceback")


def _env(**extra: str) -> dict[str, str]:
    """A plain shell's environment: none of the Makefile's or conftest's quiet defaults."""
    env = {
        k: v for k, v in os.environ.items() if k not in {*cli_defaults.QUIET, "KERAS_HOME", "PREFECT_API_URL"}
    }
    return {**env, **extra}


def _cli(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(RETRAINFLOW), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# ------------------------------------------------------------------------------------------------ pure parts
def test_keras_home_is_the_first_with_models(tmp_path: Path) -> None:
    (tmp_path / "a" / ".keras_home").mkdir(parents=True)  # no models/ inside: not a weights cache
    (tmp_path / "b" / ".keras_home" / "models").mkdir(parents=True)
    found = cli_defaults.keras_home([tmp_path / "a", tmp_path / "b"])
    assert found == (tmp_path / "b" / ".keras_home").resolve()
    assert cli_defaults.keras_home([tmp_path / "a"]) is None


def test_apply_keeps_what_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    monkeypatch.delenv("DVC_NO_ANALYTICS", raising=False)
    cli_defaults.apply({"TF_CPP_MIN_LOG_LEVEL": "2", "DVC_NO_ANALYTICS": "1"})
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1" and os.environ["DVC_NO_ANALYTICS"] == "1"
    cli_defaults.apply({}, verbose=True)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


def test_flow_run_links() -> None:
    run_id = "0b9c7e1e-0000-4000-8000-000000000000"
    served = prefect_server.PrefectApi("http://127.0.0.1:4300/api", "configured")
    assert served.flow_run_link(run_id) == f"http://127.0.0.1:4300/runs/flow-run/{run_id}"
    temporary = prefect_server.PrefectApi(None, "temporary")
    link = temporary.flow_run_link(run_id)
    assert (
        link.startswith(f"http://127.0.0.1:4200/runs/flow-run/{run_id}") and "retrainflow dashboard" in link
    )
    assert served.flow_run_link(None) is None


def test_unreachable_configured_api_is_one_clear_error(tmp_path: Path, make_workspace) -> None:
    """PREFECT_API_URL pointing at nothing: one `error:` line saying what to do, exit 1, no traceback."""
    make_workspace(tmp_path, per_class=2)
    proc = _cli(["run"], tmp_path, _env(PREFECT_API_URL="http://127.0.0.1:9/api"), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "error: the Prefect API at http://127.0.0.1:9/api does not answer" in proc.stderr
    assert "retrainflow dashboard" in proc.stderr and "Traceback" not in proc.stderr


def test_server_that_cannot_start_is_one_clear_error(tmp_path: Path) -> None:
    """A port already taken: the started server exits, and the message names the log and the cause."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(prefect_server.PrefectApiError, match="exited with code") as err:
            with prefect_server.local_server(port=port, log_file=tmp_path / "server.log", timeout=120):
                pass
    assert str(tmp_path / "server.log") in str(err.value)


# ------------------------------------------------------------------------------------------------ real runs
def test_version_and_quiet_start(tmp_path: Path, make_workspace) -> None:
    """From a plain shell: --version works, and a TensorFlow command prints none of TF's C++ start-up lines
    unless --verbose asks for them."""
    version = _cli(["--version"], tmp_path, _env(), timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("retrainflow ")
    make_workspace(tmp_path, per_class=3)
    quiet = _cli(["index"], tmp_path, _env(), timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert not [noise for noise in TF_NOISE if noise in quiet.stderr], quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("index: 6 images"), quiet.stderr
    loud = _cli(["--verbose", "index"], tmp_path, _env(), timeout=300)
    # which start-up lines TensorFlow prints depends on the CPU (oneDNN's line on some, only absl's and
    # cpu_feature_guard's on others): --verbose shows them, whichever they are
    assert loud.returncode == 0 and "absl::InitializeLog" in loud.stderr, loud.stderr


@pytest.mark.slow
def test_cold_first_run_on_the_temporary_api(tmp_path: Path, make_workspace) -> None:
    """A newcomer's first `retrainflow run`: nothing compiled yet (an empty byte-code cache, none written), a fresh
    PREFECT_HOME (new SQLite database and migrations) and no Prefect server, so Prefect's temporary API has to come
    up cold. It finished once only on a second try (Prefect's 20 s start-up timeout); now it must finish first time
    and end with the summary line and the flow run link."""
    ws = make_workspace(tmp_path / "ws")
    env = _env(
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONPYCACHEPREFIX=str(tmp_path / "empty-pycache"),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
    )
    proc = _cli(["run"], ws, env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-2:]
    assert last[0].startswith("retrain promoted: test accuracy"), last
    assert last[1].startswith("flow run: http://127.0.0.1:4200/runs/flow-run/"), last
    assert "Traceback" not in proc.stderr and "Failed to send telemetry" not in proc.stderr
    assert not list((tmp_path / "empty-pycache").rglob("*.pyc"))  # it really ran cold


@pytest.mark.slow
def test_run_reports_to_the_configured_server_and_links_the_run(
    tmp_path: Path, prefect_api_url, make_workspace
) -> None:
    """With PREFECT_API_URL set, the run's last line links the flow run in that server's dashboard, and --json
    prints the summary on stdout."""
    import json

    api = prefect_api_url
    ws = make_workspace(tmp_path)
    proc = _cli(["run", "--json"], ws, _env(PREFECT_API_URL=api), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    link = proc.stderr.strip().splitlines()[-1]
    assert link == f"flow run: {api.removesuffix('/api')}/runs/flow-run/{summary['flow_run_id']}"


def test_stage_summary_line_is_short() -> None:
    from flows.cli.orchestrate import stage_summary_line

    line = stage_summary_line(
        "features", {"manifest": "/ws/features/features.json", "computed": 10, "reused": 2, "views": {"a": 1}}
    )
    assert line == "stage features done: manifest features.json, computed 10, reused 2"


# ------------------------------------------------------------------------------------------------ the error map
def test_error_map_names_the_user_errors_and_their_codes() -> None:
    import errno

    from flows.cli.common import EXIT_FAILED, EXIT_LOCKED, EXIT_PARAMS, EXIT_WEIGHTS, user_error
    from flows.dvc_ops import DvcError
    from tasks.config import ParamsError
    from tasks.errors import DatasetError, InputError
    from tasks.io.locking import LockHeldError
    from tasks.models.bases import WeightsUnavailableError
    from tasks.models.registry import RegistryError

    def code(err: BaseException) -> int | None:
        row = user_error(err)
        return None if row is None else row.code

    assert code(ParamsError("top.lr: expected > 0")) == EXIT_PARAMS
    held = LockHeldError(Path(".retrainflow.lock"), {"pid": 1, "command": "retrainflow run"})
    assert code(held) == EXIT_LOCKED and user_error(held).label == "busy"
    assert code(WeightsUnavailableError("offline")) == EXIT_WEIGHTS
    for err in (DatasetError("no images"), RegistryError("bad"), DvcError("dvc failed")):
        assert code(err) == EXIT_FAILED
    assert code(prefect_server.PrefectApiError("no api")) == EXIT_FAILED
    assert code(OSError(errno.ENOSPC, "No space left on device")) == EXIT_FAILED
    assert code(FileNotFoundError("no trained head at models/top")) == EXIT_FAILED
    # bugs: no one-line error, the traceback shows
    assert code(OSError(errno.EBADF, "Bad file descriptor")) is None
    assert (
        code(ValueError("a bug")) is None and code(KeyError("k")) is None and code(RuntimeError("x")) is None
    )
    # user input a stage cannot use is an InputError (the domain errors' base), never a plain ValueError
    assert code(InputError("augment-preview: no policy named 'x'")) == EXIT_FAILED


def test_a_bug_in_a_command_shows_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import tasks.models.registry
    from flows.cli import app

    def broken(layout: object) -> None:
        raise ValueError("a bug, not the user's")

    monkeypatch.setattr(tasks.models.registry, "read_registry", broken)
    result = CliRunner().invoke(app, ["registry", "-w", str(tmp_path)])
    assert isinstance(result.exception, ValueError) and "error:" not in result.output

    def unreadable(layout: object) -> None:
        raise tasks.models.registry.RegistryError("models/registry.json: not JSON")

    monkeypatch.setattr(tasks.models.registry, "read_registry", unreadable)
    result = CliRunner().invoke(app, ["registry", "-w", str(tmp_path)])
    assert result.exit_code == 1 and not isinstance(result.exception, ValueError)
    assert "error: models/registry.json: not JSON" in result.output


def test_every_command_runs_under_the_error_map() -> None:
    from flows.cli import app
    from flows.cli.common import App

    typers = [app, *(group.typer_instance for group in app.registered_groups)]
    assert all(isinstance(t, App) for t in typers)
    commands = [c for t in typers for c in t.registered_commands]
    assert len(commands) >= 15
    assert all(hasattr(c.callback, "__wrapped__") for c in commands)
