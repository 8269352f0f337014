"""Kill points: count the write events of a stage, or SIGKILL the process at the N-th one.

An event is a moment where a crash hurts most: just before an ``os.replace`` (the temp file is complete but not
in place), just before an ``os.fsync`` or an ``np.save``/``np.savez`` (data not yet durable or not yet written),
and just after a zip (``.keras``) or HDF5 file is opened for writing (the file exists, empty or partial).

Run as a script, it runs one stage in a child process and kills itself at event N::

    python killpoints.py STAGE WORKDIR PARAMS_YAML N        # N = 0: never kill (just run)

Stages are the plain ``run_<stage>(params, layout)`` functions, imported before counting starts.
The tests' own process counts with the same code through the ``killpoints`` fixture (``conftest.py``).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ORIGINALS: dict[str, Any] = {}


class Counter:
    """Counts events; kills the process at event ``kill_at`` (never when 0); ``names`` records them in order."""

    def __init__(self, kill_at: int = 0):
        self.kill_at = kill_at
        self.names: list[str] = []

    def fire(self, name: str) -> None:
        self.names.append(name)
        if self.kill_at and len(self.names) == self.kill_at:
            sys.stdout.flush()
            print(killed_line(self.kill_at, name), file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def killed_line(n: int, name: str) -> str:
    """What a child prints on stderr just before it kills itself at event ``n`` (named ``name``)."""
    return f"killpoints: SIGKILL at event {n} ({name})"


def install(counter: Counter) -> None:
    """Wrap the write primitives so each call is an event of ``counter`` (undo with :func:`uninstall`)."""
    import zipfile

    import h5py
    import numpy as np

    if _ORIGINALS:
        raise RuntimeError("kill points already installed")
    _ORIGINALS.update(
        replace=os.replace,
        rename=os.rename,
        fsync=os.fsync,
        save=np.save,
        savez=np.savez,
        zip_init=zipfile.ZipFile.__init__,
        h5_init=h5py.File.__init__,
    )

    def before(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            counter.fire(name)
            return fn(*args, **kwargs)

        return wrapped

    def zip_init(self: Any, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> None:
        _ORIGINALS["zip_init"](self, file, mode, *args, **kwargs)
        if mode in ("w", "x", "a"):
            counter.fire("zip-open")

    def h5_init(self: Any, name: Any, mode: str = "r", *args: Any, **kwargs: Any) -> None:
        _ORIGINALS["h5_init"](self, name, mode, *args, **kwargs)
        if mode in ("w", "w-", "x", "a", "r+"):
            counter.fire("h5-open")

    os.replace = before("replace", os.replace)
    os.rename = before("rename", os.rename)
    os.fsync = before("fsync", os.fsync)
    np.save = before("np.save", np.save)
    np.savez = before("np.savez", np.savez)
    zipfile.ZipFile.__init__ = zip_init
    h5py.File.__init__ = h5_init


def uninstall() -> None:
    import zipfile

    import h5py
    import numpy as np

    if not _ORIGINALS:
        return
    os.replace = _ORIGINALS["replace"]
    os.rename = _ORIGINALS["rename"]
    os.fsync = _ORIGINALS["fsync"]
    np.save = _ORIGINALS["save"]
    np.savez = _ORIGINALS["savez"]
    zipfile.ZipFile.__init__ = _ORIGINALS["zip_init"]
    h5py.File.__init__ = _ORIGINALS["h5_init"]
    _ORIGINALS.clear()


def stage_runner(stage: str) -> Callable[[Any, Any], Any]:
    """The plain stage function for ``stage`` (explicit registry, imported now, before counting)."""
    if stage == "index":
        from tasks.stages.run_index import run_index

        return run_index
    if stage == "promote":
        from tasks.models.registry import run_promote

        return run_promote
    if stage == "features":
        from tasks.stages.run_features import run_features

        return lambda params, layout: run_features(params, layout)
    if stage == "train_top":
        from tasks.stages.run_train_top import run_train_top

        return run_train_top
    if stage == "finetune":
        from tasks.stages.run_finetune import run_finetune

        return run_finetune
    raise ValueError(f"killpoints: expected index, features, train_top, finetune or promote, got {stage!r}")


def run_counted(stage: str, params: Any, layout: Any, kill_at: int = 0) -> list[str]:
    """Run ``stage`` with events counted (and a kill at ``kill_at``); the event names, in order."""
    runner = stage_runner(stage)
    import keras  # noqa: F401  (imported before counting: its import writes nothing we care about)
    import rich.progress  # noqa: F401

    counter = Counter(kill_at)
    install(counter)
    try:
        runner(params, layout)
    finally:
        uninstall()
    return counter.names


def main(argv: list[str]) -> int:
    stage, workdir, params_file, kill_at = argv[1], Path(argv[2]), Path(argv[3]), int(argv[4])
    from tasks.config import load_params
    from tasks.layout import Layout

    params = load_params(params_file)
    os.chdir(workdir)
    events = run_counted(stage, params, Layout(workdir), kill_at)
    print(f"finished without being killed after {len(events)} events", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
