"""Which Prefect API a command reports to, and a local ``prefect server`` the CLI can start and stop.

A flow run needs a Prefect API. In order of preference:
1. the API the user configured (``PREFECT_API_URL``, in the environment or the active Prefect profile): it must
   answer, otherwise the command stops with one line saying what to do;
2. a local server already answering on 127.0.0.1 at :data:`DEFAULT_PORT` (``retrainflow dashboard`` /
   ``make dashboard``): every command then shares it, and its runs are visible in the dashboard;
3. with ``--with-server`` (``make demo``), a server this command starts there and stops at its end;
4. otherwise Prefect's temporary per-process API, with a start-up timeout that fits a cold start on 2 cores
   (:data:`EPHEMERAL_STARTUP_TIMEOUT`, Prefect's ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``).
Runs recorded by 2–4 live in Prefect's local database (``$PREFECT_HOME``), so ``retrainflow dashboard`` shows
them afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200
EPHEMERAL_STARTUP_TIMEOUT = 300  # s; Prefect's default (20) is too short for a cold venv on 2 busy cores
SERVER_STARTUP_TIMEOUT = 300.0  # s for `prefect server start` on a cold venv
HEALTH_TIMEOUT = 2.0  # s for one /api/health request
WHAT_TO_DO = (
    "start one with `retrainflow dashboard` (or `make dashboard`) in another terminal and run again, "
    "or unset PREFECT_API_URL to use a temporary local API"
)


class PrefectApiError(RuntimeError):
    """No usable Prefect API: the message says which URL and what to do."""


@dataclass(frozen=True)
class PrefectApi:
    """The API a command reports to: ``url`` (``http://host:port/api``) or None for Prefect's temporary API,
    and how it was chosen (``configured``, ``local server``, ``started``, ``temporary``)."""

    url: str | None
    origin: str

    @property
    def ui_url(self) -> str | None:
        """The dashboard's address (the API URL without ``/api``), None for the temporary API (no UI)."""
        return self.url[: -len("/api")] if self.url and self.url.endswith("/api") else self.url

    def flow_run_link(self, flow_run_id: str | None) -> str | None:
        """Where a person sees the flow run: a dashboard URL, or how to get one for the temporary API."""
        if not flow_run_id:
            return None
        path = f"/runs/flow-run/{flow_run_id}"
        if self.ui_url and self.origin != "started":
            return f"{self.ui_url}{path}"
        local = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
        return f"{local}{path} (start the dashboard first: retrainflow dashboard)"


def api_url_for(host: str, port: int) -> str:
    return f"http://{host}:{port}/api"


def healthy(api_url: str, timeout: float = HEALTH_TIMEOUT) -> bool:
    """Whether a Prefect API answers ``/health`` with ``true`` at ``api_url``."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:  # noqa: S310
            return resp.status == 200 and json.loads(resp.read() or b"null") is True
    except (OSError, ValueError):
        return False


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment, else from the active Prefect profile (None when unset)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def choose_api(*, start_server: bool = False) -> PrefectApi:
    """The API for this process (see the module docstring); raises :class:`PrefectApiError` when the configured
    one does not answer."""
    configured = configured_api_url()
    if configured:
        if not healthy(configured, timeout=5.0):
            raise PrefectApiError(f"the Prefect API at {configured} does not answer; {WHAT_TO_DO}")
        return PrefectApi(configured, "configured")
    local = api_url_for(DEFAULT_HOST, DEFAULT_PORT)
    if healthy(local, timeout=0.5):
        return PrefectApi(local, "local server")
    if start_server:
        return PrefectApi(local, "started")
    return PrefectApi(None, "temporary")


@contextmanager
def reporting_to(api: PrefectApi, *, log_file: Path) -> Iterator[PrefectApi]:
    """Run the body with Prefect reporting to ``api``: a ``started`` one is started first and stopped after;
    a found local server is set with Prefect's ``temporary_settings`` (Prefect reads its environment once, at
    import, so exporting ``PREFECT_API_URL`` now would not reach it)."""
    if api.origin == "configured":
        yield api
        return
    if api.origin == "temporary":
        try:
            yield api
        finally:
            _stop_temporary_api()
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if api.origin == "started":
        with local_server(log_file=log_file) as url, temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield api
            finally:
                _flush_logs()  # the run's last log lines reach the server before it stops
        return
    with temporary_settings(updates={PREFECT_API_URL: api.url}):
        yield api


def server_command(host: str, port: int) -> list[str]:
    prefect = Path(sys.executable).with_name("prefect")
    return [
        str(prefect) if prefect.exists() else "prefect",
        "server",
        "start",
        "--host",
        host,
        "--port",
        str(port),
    ]


def server_env(host: str, port: int) -> dict[str, str]:
    """A quiet server whose dashboard talks to this very port (not to a ``PREFECT_API_URL`` set elsewhere)."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_UI_API_URL"] = api_url_for(host, port)
    return env


