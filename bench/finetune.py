"""Fine-tuning speed: the tail trained on cached cut-point activations vs the whole raw-pixels model, one run.

On ``../shared/datasets/cats_vs_dogs`` with MobileNetV2 at 224 and the real ImageNet weights (by path), in one
workspace and one process:

1. the features stage from an empty cache twice: without activations (``finetune.path: full``) and with them
   (``finetune.path: tail``, a second empty cache): the one-off cost of emitting the cut-point activations;
2. train_top once (the head both paths start from);
3. the finetune stage with the same schedule (``--epochs``, every epoch run: ``min_improvement 0``, no early
   stop) on each path, alternating ``--repeats`` times: seconds per epoch (validation pass included) from the
   stage's own record, and the ratio full / tail (target >= 6x).

    .venv/bin/python bench/finetune.py                 # all 2000 images, 2 epochs, 1 repeat
    .venv/bin/python bench/finetune.py --images 600 --epochs 3 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import add_real_data_args, peak_rss_mb, report  # noqa: E402


def subset(dataset: Path, images: int | None, into: Path) -> Path:
    """``dataset`` itself, or a folder with copies of the first ``images`` files (split evenly over classes)."""
    if images is None:
        return dataset
    classes = sorted(p for p in dataset.iterdir() if p.is_dir())
    for folder in classes:
        (into / folder.name).mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.iterdir())[: images // len(classes)]:
            shutil.copyfile(path, into / folder.name / path.name)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None, help="use this many images (default: all)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="alternating finetune runs per path")
    ap.add_argument("--unfreeze-blocks", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16, help="finetune.batch_size (both paths)")
    add_real_data_args(ap)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from tasks.config import params_from_dict
    from tasks.layout import Layout
    from tasks.stages.run_features import run_features
    from tasks.stages.run_finetune import run_finetune
    from tasks.stages.run_index import run_index
    from tasks.stages.run_train_top import run_train_top

    work = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    data = subset(args.dataset, args.images, work / "images")
    layout = Layout(work / "ws")

    def params(path: str, cache: str):
        return params_from_dict(
            {
                "data": {"root": str(data)},
                "base": {"name": "mobilenet_v2", "weights": str(args.weights)},
                "features": {"cache_dir": str(work / cache)},
                "finetune": {
                    "epochs": args.epochs,
                    "unfreeze_blocks": args.unfreeze_blocks,
                    "batch_size": args.batch_size,
                    "min_improvement": 0.0,
                    "patience": args.epochs + 1,
                    "path": path,
                },
            }
        )

    run_index(params("tail", "cache"), layout)
    t0 = time.perf_counter()
    plain = run_features(params("full", "cache_plain"), layout)
    plain_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    with_acts = run_features(params("tail", "cache"), layout)
    acts_seconds = time.perf_counter() - t0
    shutil.rmtree(work / "cache_plain")
    run_train_top(params("tail", "cache"), layout)

    per_epoch: dict[str, list[float]] = {"tail": [], "full": []}
    stage: dict[str, list[float]] = {"tail": [], "full": []}
    val: dict[str, list[float]] = {"tail": [], "full": []}
    for _ in range(args.repeats):
        for path in ("tail", "full"):
            manifest = run_finetune(params(path, "cache"), layout)
            assert manifest.path == path and manifest.epochs_run == args.epochs, manifest
            per_epoch[path].append(manifest.seconds_per_epoch)
            stage[path].append(manifest.seconds)
            val[path].append(manifest.best_tried_val_loss)
    med = {p: statistics.median(v) for p, v in per_epoch.items()}
    act_bytes = sum(
        f.stat().st_size for f in (work / "cache" / with_acts.activations["cache_key"]).rglob("*")
    )
    rows = with_acts.activations_computed
    lines = [
        f"images: {sum(with_acts.rows.values())} ({with_acts.rows}), finetune epochs {args.epochs}, "
        f"unfreeze_blocks {args.unfreeze_blocks}, batch {args.batch_size}, cut {with_acts.activations['cut']} "
        f"{with_acts.activations['shape']}",
        f"features stage, empty cache, no activations:   {plain_seconds:7.1f} s ({plain.computed} views)",
        f"features stage, empty cache, with activations: {acts_seconds:7.1f} s ({with_acts.computed} views, "
        f"{rows} activations, {act_bytes / max(rows, 1) / 1024:.1f} KB each)",
        f"steady extraction: {plain.extra.get('steady_images_per_second') or 0:.1f} img/s without activations, "
        f"{with_acts.extra.get('steady_images_per_second') or 0:.1f} img/s with them -> one-off cost "
        f"{(plain.extra.get('steady_images_per_second') or 1) / (with_acts.extra.get('steady_images_per_second') or 1):.3f}x "
        "per view (the first run also pays the process warm-up)",
        f"finetune full model, s/epoch (val included):   {', '.join(f'{s:.2f}' for s in per_epoch['full'])}"
        f"  stage {', '.join(f'{s:.1f}' for s in stage['full'])} s",
        f"finetune tail from cache, s/epoch:             {', '.join(f'{s:.2f}' for s in per_epoch['tail'])}"
        f"  stage {', '.join(f'{s:.1f}' for s in stage['tail'])} s",
        f"per-epoch speed-up tail vs full: {med['full'] / med['tail']:.2f}x (target >= 6x); "
        f"stage speed-up {statistics.median(stage['full']) / statistics.median(stage['tail']):.2f}x",
        f"best val loss tried: full {val['full']}, tail {val['tail']}",
        f"peak RSS {peak_rss_mb():.0f} MiB",
    ]
    figures = {
        "per_epoch": per_epoch,
        "stage_seconds": stage,
        "features_seconds": {"plain": plain_seconds, "with_activations": acts_seconds},
        "activation_bytes_per_view": act_bytes / max(rows, 1),
        "best_tried_val_loss": val,
        "manifest": json.loads(json.dumps(with_acts.to_json(), default=str)),
    }
    report("Fine-tuning: tail on cached activations vs full model", lines, figures, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
