"""The ``features`` stage: pooled base features of every view, computed once per (image, view) and cached.

For the train split, the clean view plus ``augment.passes`` augmented views per image; for val and test, the
clean view. Images come only from ``tasks.pipeline.view_dataset`` (decoded, augmented, resized, the base's
preprocessing applied, prefetched, so decoding overlaps with inference). The base runs with ``training=False``.

Every view, clean and augmented, is ``base(preprocess(augment.rescale * pixels))`` (no scaling when rescale is
null), the same arithmetic as :class:`tasks.heads.BasePreprocess` inside the full model.

Content-addressed and incremental: the cache key (``tasks.feature_cache.cache_key``) covers the base, its alpha,
the sha256 of the weights actually loaded, the input size, the preprocessing (the base's mode, the resize
interpolation and ``augment.rescale``), the pooling and the stored dtype; a row is addressed by (image sha256, view
id), the view id carrying the augmentation policy hash and the pass. Because rescale is in the key, no view, the
clean one included, is reused across rescale values. The stage looks up which pairs exist and computes only the
missing ones, streaming them to shards (memory bounded); the manifest's ``summary()`` says "computed N, reused M".

Display is the caller's: progress goes out as ``tasks.progress.Step("features", done, total, "img")`` events, and
warnings (damaged shards, float16 underflow) come back in the manifest; this module prints nothing.

``read_features`` gives the next stage float32 features of the rows of the current index.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tasks.atomic import atomic_write_json
from tasks.bases import get_spec, load_base, resolve_image_size, weights_fingerprint
from tasks.config import Params
from tasks.errors import FeaturesMismatchError  # noqa: F401  (raised here; defined with the other domain errors)
from tasks.feature_cache import FeatureCache, KeySpec, Pair, ShardWriter
from tasks.layout import Layout
from tasks.progress import Reporter, counter
from tasks.reports import write_run_record

SPLITS = ("train", "val", "test")
CLEAN = "clean"
INDEX_COLUMNS = ("path", "label", "class_id", "split", "sha256")
STAGE = "features"  # the stage's name: its progress task and its run record (``layout.run_record``)
RERUN = "run `retrainflow features` with the same params first"


# ------------------------------------------------------------------------------------------- values
# The manifest fields that describe the features themselves (``layout.features_manifest``, the DVC dependency of
# train_top); this run's counts (``layout.features_metrics``, a DVC metric); and the whole manifest with timings
# and cache details goes to ``layout.run_record("features")``.
STABLE_FIELDS = ("cache_key", "cache_dir", "key_spec", "views", "policies", "rows", "pairs", "content_hash")
METRIC_FIELDS = ("pairs", "computed", "reused", "images_computed")


@dataclass(frozen=True)
class FeaturesManifest:
    """This run's summary: the key, what each split uses, computed / reused, timings."""

    cache_key: str
    cache_dir: str
    key_spec: dict[str, Any]
    views: dict[str, list[str]]  # split -> view ids
    rows: dict[str, int]  # split -> index rows
    pairs: int  # distinct (sha256, view) pairs this index needs
    computed: int
    reused: int
    images_computed: int  # distinct images that went through the base this run
    seconds: float
    images_per_second: float | None  # computed views per second of extraction (None when nothing computed)
    content_hash: str  # hash of the key and of the (sha256, view, class id) rows: changes iff the features do
    batch_size: int = 32
    shards_written: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)  # policy hash -> its fields (view ids)
    warnings: list[str] = field(default_factory=list)  # for the caller to show (damaged shards, underflow)

    def summary(self) -> str:
        """The run in one line: ``features <key>: computed N, reused M (P views of K images)``."""
        return (
            f"features {self.cache_key}: computed {self.computed}, reused {self.reused} "
            f"({self.pairs} views of {sum(self.rows.values())} images)"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def stable_json(self) -> dict[str, Any]:
        """The fields that change iff the features do (no counts, no timings)."""
        data = self.to_json()
        return {name: data[name] for name in STABLE_FIELDS}

    def metrics_json(self) -> dict[str, Any]:
        """This run's counts (``dvc metrics show``): no timings, no cache details."""
        data = self.to_json()
        return {name: data[name] for name in METRIC_FIELDS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeaturesManifest:
        return cls(**data)


@dataclass(frozen=True)
class FeatureSet:
    """Features of one split of the current index: ``x`` float32 [N, D] with the row identities beside it."""

    x: np.ndarray
    class_ids: np.ndarray
    sha256: np.ndarray
    view_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


# ------------------------------------------------------------------------------------------- helpers
def cache_root(params: Params, layout: Layout) -> Path:
    """``features.cache_dir`` when set (relative paths resolve against the workspace), else the layout's."""
    cfg_dir = params.features.cache_dir
    if cfg_dir is None:
        return layout.features_cache
    return cfg_dir if cfg_dir.is_absolute() else layout.root / cfg_dir


def data_root(params: Params) -> Path:
    """The image folder the index paths are relative to: ``data.root`` as the index stage reads it."""
    return Path(params.data.root)


def image_size_for(params: Params) -> tuple[int, int]:
    return resolve_image_size(params.image.size, get_spec(params.base.name))


def preprocessing_id(params: Params) -> str:
    """What happens to pixels between decoding and the base: ``<base's mode>/<interpolation>``, plus ``/crop``
    with ``image.crop_to_aspect_ratio`` and ``/rescale=<factor>`` when ``augment.rescale`` is set (a stretched,
    unscaled input keeps the id, and so every existing key, unchanged)."""
    spec = get_spec(params.base.name)
    out = f"{spec.preprocess_mode}/{params.image.interpolation}"
    if params.image.crop_to_aspect_ratio:
        out += "/crop"
    rescale = params.augment.rescale
    return out if rescale is None else f"{out}/rescale={float(rescale)!r}"


def key_spec_for(params: Params, weights_sha256: str) -> KeySpec:
    """The cache key components for ``params`` and the fingerprint of the weights they load."""
    spec = get_spec(params.base.name)
    alpha = spec.resolve_alpha(params.base.alpha)
    return KeySpec(
        base=spec.name,
        alpha=alpha,
        weights_sha256=weights_sha256,
        image_size=image_size_for(params),
        preprocessing=preprocessing_id(params),
        pooling=params.features.pooling,
        dtype=params.features.dtype,
        feature_dim=spec.feature_dim_for(alpha),
    )


def _policies(params: Params) -> list[Any]:
    """The augmentation policies of this run: the ``augment`` section, or the sampled policies of its grid."""
    if params.augment.passes == 0:
        return []
    from tasks.augment import policies_for

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
        from tasks.augment import view_id

        for policy in _policies(params):
            out += [(view_id(policy, p), policy, p) for p in range(params.augment.passes)]
    return out


def _check_index(index: Any) -> Any:
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise ValueError(f"index: missing columns {missing}, got columns {list(index.columns)}")
    bad = sorted(set(index["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"index: unknown split values {bad}, expected {list(SPLITS)}")
    return index


def _load_index(layout: Layout, index: Any | None) -> Any:
    if index is not None:
        return _check_index(index)
    from tasks.index import read_index

    return _check_index(read_index(layout))


def _view_dataset(rows: Any, root: Path, **kwargs: Any) -> Any:
    """The one image source: ``tasks.pipeline.view_dataset`` (a seam tests may replace)."""
    from tasks.pipeline import view_dataset

    return view_dataset(rows, root, **kwargs)


def _content_hash(key: str, needed: dict[str, list[tuple[str, str, int]]]) -> str:
    import hashlib

    digest = hashlib.sha256(key.encode())
    for split in SPLITS:
        for sha, view, class_id in needed.get(split, []):
            digest.update(f"{split}|{sha}|{view}|{class_id}\n".encode())
    return digest.hexdigest()[:16]


def _pool_fn(model: Any, pooling: str, image_size: tuple[int, int]) -> Callable[[Any], Any]:
    """A compiled ``batch -> pooled features`` function; the base runs in inference mode."""
    import tensorflow as tf

    reduce = tf.reduce_mean if pooling == "avg" else tf.reduce_max

    @tf.function(input_signature=[tf.TensorSpec([None, *image_size, 3], tf.float32)])
    def infer(batch: Any) -> Any:
        return reduce(model(batch, training=False), axis=[1, 2])

    return infer


# ------------------------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class _Plan:
    needed: dict[str, list[tuple[str, str, int]]]  # split -> (sha256, view, class id) rows, view-major
    views_by_split: dict[str, list[str]]
    plans: dict[str, tuple[Any, int]]  # view id -> (policy or None, pass number)
    wanted: dict[str, dict[str, int]]  # view id -> sha256 -> table position of one row with that image


def _plan(params: Params, table: Any) -> _Plan:
    """Every (sha256, view) the index needs, in a deterministic order, with one representative row per image."""
    needed: dict[str, list[tuple[str, str, int]]] = {}
    views_by_split: dict[str, list[str]] = {}
    plans: dict[str, tuple[Any, int]] = {}
    wanted: dict[str, dict[str, int]] = {}
    pos_of = {sha: i for i, sha in reversed(list(enumerate(table["sha256"])))}
    for split in SPLITS:
        sub = table[table["split"] == split]
        views = split_views(params, split, "all")
        views_by_split[split] = [v for v, _, _ in views]
        needed[split] = [
            (sha, v, int(c))
            for v, _, _ in views
            for sha, c in zip(sub["sha256"], sub["class_id"], strict=True)
        ]
        for view, policy, pass_number in views:
            plans[view] = (policy, pass_number)
            bucket = wanted.setdefault(view, {})
            for sha in sub["sha256"]:
                bucket.setdefault(sha, pos_of[sha])
    return _Plan(needed, views_by_split, plans, wanted)


def run_features(
    params: Params,
    layout: Layout,
    *,
    index: Any | None = None,
    progress: Reporter | None = None,
) -> FeaturesManifest:
    """Compute the missing features of the current index into the cache and write this run's manifest.

    ``index`` replaces ``tasks.index.read_index(layout)`` (a DataFrame in the index's columns); ``progress``
    receives ``Step("features", done, total, "img")`` after every batch (the display is the caller's). Writes the features
    manifest, the metrics (counts) and the run record (timings, cache details); prints nothing.
    """
    start = time.perf_counter()
    table = _load_index(layout, index)
    image_size = image_size_for(params)

    loaded = None
    if params.base.weights == "none":
        loaded = load_base(params.base, image_size)
        weights_sha = loaded.weights_sha256
    else:
        weights_sha = weights_fingerprint(params.base, image_size)
    spec = key_spec_for(params, weights_sha)
    # held until the last shard is committed: `retrainflow cache prune` skips a key in use
    with FeatureCache.open(cache_root(params, layout), spec).in_use() as cache:
        manifest = _compute(params, layout, table, cache, loaded, progress, start)
    atomic_write_json(layout.features_metrics, manifest.metrics_json())
    write_run_record(layout.run_record(STAGE), manifest.to_json())
    atomic_write_json(layout.features_manifest, manifest.stable_json())
    return manifest


def _compute(
    params: Params,
    layout: Layout,
    table: Any,
    cache: FeatureCache,
    loaded: Any,
    progress: Reporter | None,
    start: float,
) -> FeaturesManifest:
    """Plan, look up and compute the missing views of ``table`` into ``cache`` (held in use); this run's manifest
    (``start``: when the run began, for its seconds)."""
    spec, image_size = cache.spec, image_size_for(params)
    plan = _plan(params, table)
    needed, views_by_split, plans, wanted = plan.needed, plan.views_by_split, plan.plans, plan.wanted
    all_pairs: list[Pair] = [(sha, view) for view, shas in wanted.items() for sha in shas]
    missing = set(cache.missing(all_pairs))
    warnings = []
    if cache.broken:
        warnings.append(
            f"{len(cache.broken)} damaged shard(s) in {cache.folder} skipped; their rows are recomputed"
        )
    reused = len(all_pairs) - len(missing)

    todo: list[tuple[str, list[int]]] = []  # (view, table positions of the images to compute)
    for view, shas in wanted.items():
        positions = sorted(pos for sha, pos in shas.items() if (sha, view) in missing)
        if positions:
            todo.append((view, positions))
    n_todo = sum(len(p) for _, p in todo)

    stats: dict[str, Any] = {"shards_written": 0}
    compute_seconds = 0.0
    if n_todo:
        if loaded is None:
            loaded = load_base(params.base, image_size)
        t0 = time.perf_counter()
        stats = _extract(params, table, todo, plans, loaded, cache, image_size, progress)
        warnings += stats.pop("warnings")
        compute_seconds = time.perf_counter() - t0

    return FeaturesManifest(
        cache_key=spec.key,
        cache_dir=str(cache_root(params, layout)),
        key_spec=spec.as_json(),
        views=views_by_split,
        rows={split: int((table["split"] == split).sum()) for split in SPLITS},
        pairs=len(all_pairs),
        computed=n_todo,
        reused=reused,
        images_computed=len({table["sha256"].iloc[p] for _, ps in todo for p in ps}),
        seconds=round(time.perf_counter() - start, 3),
        images_per_second=round(n_todo / compute_seconds, 2) if n_todo and compute_seconds > 0 else None,
        content_hash=_content_hash(spec.key, needed),
        batch_size=params.features.batch_size,
        shards_written=int(stats.pop("shards_written")),
        extra=stats,
        policies={policy.short_hash: policy.fields() for policy in _policies(params)},
        warnings=warnings,
    )


def _extract(
    params: Params,
    table: Any,
    todo: list[tuple[str, list[int]]],
    plans: dict[str, tuple[Any, int]],
    loaded: Any,
    cache: FeatureCache,
    image_size: tuple[int, int],
    progress: Reporter | None,
) -> dict[str, Any]:
    """Stream the missing views through the base into shards; one tf.data pipeline across all views.

    Returns timing figures: the first batch (pipeline fill + tracing), the time the loop waited for input after
    it (the base starving), the steady images/s, the number of shards written, and ``warnings``.
    """
    batch_size = params.features.batch_size
    root = data_root(params)
    datasets = []
    ids: list[tuple[str, str, str]] = []
    for view, positions in todo:
        policy, pass_number = plans[view]
        rows = table.iloc[positions].reset_index(drop=True)
        datasets.append(
            _view_dataset(
                rows,
                root,
                image_size=image_size,
                batch_size=batch_size,
                policy=policy,
                pass_number=pass_number,
                preprocess=loaded.spec.preprocess,
                rescale=params.augment.rescale,  # every view, clean and augmented (part of the cache key)
                interpolation=params.image.interpolation,
                crop_to_aspect_ratio=params.image.crop_to_aspect_ratio,
            )
        )
        ids += [(sha, view, str(label)) for sha, label in zip(rows["sha256"], rows["label"], strict=True)]
    dataset = datasets[0]
    for more in datasets[1:]:
        dataset = dataset.concatenate(more)
    from tasks.pipeline import PREFETCH_BATCHES

    dataset = dataset.prefetch(PREFETCH_BATCHES)

    infer = _pool_fn(loaded.model, params.features.pooling, image_size)
    writer = ShardWriter(cache, params.features.shard_size)
    total = len(ids)
    advance = counter(progress, STAGE, total, "img")
    done = 0
    stats: dict[str, Any] = {"first_batch_seconds": 0.0, "input_wait_seconds": 0.0}
    warnings: list[str] = []
    advance(0)  # the display shows the total and starts its clock before the pipeline fills
    t0 = time.perf_counter()
    batches = iter(dataset)
    first_done = 0
    while True:
        waited = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        if done:  # after the first batch (pipeline fill + trace), time blocked on input = starvation
            stats["input_wait_seconds"] += time.perf_counter() - waited
        feats = infer(batch).numpy()
        n = len(feats)
        if done + n > total:
            raise RuntimeError(f"the input pipeline yielded more than the {total} views requested")
        writer.add(ids[done : done + n], feats)
        if not done:
            stats["first_batch_seconds"] = time.perf_counter() - t0
            first_done = n
            warnings += _underflow_warning(feats, params.features.dtype)
        done += n
        advance(done)
    writer.close()
    if done != total:
        raise RuntimeError(f"the input pipeline yielded {done} views, expected {total}")
    steady = time.perf_counter() - t0 - stats["first_batch_seconds"]
    stats["steady_images_per_second"] = (
        (done - first_done) / steady if done > first_done and steady > 0 else None
    )
    stats["shards_written"] = writer.shards
    rounded = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()}
    return {**rounded, "warnings": warnings}


def _underflow_warning(feats: np.ndarray, dtype: str) -> list[str]:
    """A random-init base's pooled features are tiny (about 1e-17); float16 stores them as zeros. Say so."""
    if dtype == "float16" and np.any(feats) and not np.any(feats.astype(np.float16)):
        return [
            "these features underflow float16 and are stored as zeros (a random-init base, "
            "base.weights: none?); set features.dtype: float32"
        ]
    return []


# ------------------------------------------------------------------------------------------- reading
def read_manifest(layout: Layout) -> dict[str, Any]:
    """The stable part of the last features run (:data:`STABLE_FIELDS`): cache key, key spec, views."""
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
) -> FeatureSet:
    """Float32 features of ``split``'s rows of the current index, view by view (clean first) in index order.

    The cache key comes from the last ``features`` run (its weights fingerprint) and must match ``params``, and the
    views the params ask for must be among those computed: otherwise a :class:`FeaturesMismatchError` names each
    param that differs (``<stage>: the features were computed with augment.passes=2 but the params say 3; run
    ...``); rows of an index the features never saw raise it too.
    """
    view_plan = split_views(params, split, views)
    manifest = read_manifest(layout)
    spec = key_spec_for(params, manifest["key_spec"]["weights_sha256"])
    needed = [view for view, _, _ in view_plan]
    if spec.key != manifest["cache_key"] or not set(needed) <= set(manifest["views"].get(split, [])):
        raise FeaturesMismatchError(mismatch_message(stage, params, manifest, spec))
    table = _load_index(layout, index)
    sub = table[table["split"] == split]
    shas = [str(s) for s in sub["sha256"]]
    pairs = [(sha, view) for view in needed for sha in shas]
    cache = FeatureCache.open(cache_root(params, layout), spec, create=False)
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
    """The params inside a :func:`preprocessing_id`: ``<mode>/<interpolation>[/crop][/rescale=<f>]``."""
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
    policies = _policies(params)
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