@contextmanager
def local_server(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    log_file: Path,
    timeout: float = SERVER_STARTUP_TIMEOUT,
) -> Iterator[str]:
    """Start ``prefect server start`` on ``host:port``, wait until it answers, and stop the server after the body.
    Yields the API URL; a server that does not come up raises :class:`PrefectApiError` with the end of its log."""
    url = api_url_for(host, port)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(  # noqa: S603 - our own prefect executable
            server_command(host, port),
            env=server_env(host, port),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(url, proc, log_file, timeout)
        yield url
    finally:
        _stop(proc)


def _stop_temporary_api() -> None:
    """Stop Prefect's temporary API now, its log lines flushed first, rather than at interpreter exit: its
    "Stopping temporary server" line then comes before the command's own last lines, not after them."""
    if "prefect.server.api.server" not in sys.modules:  # no flow ran: nothing was started
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running:
        _flush_logs()
        server.stop()


def _flush_logs() -> None:
    from prefect.logging.handlers import APILogHandler

    try:
        APILogHandler().flush()
    except Exception:  # noqa: BLE001 - best effort: a log line that did not arrive must not fail the run
        pass


def _wait_healthy(url: str, proc: subprocess.Popen, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PrefectApiError(
                f"the Prefect server exited with code {proc.returncode} before answering at {url} "
                f"(port in use?); its log: {log_file}\n{_tail(log_file)}"
            )
        if healthy(url):
            return
        time.sleep(0.5)
    raise PrefectApiError(
        f"the Prefect server did not answer at {url} within {timeout:.0f} s; its log: {log_file}. "
        f"Start it yourself with `retrainflow dashboard` and run again"
    )


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def is_startup_timeout(err: BaseException) -> bool:
    """Prefect's own error when its temporary API did not come up in time."""
    return isinstance(err, RuntimeError) and "ephemeral Prefect API server" in str(err)


def startup_timeout_message() -> str:
    seconds = os.environ.get(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT)
    )
    return (
        f"Prefect's temporary local API did not start within {seconds} s (a cold start on a busy machine); "
        f"{WHAT_TO_DO}, or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    )


def main(argv: list[str]) -> int:
    """``python -m flows.cli.prefect_api -- COMMAND ...``: run COMMAND with every Prefect client in it reporting to
    one server (a running local one, else one started for the command and stopped after); ``make repro`` runs
    ``dvc repro`` this way, so its stages share one API instead of starting a temporary one each."""
    command = argv[argv.index("--") + 1 :] if "--" in argv else argv
    if not command:
        print("usage: python -m flows.cli.prefect_api -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    try:
        api = choose_api(start_server=True)
        if api.origin != "started":
            return subprocess.call(command, env={**env, **({"PREFECT_API_URL": api.url} if api.url else {})})
        print(f"starting a Prefect server for `{' '.join(command)}`: {api.ui_url}", file=sys.stderr)
        from tasks.layout import Layout

        with local_server(log_file=Layout(Path(".")).prefect_server_log) as url:
            return subprocess.call(command, env={**env, "PREFECT_API_URL": url})
    except PrefectApiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
