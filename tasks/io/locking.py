"""One writer at a time: an exclusive ``fcntl`` lock on ``layout.lock_file``.

Both ``retrainflow run`` (the retrain flow) and every ``retrainflow stage NAME`` (what ``dvc repro`` runs) take
it, so a pipeline run and a ``dvc repro`` never write the workspace (or DVC's state) at the same time. The lock
is released by the kernel when the holder exits, even when it is killed; the file keeps the holder's PID and
command so the second run can say who holds it.

Within one process the lock is re-entrant (the CLI takes it, then the flow it starts asks for it again). Child
processes do not inherit it: a holder must not start ``dvc repro`` (whose stage commands would wait for it);
the flows only run ``dvc status / commit / pull / push``, which run no stage command.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.errors import LockHeldError  # noqa: F401  (raised here; defined with the other domain errors)
from tasks.layout import Layout

_held: dict[str, int] = {}  # resolved lock path -> re-entry depth, for this process
_held_guard = threading.Lock()


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(path: Path) -> dict[str, object]:
    """What the lock file says about its holder (may be stale when nobody holds the lock)."""
    try:
        raw = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


HOLDER_SETTLE_SECONDS = 2.0


def _settled_holder(path: Path, settle: float = HOLDER_SETTLE_SECONDS) -> dict[str, object]:
    """The holder record, waiting up to ``settle`` seconds for it to appear.

    A holder writes its record just after it wins the lock, so a run that loses the race by milliseconds can find
    the file still empty; a short wait lets the message name the holder's PID instead of ``?``.
    """
    deadline = time.monotonic() + settle
    while True:
        holder = read_holder(path)
        if "pid" in holder or time.monotonic() >= deadline:
            return holder
        time.sleep(0.05)


@contextmanager
def workspace_lock(layout: Layout, *, wait: float = 0.0, command: str | None = None) -> Iterator[Path]:
    """Hold the workspace lock for the ``with`` body; raise :class:`LockHeldError` if it stays busy.

    ``wait`` is how many seconds to retry before giving up (0: fail at once).
    """
    if not isinstance(wait, int | float) or wait < 0:
        raise ValueError(f"expected wait >= 0 seconds, got {wait!r}")
    path = layout.lock_file
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    with _held_guard:
        if _held.get(key):
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockHeldError(path, _settled_holder(path)) from None
                time.sleep(0.2)
        info = {
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
        record = json.dumps(info).encode()
        os.pwrite(fd, record, 0)  # write, then cut: the file is never empty while held
        os.ftruncate(fd, len(record))
        with _held_guard:
            _held[key] = 1
        try:
            yield path
        finally:
            with _held_guard:
                _held.pop(key, None)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
