"""The few DVC commands the flows run (as subprocesses of this Python's ``dvc``): status, commit, pull, push.

DVC is driven through its CLI, not its Python internals (they are not a public API). Every function takes the
repository root; none raises on a missing DVC repo — callers ask :func:`is_dvc_repo` first.

:func:`sync` is how a run starts: the workspace is the truth. Data the user changed (images dropped into or
removed from ``data/``) is recorded in its ``.dvc`` file; only outputs the workspace lacks are pulled, so a pull
never meets (and never deletes) a file DVC does not know.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DVC_TIMEOUT = 3600


class DvcError(RuntimeError):
    """A DVC command failed; the message holds the command and its output."""


def failure_reason(err: DvcError) -> str:
    """DVC's own last ``ERROR:`` line of a failed command (else its last line), for a one-line report."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["unknown error"])[-1]


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
    """``dvc pull --allow-missing TARGETS`` (nothing when no target is given: a bare pull is never run, it would
    refuse, or with ``--force`` delete, files the workspace holds and DVC does not know)."""
    if targets:
        dvc(root, "pull", "--allow-missing", *targets)


MISSING = frozenset({"deleted", "not in cache"})  # `dvc status` out states a pull can restore


@dataclass(frozen=True)
class SyncPlan:
    """What :func:`sync` does with each ``dvc status`` target whose outputs differ from what DVC recorded."""

    record: tuple[str, ...] = ()  # .dvc files whose data the workspace changed: `dvc commit` (user data)
    pull: tuple[str, ...] = ()  # targets whose outputs the workspace lacks (absent or empty): `dvc pull`
    keep: tuple[str, ...] = ()  # stages whose outputs the workspace changed: left for the run to redo

    def to_json(self) -> dict[str, list[str]]:
        return {"record": list(self.record), "pull": list(self.pull), "keep": list(self.keep)}


def tree_fingerprint(folder: Path) -> str:
    """A cheap fingerprint of every file below ``folder``: path, size and modification time (no content read).

    DVC hashes a dependency folder when it commits, not when the stage ran; comparing this before a stage and
    before ``dvc commit`` tells whether the folder changed in between. ``""`` for a missing folder.
    """
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(top, name)
            try:
                st = path.stat()
            except OSError:  # vanished, or a broken link: its absence is part of the state
                digest.update(f"{path.relative_to(folder)}\0missing\n".encode(errors="surrogateescape"))
                continue
            line = f"{path.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n"
            digest.update(line.encode(errors="surrogateescape"))
    return digest.hexdigest()


def _changed_outs(entries: Any) -> dict[str, str]:
    """``{out path: state}`` from one target's ``dvc status --json`` entries (``"changed outs"`` items)."""
    outs: dict[str, str] = {}
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, Mapping) and isinstance(entry.get("changed outs"), Mapping):
            outs.update({str(k): str(v) for k, v in entry["changed outs"].items()})
    return outs


def _holds_files(path: Path) -> bool:
    """A file, or a folder with at least one file below it (an empty folder holds no data)."""
    if path.is_file():
        return True
    return path.is_dir() and any(p.is_file() for p in path.rglob("*"))


def locked_stages(root: Path) -> set[str]:
    """The stages ``dvc.lock`` records outputs for (none before the first ``dvc repro`` / ``dvc commit``)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return set()
    raw = yaml.safe_load(lock.read_text()) or {}
    stages = raw.get("stages") if isinstance(raw, dict) else None
    return set(stages) if isinstance(stages, dict) else set()


def plan_sync(
    root: Path,
    status_json: Mapping[str, Any],
    *,
    remote: bool,
    locked: set[str] | frozenset[str] = frozenset(),
) -> SyncPlan:
    """Decide per target from ``dvc status --json``: a ``.dvc`` file whose outputs hold files that differ is
    recorded (never pulled over); a ``.dvc`` file or a ``locked`` stage (one ``dvc.lock`` records) whose changed
    outputs are all absent, empty or only missing from the cache is pulled (when there is a ``remote``); a stage
    whose outputs hold changed files is kept (the run reruns it). A stage never recorded has nothing to pull."""
    record, fetch, keep = [], [], []
    for target in sorted(status_json):
        outs = _changed_outs(status_json[target])
        if not outs:
            continue  # only deps or params changed: nothing in the workspace to restore or record
        is_data = target.endswith(".dvc")
        present = any(state not in MISSING and _holds_files(root / p) for p, state in outs.items())
        if present:
            (record if is_data else keep).append(target)
        elif remote and (is_data or target in locked):
            fetch.append(target)
    return SyncPlan(record=tuple(record), pull=tuple(fetch), keep=tuple(keep))


def sync(root: Path, *, remote: bool) -> SyncPlan:
    """Bring DVC and the workspace in step before a run without touching a user's files: record changed data
    (``dvc commit -f`` of its ``.dvc`` file, what ``dvc add`` would write), then, with a ``remote``, pull what the
    workspace lacks (a fresh clone, a deleted data folder). Returns what was done."""
    plan = plan_sync(root, status(root), remote=remote, locked=locked_stages(root))
    commit(root, *plan.record)
    pull(root, *plan.pull)
    return plan


def push(root: Path, *targets: str) -> None:
    """``dvc push`` of the data and the pipeline outputs."""
    dvc(root, "push", *targets)
