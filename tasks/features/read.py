"""Reading the feature cache for training: which views a split uses, the cache key of the params, the features.

What a stage that trains on cached features (train_top) stands on, and all it stands on: the index table
(:mod:`tasks.data.index_table`), the augmentation policies' view ids (:mod:`tasks.data.augment`, the policy side: no
OpenCV), the content-addressed store (:mod:`tasks.features.cache`) and the resolved inputs (:mod:`tasks.inputs`).
No TensorFlow, no decoder, no resampler: those are the features stage's (:mod:`tasks.features.extract`), which plans
with the same :func:`split_views` and keys with the same :func:`key_spec_for`.

* :func:`split_views`: (view id, policy, pass) per split: the clean view, plus ``augment.passes`` augmented
  views of every policy for train.
* :func:`key_spec_for`: the cache key's components for resolved :class:`~tasks.inputs.Inputs`.
* :func:`read_features` / :func:`read_manifest`: the features of a split of the current index, and the stable
  manifest of the last features run; a cache computed for other params raises
  :class:`~tasks.errors.FeaturesMismatchError` naming each param that differs (:func:`mismatch_message`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tasks.data.augment import CLEAN_VIEW, AugmentPolicy, policies_for, view_id
from tasks.errors import DatasetError, FeaturesMismatchError
from tasks.features.cache import FeatureCache, KeySpec
from tasks.inputs import resolve_inputs
from tasks.layout import Layout

if TYPE_CHECKING:
    from tasks.config import FeaturesConfig, Params
    from tasks.inputs import Inputs

SPLITS = ("train", "val", "test")
CLEAN = CLEAN_VIEW
INDEX_COLUMNS = ("path", "label", "class_id", "split", "sha256")
RERUN = "run `retrainflow features` with the same params first"


@dataclass(frozen=True)
class FeatureSet:
    """Features of one split of the current index: ``x`` float32 [N, D] with the row identities beside it."""

    x: np.ndarray
    class_ids: np.ndarray
    sha256: np.ndarray
    view_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


# ------------------------------------------------------------------------------------------- the key
def key_spec_for(
    inputs: Inputs, features: FeaturesConfig, weights_sha256: str, engine: str | None = None
) -> KeySpec:
    """The cache key components for the resolved ``inputs``, the ``features`` section (pooling, stored dtype),
    the fingerprint of the weights loaded and the engine that ran them (``EngineChoice.key``: None for Keras)."""
    return KeySpec(
        base=inputs.base.name,
        alpha=inputs.alpha,
        weights_sha256=weights_sha256,
        image_size=inputs.image_size,
        preprocessing=inputs.preprocessing_id,
        pooling=features.pooling,
        dtype=features.dtype,
        feature_dim=inputs.base.feature_dim_for(inputs.alpha),
        engine=engine,
    )


# ------------------------------------------------------------------------------------------- the views
def run_policies(params: Params) -> list[AugmentPolicy]:
    """The augmentation policies of this run: none without ``augment.passes``, else the ``augment`` section or
    the sampled policies of its grid (:func:`tasks.data.augment.policies_for`)."""
    if params.augment.passes == 0:
        return []
    return policies_for(params.augment)


def split_views(params: Params, split: str, views: str = "all") -> list[tuple[str, Any, int]]:
    """(view id, policy or None, pass number) for ``split``: train gets ``augment.passes`` augmented passes of
    every policy (one policy, or each sampled policy of ``augment.grid``) with ``views="all"``."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if views not in ("all", "clean"):
        raise ValueError(f"views: expected 'all' or 'clean', got {views!r}")
    out: list[tuple[str, Any, int]] = [(CLEAN, None, 0)]
    if split == "train" and views == "all":
        for policy in run_policies(params):
            out += [(view_id(policy, p), policy, p) for p in range(params.augment.passes)]
    return out


# ------------------------------------------------------------------------------------------- the index
def check_index(index: Any) -> Any:
    """``index`` when it has the columns the features need and only known splits, else :class:`DatasetError`."""
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise DatasetError(f"index: missing columns {missing}, got columns {list(index.columns)}")
    bad = sorted(set(index["split"]) - set(SPLITS))
    if bad:
        raise DatasetError(f"index: unknown split values {bad}, expected {list(SPLITS)}")
    return index


def load_index(layout: Layout, index: Any | None) -> Any:
    """``index`` (a DataFrame in the index's columns) or the index table of ``layout``, checked."""
    if index is not None:
        return check_index(index)
    from tasks.data.index_table import read_index

    return check_index(read_index(layout))


# ------------------------------------------------------------------------------------------- reading
def read_manifest(layout: Layout) -> dict[str, Any]:
    """The stable part of the last features run (``tasks.features.extract.STABLE_FIELDS``): cache key, key spec, views."""
    path = layout.features_manifest
    if not path.is_file():
        raise FileNotFoundError(f"no features manifest at {path}: run `retrainflow features` first")
    return json.loads(path.read_text())


