"""Engines for the frozen base: the features stage on ``engine: keras`` vs ``engine: litert``, each against its own
bare loop, plus the full model's predict on each engine. One run, alternating engines (the host is noisy).

On ``../shared/datasets/cats_vs_dogs`` with MobileNetV2 at 224 and the real ImageNet weights (by path):

1. bare loops over N images decoded and preprocessed once, held in memory: Keras, and LiteRT at 1 and 2 threads
   and a few batch sizes (what ``tasks.models.engines.litert_threads`` and ``features.batch_size`` stand on);
2. the conversion (once per key, then cached under ``<cache>/.engines``);
3. alternately, the whole ``run_features`` stage from an empty feature cache with each engine (clean views:
   ``augment.passes 0``, ``finetune.epochs 0``), then once each with the default params (2 augmented passes and the
   tail fine-tune's cut-point activations);
   targets: litert stage >= 2x keras stage, and litert stage >= 0.9 of the bare LiteRT loop;
4. agreement of the two engines' stored features (real weights): max abs and the lowest cosine;
5. the full raw-pixels model (base + a head) on Keras vs LiteRT: predict img/s and max abs of the probabilities.

    .venv/bin/python bench/engines.py --out bench/results/engines.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Timing, add_real_data_args, report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="images to use (default 400)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats of each engine's stage run")
    ap.add_argument("--batch-size", type=int, default=16, help="features.batch_size of the stage runs")
    add_real_data_args(ap)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import numpy as np

    from tasks.config import params_from_dict
    from tasks.data.index_table import read_index
    from tasks.data.pipeline import view_dataset
    from tasks.features.cache import FeatureCache, KeySpec
    from tasks.inputs import ImageSpec
    from tasks.layout import Layout
    from tasks.models import engines
    from tasks.models.bases import load_base
    from tasks.stages.run_features import run_features
    from tasks.stages.run_index import run_index

    work = Path(tempfile.mkdtemp(prefix="bench_engines_"))
    layout = Layout(work)
    size = (224, 224)

    def params(engine: str, cache: str, default_views: bool = False):
        raw = {
            "data": {"root": str(args.dataset)},
            "base": {"name": "mobilenet_v2", "weights": str(args.weights)},
            "features": {"cache_dir": str(work / cache), "batch_size": args.batch_size, "engine": engine},
        }
        if not default_views:
            raw |= {"augment": {"passes": 0}, "finetune": {"epochs": 0}}
        return params_from_dict(raw)

    run_index(params("keras", "c"), layout)
    index = (
        read_index(layout).sample(n=args.images, random_state=0).sort_values("path").reset_index(drop=True)
    )
    n = len(index)
    print(f"{n} images from {args.dataset}, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    # 1. bare loops on pixels decoded once
    loaded = load_base(params("keras", "c").base, size)
    pixels = np.concatenate(
        list(
            view_dataset(
                index, args.dataset, ImageSpec(size), batch_size=64, preprocess=loaded.spec.preprocess
            ).as_numpy_iterator()
        )
    )
    keras_forward = engines.keras_forward(loaded.model, "avg", size, None)
    t0 = time.perf_counter()
    tflite = engines.convert_base(loaded.model, "avg", None, work / "pooled.tflite")
    convert_seconds = time.perf_counter() - t0

    def bare(forward, batch_size: int) -> float:
        forward(pixels[:batch_size])  # warm-up (trace / allocation)
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            forward(pixels[i : i + batch_size])
        return n / (time.perf_counter() - start)

    bare_rates: dict[str, float] = {}
    for _ in range(args.repeats):  # alternate, keep the best of each (the host is noisy)
        for name, make in (
            (f"keras batch {args.batch_size}", lambda: keras_forward),
            *(
                (f"litert {t} thread(s) batch {bs}", lambda t=t, bs=bs: engines.litert_forward(tflite, bs, t))
                for t in (1, 2)
                for bs in (8, 16, 32)
            ),
        ):
            bs = int(name.rsplit(" ", 1)[1])
            bare_rates[name] = max(bare_rates.get(name, 0.0), bare(make(), bs))
    for name, rate in bare_rates.items():
        print(f"bare loop {name:<28} {rate:7.1f} img/s")
    bare_keras = bare_rates[f"keras batch {args.batch_size}"]
    bare_litert = bare_rates[f"litert {engines.litert_threads()} thread(s) batch {args.batch_size}"]

    # 2-3. the stage from an empty feature cache, alternating engines; the conversion copied in (timed above)
    def stage(engine: str, cache: str, default_views: bool = False) -> tuple[float, float, object]:
        p = params(engine, cache, default_views)
        if engine == "litert":  # the conversion is cached per key: give each fresh cache the one made above
            store = work / cache / engines.ENGINE_DIR
            store.mkdir(parents=True, exist_ok=True)
            parts = {
                "base": "mobilenet_v2",
                "alpha": 1.0,
                "weights_sha256": loaded.weights_sha256,
                "image_size": list(size),
                "pooling": "avg",
                "cut": None,
            }
            if not default_views:
                shutil.copy(tflite, store / f"{engines.conversion_key(parts)}.tflite")
        start = time.perf_counter()
        manifest = run_features(p, layout, index=index)
        wall = time.perf_counter() - start
        assert manifest.engine == engine and manifest.reused == 0, manifest.summary()
        return wall, float(manifest.images_per_second or 0.0), manifest

    walls: dict[str, Timing] = {e: Timing(f"features stage, {e}, wall", n) for e in ("keras", "litert")}
    rates: dict[str, list[float]] = {"keras": [], "litert": []}
    steady: dict[str, list[float]] = {
        "keras": [],
        "litert": [],
    }  # after the first batch (fill, trace, allocate)
    last = {}
    for r in range(args.repeats):
        for engine in ("keras", "litert") if r % 2 == 0 else ("litert", "keras"):
            wall, rate, manifest = stage(engine, f"{engine}{r}")
            walls[engine].seconds.append(wall)
            rates[engine].append(rate)
            steady[engine].append(float(manifest.extra.get("steady_images_per_second") or 0.0))
            last[engine] = (f"{engine}{r}", manifest)
    default = {}
    for engine in ("keras", "litert"):
        wall, rate, manifest = stage(engine, f"default_{engine}", default_views=True)
        default[engine] = {
            "wall_seconds": round(wall, 2),
            "views": manifest.computed,
            "activations": manifest.activations_computed,
            "views_per_second": rate,
            "conversion_included": engine == "litert",
        }

    # 4. agreement (real weights): the two forward passes in float32 on every image, and the stored features
    # (float16 by default: both engines' rows rounded the same way)
    bare_litert_forward = engines.litert_forward(tflite, args.batch_size)
    outs = [
        (bare_litert_forward(pixels[i : i + 16])[0], keras_forward(pixels[i : i + 16])[0])
        for i in range(0, n, 16)
    ]
    got, want = (np.concatenate(side).astype(np.float64) for side in zip(*outs, strict=True))
    cosine = float(((got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)).min())
    max_abs = float(np.abs(got - want).max())

    def stored_features(manifest) -> np.ndarray:
        spec = KeySpec(**{**manifest.key_spec, "image_size": tuple(manifest.key_spec["image_size"])})
        cache = FeatureCache.open(Path(manifest.cache_dir), spec, create=False)
        return cache.read([(sha, "clean") for sha in dict.fromkeys(index["sha256"])])

    stored = {engine: stored_features(manifest) for engine, (_, manifest) in last.items()}
    stored_max_abs = float(np.abs(stored["litert"] - stored["keras"]).max())
    stored_differ = float(np.mean(np.any(stored["litert"] != stored["keras"], axis=1)))

    # 5. the full model: base + a dense head, raw pixels in
    full = _full_model(loaded)
    full_tflite = work / "full.tflite"
    full_tflite.write_bytes(engines.convert_model(full))
    classify = engines.litert_classifier(full_tflite)
    raw_pixels = np.concatenate(
        list(view_dataset(index, args.dataset, ImageSpec(size), batch_size=64).as_numpy_iterator())
    )
    full_rates = {"keras": 0.0, "litert": 0.0}
    for _ in range(args.repeats):
        for name, fn in (
            ("keras", lambda x: full.predict(x, verbose=0, batch_size=32)),
            ("litert", classify),
        ):
            fn(raw_pixels[:32])
            start = time.perf_counter()
            outs = [fn(raw_pixels[i : i + 32]) for i in range(0, n, 32)]
            full_rates[name] = max(full_rates[name], n / (time.perf_counter() - start))
            if name == "keras":
                keras_probs = np.concatenate(outs)
            else:
                litert_probs = np.concatenate(outs)
    probs_max_abs = float(np.abs(keras_probs - litert_probs).max())

    stage_keras = float(np.median(rates["keras"]))
    stage_litert = float(np.median(rates["litert"]))
    lines = [
        f"images: {n} (cats_vs_dogs JPEGs), MobileNetV2 1.0 @ 224, ImageNet weights, avg pool, "
        f"features.batch_size {args.batch_size}",
        *(f"  bare loop {name}: {rate:.1f} img/s" for name, rate in bare_rates.items()),
        f"conversion to LiteRT (once per key): {convert_seconds:.1f} s",
        f"features stage extraction, keras:  {stage_keras:.1f} img/s (runs: {', '.join(f'{r:.1f}' for r in rates['keras'])})",
        f"features stage extraction, litert: {stage_litert:.1f} img/s (runs: {', '.join(f'{r:.1f}' for r in rates['litert'])})",
        walls["keras"].line(),
        walls["litert"].line(),
        f"ratio litert stage / keras stage: {stage_litert / stage_keras:.2f}  (target >= 2)",
        f"ratio litert stage / bare litert loop: {stage_litert / bare_litert:.2f}  (target >= 0.9)",
        f"ratio keras stage / bare keras loop: {stage_keras / bare_keras:.2f}",
        f"after the first batch: keras {np.median(steady['keras']):.1f} img/s, litert {np.median(steady['litert']):.1f}"
        f" img/s; litert steady / bare litert: {np.median(steady['litert']) / bare_litert:.2f}",
        f"ratio stage wall time litert / keras: {walls['keras'].median / walls['litert'].median:.2f}x faster",
        *(
            f"default params ({d['views']} views + {d['activations']} activations), {e}: {d['wall_seconds']} s wall"
            + (" incl. conversion" if d["conversion_included"] else "")
            for e, d in default.items()
        ),
        f"pooled features litert vs keras (float32, {n} images): max abs {max_abs:.2e}, lowest cosine {cosine:.7f}"
        "  (target <= 1e-4, >= 0.99999)",
        f"stored (float16) features litert vs keras: max abs {stored_max_abs:.2e} (float16 rounding), "
        f"{stored_differ * 100:.0f}% of rows differ in at least one value",
        f"full model predict, keras {full_rates['keras']:.1f} img/s, litert {full_rates['litert']:.1f} img/s "
        f"({full_rates['litert'] / full_rates['keras']:.2f}x), probabilities max abs {probs_max_abs:.2e}",
        f"load average at the end: {os.getloadavg()[0]:.2f}",
    ]
    report(
        "Engines (bench/engines.py)",
        lines,
        {
            "images": n,
            "batch_size": args.batch_size,
            "bare_rates": bare_rates,
            "convert_seconds": convert_seconds,
            "stage_rates": rates,
            "stage_walls": {e: t.seconds for e, t in walls.items()},
            "stage_steady_rates": steady,
            "ratio_litert_keras_stage": stage_litert / stage_keras,
            "ratio_litert_stage_bare": stage_litert / bare_litert,
            "ratio_keras_stage_bare": stage_keras / bare_keras,
            "default_params": default,
            "features_max_abs": max_abs,
            "features_min_cosine": cosine,
            "stored_max_abs": stored_max_abs,
            "stored_rows_differing": stored_differ,
            "full_model_rates": full_rates,
            "probabilities_max_abs": probs_max_abs,
        },
        args.out,
    )
    shutil.rmtree(work, ignore_errors=True)


def _full_model(loaded):
    """The raw-pixels full model the pipeline saves: MobileNetV2 + its preprocessing + a seeded dense head."""
    import keras

    from tasks.config import HeadSpec
    from tasks.models.full_model import build_full_model
    from tasks.models.heads import build_head

    keras.utils.set_random_seed(0)
    head = build_head(HeadSpec(name="dense", type="dense", units=(128,)), 1280, "binary", 2)
    return build_full_model(loaded.model, "mobilenet_v2", head, (224, 224), "avg")


if __name__ == "__main__":
    main()
