"""Atomic file writes: readers see the old file or the whole new one, never a part.

The one home of the temp-file + fsync + ``os.replace`` + folder-fsync rule for single small files (metrics,
reports, ``classes.json``, ``head.json``, fine-tuning state). The feature cache (unique temp names, several writers
at once) and the index (PID-named temp files cleaned after a kill) keep their own naming but use
:func:`fsync_dir` from here.
"""

from __future__ import annotations

import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (fsync of the directory entry)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through ``<name>.tmp`` beside it (fsync, ``os.replace``, fsync of the folder). The temp name
    is fixed, so the next write replaces what a killed one left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_bytes_atomic` of ``text`` (UTF-8)."""
    write_bytes_atomic(path, text.encode())
