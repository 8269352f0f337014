"""Feature extraction, the library of the ``features`` stage: pooled base features of every view, computed once
per (image, view) and cached. The stage shell is :mod:`tasks.stages.run_features`; reading the cache (for training) is
:mod:`tasks.features.read`, which this module plans with (:func:`~tasks.features.read.split_views`).

For the train split, the clean view plus ``augment.passes`` augmented views per image; for val and test, the
clean view. Images come only from ``tasks.data.pipeline.view_dataset`` (decoded, augmented, resized, the base's
preprocessing applied, prefetched, so decoding overlaps with inference). The base runs with ``training=False``.

Every view, clean and augmented, is ``base(preprocess(augment.rescale * pixels))`` (no scaling when rescale is
null), the same arithmetic as :class:`tasks.models.full_model.BasePreprocess` inside the full model.

Content-addressed and incremental: the cache key (``tasks.features.cache.cache_key``) covers the base, its alpha,
the sha256 of the weights actually loaded, the input size, the preprocessing (the base's mode, the resize
interpolation and ``augment.rescale``), the pooling and the stored dtype; a row is addressed by (image sha256, view
id), the view id carrying the augmentation policy hash and the pass. Because rescale is in the key, no view, the
clean one included, is reused across rescale values. The stage looks up which pairs exist and computes only the
missing ones, streaming them to shards (memory bounded); the manifest's ``summary()`` says "computed N, reused M".

Display is the caller's: progress goes out as ``tasks.progress.Step("features", done, total, "img")`` events, and
warnings (damaged shards, float16 underflow) come back in the manifest; this module prints nothing.

:func:`compute_features` plans (every (sha256, view) the index needs), looks up and computes the missing views
into shards (:class:`tasks.features.cache.ShardWriter`); :func:`base_weights` fingerprints the weights for the key.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import Params
from tasks.features.activations import activation_views, pairs_needed, shard_rows
from tasks.features.cache import FeatureCache, Pair, ShardWriter
from tasks.features.read import SPLITS, run_policies, split_views
from tasks.inputs import ImageSpec, Inputs
from tasks.models.bases import CutPoint, LoadedBase, load_base, weights_fingerprint
from tasks.models.engines import Forward, PreparedEngine, keras_forward, litert_forward
from tasks.progress import Reporter, counter

STAGE = "features"  # the stage's name: its progress task and its run record (``layout.run_record``)


# ------------------------------------------------------------------------------------------- values
# The manifest fields that describe the features themselves (``layout.features_manifest``, the DVC dependency of
# train_top); this run's counts (``layout.features_metrics``, a DVC metric); and the whole manifest with timings
# and cache details goes to ``layout.run_record("features")``. No path: the same features in another folder (a
# moved cache, a DVC experiment's copy of the repo) are the same dependency.
STABLE_FIELDS = ("cache_key", "key_spec", "views", "policies", "rows", "pairs", "content_hash")
METRIC_FIELDS = (
    "pairs",
    "computed",
    "reused",
    "images_computed",
    "activations_computed",
    "activations_reused",
)


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
    # cut-point activations for tail fine-tuning (:mod:`tasks.features.activations`): counts, and what they are
    # (key, cut layer, shape, views; empty when fine-tuning does not read them)
    activations_computed: int = 0
    activations_reused: int = 0
    activations: dict[str, Any] = field(default_factory=dict)
    engine: str = "keras"  # the engine of the forward pass (:mod:`tasks.models.engines`) and why
    engine_reason: str = ""

    def summary(self) -> str:
        """The run in one line: ``features <key>: computed N, reused M (P views of K images) on <engine>``, plus
        ``; activations <cut>: computed N, reused M`` when fine-tuning reads cut-point activations."""
        line = (
            f"features {self.cache_key}: computed {self.computed}, reused {self.reused} "
            f"({self.pairs} views of {sum(self.rows.values())} images) on {self.engine}"
        )
        if self.activations:
            line += (
                f"; activations {self.activations['cut']}: computed {self.activations_computed}, "
                f"reused {self.activations_reused}"
            )
        return line

    def activations_json(self) -> dict[str, Any]:
        """What the finetune stage reads (``layout.activations_manifest``, its DVC dependency): the activations'
        key and views, or ``{"path": ...}`` alone when fine-tuning reads none. No counts, no timings."""
        return {name: value for name, value in self.activations.items() if name != "cache_dir"}

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


# ------------------------------------------------------------------------------------------- helpers
def _view_dataset(rows: Any, root: Path, image: ImageSpec, **kwargs: Any) -> Any:
    """The one image source: ``tasks.data.pipeline.view_dataset`` (a seam tests may replace)."""
    from tasks.data.pipeline import view_dataset

    return view_dataset(rows, root, image, **kwargs)


def _content_hash(key: str, needed: dict[str, list[tuple[str, str, int]]]) -> str:
    import hashlib

    digest = hashlib.sha256(key.encode())
    for split in SPLITS:
        for sha, view, class_id in needed.get(split, []):
            digest.update(f"{split}|{sha}|{view}|{class_id}\n".encode())
    return digest.hexdigest()[:16]


def _forward(
    params: Params, inputs: Inputs, loaded: LoadedBase | None, engine: PreparedEngine, cut_layer: str | None
) -> Forward:
    """The run's forward pass: the converted LiteRT model, or the Keras base (built here when not yet)."""
    if engine.model_path is not None:
        return litert_forward(engine.model_path, params.features.batch_size)
    model = loaded.model if loaded is not None else load_base(params.base, inputs.image_size).model
    return keras_forward(model, params.features.pooling, inputs.image_size, cut_layer)


