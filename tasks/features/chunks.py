"""Extraction in chunks, for ``features.runner: dask``: the missing views of a run cut into chunks that any
worker process may compute, on any machine that sees the cache folder and the data root.

A view is a pure function of (image sha256, pass, policy), and the cache takes several writers, so a chunk is
self-contained: :class:`Chunk` carries the params, the resolved inputs (absolute paths), the cache keys, the
engine, one view and the rows of its images; :func:`compute_chunk` (run on a worker) computes the chunk's missing
pairs through :func:`tasks.features.extract.extract_views`, the very loop the local runner uses, writes its own
shards and returns a :class:`ChunkResult`: shard names and counts, never arrays. Chunks are whole batches of one
view in the local runner's order (:func:`plan_chunks`), so every batch matches the local run's and the features
are bit-identical whatever the number of workers or the order the chunks finish in.

The base is loaded once per worker process (:func:`_worker_forward`, keyed by the weights' sha256, the engine
file and the cut), and a worker refuses to write under a key whose weights it does not have.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tasks.config import Params
from tasks.features.cache import FeatureCache, KeySpec, Pair
from tasks.inputs import Inputs
from tasks.models.bases import CutPoint
from tasks.models.engines import Forward, PreparedEngine


@dataclass(frozen=True)
class Chunk:
    """One view of up to ``features.chunk_size`` images, and where its rows go."""

    number: int
    params: Params
    inputs: Inputs  # data_root and cache_root absolute: the worker may run in another folder or machine
    spec: KeySpec
    engine: PreparedEngine
    view: str
    plan: tuple[Any, int]  # (augmentation policy or None, pass number)
    rows: Any  # DataFrame: the index rows of the chunk's images (one per sha256)
    features: frozenset[Pair]  # the chunk's pairs the feature cache lacks
    activations: frozenset[Pair]  # ... and the activation cache lacks
    activation_spec: KeySpec | None = None
    cut: CutPoint | None = None
    threads: int | None = None  # LiteRT interpreter threads on the worker (None: every core)

    @property
    def size(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class ChunkResult:
    """What a worker wrote for one chunk: small enough for Prefect and Dask to pass around."""

    number: int
    views: int  # views of the chunk (done, for progress)
    features_written: int
    activations_written: int
    shards: tuple[str, ...]  # feature shard names, then activation shard names
    seconds: float
    warnings: tuple[str, ...] = ()


def chunk_rows(chunk_size: int, batch_size: int) -> int:
    """``features.chunk_size`` rounded up to whole batches, so a chunk's batches are the local run's."""
    return max(1, math.ceil(chunk_size / batch_size)) * batch_size


def plan_chunks(
    params: Params,
    inputs: Inputs,
    table: Any,
    todo: list[tuple[str, list[int]]],
    plans: dict[str, tuple[Any, int]],
    wanted: Any,
    engine: PreparedEngine,
    cache: FeatureCache,
    *,
    threads: int | None = None,
) -> list[Chunk]:
    """Cut ``todo`` ((view, table positions) in the local runner's order) into chunks of whole batches."""
    size = chunk_rows(params.features.chunk_size, params.features.batch_size)
    absolute = replace(inputs, data_root=inputs.data_root.resolve(), cache_root=inputs.cache_root.resolve())
    if engine.model_path is not None:
        engine = replace(engine, model_path=engine.model_path.resolve())
    target = wanted.target
    chunks: list[Chunk] = []
    for view, positions in todo:
        for start in range(0, len(positions), size):
            rows = table.iloc[positions[start : start + size]].reset_index(drop=True)
            pairs = {(sha, view) for sha in rows["sha256"]}
            chunks.append(
                Chunk(
                    number=len(chunks),
                    params=params,
                    inputs=absolute,
                    spec=cache.spec,
                    engine=engine,
                    view=view,
                    plan=plans[view],
                    rows=rows,
                    features=frozenset(pairs & wanted.features),
                    activations=frozenset(pairs & wanted.activations),
                    activation_spec=target.cache.spec if target is not None else None,
                    cut=target.cut if target is not None else None,
                    threads=threads,
                )
            )
    return chunks


def compute_chunk(chunk: Chunk) -> ChunkResult:
    """Compute ``chunk`` on this process into the shared cache (the driver created its keys and holds them in
    use); its shards are committed whole or not at all, so a worker killed mid-chunk leaves nothing half-read."""
    from tasks.features.extract import Activations, Wanted, extract_views

    start = time.perf_counter()
    root = chunk.inputs.cache_root
    cache = FeatureCache.open(root, chunk.spec, create=False)  # no orphan sweep: other writers may be live
    target = None
    if chunk.activation_spec is not None and chunk.cut is not None:
        target = Activations(FeatureCache.open(root, chunk.activation_spec, create=False), chunk.cut)
    forward = _worker_forward(
        chunk.params.base,
        chunk.inputs.image_size,
        chunk.params.features.pooling,
        chunk.params.features.batch_size,
        chunk.spec.weights_sha256,
        chunk.engine.model_path,
        chunk.cut.layer if chunk.cut is not None else None,
        chunk.threads,
    )
    # a chunk run again (its worker died, Prefect retried it) computes only what the first try did not commit
    features = set(cache.missing(sorted(chunk.features)))
    activations = set(target.cache.missing(sorted(chunk.activations))) if target is not None else set()
    if not features and not activations:
        return ChunkResult(chunk.number, chunk.size, 0, 0, (), round(time.perf_counter() - start, 3))
    stats = extract_views(
        chunk.params,
        chunk.inputs,
        chunk.rows,
        [(chunk.view, list(range(chunk.size)))],
        {chunk.view: chunk.plan},
        forward,
        cache,
        None,
        Wanted(features, activations, target),
    )
    return ChunkResult(
        number=chunk.number,
        views=chunk.size,
        features_written=len(features),
        activations_written=len(activations),
        shards=tuple(stats["shard_names"]),
        seconds=round(time.perf_counter() - start, 3),
        warnings=tuple(stats["warnings"]),
    )


@functools.lru_cache(maxsize=2)
def _worker_forward(
    base: Any,
    image_size: tuple[int, int],
    pooling: str,
    batch_size: int,
    weights_sha256: str,
    engine_path: Path | None,
    cut_layer: str | None,
    threads: int | None,
) -> Forward:
    """The forward pass, built once per worker process for these weights, engine file and cut."""
    from tasks.models.bases import load_base
    from tasks.models.engines import keras_forward, litert_forward

    if engine_path is not None:
        return litert_forward(engine_path, batch_size, threads)
    loaded = load_base(base, image_size)
    if loaded.weights_sha256 != weights_sha256:
        raise RuntimeError(
            f"this worker's base weights have sha256 {loaded.weights_sha256[:12]}, the run's cache key "
            f"{weights_sha256[:12]}: give every Dask worker the same weights file (KERAS_HOME / base.weights)"
        )
    return keras_forward(loaded.model, pooling, image_size, cut_layer)
