import copy
import re
from pathlib import Path

import pytest
import yaml

from tasks.config import Params, ParamsError, load_params, params_from_dict, parse_overrides
from tasks.models.bases import BASE_MODELS

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def test_project_params_file_is_valid():
    params = load_params(PARAMS_FILE)
    assert params.base.name == "mobilenet_v2"
    assert params.data.split.train == pytest.approx(0.7)


def _regex_error(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as err:
        return str(err)
    raise AssertionError(f"{pattern!r} compiles")


GRID_KEYS = (
    "['brightness_range', 'channel_shift_range', 'cval', 'fill_mode', 'height_shift_range', 'horizontal_flip', "
    "'rotation_range', 'shear_range', 'vertical_flip', 'width_shift_range', 'zoom_range']"
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"augment": {"zoom_range": "big"}},
            "augment.zoom_range: expected a number in [0, 1) or a [low, high] pair, got 'big'",
        ),
        ({"top": {"lr": -1}}, "top.lr: expected greater than 0, got -1"),
        ({"top": {"lrr": 1}}, "top.lrr: unknown key, got 1; did you mean 'top.lr'?"),
        ({"top": {"epoch": 3}}, "top.epoch: unknown key, got 3; did you mean 'top.epochs'?"),
        ({"tpo": {}}, "tpo: unknown key, got {}; did you mean 'top'?"),
        (
            {"top": {"heads": [{"name": "a", "unit": 3}]}},
            "top.heads.0.unit: unknown key, got 3; did you mean 'top.heads.0.units'?",
        ),
        (
            {"data": {"split": {"tran": 1}}},
            "data.split.tran: unknown key, got 1; did you mean 'data.split.train'?",
        ),
        ({"nonsense": {}}, "nonsense: unknown key, got {}"),  # nothing close: no suggestion
        (
            {"base": {"name": "alexnet"}},
            f"base.name: expected one of {sorted(BASE_MODELS)}, got 'alexnet'",
        ),
        (
            {"base": {"weights": "/no/such/file.h5"}},
            "base.weights: expected 'imagenet', 'none' or the path of an existing weights file, got '/no/such/file.h5'",
        ),
        (
            {"image": {"size": [0, 32]}},
            "image.size: expected an integer or a [height, width] pair of integers in [8, 2048], got [0, 32]",
        ),
        (
            {"augment": {"fill_mode": "mirror"}},
            "augment.fill_mode: expected 'constant', 'nearest', 'reflect' or 'wrap', got 'mirror'",
        ),
        (
            {"augment": {"passes": "two"}},
            "augment.passes: expected a valid integer, unable to parse string as an integer, got 'two'",
        ),
        (
            {"finetune": {"layer_regex": "("}},
            f"finetune.layer_regex: expected a valid regular expression ({_regex_error('(')}), got '('",
        ),
        # grid values: the grid key's path and the one bad value, not the whole section
        (
            {"augment": {"grid": {"zoom_range": [0.1, "big"]}}},
            "augment.grid.zoom_range: expected a number in [0, 1) or a [low, high] pair, got 'big'",
        ),
        (
            {"augment": {"grid": {"zoom_range": [[0.9, "x"]]}}},
            "augment.grid.zoom_range: expected a [low, high] pair of positive numbers with low <= high, "
            "got [0.9, 'x']",
        ),
        (
            {"augment": {"grid": {"fill_mode": ["nearest", "mirror"]}}},
            "augment.grid.fill_mode: expected 'constant', 'nearest', 'reflect' or 'wrap', got 'mirror'",
        ),
        (
            {"augment": {"grid": {"spin": [1, 2]}}},
            f"augment.grid.spin: unknown key; expected one of {GRID_KEYS}, got [1, 2]",
        ),
        ({"augment": {"grid": {"cval": 3}}}, "augment.grid.cval: expected a non-empty list of values, got 3"),
        (
            {"augment": {"grid": ["cval"]}},
            "augment.grid: expected a mapping of augmentation parameter -> list of values, got ['cval']",
        ),
        # data: one line each, naming the key and echoing what was received
        (
            {"data": {"split": {"train": 0.5, "val": 0.1, "test": 0.1}}},
            "data.split: expected train + val + test to sum to 1 (they sum to 0.7), "
            "got {'train': 0.5, 'val': 0.1, 'test': 0.1}",
        ),
        (
            {"data": {"split": {"train": 0.5}}},  # the defaults count: what the sum is made of
            "data.split: expected train + val + test to sum to 1 (they sum to 0.8), "
            "got {'train': 0.5, 'val': 0.15, 'test': 0.15}",
        ),
        (
            {"data": {"split": {"train": 0, "val": 0.5, "test": 0.5}}},
            "data.split.train: expected a fraction above 0, got 0.0",
        ),
        ({"data": {"source": "csv"}}, "data.csv: required when data.source is 'csv', got None"),
        ({"data": {"classes": ["a"]}}, "data.classes: expected at least 2 classes, got ['a']"),
        ({"data": {"classes": ["a", "b", "a"]}}, "data.classes: expected unique names, got ['a', 'b', 'a']"),
        ({"data": {"classes": "a, b,a"}}, "data.classes: expected unique names, got 'a, b,a'"),
        (
            {"data": {"classes": "a,,b"}},
            "data.classes: expected comma-separated class names, with no empty name, got 'a,,b'",
        ),
        ({"data": {"classes": "solo"}}, "data.classes: expected at least 2 classes, got ['solo']"),
        (
            {"data": {"classes": ["a", " "]}},
            "data.classes: expected class names that are not empty, got ['a', ' ']",
        ),
        # heads: a bad head is reported once, without a second line about the tuple's length
        (
            {"top": {"heads": [{"name": "a", "units": [0]}]}},
            "top.heads.0.units: expected a positive integer or a list of positive integers, got [0]",
        ),
        ({"top": {"heads": []}}, "top.heads: expected at least 1 head, got []"),
        (
            {"top": {"heads": [{"name": "a", "type": "linear"}, {"name": "a", "type": "linear"}]}},
            "top.heads: expected unique head names, got ['a', 'a']",
        ),
    ],
)
def test_bad_params_name_key_and_value(raw, expected):
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw)
    assert err.value.problems == [expected]
    assert expected in str(err.value)