# ------------------------------------------------------------------------------------------- computing
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


def base_weights(params: Params, image_size: tuple[int, int]) -> tuple[LoadedBase | None, str]:
    """(the loaded base or None, the sha256 of its weights): a random-init base (``base.weights: none``) is built
    to hash its arrays; ImageNet weights are fingerprinted from their file, the base built only when a view is
    missing (:func:`compute_features`)."""
    if params.base.weights == "none":
        loaded = load_base(params.base, image_size)
        return loaded, loaded.weights_sha256
    return None, weights_fingerprint(params.base, image_size)


def compute_features(
    params: Params,
    inputs: Inputs,
    table: Any,
    cache: FeatureCache,
    loaded: LoadedBase | None,
    engine: PreparedEngine,
    *,
    activations: Activations | None = None,
    progress: Reporter | None = None,
    start: float | None = None,
    map_chunks: MapChunks | None = None,
) -> FeaturesManifest:
    """Plan, look up and compute the missing views of ``table`` into ``cache`` (the caller holds it in use),
    and the missing cut-point activations into ``activations.cache`` in the same forward pass of ``engine``
    (``loaded``: the Keras base when it is already built); this run's
    manifest (``start``: ``time.perf_counter()`` when the run began, for its seconds). Writes shards only;
    ``progress`` receives ``Step("features", done, total, "img")`` after every batch. With ``map_chunks``
    (``features.runner: dask``), the missing views go out as :class:`~tasks.features.chunks.Chunk` s to
    ``map_chunks(chunks, on_result)``, which computes them elsewhere and calls ``on_result`` as each finishes;
    the cache is then checked to hold every pair."""
    start = time.perf_counter() if start is None else start
    spec = cache.spec
    plan = _plan(params, table)
    needed, views_by_split, plans, wanted = plan.needed, plan.views_by_split, plan.plans, plan.wanted
    all_pairs: list[Pair] = [(sha, view) for view, shas in wanted.items() for sha in shas]
    missing = set(cache.missing(all_pairs))
    act_pairs = pairs_needed(params, table) if activations is not None else []
    act_missing = set(activations.cache.missing(act_pairs)) if activations is not None else set()
    warnings = [engine.warning] if engine.warning else []
    for store in (cache, activations.cache if activations is not None else None):
        if store is not None and store.broken:
            warnings.append(
                f"{len(store.broken)} damaged shard(s) in {store.folder} skipped; their rows are recomputed"
            )
    reused = len(all_pairs) - len(missing)

    todo: list[tuple[str, list[int]]] = []  # (view, table positions of the images to compute)
    for view, shas in wanted.items():
        positions = sorted(
            pos for sha, pos in shas.items() if (sha, view) in missing or (sha, view) in act_missing
        )
        if positions:
            todo.append((view, positions))
    n_todo = sum(len(p) for _, p in todo)

    stats: dict[str, Any] = {"shards_written": 0}
    compute_seconds = 0.0
    if n_todo:
        t0 = time.perf_counter()
        cut_layer = activations.cut.layer if activations is not None else None
        wanted_rows = Wanted(missing, act_missing, activations)
        if map_chunks is None:
            stats = extract_views(
                params,
                inputs,
                table,
                todo,
                plans,
                _forward(params, inputs, loaded, engine, cut_layer),
                cache,
                progress,
                wanted_rows,
            )
        else:
            stats = _map_extract(
                params, inputs, table, todo, plans, engine, cache, wanted_rows, map_chunks, progress
            )
        stats.pop("shard_names")
        warnings += stats.pop("warnings")
        compute_seconds = time.perf_counter() - t0

    return FeaturesManifest(
        cache_key=spec.key,
        cache_dir=str(inputs.cache_root),
        key_spec=spec.as_json(),
        views=views_by_split,
        rows={split: int((table["split"] == split).sum()) for split in SPLITS},
        pairs=len(all_pairs),
        computed=len(missing),
        reused=reused,
        images_computed=len({table["sha256"].iloc[p] for _, ps in todo for p in ps}),
        seconds=round(time.perf_counter() - start, 3),
        images_per_second=round(n_todo / compute_seconds, 2) if n_todo and compute_seconds > 0 else None,
        content_hash=_content_hash(spec.key, needed),
        batch_size=params.features.batch_size,
        shards_written=int(stats.pop("shards_written")),
        extra=stats,
        policies={policy.short_hash: policy.fields() for policy in run_policies(params)},
        warnings=warnings,
        activations_computed=len(act_missing),
        activations_reused=len(act_pairs) - len(act_missing),
        activations=activations.describe(params, table) if activations is not None else {},
        engine=engine.choice.name,
        engine_reason=engine.choice.reason,
    )


