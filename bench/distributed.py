"""Scale-out of the features stage: the local runner vs Dask with 1 and 2 single-thread workers, in one run.

On ``../shared/datasets/cats_vs_dogs`` with MobileNetV2 at 224 and the real ImageNet weights (by path), each
configuration is the command a user runs, ``retrainflow features`` in a fresh process on a fresh workspace with an
empty cache (clean views only unless ``--passes``: ``augment.passes 0``, ``finetune.epochs 0``; engine keras):

1. local, 1 TF thread (``TF_NUM_INTRAOP_THREADS=1``: the same total threads as Dask 1 x 1);
2. local, every core (the default; the same total threads as Dask 2 x 1 on this 2-core machine);
3. ``--runner dask --workers 1``: a LocalCluster of 1 worker process x 1 thread;
4. ``--runner dask --workers 2``: 2 worker processes x 1 thread.

The configurations alternate for ``--repeats`` rounds (the host is noisy); medians are reported. Printed:
img/s (images / command wall time, process start, model build and cluster start included), the speed-up of
Dask 2 x 1 over Dask 1 x 1 (target >= 1.6x on 2 cores), Dask's overhead vs local at the same total threads, and
then, from two more Dask 1 x 1 runs on ``--overhead-images`` images at two chunk sizes, the per-chunk overhead
(a Prefect task run + a Dask task) and the cache write and image read volumes per image (the scaling model's
inputs, BENCHMARKS.md).

All Dask runs report to one Prefect server this script starts on 127.0.0.1 (outside the timed commands).

    .venv/bin/python bench/distributed.py                 # all 2000 images, 1 round
    .venv/bin/python bench/distributed.py --images 400 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, add_real_data_args, report  # noqa: E402

RETRAINFLOW = Path(sys.executable).with_name("retrainflow")
CONFIGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "local 1 thread": (
        [],
        {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"},
    ),
    "local all cores": ([], {}),
    "dask 1x1": (["--runner", "dask", "--workers", "1"], {}),
    "dask 2x1": (["--runner", "dask", "--workers", "2"], {}),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _subset(dataset: Path, images: int | None, dest: Path) -> Path:
    """``images`` per-class-balanced files of ``dataset`` copied under ``dest`` (all of them: the dataset)."""
    if images is None:
        return dataset
    classes = sorted(p for p in dataset.iterdir() if p.is_dir())
    for folder in classes:
        files = sorted(f for f in folder.iterdir() if f.is_file())[: max(1, images // len(classes))]
        (dest / folder.name).mkdir(parents=True)
        for f in files:
            shutil.copy2(f, dest / folder.name / f.name)
    return dest


def _sets(data_root: Path, weights: Path, chunk_size: int, passes: int = 0) -> list[str]:
    values = {
        "data.root": data_root,
        "image.size": 224,
        "base.name": "mobilenet_v2",
        "base.weights": weights,
        "augment.passes": passes,
        "finetune.epochs": 0,
        "features.engine": "keras",
        "features.chunk_size": chunk_size,
        "features.cache_dir": "null",
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _run(command: list[str], workdir: Path, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """Wall seconds of ``retrainflow COMMAND -w WORKDIR`` and its run record."""
    start = time.perf_counter()
    done = subprocess.run(  # noqa: S603 - our own command
        [str(RETRAINFLOW), *command, "-w", str(workdir)], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return wall, json.loads((workdir / "reports" / "runs" / "features.json").read_text())


def _workspace(indexed: Path, dest: Path) -> Path:
    shutil.copytree(indexed / "index", dest / "index")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None, help="use this many images (default: all)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds of the four configurations")
    ap.add_argument("--chunk-size", type=int, default=128, help="features.chunk_size of the main runs")
    ap.add_argument("--passes", type=int, default=0, help="augment.passes (0: clean views only)")
    ap.add_argument("--overhead-images", type=int, default=192, help="images of the per-chunk overhead runs")
    add_real_data_args(ap)
    args = ap.parse_args()

    from flows.cli.prefect_api import local_server

    work = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    data_root = _subset(args.dataset, args.images, work / "data")
    params = ["-p", str(ROOT / "params.yaml")]
    base_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    base_env.pop("PREFECT_API_URL", None)
    indexed = work / "indexed"
    index_sets = _sets(data_root, args.weights, args.chunk_size, args.passes)
    subprocess.run(
        [str(RETRAINFLOW), "index", *params, *index_sets, "-w", str(indexed)],
        env=base_env,
        check=True,
        capture_output=True,
    )
    n = len((indexed / "index" / "index.csv").read_text().splitlines()) - 1
    print(f"{n} images from {args.dataset}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")

    walls: dict[str, list[float]] = {name: [] for name in CONFIGS}
    records: dict[str, dict[str, Any]] = {}
    with local_server(port=_free_port(), log_file=work / "prefect-server.log") as api_url:
        env = {**base_env, "PREFECT_API_URL": api_url}
        for r in range(args.repeats):
            for name, (options, extra_env) in CONFIGS.items():
                ws = _workspace(indexed, work / f"{name.replace(' ', '_')}-{r}")
                command = ["features", *params, *index_sets, *options, "--no-progress"]
                wall, record = _run(command, ws, {**env, **extra_env})
                assert record["computed"] == record["pairs"], record
                views = record["pairs"]
                walls[name].append(wall)
                records[name] = record
                print(f"  round {r + 1} {name:<16} {wall:7.1f} s  {views / wall:6.1f} views/s", flush=True)
        hashes = {
            name: json.loads(
                (work / f"{name.replace(' ', '_')}-0" / "features" / "features.json").read_text()
            )["content_hash"]
            for name in CONFIGS
        }
        # per-chunk overhead: Dask 1 x 1 on the same images in many small chunks vs few large ones
        small_root = _subset(args.dataset, args.overhead_images, work / "data-small")
        overhead: dict[int, tuple[float, int, float]] = {}
        for chunk in (16, args.overhead_images):
            sets = _sets(small_root, args.weights, chunk)
            ws = work / f"overhead-{chunk}"
            subprocess.run(
                [str(RETRAINFLOW), "index", *params, *sets, "-w", str(ws)],
                env=base_env,
                check=True,
                capture_output=True,
            )
            wall, record = _run(
                ["features", *params, *sets, *CONFIGS["dask 1x1"][0], "--no-progress"], ws, env
            )
            overhead[chunk] = (wall, record["extra"]["chunks"], record["extra"]["chunk_seconds"])

    median = {name: statistics.median(values) for name, values in walls.items()}
    rate = {name: views / value for name, value in median.items()}
    speedup = rate["dask 2x1"] / rate["dask 1x1"]
    (many_wall, many, many_busy), (few_wall, few, few_busy) = overhead[16], overhead[args.overhead_images]
    per_chunk = ((many_wall - many_busy) - (few_wall - few_busy)) / max(1, many - few)
    cache_dir = work / "dask_2x1-0" / "cache" / "features" / records["dask 2x1"]["cache_key"]
    cache_bytes = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
    image_bytes = sum(p.stat().st_size for p in data_root.rglob("*") if p.is_file())
    fixed = median["dask 1x1"] - records["dask 1x1"]["extra"]["chunk_seconds"]
    lines = [
        f"images: {n} (cats_vs_dogs JPEGs), {views} views (augment.passes {args.passes}), MobileNetV2 1.0 @ 224, ImageNet weights, avg pool, engine keras,"
        f" chunk_size {args.chunk_size}; wall = the whole `retrainflow features` command; median of {args.repeats}",
        *(f"{name:<18} {median[name]:7.1f} s  {rate[name]:6.1f} views/s" for name in CONFIGS),
        f"speed-up dask 2x1 / dask 1x1: {speedup:.2f}x  (target >= 1.6x)",
        f"dask 1x1 / local 1 thread (same threads) views/s: {rate['dask 1x1'] / rate['local 1 thread']:.2f}"
        f"  (overhead {median['dask 1x1'] - median['local 1 thread']:+.1f} s)",
        f"dask 2x1 / local all cores (same threads) views/s: {rate['dask 2x1'] / rate['local all cores']:.2f}"
        f"  (overhead {median['dask 2x1'] - median['local all cores']:+.1f} s)",
        f"dask 1x1 outside the chunks (process + cluster start, base build, collection): {fixed:.1f} s",
        f"per-chunk overhead (Prefect task run + Dask task), {args.overhead_images} images in {many} vs {few}"
        f" chunks: {per_chunk * 1000:.0f} ms",
        f"cache written per view (float16 1280 avg-pooled + shard index): {cache_bytes / views / 1024:.2f} KiB;"
        f" images read per image: {image_bytes / n / 1024:.1f} KiB",
        f"features bit-identical across the four configurations: {len(set(hashes.values())) == 1}",
        f"load average at the end: {os.getloadavg()[0]:.2f}",
    ]
    report(
        "Scale-out on Dask (bench/distributed.py)",
        lines,
        {
            "images": n,
            "views": views,
            "passes": args.passes,
            "chunk_seconds": {name: rec["extra"].get("chunk_seconds") for name, rec in records.items()},
            "chunk_size": args.chunk_size,
            "walls": walls,
            "images_per_second": rate,
            "speedup_2x1_over_1x1": speedup,
            "fixed_seconds_dask_1x1": fixed,
            "per_chunk_overhead_seconds": per_chunk,
            "overhead_runs": {str(k): v for k, v in overhead.items()},
            "cache_bytes_per_view": cache_bytes / views,
            "image_bytes_per_image": image_bytes / n,
            "content_hashes": hashes,
        },
        args.out,
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
