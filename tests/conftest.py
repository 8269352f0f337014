"""Shared fixtures: an offline, quiet environment for every test; ../shared data and weights when present
(``shared_path``: a test that needs one skips, naming the exact path, when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RETRAINFLOW_SHARED", PROJECT_ROOT.parent / "shared"))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def shared_path(*parts: str) -> Path:
    """``SHARED/<parts>`` (a dataset folder, a weights file), or skip the calling test with a reason naming that
    exact path when it is absent: a partial ../shared then skips only the tests it cannot serve, each saying why.
    Usable from fixtures of any scope (module-scoped workspaces too)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared, or set RETRAINFLOW_SHARED)")
    return path


@pytest.fixture
def shared_dir() -> Path:
    """The ../shared folder itself; a test needing something in it should ask ``shared_path(...)`` for it."""
    return shared_path()


@pytest.fixture
def keras_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Keras cache, so nothing is found there and no test depends on the user's ~/.keras."""
    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home
