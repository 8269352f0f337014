"""The workspace lock: one writer at a time, and a clear message naming the holder's PID."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.io.locking import LockHeldError, workspace_lock
from tasks.layout import Layout

HOLDER = """
import sys, time
from pathlib import Path
from tasks.layout import Layout
from tasks.io.locking import workspace_lock
with workspace_lock(Layout(Path(sys.argv[1])), command="retrainflow run (test holder)"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_second_process_gets_clear_message_then_lock_frees(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(LockHeldError) as info:
            with workspace_lock(layout):
                pass
        msg = str(info.value)
        assert f"pid {proc.pid}" in msg and "test holder" in msg and str(layout.lock_file) in msg
    finally:
        proc.kill()
        proc.wait()
    # the kernel released it when the holder died: we can take it now
    with workspace_lock(layout, wait=5) as path:
        assert path == layout.lock_file


def test_reentrant_in_one_process_and_released_after(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    with workspace_lock(layout):
        with workspace_lock(layout):
            pass
        code = (
            "import sys; from pathlib import Path; from tasks.layout import Layout;"
            "from tasks.io.locking import workspace_lock, LockHeldError\n"
            "try:\n  with workspace_lock(Layout(Path(sys.argv[1]))): print('got')\n"
            "except LockHeldError as e: print('busy', e)\n"
        )
        child = subprocess.run(  # even our own child process is refused: the lock is not inherited
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
        )
        assert child.stdout.startswith("busy") and f"pid {os.getpid()}" in child.stdout
    assert layout.lock_file.read_text() == ""  # released: the holder record is cleared


def test_wait_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="-1"):
        with workspace_lock(Layout(tmp_path), wait=-1):
            pass


SLOW_WRITER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(0.5)  # the window between winning the lock and writing the record
os.pwrite(fd, json.dumps({"pid": os.getpid(), "since": "now", "command": "slow writer"}).encode(), 0)
time.sleep(60)
"""


def test_loser_of_a_close_race_still_names_the_holder(tmp_path: Path) -> None:
    """A run that finds the lock taken but the record not yet written waits for the record (CI saw `pid ?`)."""
    layout = Layout(tmp_path)
    layout.lock_file.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(layout.lock_file)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockHeldError) as info:
            with workspace_lock(layout):
                pass
        assert f"pid {proc.pid}" in str(info.value) and "slow writer" in str(info.value)
    finally:
        proc.kill()
        proc.wait()
