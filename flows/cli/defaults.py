"""The environment every ``retrainflow`` command sets for itself before TensorFlow, Prefect or DVC load.

These were once exported only by the Makefile, so the same commands run from a plain shell were noisy (TF's C++
start-up lines, a telemetry traceback) and failed offline on the ImageNet weights. A value the user set in the
environment always wins; ``--verbose`` brings TensorFlow's logs back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from flows.cli.prefect_api import EPHEMERAL_STARTUP_TIMEOUT

KERAS_HOME_DIR = ".keras_home"  # what `make setup` fills from ../shared/weights (offline ImageNet weights)
QUIET = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # hides TF's C++ info and warnings (cpu_feature_guard, jpeg_mem, rendezvous)
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # else a "database is locked" telemetry traceback offline
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(EPHEMERAL_STARTUP_TIMEOUT),
    # features.runner dask: no INFO line per scheduler/nanny event, and no warning per chunk task run that
    # `retrainflow features` (no flow run) cannot send its logs to the API
    "DASK_LOGGING__DISTRIBUTED": "warning",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}
VERBOSE = {"TF_CPP_MIN_LOG_LEVEL": "0"}
# commands that never load TensorFlow (the rest import it quietly up front, see import_tensorflow_quietly)
WITHOUT_TENSORFLOW = frozenset({"params", "dashboard", "registry", "cache"})


def project_root() -> Path:
    """The folder this package is installed from (an editable install: the project checkout)."""
    return Path(__file__).resolve().parents[2]


def keras_home(candidates: list[Path]) -> Path | None:
    """The first ``.keras_home`` with a ``models/`` folder among ``candidates`` (None when there is none: Keras
    then uses ``~/.keras`` and downloads)."""
    for folder in candidates:
        home = folder / KERAS_HOME_DIR
        if (home / "models").is_dir():
            return home.resolve()
    return None


def process_defaults() -> dict[str, str]:
    """The variables this process should set: the quiet defaults, and ``KERAS_HOME`` when the current folder or
    the project checkout has a ``.keras_home`` (the offline weights ``make setup`` links)."""
    values = dict(QUIET)
    home = keras_home([Path.cwd(), project_root()])
    if home is not None:
        values["KERAS_HOME"] = str(home)
    return values


def apply(values: Mapping[str, str], *, override: Mapping[str, str] = VERBOSE, verbose: bool = False) -> None:
    """Set each of ``values`` unless the environment already has it; ``verbose`` sets ``override`` outright."""
    for name, value in values.items():
        os.environ.setdefault(name, value)
    if verbose:
        os.environ.update(override)


@contextmanager
def stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the body (C++ libraries write there, below Python's sys.stderr)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up lines hidden. TF 2.21 writes them through absl at import time
    ("All log messages before absl::InitializeLog() ...", "oneDNN custom operations are on ..."), whatever
    ``TF_CPP_MIN_LOG_LEVEL`` says; later C++ warnings (``jpeg_mem.cc``) honour the level. An import error is
    raised as usual, after stderr is back."""
    with stderr_silenced():
        import tensorflow  # noqa: F401
