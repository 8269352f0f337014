"""The few DVC commands the flows run (as subprocesses of this Python's ``dvc``): status, commit, pull, push.

DVC is driven through its CLI, not its Python internals (they are not a public API). Every function takes the
repository root; none raises on a missing DVC repo — callers ask :func:`is_dvc_repo` first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DVC_TIMEOUT = 3600


class DvcError(RuntimeError):
    """A DVC command failed; the message holds the command and its output."""


@dataclass(frozen=True)
class DvcResult:
    args: tuple[str, ...]
    stdout: str
    stderr: str


def dvc(root: Path, *args: str, check: bool = True, timeout: float = DVC_TIMEOUT) -> DvcResult:
    """Run ``dvc ARGS`` in ``root`` (analytics and update checks off); raise :class:`DvcError` on failure."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_NO_UPDATE_CHECK": "1"}
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise DvcError(
            f"`dvc {' '.join(args)}` failed in {root} (exit {proc.returncode}):\n{proc.stderr or proc.stdout}"
        )
    return DvcResult(tuple(args), proc.stdout, proc.stderr)


def is_dvc_repo(root: Path) -> bool:
    """True when ``root`` is a DVC project root with a pipeline (``.dvc/`` and ``dvc.yaml``)."""
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def remotes(root: Path) -> list[str]:
    """Names of the configured DVC remotes (empty when none)."""
    out = dvc(root, "remote", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def status(root: Path, *targets: str) -> dict[str, object]:
    """``dvc status --json`` for ``targets`` (all stages when none): ``{}`` means up to date."""
    out = dvc(root, "status", "--json", *targets).stdout.strip()
    return json.loads(out) if out else {}


def commit(root: Path, *targets: str) -> None:
    """``dvc commit -f TARGETS``: record the current deps/outs/params of what a flow ran in ``dvc.lock``."""
    if targets:
        dvc(root, "commit", "-f", *targets)


def pull(root: Path, *targets: str) -> None:
    """``dvc pull`` (the data version named by ``data.dvc`` and cached outputs)."""
    dvc(root, "pull", "--allow-missing", *targets)


def push(root: Path, *targets: str) -> None:
    """``dvc push`` of the data and the pipeline outputs."""
    dvc(root, "push", *targets)
