"""The ``features`` stage shell: params + index in, feature cache + ``features/features.json`` out
(``retrainflow stage features``, ``dvc repro features``).

Thin on purpose (DVC's example-get-started stages): resolve the inputs once (:func:`tasks.inputs.resolve_inputs`),
read the index (:func:`tasks.features.read.load_index`), fingerprint the weights and key the cache
(:func:`tasks.features.read.key_spec_for`), hold the key in use while the library computes the missing views into
shards (:func:`tasks.features.extract.compute_features`), then write this run's three records at the
:class:`tasks.layout.Layout` paths through :mod:`tasks.io.atomic`: what the features are (``features_manifest``, the
DVC dependency of train_top), this run's counts (``features_metrics``) and its timings (``run_record``). Prints
nothing: progress goes out as ``tasks.progress.Step("features", done, total, "img")`` events and warnings come
back in the manifest.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from tasks.config import Params
from tasks.features.activations import activation_key_spec, finetune_path
from tasks.features.cache import FeatureCache
from tasks.features.extract import (
    STAGE,
    Activations,
    FeaturesManifest,
    MapChunks,
    base_weights,
    compute_features,
)
from tasks.features.read import key_spec_for, load_index
from tasks.inputs import Inputs, resolve_inputs
from tasks.io.atomic import atomic_write_json, atomic_write_text
from tasks.layout import Layout
from tasks.models.bases import CutPoint, LoadedBase, cut_point, load_base
from tasks.models.engines import ENGINE_DIR, PreparedEngine, choose_engine, prepare_forward
from tasks.progress import Reporter
from tasks.reports.plots import write_run_record


def run_features(
    params: Params,
    layout: Layout,
    *,
    index: Any | None = None,
    progress: Reporter | None = None,
    map_chunks: MapChunks | None = None,
) -> FeaturesManifest:
    """Compute the missing features of the current index into the cache and write this run's manifest.

    ``index`` replaces ``tasks.data.index_table.read_index(layout)`` (a DataFrame in the index's columns);
    ``progress`` receives ``Step("features", done, total, "img")`` after every batch (the display is the
    caller's); ``map_chunks`` computes the missing views elsewhere (``features.runner: dask``, given by the
    flow edge: :mod:`flows.scale`). Writes the features manifest, the metrics (counts) and the run record (timings, cache details).
    """
    start = time.perf_counter()
    inputs = resolve_inputs(params, layout)
    table = load_index(layout, index)
    path = finetune_path(params)
    loaded, weights_sha = base_weights(params, inputs.image_size)
    if path.wants_activations and loaded is None:
        loaded = load_base(params.base, inputs.image_size)  # the cut point is read off the built base
    cut = (
        cut_point(loaded.model, inputs.base, params.finetune.unfreeze_blocks)
        if path.wants_activations
        else None
    )
    engine = _prepare_engine(params, inputs, loaded, weights_sha, cut, progress)
    spec = key_spec_for(inputs, params.features, weights_sha, engine.choice.key)
    # held until the last shard is committed: `retrainflow cache prune` skips a key in use
    with contextlib.ExitStack() as held:
        cache = held.enter_context(FeatureCache.open(inputs.cache_root, spec).in_use())
        activations = None
        if cut is not None:
            act_spec = activation_key_spec(inputs, params, weights_sha, cut, engine.choice.key)
            act_cache = held.enter_context(FeatureCache.open(inputs.cache_root, act_spec).in_use())
            activations = Activations(act_cache, cut)
        manifest = compute_features(
            params,
            inputs,
            table,
            cache,
            loaded,
            engine,
            activations=activations,
            progress=progress,
            start=start,
            map_chunks=map_chunks,
        )
    if inputs.cache_root.resolve() != layout.features_cache.resolve():
        atomic_write_text(
            layout.features_cache_pointer, f"this workspace's feature cache: {inputs.cache_root}\n"
        )
    atomic_write_json(layout.features_metrics, manifest.metrics_json())
    write_run_record(layout.run_record(STAGE), manifest.to_json())
    atomic_write_json(layout.features_manifest, manifest.stable_json())
    atomic_write_json(
        layout.activations_manifest,
        manifest.activations_json() or {"path": path.path, "reason": path.reason},
    )
    return manifest


def _prepare_engine(
    params: Params,
    inputs: Inputs,
    loaded: LoadedBase | None,
    weights_sha: str,
    cut: CutPoint | None,
    progress: Reporter | None,
) -> PreparedEngine:
    """``features.engine`` chosen, and for litert the converted base found or converted (in the cache root)."""
    parts = {
        "base": inputs.base.name,
        "alpha": inputs.alpha,
        "weights_sha256": weights_sha,
        "image_size": list(inputs.image_size),
        "pooling": params.features.pooling,
        "cut": cut.layer if cut is not None else None,
    }

    def build() -> Any:
        return (loaded or load_base(params.base, inputs.image_size)).model

    return prepare_forward(
        choose_engine(params.features.engine),
        inputs.cache_root / ENGINE_DIR,
        parts,
        build,
        parts["cut"],
        progress=progress,
    )
