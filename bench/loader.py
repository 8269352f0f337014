"""Input pipeline benchmark (issue 3): ImageDataGenerator vs our tf.data pipeline, same run, same photos.

(a) legacy ``ImageDataGenerator.flow_from_directory`` with rescale, rotation 15, shifts 0.1, shear 10, zoom 0.2,
    horizontal flip, fill reflect; (b) ``tasks.data.pipeline.view_dataset`` with the same augmentation; (c) the same
    pipeline without augmentation (read + decode + resize: the limit). 224x224, batch 32. Prints img/s and the
    ratios b/a (target >= 10) and b/c (target >= 0.6); runs are interleaved a, b, c, a, b, c, ... so host noise
    hits all three alike. ``--memory`` also runs (b) in child processes over N and 4N images and compares peak RSS
    (target: 4N at most 1.15x N).

    .venv/bin/python bench/loader.py                      # 1000 photos, 5 repeats, memory check
    .venv/bin/python bench/loader.py --images 500         # shorter passes: the ~45 ms start of each pass shows
    .venv/bin/python bench/loader.py --images 2000 --repeats 7 --json bench/results/loader.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import SHARED, Timing, as_dict, ratio, report, run_child_peak_rss  # noqa: E402

AUGMENT = {
    "rotation_range": 15,
    "width_shift_range": 0.1,
    "height_shift_range": 0.1,
    "shear_range": 10,
    "zoom_range": 0.2,
    "horizontal_flip": True,
    "fill_mode": "reflect",
}
RESCALE = 1.0 / 255


def list_images(dataset: Path, count: int) -> list[Path]:
    """``count`` photos taken alternately from each class folder (cycled when the folder has fewer)."""
    classes = sorted(p for p in dataset.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"no class folders in {dataset}")
    per_class = [
        sorted(p for p in c.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) for c in classes
    ]
    out: list[Path] = []
    i = 0
    while len(out) < count:
        files = per_class[i % len(classes)]
        out.append(files[(i // len(classes)) % len(files)])
        i += 1
    return out


def index_rows(files: list[Path], root: Path):
    """An index-shaped table (path relative to ``root``, sha256, size after EXIF orientation) for the pipeline."""
    import pandas as pd

    from tasks.data.images import read_header

    records = []
    for i, f in enumerate(files):
        contents = f.read_bytes()
        fmt, width, height, orientation, _ = read_header(contents, 10**9)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        records.append(
            {
                "path": f.relative_to(root).as_posix(),
                "sha256": hashlib.sha256(
                    contents + str(i).encode()
                ).hexdigest(),  # repeats are distinct views
                "class_id": 0,
                "width": width,
                "height": height,
                "orientation": orientation,
                "format": fmt,
            }
        )
    return pd.DataFrame(records)


def link_tree(files: list[Path], dataset: Path, into: Path) -> None:
    """A flow_from_directory tree of symlinks to exactly ``files`` (unique names for repeated files)."""
    for i, f in enumerate(files):
        target = into / f.parent.name / f"{i:05d}_{f.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(f.resolve())


def consume(dataset) -> int:
    n = 0
    for batch in dataset:
        n += int(batch.shape[0])
    return n


def ours(rows, root: Path, size: int, batch: int, augment: bool):
    from tasks.data.augment import AugmentPolicy
    from tasks.data.pipeline import view_dataset
    from tasks.inputs import ImageSpec

    policy = (
        AugmentPolicy(
            name="bench",
            rotation_range=15,
            width_shift_range=0.1,
            height_shift_range=0.1,
            shear_range=10,
            zoom_range=(0.8, 1.2),
            horizontal_flip=True,
            fill_mode="reflect",
        )
        if augment
        else None
    )
    return view_dataset(rows, root, ImageSpec((size, size), rescale=RESCALE), batch_size=batch, policy=policy)


def legacy(tree: Path, size: int, batch: int):
    from tensorflow.keras.preprocessing.image import ImageDataGenerator

    generator = ImageDataGenerator(rescale=RESCALE, **AUGMENT)
    return generator.flow_from_directory(
        str(tree), target_size=(size, size), batch_size=batch, class_mode="binary", shuffle=False
    )


def run_legacy(iterator) -> int:
    n = 0
    for i in range(len(iterator)):
        n += int(iterator[i][0].shape[0])
    return n


def child(args: argparse.Namespace) -> None:
    """Memory mode: stream (b) over ``--images`` photos once, nothing else."""
    files = list_images(args.dataset, args.images)
    rows = index_rows(files, args.dataset.parent)
    n = consume(ours(rows, args.dataset.parent, args.size, args.batch, augment=True))
    print("IMAGES", n)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", type=Path, default=SHARED / "datasets" / "cats_vs_dogs")
    parser.add_argument(
        "--images",
        type=int,
        default=1000,
        help="photos per pass (default 1000; cycled if fewer). Each pass of (b)/(c) starts a new iterator "
        "(~45 ms: iterator creation + pipeline fill), 10%% of a 500-photo pass",
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS check (child processes)")
    parser.add_argument("--json", type=Path, default=None, help="also save the raw figures here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.dataset.is_dir():
        raise SystemExit(f"dataset not found: {args.dataset} (set --dataset or RETRAINFLOW_SHARED)")
    if args.child:
        child(args)
        return

    files = list_images(args.dataset, args.images)
    rows = index_rows(files, args.dataset.parent)
    timings = {k: Timing(name, args.images) for k, name in _NAMES.items()}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        link_tree(files, args.dataset, tree)
        build: dict[str, float] = {}
        start = time.perf_counter()
        legacy_iterator = legacy(tree, args.size, args.batch)
        build["a"] = time.perf_counter() - start
        datasets = {}
        for key, augment in (("b", True), ("c", False)):
            start = time.perf_counter()
            datasets[key] = ours(rows, args.dataset.parent, args.size, args.batch, augment=augment)
            build[key] = time.perf_counter() - start
        runs = {
            "a": lambda: run_legacy(legacy_iterator),
            "b": lambda: consume(datasets["b"]),
            "c": lambda: consume(datasets["c"]),
        }
        for key in ("b", "c"):  # warm-up pass: file cache, first-run allocations
            runs[key]()
        cpu: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(args.repeats):
            for key, fn in runs.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                got = fn()
                timings[key].seconds.append(time.perf_counter() - start)
                cpu[key].append(time.process_time() - start_cpu)
                if got != args.images:
                    raise SystemExit(f"{_NAMES[key]} yielded {got} images, expected {args.images}")
    a, b, c = timings["a"], timings["b"], timings["c"]
    lines = [t.line() for t in (a, b, c)]
    lines.append(f"b/a = {ratio(b, a):.2f}  (target >= 10)")
    lines.append(f"b/c = {ratio(b, c):.2f}  (target >= 0.6)")
    best = {k: args.images / min(t.seconds) for k, t in timings.items()}
    lines.append(
        "best pass of each (less exposed to a busy host): "
        + ", ".join(f"{k} {v:.1f} img/s" for k, v in best.items())
        + f"; b/a = {best['b'] / best['a']:.2f}, b/c = {best['b'] / best['c']:.2f}"
    )
    cpu_ms = {k: 1000 * statistics.median(v) / args.images for k, v in cpu.items()}
    lines.append(
        "CPU time per image (all threads; robust to a busy host): "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in cpu_ms.items())
        + f"; CPU-time ratios a/b = {cpu_ms['a'] / cpu_ms['b']:.2f}, c/b = {cpu_ms['c'] / cpu_ms['b']:.2f}"
    )
    lines.append(
        "one-off set-up, not in the rates above (tf.data graph tracing; legacy: listing files): "
        + ", ".join(f"{k} {v:.2f}s" for k, v in build.items())
    )
    figures: dict[str, object] = {
        "images": args.images,
        "size": args.size,
        "batch": args.batch,
        "a": as_dict(a),
        "b": as_dict(b),
        "c": as_dict(c),
        "b_over_a": ratio(b, a),
        "b_over_c": ratio(b, c),
        "setup_seconds": build,
        "cpu_ms_per_image": cpu_ms,
        "best_rate": best,
    }
    if not args.no_memory:
        script = str(Path(__file__).resolve())
        common = [
            "--child",
            "--dataset",
            str(args.dataset),
            "--size",
            str(args.size),
            "--batch",
            str(args.batch),
        ]
        one, _ = run_child_peak_rss([script, *common, "--images", str(args.images)])
        four, _ = run_child_peak_rss([script, *common, "--images", str(4 * args.images)])
        lines.append(
            f"peak RSS of (b): {args.images} images {one:.0f} MiB, {4 * args.images} images {four:.0f} MiB, "
            f"ratio {four / one:.3f} (target <= 1.15)"
        )
        figures.update({"rss_1x_mib": one, "rss_4x_mib": four, "rss_ratio": four / one})
    report(
        f"Input pipeline, {args.images} photos of {args.dataset.name}, {args.size}px, batch {args.batch}",
        lines,
        figures,
        args.json,
    )


_NAMES = {
    "a": "(a) ImageDataGenerator.flow_from_directory + aug",
    "b": "(b) tasks.data.pipeline.view_dataset + same aug",
    "c": "(c) tasks.data.pipeline.view_dataset, no aug",
}

if __name__ == "__main__":
    main()