@dataclass(frozen=True)
class Activations:
    """Where the cut-point activations go: their store (the caller holds it in use) and the cut point."""

    cache: FeatureCache
    cut: CutPoint

    def describe(self, params: Params, table: Any) -> dict[str, Any]:
        views = activation_views(params)
        rows = [(sha, view) for sha, view in pairs_needed(params, table)]
        return {
            "path": "tail",
            "cache_key": self.cache.spec.key,
            "key_spec": self.cache.spec.as_json(),
            "cut": self.cut.layer,
            "block": self.cut.block,
            "shape": list(self.cut.shape),
            "views": views,
            "content_hash": _content_hash(self.cache.spec.key, {"train": [(s, v, 0) for s, v in rows]}),
        }


@dataclass(frozen=True)
class Wanted:
    """Which computed rows each store lacks: a view may be missing from one store only."""

    features: set[Pair]
    activations: set[Pair]
    target: Activations | None


def extract_views(
    params: Params,
    inputs: Inputs,
    table: Any,
    todo: list[tuple[str, list[int]]],
    plans: dict[str, tuple[Any, int]],
    forward: Forward,
    cache: FeatureCache,
    progress: Reporter | None,
    wanted: Wanted,
) -> dict[str, Any]:
    """Stream the missing views through the base into shards; one tf.data pipeline across all views.

    Returns timing figures: the first batch (pipeline fill + tracing), the time the loop waited for input after
    it (the base starving), the steady images/s, the number of shards written, and ``warnings``.
    """
    batch_size = params.features.batch_size
    root = inputs.data_root
    datasets = []
    ids: list[tuple[str, str, str]] = []
    for view, positions in todo:
        policy, pass_number = plans[view]
        rows = table.iloc[positions].reset_index(drop=True)
        datasets.append(
            _view_dataset(
                rows,
                root,
                inputs.image,  # its rescale applies to every view, clean and augmented (part of the cache key)
                batch_size=batch_size,
                policy=policy,
                pass_number=pass_number,
                preprocess=inputs.base.preprocess,
            )
        )
        ids += [(sha, view, str(label)) for sha, label in zip(rows["sha256"], rows["label"], strict=True)]
    dataset = datasets[0]
    for more in datasets[1:]:
        dataset = dataset.concatenate(more)
    from tasks.data.pipeline import PREFETCH_BATCHES

    dataset = dataset.prefetch(PREFETCH_BATCHES)

    target = wanted.target
    writer = ShardWriter(cache, params.features.shard_size)
    act_writer = (
        ShardWriter(target.cache, shard_rows(target.cache.spec, params.features.shard_size))
        if target is not None
        else None
    )
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
        feats, cut = forward(batch)
        n = len(feats)
        if done + n > total:
            raise RuntimeError(f"the input pipeline yielded more than the {total} views requested")
        batch_ids = ids[done : done + n]
        _add_wanted(writer, wanted.features, batch_ids, feats)
        if act_writer is not None:
            acts = cut.reshape(n, -1)
            _add_wanted(act_writer, wanted.activations, batch_ids, acts)
        if not done:
            stats["first_batch_seconds"] = time.perf_counter() - t0
            first_done = n
            warnings += _underflow_warning(feats, params.features.dtype)
        done += n
        advance(done)
    writer.close()
    if act_writer is not None:
        act_writer.close()
    if done != total:
        raise RuntimeError(f"the input pipeline yielded {done} views, expected {total}")
    steady = time.perf_counter() - t0 - stats["first_batch_seconds"]
    stats["steady_images_per_second"] = (
        (done - first_done) / steady if done > first_done and steady > 0 else None
    )
    stats["shards_written"] = writer.shards
    stats["shard_names"] = writer.names + (act_writer.names if act_writer is not None else [])
    if act_writer is not None:
        stats["activation_shards_written"] = act_writer.shards
    rounded = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()}  # names: lists
    return {**rounded, "warnings": warnings}


