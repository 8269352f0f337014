"""Bad params through the CLI: wrong types, out-of-range values and unknown keys in every section, unknown bases,
missing or fake weights files. Every command exits 2 before doing any work, naming the key path and the value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

# (dotted key, bad YAML value, text the message must contain besides the key path)
WRONG: list[tuple[str, str, str]] = [
    ("seed", "-1", "-1"),
    ("seed", "abc", "abc"),
    ("data.source", "ftp", "ftp"),
    ("data.split.train", "1.5", "1.5"),
    ("data.split", "{train: 0.5, val: 0.1, test: 0.1}", "sum to 1"),
    ("data.max_pixels", "0", "0"),
    ("data.workers", "many", "many"),
    ("data.classes", "[solo]", "at least 2"),
    ("image.size", "3", "3"),
    ("image.size", "[32, big]", "big"),
    ("image.interpolation", "bicubic-ish", "bicubic-ish"),
    ("augment.zoom_range", "big", "big"),
    ("augment.rotation_range", "400", "400"),
    ("augment.passes", "-2", "-2"),
    ("augment.fill_mode", "mirror", "mirror"),
    ("augment.brightness_range", "[2, 1]", "low <= high"),
    ("base.name", "inception_v9", "inception_v9"),
    ("base.alpha", "wide", "wide"),
    ("features.dtype", "int8", "int8"),
    ("features.batch_size", "0", "0"),
    ("features.pooling", "median", "median"),
    ("features.shard_size", "big", "big"),
    ("top.lr", "-0.1", "-0.1"),
    ("top.epochs", "ten", "ten"),
    ("top.optimizer", "lbfgs", "lbfgs"),
    ("top.heads", "[]", "at least 1"),
    ("top.heads", "[{name: a, type: weird}]", "weird"),
    ("top.heads", "[{name: a, units: [-3]}]", "positive"),
    ("finetune.momentum", "1.5", "1.5"),
    ("finetune.min_improvement", "1", "1"),
    ("finetune.layer_regex", "'(unclosed'", "regular expression"),
    ("finetune.epochs", "true", "true"),
    ("top.lr", "false", "false"),
    ("evaluate.min_accuracy", "2", "2"),
    ("evaluate.metric", "auc", "auc"),
    ("evaluate.batch_size", "lots", "lots"),
    ("evaluate.tolerance", "small", "small"),
]
# Out of range for the chosen base: the tiny params' base is mobilenet (alphas 0.25, 0.5, 0.75, 1.0)
BASE_OUT_OF_RANGE: list[tuple[str, str, str]] = [
    ("base.alpha", "0.9", "0.9"),
    ("base.alpha", "-1", "-1"),
]
SECTIONS = ("data", "image", "augment", "base", "features", "top", "finetune", "evaluate")
runner = CliRunner()


@pytest.fixture
def workdir(tmp_path: Path, write_params, tiny_dict) -> Path:
    write_params(tmp_path, tiny_dict())
    return tmp_path


def _invoke(workdir: Path, *args: str):
    params = str(workdir / "params.yaml")
    return runner.invoke(app, [*args, "--params", params, "--workdir", str(workdir)])


def _id(case) -> str:
    values = case.values if hasattr(case, "values") else case
    return f"{values[0]}={values[1]}"


def flat(text: str) -> str:
    """Console output with the terminal's line wrapping undone."""
    return text.replace("\n", "")


@pytest.mark.parametrize(("key", "value", "echo"), WRONG, ids=[_id(c) for c in WRONG])
def test_bad_value_exits_2_with_key_path(workdir: Path, key: str, value: str, echo: str) -> None:
    result = runner.invoke(
        app, ["params", "--params", str(workdir / "params.yaml"), "--set", f"{key}={value}"]
    )
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert f"{key}" in text and echo in text, text


@pytest.mark.parametrize(("key", "value", "echo"), BASE_OUT_OF_RANGE, ids=[_id(c) for c in BASE_OUT_OF_RANGE])
def test_base_value_out_of_range_exits_2_with_key_path(
    workdir: Path, key: str, value: str, echo: str
) -> None:
    result = runner.invoke(
        app, ["params", "--params", str(workdir / "params.yaml"), "--set", f"{key}={value}"]
    )
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert key in text and echo in text, text


@pytest.mark.parametrize("section", ("", *SECTIONS, "data.split", "top.heads.0"))
def test_unknown_key_in_every_section(workdir: Path, section: str, tiny_dict, write_params) -> None:
    raw = tiny_dict()
    if section == "top.heads.0":
        raw["top"]["heads"][0]["colour"] = "blue"
        where = "top.heads.0.colour"
    else:
        node = raw
        for part in filter(None, section.split(".")):
            node = node.setdefault(part, {})
        node["colour"] = "blue"
        where = f"{section}.colour" if section else "colour"
    write_params(workdir, raw)
    result = _invoke(workdir, "index")
    assert result.exit_code == 2, result.output
    assert f"{where}: unknown key" in flat(result.output), result.output
    assert not (workdir / "index").exists(), "the stage ran although the params were invalid"