def read_features(
    params: Params,
    layout: Layout,
    split: str,
    views: Literal["all", "clean"] = "all",
    *,
    index: Any | None = None,
    stage: str = "read_features",
    inputs: Inputs | None = None,
) -> FeatureSet:
    """Float32 features of ``split``'s rows of the current index, view by view (clean first) in index order.

    The cache key comes from the last ``features`` run (its weights fingerprint and engine) and must match ``params``, and the
    views the params ask for must be among those computed: otherwise a :class:`FeaturesMismatchError` names each
    param that differs (``<stage>: the features were computed with augment.passes=2 but the params say 3; run
    ...``); rows of an index the features never saw raise it too. ``inputs``: the stage's resolved inputs
    (:func:`tasks.inputs.resolve_inputs`, resolved here when not given).
    """
    view_plan = split_views(params, split, views)
    manifest = read_manifest(layout)
    inputs = inputs if inputs is not None else resolve_inputs(params, layout)
    recorded = manifest["key_spec"]  # the weights and the engine are the features run's facts
    spec = key_spec_for(inputs, params.features, recorded["weights_sha256"], recorded.get("engine"))
    needed = [view for view, _, _ in view_plan]
    if spec.key != manifest["cache_key"] or not set(needed) <= set(manifest["views"].get(split, [])):
        raise FeaturesMismatchError(mismatch_message(stage, params, manifest, spec))
    table = load_index(layout, index)
    sub = table[table["split"] == split]
    shas = [str(s) for s in sub["sha256"]]
    pairs = [(sha, view) for view in needed for sha in shas]
    cache = FeatureCache.open(inputs.cache_root, spec, create=False)
    absent = cache.missing(pairs)
    if absent:
        raise FeaturesMismatchError(
            f"{stage}: {len(absent)} of {len(pairs)} {split} (image, view) pairs of the current index are not in "
            f"feature cache {spec.key} (the index changed since the features were computed?); {RERUN}"
        )
    x = cache.read(pairs)
    return FeatureSet(
        x=x,
        class_ids=np.tile(np.asarray(sub["class_id"], dtype=np.int64), len(view_plan)),
        sha256=np.asarray([p[0] for p in pairs]),
        view_ids=np.asarray([p[1] for p in pairs]),
    )


# ------------------------------------------------------------------------------------------- mismatches
# key spec field -> the param it comes from (preprocessing is split into its params by _preprocessing_params;
# feature_dim follows base and alpha, weights_sha256 is the recorded one by construction)
KEY_PARAMS = {
    "base": "base.name",
    "alpha": "base.alpha",
    "image_size": "image.size",
    "pooling": "features.pooling",
    "dtype": "features.dtype",
    "format": "feature cache format",
}
Difference = tuple[str, Any, Any]  # (param, value the features were computed with, value the params give)


def mismatch_message(stage: str, params: Params, manifest: dict[str, Any], spec: KeySpec) -> str:
    """``<stage>: the features were computed with K=old but the params say new; run ...`` for the params whose
    values differ between the features manifest and ``params`` (``spec``: the key spec ``params`` give)."""
    diffs = _key_differences(manifest["key_spec"], spec.as_json()) or _augment_differences(manifest, params)
    if not diffs:
        return (
            f"{stage}: the features were computed for cache key {manifest['cache_key']} with views "
            f"{manifest['views']}, which the params (key {spec.key}) do not match; {RERUN}"
        )
    if len(diffs) == 1:
        name, old, new = diffs[0]
        said = f"{name}={_shown(old)} but the params say {_shown(new)}"
    else:
        said = (
            ", ".join(f"{name}={_shown(old)}" for name, old, _ in diffs)
            + " but the params say "
            + ", ".join(f"{name}={_shown(new)}" for name, _, new in diffs)
        )
    return f"{stage}: the features were computed with {said}; {RERUN}"


def _shown(value: Any) -> str:
    """A value as it is written in params.yaml / ``--set`` (strings bare, the rest as YAML flow)."""
    return value if isinstance(value, str) else json.dumps(value)


def _preprocessing_params(preprocessing: str) -> dict[str, Any]:
    """The params inside a preprocessing id (``tasks.inputs.preprocessing_id``):
    ``<mode>/<interpolation>[/crop][/rescale=<f>]``."""
    parts = preprocessing.split("/")
    rescale = next((float(p.split("=", 1)[1]) for p in parts if p.startswith("rescale=")), None)
    return {
        "image.interpolation": parts[1] if len(parts) > 1 else None,
        "image.crop_to_aspect_ratio": "crop" in parts[2:],
        "augment.rescale": rescale,
    }


def _key_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[Difference]:
    diffs = [
        (param, recorded.get(name), current[name])
        for name, param in KEY_PARAMS.items()
        if recorded.get(name) != current[name]
    ]
    old = _preprocessing_params(recorded.get("preprocessing", ""))
    new = _preprocessing_params(current["preprocessing"])
    diffs += [(param, old[param], new[param]) for param in new if old[param] != new[param]]
    return diffs


def _augment_differences(manifest: dict[str, Any], params: Params) -> list[Difference]:
    """augment.passes, or the augment.* fields of the policy, that differ from the features' train views."""
    recorded = [v for v in manifest["views"].get("train", []) if v != CLEAN]
    passes_of = {
        h: sum(1 for v in recorded if v.split(":")[0] == h) for h in {v.split(":")[0] for v in recorded}
    }
    old_passes = max(passes_of.values(), default=0)
    policies = run_policies(params)
    new_passes = params.augment.passes if policies else 0
    diffs: list[Difference] = []
    if old_passes != new_passes:
        diffs.append(("augment.passes", old_passes, new_passes))
    new_hashes = [p.short_hash for p in policies]
    if not (old_passes and new_passes) or set(passes_of) == set(new_hashes):
        return diffs
    fields = manifest.get("policies", {})
    if len(passes_of) == 1 == len(policies) and next(iter(passes_of)) in fields:
        old_fields, new_fields = fields[next(iter(passes_of))], policies[0].fields()
        changed = [
            (f"augment.{k}", old_fields.get(k), v) for k, v in new_fields.items() if old_fields.get(k) != v
        ]
        return diffs + (changed or [("augment policy", next(iter(passes_of)), new_hashes[0])])
    return diffs + [("augment policies (augment.grid)", sorted(passes_of), sorted(new_hashes))]
