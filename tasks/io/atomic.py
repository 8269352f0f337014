"""Atomic writes: readers see the old file (or folder, or link) or the whole new one, never a part.

The ONE writer of the project's outputs. Every write goes through :func:`atomic_write` (or the two-step
:func:`stage` + :meth:`Staged.commit` when something that describes the file must be written between the two):

1. ``write(tmp)`` fills a temp path in the same folder as the target (``.tmp-<pid>-<random>-<name>``: it ends with
   the target's name, so a ``.keras`` / ``.npy`` / ``.png`` suffix that a library looks at is kept);
2. the temp file is fsynced (its data is on disk before its name is);
3. ``os.replace(tmp, path)``, the commit;
4. the folder is fsynced (the rename is durable).

Whatever makes the bytes (``bytes``, text, JSON, ``np.save``, a pandas CSV, ``keras.Model.save``, matplotlib's
``savefig``) only ever writes to the temp path it is given. A failed writer removes its temp file; a killed one
leaves it, and the next write of the same target removes the temp files of writers that are no longer running
(the writer's PID is in the name; the feature cache's orphan sweep reads the same names).

:func:`atomic_dir` does the same for a folder built in full before it appears (a champion copy, a SavedModel
export) and :func:`atomic_symlink` for a link moved in one rename. ``tests/reliability/killpoints.py`` counts the
events of these writes (``os.fsync``, ``os.replace``, ``np.save``, a zip or HDF5 file opened for writing), so the
calls go through the ``os`` / ``np`` module attributes.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"

_LIVE: set[Path] = set()  # temp paths this process is filling now (a sweep in another thread keeps them)
_LIVE_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------ temp names
def temp_path(path: Path) -> Path:
    """A fresh temp name beside ``path``: ``.tmp-<pid>-<8 hex>-<name>``."""
    path = Path(path)
    return path.parent / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}"


def temp_writer_pid(name: str) -> int | None:
    """The PID in a temp name made by :func:`temp_path` (None when ``name`` is not one)."""
    if not name.startswith(TMP_PREFIX):
        return None
    pid = name[len(TMP_PREFIX) :].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _temp_target(name: str) -> str | None:
    """The target name a temp name stands for (``.tmp-<pid>-<rand>-<name>`` -> ``<name>``)."""
    parts = name[len(TMP_PREFIX) :].split("-", 2) if name.startswith(TMP_PREFIX) else []
    return parts[2] if len(parts) == 3 else None


def _stale(tmp: Path) -> bool:
    from tasks.io.locking import pid_alive

    with _LIVE_LOCK:
        if tmp in _LIVE:
            return False
    pid = temp_writer_pid(tmp.name)
    return pid is None or pid == os.getpid() or not pid_alive(pid)


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temp files (or folders) that killed writers of ``path`` left beside it; a running writer's
    are kept. Returns what was removed."""
    return _sweep(Path(path).parent, Path(path).name)


def remove_stale_temps_in(folder: Path) -> list[Path]:
    """:func:`remove_stale_temps` for every target in ``folder`` (where targets get new names, e.g. one folder
    per champion)."""
    return _sweep(Path(folder), None)


def _sweep(folder: Path, name: str | None) -> list[Path]:
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        target = _temp_target(entry.name)
        if target is None or (name is not None and target != name):
            continue
        tmp = Path(entry.path)
        if not _stale(tmp):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


# ------------------------------------------------------------------------------------------------ fsync
def fsync_file(path: Path) -> None:
    """Flush a written file's data (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (fsync of the directory entry)."""
    fsync_file(folder)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


# ------------------------------------------------------------------------------------------ the writer
@dataclass
class Staged:
    """A complete, fsynced temp file waiting beside its target: :meth:`commit` renames it into place."""

    tmp: Path
    path: Path

    def commit(self) -> Path:
        """``os.replace(tmp, path)`` and the folder's fsync: the write's commit point."""
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Remove the temp file (the target is left as it was)."""
        Path(self.tmp).unlink(missing_ok=True)


def _forget(tmp: Path) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(tmp)


def stage(path: Path, write: Callable[[Path], object], *, sweep: bool = True) -> Staged:
    """Steps 1-2 of a write: ``write(tmp)`` fills a temp path beside ``path``, which is then fsynced. Nothing is
    in place until :meth:`Staged.commit`. ``sweep``: first remove what killed writers of ``path`` left (skip it
    only for names that are never written twice, e.g. feature shards: their store sweeps on open)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        remove_stale_temps(path)
    tmp = temp_path(path)
    with _LIVE_LOCK:
        _LIVE.add(tmp)
    try:
        write(tmp)
        fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _forget(tmp)
    return Staged(tmp, path)


def atomic_write(path: Path, write: Callable[[Path], object], *, sweep: bool = True) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` makes the file at the temp path it is given, then fsync,
    ``os.replace``, fsync of the folder. On an error the target is untouched and the temp file removed."""
    staged = stage(path, write, sweep=sweep)
    try:
        return staged.commit()
    except BaseException:
        staged.discard()
        raise


def atomic_write_bytes(path: Path, data: bytes, *, sweep: bool = True) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), sweep=sweep)


def atomic_write_text(path: Path, text: str) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8, newlines as given."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, **dumps: Any) -> Path:
    """:func:`atomic_write` of ``json.dumps(obj, indent=2, **dumps)`` and a final newline."""
    return atomic_write_text(path, json.dumps(obj, **{"indent": 2, **dumps}) + "\n")


# --------------------------------------------------------------------------------------- folders, links
def atomic_dir(path: Path, fill: Callable[[Path], object]) -> Path:
    """Build the folder ``path`` in full before it appears: ``fill(tmp)`` makes a temp folder beside it (it may
    create ``tmp`` or find it created), every file in it is fsynced, then one ``os.replace`` onto a missing or
    empty ``path`` and an fsync of the parent. On an error the temp folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    with _LIVE_LOCK:
        _LIVE.add(tmp)
    try:
        fill(tmp)
        _fsync_tree(tmp)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _forget(tmp)
    fsync_dir(path.parent)
    return path


def atomic_symlink(link: Path, target: Path | str) -> Path:
    """Point ``link`` at ``target`` with one rename of a fresh symlink over it (fsync of the folder)."""
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(link)
    tmp = temp_path(link)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
    return link
