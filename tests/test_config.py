from pathlib import Path

import pytest
import yaml

from tasks.config import Params, ParamsError, load_params, params_from_dict, parse_overrides

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def test_project_params_file_is_valid():
    params = load_params(PARAMS_FILE)
    assert params.base.name == "mobilenet_v2"
    assert params.data.split.train == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"augment": {"zoom_range": "big"}},
            "augment.zoom_range: expected a number in [0, 1) or a [low, high] pair, got 'big'",
        ),
        ({"top": {"lr": -1}}, "top.lr: expected greater than 0, got -1"),
        ({"top": {"lrr": 1}}, "top.lrr: unknown key, got 1"),
        ({"nonsense": {}}, "nonsense: unknown key"),
        ({"base": {"name": "alexnet"}}, "base.name: expected one of"),
        ({"base": {"weights": "/no/such/file.h5"}}, "base.weights: expected 'imagenet', 'none' or the path"),
        (
            {"data": {"split": {"train": 0.5, "val": 0.1, "test": 0.1}}},
            "data.split: expected train + val + test",
        ),
        ({"image": {"size": [0, 32]}}, "image.size: expected an integer or a [height, width] pair"),
        (
            {"augment": {"fill_mode": "mirror"}},
            "augment.fill_mode: expected 'constant', 'nearest', 'reflect' or 'wrap', got 'mirror'",
        ),
        ({"augment": {"passes": "two"}}, "augment.passes: expected a valid integer"),
        ({"finetune": {"layer_regex": "("}}, "finetune.layer_regex: expected a valid regular expression"),
        ({"augment": {"grid": {"zoom_range": [0.1, "big"]}}}, "grid.zoom_range: value 'big' is invalid"),
        ({"data": {"source": "csv"}}, "data.source is 'csv' but data.csv is not set"),
        (
            {"top": {"heads": [{"name": "a", "type": "linear"}, {"name": "a", "type": "linear"}]}},
            "expected unique head names",
        ),
    ],
)
def test_bad_params_name_key_and_value(raw, expected):
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw)
    assert expected in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ParamsError) as err:
        params_from_dict({"top": {"lr": 0, "epochs": 0}, "finetune": {"momentum": 2}})
    assert len(err.value.problems) == 3


def test_overrides_are_parsed_as_yaml_and_merged(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"top": {"lr": 0.5}, "image": {"size": 64}}))
    params = load_params(path, ["top.lr=0.01", "augment.zoom_range=[0.8, 1.2]", "image.size=[32, 48]"])
    assert params.top.lr == 0.01
    assert params.augment.zoom_range == (0.8, 1.2)
    assert params.image.size == (32, 48)


def test_override_without_equals_is_rejected():
    with pytest.raises(ParamsError, match="expected KEY.PATH=VALUE"):
        parse_overrides(["top.lr"])


def test_params_are_frozen_and_hash_is_stable_per_section():
    a, b = Params(), params_from_dict({"top": {"lr": 0.01}})
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen assignment
        a.seed = 1  # type: ignore[misc]
    assert a.section_hash("augment", "base") == b.section_hash("augment", "base")
    assert a.section_hash("top") != b.section_hash("top")


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
