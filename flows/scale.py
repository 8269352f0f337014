"""Scale-out of the features stage on Dask through Prefect (``features.runner: dask``).

Prefect's own Dask integration runs the chunks: :func:`dask_task_runner` is a ``prefect_dask.DaskTaskRunner``,
either a ``distributed.LocalCluster`` of ``features.dask_workers`` worker processes with one thread each (bound to
127.0.0.1: the scheduler port never faces the network), or the existing scheduler at ``features.dask_address``.
Each chunk (:class:`tasks.features.chunks.Chunk`) is one ``extract-chunk`` Prefect task run, visible in the
dashboard and retried on failure; Dask itself reruns a chunk whose worker died. Workers write their own shards
into the shared cache and return only shard names and counts (:class:`tasks.features.chunks.ChunkResult`).
No scheduler of our own: :func:`map_chunks_on_dask` submits and waits, nothing more.

Workers report their task runs to the Prefect API of the calling process (Prefect passes its settings along);
that must be a server they can reach, so the CLI starts one when none is configured (not the temporary API).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import FeaturesConfig

# each worker process: one TensorFlow/BLAS thread (the cluster's threads are its worker processes)
WORKER_ENV = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
CHUNK_RETRIES = 2


@task(
    name="extract-chunk",
    task_run_name="extract-chunk-{chunk.number}",
    tags=["retrainflow", "stage:features", "dask"],
    retries=CHUNK_RETRIES,
    retry_delay_seconds=2,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def extract_chunk_task(chunk: Any) -> Any:
    """Compute one chunk's missing views on this Dask worker into the shared cache."""
    from flows.cli.defaults import import_tensorflow_quietly
    from tasks.features.chunks import compute_chunk

    import_tensorflow_quietly()  # once per worker process: no TF start-up lines on the console

    return compute_chunk(chunk)


def dask_task_runner(features: FeaturesConfig) -> Any:
    """The DaskTaskRunner of ``features``: the scheduler at ``dask_address``, else a LocalCluster."""
    from prefect_dask import DaskTaskRunner

    if features.dask_address:
        return DaskTaskRunner(address=features.dask_address)
    # the LocalCluster has no dashboard (bokeh is not a dependency): hide prefect-dask's line linking to one
    logging.getLogger("prefect.task_runner.dask").setLevel(logging.WARNING)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": features.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
            "env": WORKER_ENV,
        },
    )


def map_chunks_on_dask(features: FeaturesConfig) -> Callable[[list[Any], Callable[[Any], None]], None]:
    """``map_chunks(chunks, on_result)`` for :func:`tasks.features.extract.compute_features`: every chunk as an
    ``extract-chunk`` task run on the cluster, ``on_result`` called as each one finishes."""

    def map_chunks(chunks: list[Any], on_result: Callable[[Any], None]) -> None:
        from prefect.futures import as_completed

        with dask_task_runner(features) as runner:
            futures = [runner.submit(extract_chunk_task, parameters={"chunk": c}) for c in chunks]
            for future in as_completed(futures):
                on_result(future.result())

    return map_chunks
