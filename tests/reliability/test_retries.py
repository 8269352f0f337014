"""A transiently failing task is retried by Prefect (with the retry settings of ``flows/flows.py``) and the
retrain run completes: the features stage fails once with an I/O error after writing part of its shards."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from tasks.layout import Layout


@pytest.fixture(scope="session")
def prefect_api(prefect_api_url) -> str:
    """The session's Prefect server (shared with the orchestration tests), current for flows run in-process."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = prefect_api_url
    with temporary_settings({PREFECT_API_URL: url}):
        yield url


class FailOnce:
    """Wraps ``FeatureCache.write_shard``: the ``fail_at``-th call raises EIO once (a network disk hiccup)."""

    def __init__(self, real, fail_at: int):
        self.real, self.fail_at, self.calls, self.raised = real, fail_at, 0, 0

    def __call__(self, cache, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            self.raised += 1
            raise OSError(errno.EIO, "Input/output error (transient, injected by the test)")
        return self.real(cache, *args, **kwargs)


@pytest.mark.slow
def test_transient_features_failure_is_retried_and_the_run_completes(
    prefect_api,
    tmp_path,
    monkeypatch,
    imagegen,
    write_params,
    check_cache_consistent,
    tiny_dict,
    leftover_temp_files,
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.flows import STAGE_RETRIES, retrain
    from tasks.features.cache import FeatureCache
    from tasks.features.read import read_features
    from tasks.inputs import cache_root
    from tasks.models.registry import read_registry

    assert STAGE_RETRIES["features"] >= 1, "the features task is expected to be retried on failure"
    imagegen.make_class_folders(tmp_path / "data" / "images", ["red", "blue"], per_class=6, size=32)
    write_params(tmp_path, tiny_dict(top={"epochs": 1}, finetune={"epochs": 0}))  # the retry is what matters
    failing = FailOnce(FeatureCache.write_shard, fail_at=2)
    monkeypatch.setattr(FeatureCache, "write_shard", lambda self, *a, **k: failing(self, *a, **k))

    state = retrain(params_file=str(tmp_path / "params.yaml"), workdir=str(tmp_path), return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    assert failing.raised == 1 and failing.calls > 2
    assert summary["status"] in ("promoted", "not promoted"), summary
    assert summary["ran"] == ["index", "features", "train_top", "finetune", "evaluate"]

    flt = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=flt)
    features_runs = [r for r in runs if "stage:features" in r.tags]
    assert len(features_runs) == 1 and features_runs[0].run_count == 2, [(r.name, r.run_count) for r in runs]
    assert features_runs[0].state.is_completed()

    from tasks.config import load_params

    params = load_params(tmp_path / "params.yaml")
    layout = Layout(tmp_path)
    check_cache_consistent(cache_root(params, layout))
    for split in ("train", "val", "test"):
        assert np.isfinite(read_features(params, layout, split).x).all()
    assert len(read_registry(layout).candidates) == 1
    assert leftover_temp_files(tmp_path) == []


@pytest.mark.slow
def test_a_failure_that_persists_fails_the_run_with_its_reason(
    prefect_api, tmp_path, monkeypatch, imagegen, write_params, tiny_dict
):
    """train_top has no retries (training is deterministic): its error ends the run; the registry is untouched."""
    from flows.flows import STAGE_RETRIES, STAGE_TASKS, retrain

    imagegen.make_class_folders(tmp_path / "data" / "images", ["red", "blue"], per_class=6, size=32)
    write_params(tmp_path, tiny_dict())

    def broken(*args, **kwargs):
        raise RuntimeError("head training diverged (injected by the test)")

    monkeypatch.setattr("tasks.stages.run_train_top.run_train_top", broken)
    state = retrain(params_file=str(tmp_path / "params.yaml"), workdir=str(tmp_path), return_state=True)
    assert state.is_failed(), state
    with pytest.raises(RuntimeError, match="diverged"):
        state.result()
    assert STAGE_TASKS["train_top"].retries == STAGE_RETRIES["train_top"] == 0
    assert not (tmp_path / "models" / "registry.json").exists()
    assert not (tmp_path / "models" / "candidate").exists()
