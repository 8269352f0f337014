"""A full disk during a feature-shard write: the shard writer is made to write part of its bytes and then fail with
ENOSPC (what a full filesystem does). The stage stops with a clear error, the cache stays consistent (every shard
the manifest lists reads back whole, no temp or orphan file is left), and the next run completes with features
bit-identical to a run that never failed."""

from __future__ import annotations

import errno
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tasks.layout import Layout

REAL_SAVE = np.save


class DiskFull:
    """Replaces ``np.save``: the ``fail_at``-th call writes half of its bytes, then raises ENOSPC."""

    def __init__(self, fail_at: int):
        self.fail_at = fail_at
        self.calls = 0
        self.failed = False

    def __call__(self, file, arr, allow_pickle=True, **kwargs):
        self.calls += 1
        if self.calls != self.fail_at:
            return REAL_SAVE(file, arr, allow_pickle=allow_pickle, **kwargs)
        buf = io.BytesIO()
        REAL_SAVE(buf, arr, allow_pickle=allow_pickle, **kwargs)
        data = buf.getvalue()
        file.write(data[: len(data) // 2])
        self.failed = True
        raise OSError(errno.ENOSPC, "No space left on device")


def features_by_split(params, layout) -> dict[str, np.ndarray]:
    from tasks.features.read import read_features

    return {s: read_features(params, layout, s).x for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, imagegen, tiny_params):
    """Images and a reference run that never failed (its features are the expected ones)."""
    from tasks.stages.run_features import run_features
    from tasks.stages.run_index import run_index

    tmp = tmp_path_factory.mktemp("diskfull")
    root = imagegen.make_class_folders(tmp / "images", ["red", "blue"], per_class=10, size=32)
    params = tiny_params(root)
    reference = Layout(tmp / "reference")
    run_index(params, reference)
    run_features(params, reference)
    return root, params, features_by_split(params, reference)


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [1, 4])
def test_enospc_during_shard_write_then_rerun(
    dataset, tmp_path, monkeypatch, fail_at: int, check_cache_consistent, leftover_temp_files
) -> None:
    from tasks.inputs import cache_root
    from tasks.stages.run_features import run_features
    from tasks.stages.run_index import run_index

    root, params, expected = dataset
    layout = Layout(tmp_path / "work")
    run_index(params, layout)
    full = DiskFull(fail_at)
    monkeypatch.setattr(np, "save", full)
    with pytest.raises(OSError, match="No space left") as err:
        run_features(params, layout)
    monkeypatch.setattr(np, "save", REAL_SAVE)
    assert full.failed and err.value.errno == errno.ENOSPC
    cache = cache_root(params, layout)
    assert leftover_temp_files(layout.root) == [], "a half-written temp file was left behind"
    assert not layout.features_manifest.exists(), "the run's manifest was written although it failed"

    manifest = run_features(params, layout)
    check_cache_consistent(cache)
    assert manifest.computed + manifest.reused == manifest.pairs
    got = features_by_split(params, layout)
    for split, x in expected.items():
        np.testing.assert_array_equal(got[split], x, err_msg=split)
    assert leftover_temp_files(layout.root) == []


@pytest.mark.slow
def test_cli_reports_full_disk_clearly(
    dataset, tmp_path, monkeypatch, write_params, tiny_dict, tiny_params
) -> None:
    """`retrainflow features` on a full disk: a one-line error naming the problem, non-zero exit, no traceback."""
    from flows.cli import app
    from tasks.stages.run_index import run_index

    root, _, _ = dataset
    write_params(tmp_path, tiny_dict(root))
    run_index(tiny_params(root), Layout(tmp_path))
    monkeypatch.setattr(np, "save", DiskFull(2))
    result = CliRunner().invoke(
        app,
        ["features", "--params", str(tmp_path / "params.yaml"), "--workdir", str(tmp_path), "--no-progress"],
    )
    assert result.exit_code not in (0, None)
    assert isinstance(result.exception, SystemExit), f"unhandled {result.exception!r}"
    assert "No space left" in result.output


DISKFULL_CLI = Path(__file__).with_name("diskfull_cli.py")


@pytest.mark.slow
@pytest.mark.parametrize("command", [["stage", "features"], ["run"]], ids=["stage-features", "run"])
def test_stage_and_run_report_full_disk_clearly(
    dataset,
    tmp_path,
    command,
    prefect_api_url,
    write_params,
    tiny_dict,
    tiny_params,
    leftover_temp_files,
    quiet_env,
) -> None:
    """`retrainflow stage features` (what `dvc repro` runs) and `retrainflow run`, which run the stage inside a
    Prefect flow, exit like `retrainflow features` does on a full disk: code 1 and one `error:` line naming it,
    after the task's retry failed too (a full disk stays full). Real processes: the CLI with the shard writer
    failing (diskfull_cli.py), reporting to the session's Prefect server."""
    from tasks.stages.run_index import run_index

    root, _, _ = dataset
    write_params(tmp_path, tiny_dict(root))
    run_index(tiny_params(root), Layout(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(DISKFULL_CLI), "2", *command, "--params", "params.yaml"],
        cwd=tmp_path,
        env=quiet_env({"PREFECT_API_URL": prefect_api_url}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-4000:]
    calls = [int(n) for n in re.findall(r"np.save failed: call (\d+)", proc.stderr)]
    assert len(calls) >= 2, proc.stderr[-4000:]  # it failed, and failed again in the task's retry
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], proc.stderr[-4000:]
    assert proc.stderr.rstrip().endswith(errors[0]), "the error line is the last word, not a traceback"
    assert not Layout(tmp_path).features_manifest.exists()
    assert leftover_temp_files(tmp_path) == []
