"""tasks/inputs.py: where the feature cache is, including in a DVC experiment's copy of the repo."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import params_from_dict
from tasks.inputs import cache_root, experiment_origin
from tasks.layout import Layout


def _params(cache_dir: str | None):
    return params_from_dict({"features": {"cache_dir": cache_dir}})


def test_a_workspace_uses_its_own_cache_or_the_configured_one(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "ws")
    assert cache_root(_params(None), layout) == layout.features_cache
    assert cache_root(_params("shared/cache"), layout) == tmp_path / "ws" / "shared" / "cache"
    assert cache_root(_params(str(tmp_path / "elsewhere")), layout) == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("cache_dir", "expected"),
    [(None, "repo/cache/features"), ("shared/cache", "repo/shared/cache"), ("/abs/cache", "/abs/cache")],
)
def test_a_dvc_experiment_copy_uses_the_origin_repos_cache(
    tmp_path: Path, cache_dir: str | None, expected: str
) -> None:
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpa2qhg82p"
    copy.mkdir(parents=True)
    assert experiment_origin(copy) == (tmp_path / "repo").resolve()
    root = cache_root(_params(cache_dir), Layout(copy))
    assert root == (Path(expected) if expected.startswith("/") else (tmp_path / expected).resolve())


def test_only_dvcs_own_experiment_folders_count(tmp_path: Path) -> None:
    for folder in (
        tmp_path / "exps" / "tmp1",
        tmp_path / "tmp" / "exps" / "x",
        tmp_path / ".dvc" / "exps" / "x",
    ):
        folder.mkdir(parents=True)
        assert experiment_origin(folder) is None
        assert cache_root(_params(None), Layout(folder)) == Layout(folder).features_cache