def test_every_problem_reported_at_once_by_every_command(
    tmp_path: Path, merged, write_params, tiny_dict, cli
) -> None:
    """One file with an unknown key in every section: each command (real subprocess) lists them all, exits 2."""
    raw = merged(tiny_dict(), {s: {"colour": "blue"} for s in SECTIONS})
    raw["colour"] = "blue"
    write_params(tmp_path, raw)
    for command in (["index"], ["features"], ["stage", "train_top"], ["run"]):
        proc = cli([*command, "--params", "params.yaml"], tmp_path)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        text = " ".join(proc.stderr.split())
        for section in SECTIONS:
            assert f"{section}.colour: unknown key" in text, (command, section, text)
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], "a command wrote outputs anyway"


def test_message_keeps_bracketed_expectations(workdir: Path) -> None:
    """The expected-value text is printed verbatim (``[height, width]``), not eaten as console markup."""
    result = runner.invoke(app, ["params", "--params", str(workdir / "params.yaml"), "--set", "image.size=3"])
    assert result.exit_code == 2
    assert "[height, width]" in result.output, result.output


@pytest.mark.parametrize("kind", ["missing", "wrong_suffix", "directory"])
def test_weights_path_that_is_not_a_weights_file(workdir: Path, kind: str) -> None:
    target = {
        "missing": workdir / "nowhere" / "weights.h5",
        "wrong_suffix": workdir / "weights.txt",
        "directory": workdir / "weights.h5",
    }[kind]
    if kind == "wrong_suffix":
        target.write_text("not weights")
    if kind == "directory":
        target.mkdir()
    result = runner.invoke(
        app, ["params", "--params", str(workdir / "params.yaml"), "--set", f"base.weights={target}"]
    )
    assert result.exit_code == 2, result.output
    assert "base.weights" in flat(result.output) and target.name in flat(result.output), result.output


def test_fake_h5_weights_rejected_up_front(workdir: Path) -> None:
    """A text file named ``.h5`` is not a weights file: rejected by validation (exit 2), not by an h5py traceback."""
    fake = workdir / "fake.h5"
    fake.write_text("this is not HDF5\n")
    result = runner.invoke(
        app, ["params", "--params", str(workdir / "params.yaml"), "--set", f"base.weights={fake}"]
    )
    assert result.exit_code == 2, result.output
    assert "base.weights" in flat(result.output)


def test_override_syntax_errors(workdir: Path) -> None:
    for bad in ("top.lr", "=3", "top.lr.x=1"):
        result = runner.invoke(app, ["params", "--params", str(workdir / "params.yaml"), "--set", bad])
        assert result.exit_code == 2, (bad, result.output)
        assert "Traceback" not in result.output


def test_override_problems_are_labelled_as_the_override_with_a_suggestion(workdir: Path) -> None:
    """A ``--set`` typo is the override's, not the params file's, and names the key that was probably meant."""
    result = _invoke(workdir, "index", "--set", "top.epoch=3")
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "invalid --set override:" in text and "invalid params.yaml" not in text, text
    assert "top.epoch: unknown key, got 3; did you mean 'top.epochs'?" in text, text
    assert not (workdir / "index").exists()


def test_params_file_problems_keep_the_file_label(workdir: Path, tiny_dict, write_params) -> None:
    raw = tiny_dict()
    raw["top"]["epoch"] = 3
    write_params(workdir, raw)
    result = _invoke(workdir, "index", "--set", "finetune.momentum=2")
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    file_part = text[text.index(f"invalid {workdir / 'params.yaml'}:") :]
    override_part = text[text.index("invalid --set override:") : text.index(file_part)]
    assert "finetune.momentum" in override_part and "top.epoch" not in override_part, text
    assert "top.epoch: unknown key, got 3; did you mean 'top.epochs'?" in file_part, text


@pytest.mark.parametrize(
    ("text", "message"),
    [("- just\n- a list\n", "expected a mapping of sections"), ("seed: [unclosed\n", "not valid YAML")],
    ids=["list", "unclosed"],
)
def test_params_file_not_yaml_mapping_exits_2(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    result = runner.invoke(app, ["params", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2, result.output
    assert message in flat(result.output) and "Traceback" not in result.output


@pytest.mark.parametrize("text", ["", "# nothing set here\n"], ids=["empty", "comment-only"])
def test_params_file_without_keys_means_every_default(tmp_path: Path, text: str) -> None:
    """An empty params file is no error: every key takes its documented default."""
    from tasks.config import params_from_dict

    (tmp_path / "params.yaml").write_text(text)
    result = runner.invoke(app, ["params", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout) == params_from_dict({}).model_dump(mode="json")