def test_two_bad_heads_give_two_lines_and_nothing_else():
    with pytest.raises(ParamsError) as err:
        params_from_dict({"top": {"heads": [{"name": "a", "units": [0]}, {"name": "b", "units": "x"}]}})
    assert err.value.problems == [
        "top.heads.0.units: expected a positive integer or a list of positive integers, got [0]",
        "top.heads.1.units: expected a positive integer or a list of positive integers, got 'x'",
    ]


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
    with pytest.raises(ParamsError, match="expected KEY.PATH=VALUE") as err:
        parse_overrides(["top.lr"])
    assert str(err.value).startswith("invalid --set override:")


def test_classes_as_a_comma_separated_string(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("{}\n")
    assert load_params(path, ["data.classes=cats,dogs"]).data.classes == ("cats", "dogs")
    assert load_params(path, ["data.classes= cats , dogs "]).data.classes == ("cats", "dogs")
    assert load_params(path, ["data.classes=[cats, dogs]"]).data.classes == ("cats", "dogs")


def test_problems_are_labelled_with_where_they_came_from(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"top": {"lr": 0.5}}))
    with pytest.raises(ParamsError) as err:
        load_params(path, ["top.epoch=3"])
    assert str(err.value) == (
        "invalid --set override:\n  top.epoch: unknown key, got 3; did you mean 'top.epochs'?"
    )
    # a problem the override caused elsewhere (the CSV becomes required) is the override's too
    with pytest.raises(ParamsError) as err:
        load_params(path, ["data.source=csv"])
    assert str(err.value).startswith("invalid --set override:\n  data.csv: required")
    # the file's own problems keep the file's label; each line appears once, under its source
    path.write_text(yaml.safe_dump({"top": {"lr": -1}}))
    with pytest.raises(ParamsError) as err:
        load_params(path, ["finetune.momentum=2"])
    assert err.value.overridden == ["finetune.momentum: expected less than 1, got 2"]
    assert str(err.value) == (
        "invalid --set override:\n  finetune.momentum: expected less than 1, got 2\n"
        f"invalid {path}:\n  top.lr: expected greater than 0, got -1"
    )
    # an override of the bad key itself is labelled as the override
    with pytest.raises(ParamsError) as err:
        load_params(path, ["top.lr=-2"])
    assert str(err.value) == "invalid --set override:\n  top.lr: expected greater than 0, got -2"
    # without overrides, the file's label only
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(err.value) == f"invalid {path}:\n  top.lr: expected greater than 0, got -1"


def test_params_are_frozen_and_hash_is_stable_per_section():
    a, b = Params(), params_from_dict({"top": {"lr": 0.01}})
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen assignment
        a.seed = 1  # type: ignore[misc]
    assert a.section_hash("augment", "base") == b.section_hash("augment", "base")
    assert a.section_hash("top") != b.section_hash("top")


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_augment_grid_is_read_only_and_dumps_as_a_plain_mapping():
    params = params_from_dict(
        {"augment": {"grid": {"rotation_range": [0, 15], "zoom_range": [0.1, [0.9, 1.3]]}}}
    )
    grid = params.augment.grid
    assert grid["rotation_range"] == (0, 15) and grid["zoom_range"] == (0.1, (0.9, 1.3))
    assert dict(grid) == {"rotation_range": (0, 15), "zoom_range": (0.1, (0.9, 1.3))}
    with pytest.raises(TypeError):
        grid["rotation_range"] = (99,)  # type: ignore[index]
    with pytest.raises(TypeError):
        del grid["zoom_range"]  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        grid.update(rotation_range=(99,))  # type: ignore[attr-defined]
    assert params.augment.grid["rotation_range"] == (0, 15)
    # dumps (what section hashes are computed from) are those of a plain dict
    assert params.model_dump(mode="json")["augment"]["grid"] == {
        "rotation_range": [0, 15],
        "zoom_range": [0.1, [0.9, 1.3]],
    }
    assert params.augment.model_dump()["grid"] == {"rotation_range": (0, 15), "zoom_range": (0.1, (0.9, 1.3))}
    # and the frozen params stay hashable and copyable (deepcopy goes through __reduce__, as pickling would)
    assert copy.deepcopy(params) == params
    assert hash(params.augment) == hash(copy.deepcopy(params).augment)


def test_base_alpha_must_be_a_width_multiplier_the_base_has():
    assert params_from_dict({"base": {"name": "mobilenet", "alpha": 0.25}}).base.alpha == 0.25
    with pytest.raises(ParamsError) as err:
        params_from_dict({"base": {"name": "mobilenet_v2", "alpha": 0.9}})
    assert err.value.problems == [
        "base.alpha: expected one of [0.35, 0.5, 0.75, 1.0, 1.3, 1.4] for mobilenet_v2, got 0.9"
    ]
    with pytest.raises(ParamsError) as err:
        params_from_dict({"base": {"name": "resnet50", "alpha": 1.0}})
    assert err.value.problems == [
        "base.alpha: resnet50 takes no alpha (width multiplier); expected null, got 1.0"
    ]
