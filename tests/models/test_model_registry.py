"""The promotion gate (pure) and the registry it writes: a better model is promoted, a worse one rejected."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tasks.config import EvaluateConfig, params_from_dict
from tasks.layout import Layout
from tasks.models.registry import (
    RegistryError,
    candidate_score,
    champion_model,
    data_dvc_hash,
    gate,
    git_commit,
    read_registry,
    run_promote,
    unchanged_reason,
)


def test_gate_first_model_needs_min_accuracy() -> None:
    cfg = EvaluateConfig(min_accuracy=0.6, tolerance=0.01)
    ok = gate(0.7, None, cfg)
    assert ok.promote and "no champion yet" in ok.reason
    low = gate(0.5, None, cfg)
    assert not low.promote and "min_accuracy" in low.reason and "0.5000" in low.reason


def test_gate_against_champion_with_tolerance() -> None:
    cfg = EvaluateConfig(min_accuracy=0.0, tolerance=0.02)
    assert gate(0.90, 0.80, cfg).promote
    assert gate(0.79, 0.80, cfg).promote  # within the tolerance
    worse = gate(0.70, 0.80, cfg)
    assert not worse.promote and "champion 0.8000" in worse.reason and "0.7800" in worse.reason


def test_gate_rejects_non_numeric_scores() -> None:
    with pytest.raises(RegistryError, match="'high'"):
        gate("high", None, EvaluateConfig())  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="nan"):
        gate(float("nan"), None, EvaluateConfig())


def test_candidate_score_reads_test_section_or_top_level() -> None:
    assert candidate_score({"test_accuracy": 0.75, "val_accuracy": 0.9}, "accuracy") == 0.75
    assert candidate_score({"test": {"accuracy": 0.8}}, "accuracy") == 0.8
    assert candidate_score({"macro_f1": 0.5}, "macro_f1") == 0.5
    with pytest.raises(RegistryError, match="macro_f1"):
        candidate_score({"test": {"accuracy": 0.8}}, "macro_f1")


def _workspace(root: Path, score: float, rows: int = 4) -> Layout:
    """A hand-made workspace: an index table, a candidate model file and evaluate metrics."""
    layout = Layout(root)
    layout.index_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "path": [f"a/{i}.png" for i in range(rows)],
            "label": ["a"] * rows,
            "split": ["train"] * rows,
            "sha256": [f"{i:064d}" for i in range(rows)],
        }
    ).to_csv(layout.index_table, index=False)
    layout.candidate_dir.mkdir(parents=True, exist_ok=True)
    (layout.candidate_dir / "model.keras").write_text(f"model with score {score}")
    (layout.candidate_dir / "classes.json").write_text("{}")
    layout.metrics_dir.mkdir(parents=True, exist_ok=True)
    (layout.metrics_dir / "evaluate.json").write_text(json.dumps({"test_accuracy": score}))
    return layout


def test_promote_better_then_reject_worse(tmp_path: Path) -> None:
    params = params_from_dict(
        {"evaluate": {"min_accuracy": 0.5, "tolerance": 0.05}, "base": {"weights": "none"}}
    )
    layout = _workspace(tmp_path, 0.80)
    first = run_promote(params, layout)
    assert first.promoted and first.champion == first.candidate_id
    assert (layout.champion_dir / "model.keras").read_text() == "model with score 0.8"

    _workspace(tmp_path, 0.90)
    better = run_promote(params, layout)
    assert better.promoted and better.champion_score == pytest.approx(0.80)
    assert (layout.champion_dir / "model.keras").read_text() == "model with score 0.9"

    _workspace(tmp_path, 0.70)
    worse = run_promote(params, layout)
    assert not worse.promoted and "rejected" in worse.reason
    assert (layout.champion_dir / "model.keras").read_text() == "model with score 0.9"  # unchanged

    reg = read_registry(layout)
    assert [c.promoted for c in reg.candidates] == [True, True, False]
    assert reg.champion == better.candidate_id
    last = reg.candidates[-1]
    assert last.previous_champion == better.candidate_id and last.params_hash == params.section_hash()
    assert last.score == pytest.approx(0.70) and last.data_version.startswith("index:")
    on_disk = json.loads(layout.model_registry.read_text())
    assert on_disk["champion"] == better.candidate_id and len(on_disk["candidates"]) == 3
    champ_record = json.loads((layout.champion_dir / "champion.json").read_text())
    assert champ_record["id"] == better.candidate_id


def test_unchanged_since_champion_detects_data_and_params(tmp_path: Path) -> None:
    params = params_from_dict({"base": {"weights": "none"}})
    layout = _workspace(tmp_path, 0.8)
    run_promote(params, layout)
    reg = read_registry(layout)
    champ = reg.champion_entry()
    assert champ is not None
    assert unchanged_reason(reg, champ.index_hash, params.section_hash()) is not None
    other = params_from_dict({"base": {"weights": "none"}, "top": {"lr": 0.5}})
    assert unchanged_reason(reg, champ.index_hash, other.section_hash()) is None
    _workspace(tmp_path, 0.8, rows=5)  # one more image
    from tasks.models.registry import index_content_hash

    assert unchanged_reason(reg, index_content_hash(layout), params.section_hash()) is None


def test_data_dvc_hash_and_bad_registry(tmp_path: Path) -> None:
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc123.dir\n  path: data\n")
    assert data_dvc_hash(tmp_path / "data.dvc") == "abc123.dir"
    assert data_dvc_hash(tmp_path / "missing.dvc") is None
    layout = Layout(tmp_path)
    layout.models_dir.mkdir()
    layout.model_registry.write_text("[1, 2]")
    with pytest.raises(RegistryError, match="candidates"):
        read_registry(layout)


def test_promote_and_registry_commands(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    _workspace(tmp_path, 0.9)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("base: {weights: none}\nevaluate: {min_accuracy: 0.95}\n")
    runner = CliRunner()
    promoted = runner.invoke(app, ["promote", "-p", str(params_file), "-w", str(tmp_path)])
    assert promoted.exit_code == 0, promoted.output
    assert json.loads(promoted.stdout)["promoted"] is False  # 0.9 < min_accuracy 0.95
    listed = runner.invoke(app, ["registry", "-w", str(tmp_path), "--json"])
    reg = json.loads(listed.stdout)
    assert reg["champion"] is None and "below evaluate.min_accuracy" in reg["candidates"][0]["reason"]
    table = runner.invoke(app, ["registry", "-w", str(tmp_path)])
    assert table.exit_code == 0 and "champion: none" in table.stdout and "rejected" in table.stdout
    missing = runner.invoke(app, ["promote", "-p", str(params_file), "-w", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "evaluate.json" in missing.output


def test_model_path_is_the_immutable_copy_not_the_moving_link(tmp_path: Path) -> None:
    params = params_from_dict({"evaluate": {"min_accuracy": 0.5}, "base": {"weights": "none"}})
    layout = _workspace(tmp_path, 0.80)
    first = run_promote(params, layout)
    _workspace(tmp_path, 0.90)
    second = run_promote(params, layout)
    assert first.promoted and second.promoted
    reg = read_registry(layout)
    paths = [Path(c.model_path) for c in reg.candidates if c.model_path]
    assert paths == [champion_model(layout, first.candidate_id), champion_model(layout, second.candidate_id)]
    assert paths[0] == layout.champions_dir / first.candidate_id / "model.keras"
    assert layout.champion_dir not in paths[0].parents and layout.champion_dir not in paths[1].parents
    # the first record still names the first model although the champion link moved on
    assert paths[0].read_text() == "model with score 0.8" and paths[1].read_text() == "model with score 0.9"
    assert json.loads((paths[1].parent / "champion.json").read_text())["model_path"] == str(paths[1])
    _workspace(tmp_path, 0.1)
    rejected = run_promote(params, layout)
    assert not rejected.promoted and read_registry(layout).candidates[-1].model_path is None


def _git(repo: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def test_git_commit_is_head_with_dirty_only_for_tracked_edits(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None  # not a git checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert len(head) == 40 and git_commit(tmp_path) == head
    (tmp_path / "untracked.txt").write_text("x")
    assert git_commit(tmp_path) == head  # untracked files are not code the run used
    (tmp_path / "params.yaml").write_text("seed: 2\n")
    assert git_commit(tmp_path) == f"{head}+dirty"


def test_promote_records_the_commit_it_is_given_else_captures_it(tmp_path: Path) -> None:
    """The retrain flow passes the commit it captured before its own writes; a bare promote captures it now."""
    params = params_from_dict({"base": {"weights": "none"}})
    layout = _workspace(tmp_path, 0.8)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "workspace")
    head = _git(tmp_path, "rev-parse", "HEAD")
    run_promote(params, layout, commit="0123abcd")
    (layout.metrics_dir / "evaluate.json").write_text(json.dumps({"test_accuracy": 0.9}))  # a tracked edit
    run_promote(params, layout)
    assert [c.git_commit for c in read_registry(layout).candidates] == ["0123abcd", f"{head}+dirty"]


def test_promoting_the_same_candidate_twice_records_it_once(tmp_path: Path) -> None:
    params = params_from_dict({"evaluate": {"min_accuracy": 0.5}, "base": {"weights": "none"}})
    layout = _workspace(tmp_path, 0.80)
    first = run_promote(params, layout)
    again = run_promote(params, layout)
    assert first.promoted and not first.already_registered
    assert again.already_registered and again.candidate_id == first.candidate_id and again.promoted
    assert again.reason.startswith(f"already registered as {first.candidate_id} (promoted)")
    reg = read_registry(layout)
    assert [c.id for c in reg.candidates] == [first.candidate_id] and reg.champion == first.candidate_id
    assert [p.name for p in layout.champions_dir.iterdir()] == [first.candidate_id]  # not copied again
    # new metrics for the same model (e.g. a new test split) are a new evaluation: recorded
    (layout.metrics_dir / "evaluate.json").write_text(json.dumps({"test_accuracy": 0.85}))
    third = run_promote(params, layout)
    assert not third.already_registered and len(read_registry(layout).candidates) == 2


def test_promote_command_twice_says_already_registered_and_exits_0(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    _workspace(tmp_path, 0.9)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("base: {weights: none}\nevaluate: {min_accuracy: 0.95}\n")
    runner = CliRunner()
    args = ["promote", "-p", str(params_file), "-w", str(tmp_path)]
    first = json.loads(runner.invoke(app, args).stdout)
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert f"already registered as {first['candidate_id']} (rejected)" in second.stdout
    assert len(read_registry(Layout(tmp_path)).candidates) == 1


def test_data_version_is_the_dvc_hash_only_for_data_inside_the_tracked_folder(tmp_path: Path) -> None:
    from tasks.models.registry import data_version, index_content_hash

    layout = _workspace(tmp_path, 0.8)
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc123.dir\n  path: data\n")
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    index = f"index:{index_content_hash(layout)}"
    assert data_version(layout, tmp_path / "data" / "images") == "dvc:abc123.dir"
    assert data_version(layout, tmp_path / "data") == "dvc:abc123.dir"
    assert data_version(layout, tmp_path / "elsewhere") == index
    assert data_version(layout, tmp_path / "data-other") == index  # a sibling with the same prefix
    assert data_version(layout) == index  # nothing says the index read the tracked folder
    (tmp_path / "data.dvc").unlink()
    assert data_version(layout, tmp_path / "data" / "images") == index


def test_promote_records_the_data_version_of_the_data_it_indexed(tmp_path: Path) -> None:
    layout = _workspace(tmp_path, 0.8)
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc123.dir\n  path: data\n")
    outside = params_from_dict({"base": {"weights": "none"}, "data": {"root": str(tmp_path / "mine")}})
    inside = params_from_dict({"base": {"weights": "none"}, "data": {"root": str(tmp_path / "data" / "x")}})
    run_promote(outside, layout)
    assert read_registry(layout).candidates[-1].data_version.startswith("index:")
    (layout.metrics_dir / "evaluate.json").write_text(json.dumps({"test_accuracy": 0.9}))
    run_promote(inside, layout)
    assert read_registry(layout).candidates[-1].data_version == "dvc:abc123.dir"