# (chunks, on_result) -> None: computes every chunk elsewhere, calling on_result(ChunkResult) as each finishes
MapChunks = Callable[[list[Any], Callable[[Any], None]], None]


def _map_extract(
    params: Params,
    inputs: Inputs,
    table: Any,
    todo: list[tuple[str, list[int]]],
    plans: dict[str, tuple[Any, int]],
    engine: PreparedEngine,
    cache: FeatureCache,
    wanted: Wanted,
    map_chunks: MapChunks,
    progress: Reporter | None,
) -> dict[str, Any]:
    """The missing views as chunks through ``map_chunks``; then every wanted pair must read back from the cache."""
    from tasks.features.chunks import plan_chunks

    chunks = plan_chunks(params, inputs, table, todo, plans, wanted, engine, cache, threads=1)
    advance = counter(progress, STAGE, sum(c.size for c in chunks), "img")
    results: list[Any] = []
    advance(0)

    def on_result(result: Any) -> None:
        results.append(result)
        advance(sum(r.views for r in results))

    map_chunks(chunks, on_result)
    _check_stored(cache, wanted.features)
    if wanted.target is not None:
        _check_stored(wanted.target.cache, wanted.activations)
    return {
        "chunks": len(chunks),
        "chunk_seconds": round(sum(r.seconds for r in results), 3),
        "shards_written": sum(len(r.shards) for r in results),
        "shard_names": [name for r in sorted(results, key=lambda r: r.number) for name in r.shards],
        "warnings": sorted({w for r in results for w in r.warnings}),
    }


def _check_stored(cache: FeatureCache, pairs: set[Pair]) -> None:
    """Raise when the workers left any of ``pairs`` out of ``cache`` (read again from its manifest)."""
    cache.refresh()  # the workers committed shards this process has not seen
    absent = cache.missing(sorted(pairs))
    if absent:
        raise RuntimeError(
            f"the Dask workers did not store {len(absent)} of {len(pairs)} views in {cache.folder} "
            f"(first: {absent[0]}); run again to compute only those"
        )


def _add_wanted(
    writer: ShardWriter, wanted: set[Pair], ids: list[tuple[str, str, str]], x: np.ndarray
) -> None:
    """Add the rows of ``ids`` whose (sha256, view) the writer's store lacks."""
    keep = [i for i, (sha, view, _) in enumerate(ids) if (sha, view) in wanted]
    if len(keep) == len(ids):
        writer.add(ids, x)
    elif keep:
        writer.add([ids[i] for i in keep], x[keep])


def _underflow_warning(feats: np.ndarray, dtype: str) -> list[str]:
    """A random-init base's pooled features are tiny (about 1e-17); float16 stores them as zeros. Say so."""
    if dtype == "float16" and np.any(feats) and not np.any(feats.astype(np.float16)):
        return [
            "these features underflow float16 and are stored as zeros (a random-init base, "
            "base.weights: none?); set features.dtype: float32"
        ]
    return []
