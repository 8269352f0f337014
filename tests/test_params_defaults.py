"""One source of defaults: ``params.yaml`` states every key of the config schema, each with the schema's default.

The schema (``tasks.config.Params``) is where defaults live; ``params.yaml`` repeats them so that a user reads every
knob in one file. These tests fail the moment the two drift apart (a new key, a changed default, a typo).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.config import HeadSpec, Params, load_params

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def _stated() -> dict[str, Any]:
    return yaml.safe_load(PARAMS_FILE.read_text())


def _differences(stated: Any, default: Any, path: str) -> list[str]:
    """Every key path below ``path`` where ``stated`` (raw YAML) is absent, extra or not the ``default`` (the
    schema's defaults dumped as JSON: tuples are lists, paths are text)."""
    if isinstance(default, dict):
        if not isinstance(stated, dict):
            return [f"{path}: params.yaml has {stated!r}, the schema a section {default!r}"]

        def below(key: str) -> str:
            return f"{path}.{key}" if path else key

        out = [
            f"{below(k)}: in the schema (default {default[k]!r}), not in params.yaml"
            for k in sorted(default.keys() - stated.keys())
        ]
        out += [
            f"{below(k)}: in params.yaml ({stated[k]!r}), not in the schema"
            for k in sorted(stated.keys() - default.keys())
        ]
        for key in sorted(default.keys() & stated.keys()):
            out += _differences(stated[key], default[key], below(key))
        return out
    if isinstance(default, list) and isinstance(stated, list):
        if len(stated) != len(default):
            return [f"{path}: params.yaml has {len(stated)} items, the schema's default {len(default)}"]
        out = []
        for i, (item, default_item) in enumerate(zip(stated, default, strict=True)):
            out += _differences(item, default_item, f"{path}[{i}]")
        return out
    if isinstance(stated, bool) or isinstance(default, bool):  # YAML true must not pass for 1
        same = type(stated) is type(default) and stated == default
    else:
        same = stated == default  # 15 == 15.0: YAML integers state float defaults
    return [] if same else [f"{path}: params.yaml says {stated!r}, the schema's default is {default!r}"]


def _with_head_defaults(stated: dict[str, Any]) -> dict[str, Any]:
    """``top.heads`` items are list entries, not sections: an entry may leave out a head's own per-entry
    defaults (``units: []`` for a linear head). Fill those in from ``HeadSpec`` so every other key is compared
    as written; the entries' stated keys are still compared one by one."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in stated.items()}
    heads = out.get("top", {}).get("heads")
    if isinstance(heads, list):
        out["top"]["heads"] = [
            {**HeadSpec.model_validate(h).model_dump(mode="json"), **h} if isinstance(h, dict) else h
            for h in heads
        ]
    return out


def test_params_yaml_states_every_schema_key_with_its_default():
    problems = _differences(_with_head_defaults(_stated()), Params().model_dump(mode="json"), "")
    assert problems == [], "params.yaml and the schema's defaults differ:\n  " + "\n  ".join(problems)


def test_params_yaml_loads_to_exactly_the_schema_defaults():
    """Validated, the file is the default Params: the same values, the same section hashes (cache keys,
    registry records)."""
    loaded = load_params(PARAMS_FILE)
    assert loaded == Params()
    assert loaded.section_hash() == Params().section_hash()


def test_the_comparison_sees_a_changed_default_a_missing_and_an_extra_key():
    default = Params().model_dump(mode="json")
    stated = _with_head_defaults(_stated())
    stated["augment"] = {**stated["augment"], "rotation_range": 16, "typo": 1}
    del stated["image"]["size"]
    stated["augment"].pop("horizontal_flip")
    stated["top"]["heads"][1]["dropout"] = 0.4
    problems = _differences(stated, default, "")
    assert sorted(problems) == sorted(
        [
            "augment.rotation_range: params.yaml says 16, the schema's default is 15.0",
            "augment.typo: in params.yaml (1), not in the schema",
            "augment.horizontal_flip: in the schema (default True), not in params.yaml",
            "image.size: in the schema (default [224, 224]), not in params.yaml",
            "top.heads[1].dropout: params.yaml says 0.4, the schema's default is 0.5",
        ]
    )


@pytest.mark.parametrize("stated, default", [(1, True), (0, False), (True, 1)])
def test_booleans_and_numbers_are_not_confused(stated, default):
    assert _differences(stated, default, "k")
