"""One real Prefect API server for the whole test session (``prefect server start`` on a free 127.0.0.1 port).

Starting a server takes about 6 s; a per-process temporary API 7-12 s each time. The orchestration tests
(test_flows, test_dvc_pipeline, test_serve) share this one server: :func:`local_server` starts it on first use
(cached for the process) with its own PREFECT_HOME and SQLite database, and stops it at exit.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(home: Path) -> dict[str, str]:
    """Environment for a quiet, offline Prefect process with its own home."""
    return {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


@functools.cache
def local_server(timeout: float = 120.0) -> str:
    """Start the session's Prefect server (once) and return its API URL (``http://127.0.0.1:PORT/api``)."""
    home = Path(tempfile.mkdtemp(prefix="retrainflow-prefect-"))
    port = _free_port()
    prefect = Path(sys.executable).with_name("prefect")
    log = open(home / "server.log", "w")  # noqa: SIM115 - kept open for the server's lifetime
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=server_env(home),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(home, ignore_errors=True)

    atexit.register(stop)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited early:\n{(home / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310 - local URL
                if resp.status == 200:
                    return url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(
        f"prefect server not healthy after {timeout}s:\n{(home / 'server.log').read_text()[-3000:]}"
    )


def client_env(api_url: str) -> dict[str, str]:
    """Environment for a subprocess (``retrainflow``, ``dvc repro``) that reports to the session server."""
    return {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
