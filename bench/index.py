"""Index benchmark (issue 2): how fast ``build_index`` validates a real photo folder, against a same-run baseline.

Baselines: just reading and hashing (sha256) every file's bytes, single-threaded (the least any index must do),
and reading + the bare TF decode of every file, single-threaded (what any index that really decodes must pay).
Then the full index (read + sha256 + Pillow header + the REAL TensorFlow decode of every file + duplicate and split
bookkeeping) with ``data.workers`` threads, and with 1 thread to show what the threads buy. Runs are interleaved
(baseline, index, index-1-thread, baseline, ...) so host noise hits all alike; one warm-up pass fills the OS file
cache and traces the decode graph. Prints img/s and the ratios.

    .venv/bin/python bench/index.py                                   # ../shared/datasets/cats_vs_dogs, 3 repeats
    .venv/bin/python bench/index.py --dataset ../shared/datasets/flowers --repeats 5 --json bench/results/index.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import SHARED, Timing, as_dict, peak_rss_mb, ratio, report  # noqa: E402


def read_and_hash(files: list[Path]) -> int:
    total = 0
    for f in files:
        data = f.read_bytes()
        hashlib.sha256(data).hexdigest()
        total += len(data)
    return total


def read_and_decode(files: list[Path]) -> int:
    """Read + the bare TF decode of every file, one thread: the decode cost any validating index pays."""
    import tensorflow as tf

    pixels = 0
    for f in files:
        image = tf.io.decode_image(f.read_bytes(), channels=3, expand_animations=False)
        pixels += int(image.shape[0]) * int(image.shape[1])
    return pixels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", type=Path, default=SHARED / "datasets" / "cats_vs_dogs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="validation threads (0 = one per core)")
    parser.add_argument("--json", type=Path, default=None, help="also save the raw figures here")
    args = parser.parse_args(argv)
    if not args.dataset.is_dir():
        print(f"dataset not found at {args.dataset}; skipping the index benchmark")
        return

    from tasks.config import DataConfig
    from tasks.data.indexing import build_index

    files = sorted(p for p in args.dataset.rglob("*") if p.is_file() and not p.name.startswith("."))
    cfg = DataConfig(root=args.dataset, workers=args.workers)
    cfg_one = DataConfig(root=args.dataset, workers=1)

    start = time.perf_counter()
    first = build_index(args.dataset, cfg)  # warm-up: file cache, TF import, decode graph trace
    cold = time.perf_counter() - start
    n = len(files)
    base, full, single = Timing("read + sha256 only (baseline, 1 thread)", n), Timing("", n), Timing("", n)
    decode = Timing("read + bare tf decode (baseline, 1 thread)", n)
    workers = cfg.workers or os.cpu_count() or 1
    full.name = f"build_index, {workers} threads (full decode)"
    single.name = "build_index, 1 thread (full decode)"
    for _ in range(args.repeats):
        for timing, fn in (
            (base, lambda: read_and_hash(files)),
            (decode, lambda: read_and_decode(files)),
            (full, lambda: build_index(args.dataset, cfg)),
            (single, lambda: build_index(args.dataset, cfg_one)),
        ):
            t0 = time.perf_counter()
            fn()
            timing.seconds.append(time.perf_counter() - t0)

    lines = [
        f"dataset: {args.dataset.name}, {n} files, {first.report['images']} indexed, "
        f"{sum(f.stat().st_size for f in files) / 2**20:.0f} MiB",
        f"first run incl. TF import and graph trace: {cold:.2f}s",
        base.line(),
        decode.line(),
        full.line(),
        single.line(),
        f"index / read+sha256: {ratio(full, base):.2f}x   index / bare decode: {ratio(full, decode):.2f}x   "
        f"threads speed-up: {ratio(full, single):.2f}x",
        f"peak RSS: {peak_rss_mb():.0f} MiB",
    ]
    report(
        "Index (issue 2)",
        lines,
        {
            "dataset": str(args.dataset),
            "files": n,
            "cold_seconds": cold,
            "baseline": as_dict(base),
            "decode_baseline": as_dict(decode),
            "ratio_index_vs_decode": ratio(full, decode),
            "index": as_dict(full),
            "index_one_thread": as_dict(single),
            "ratio_index_vs_baseline": ratio(full, base),
            "threads_speedup": ratio(full, single),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
