"""The one atomic writer (tasks/io/atomic.py): temp beside the target, fsync of the file and of its folder, one rename;
failed writers leave nothing, killed writers' temp files are swept by the next write of the same target."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.io import atomic
from tasks.io.atomic import (
    atomic_dir,
    atomic_symlink,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    stage,
    temp_path,
    temp_writer_pid,
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_writes_go_through_a_temp_file_fsync_replace_and_a_folder_fsync(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open
    opened: dict[int, str] = {}

    def fake_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = "dir" if os.path.isdir(path) else Path(path).name
        return fd

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", opened.get(fd, "?"))), real_fsync(fd))
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b))
    )
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(".tmp-") and events[0][1].endswith("-out.json")
    assert events[1] == ("replace", "out.json") and events[2] == ("fsync", "dir")
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_the_temp_name_keeps_the_suffix_and_names_the_writer(tmp_path):
    tmp = temp_path(tmp_path / "model.keras")
    assert tmp.parent == tmp_path and tmp.name.startswith(f".tmp-{os.getpid()}-") and tmp.suffix == ".keras"
    assert temp_writer_pid(tmp.name) == os.getpid() and temp_writer_pid("model.keras") is None


def test_a_failed_writer_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "x.txt"
    atomic_write_text(target, "old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, broken)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_library_writers_write_to_the_temp_path(tmp_path):
    def save(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.save(fh, np.arange(3), allow_pickle=False)

    atomic_write(tmp_path / "a.npy", save)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(3))


def test_the_next_write_sweeps_dead_writers_temps_of_that_target_only(tmp_path):
    dead = _dead_pid()
    mine = tmp_path / f".tmp-{dead}-deadbeef-x.txt"  # a killed writer of x.txt
    other = tmp_path / f".tmp-{dead}-deadbeef-y.txt"  # ... of another file: left for y.txt's next write
    live = tmp_path / f".tmp-{os.getppid()}-cafecafe-x.txt"  # a running writer's: kept
    for path in (mine, other, live):
        path.write_bytes(b"partial")
    atomic_write_bytes(tmp_path / "x.txt", b"new")
    assert not mine.exists() and other.exists() and live.exists()
    assert (tmp_path / "x.txt").read_bytes() == b"new"


def test_stage_then_commit_puts_the_file_in_place_only_at_the_commit(tmp_path):
    target = tmp_path / "m.bin"
    staged = stage(target, lambda tmp: tmp.write_bytes(b"model"))
    assert not target.exists() and staged.tmp.read_bytes() == b"model"
    staged.commit()
    assert target.read_bytes() == b"model" and not staged.tmp.exists()
    again = stage(target, lambda tmp: tmp.write_bytes(b"other"))
    again.discard()
    assert target.read_bytes() == b"model" and sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]


def test_a_folder_appears_whole_and_a_failed_one_not_at_all(tmp_path):
    def fill(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "a.txt").write_text("a")

    atomic_dir(tmp_path / "out", fill)
    assert (tmp_path / "out" / "a.txt").read_text() == "a"

    def broken(tmp: Path) -> None:
        fill(tmp)
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "other", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_link_moves_in_one_rename(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    link = tmp_path / "current"
    atomic_symlink(link, "one")
    atomic_symlink(link, "two")
    assert os.readlink(link) == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "one", "two"]


def test_no_other_module_renames_or_fsyncs():
    """Every write goes through tasks/io/atomic.py: no other tasks module calls the commit primitives itself."""
    tasks_dir = Path(atomic.__file__).parent
    for path in sorted(tasks_dir.glob("*.py")):
        if path.name == "atomic.py":
            continue
        text = path.read_text()
        for primitive in ("os.replace(", "os.rename(", "os.fsync(", "tempfile.mkstemp", "Path.replace("):
            assert primitive not in text, f"{path.name} calls {primitive}"
