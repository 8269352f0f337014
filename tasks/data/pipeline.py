"""The streaming tf.data input pipeline, built from index rows; it never holds the dataset in memory.

read bytes -> ``tasks.data.images.decode_rgb`` (JPEG DCT-reduced when the source is much bigger than the target and
the reduction pays, :func:`_worthwhile_ratios`) -> one resampling per image that applies the augmentation AND the
resize (``tasks.data.resample.render_view``, OpenCV in a ``tf.numpy_function``) -> batch -> ``rescale`` and the base's
preprocessing on the batch -> prefetch. Images travel in groups of ``GROUP_SIZE``: one map call (one map worker
per core) reads and decodes a group and resamples it in ONE numpy_function call; the rows that do not fill a
last group form one shorter group (its own static size: nothing is padded or sliced), and groups are re-cut into
batches (``rebatch``). Grouping changes no pixel and no order.

* :func:`view_dataset`: ordered and deterministic (feature extraction, evaluation, predict). A view is a pure
  function of (sha256, pass, policy incl. its seed): independent of batch size, order and worker count.
* :func:`training_dataset`: repeats forever; every epoch is a fresh permutation (stateless, from ``seed`` and the
  epoch number) in which every sample appears exactly once, the final partial batch kept; augmented views use
  the epoch number as the pass, so epoch e sees view pass e of every image. Epochs are numbered from
  ``first_epoch``: a fit resumed at epoch k gets epoch k's order and views, not epoch 0's again.
* labels: :func:`tasks.data.labels.encode_labels` (``training_dataset`` encodes ``class_id`` with it).

TensorFlow and OpenCV are imported lazily.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.augment import INTERPOLATIONS, AugmentPolicy
from tasks.data.labels import encode_labels
from tasks.data.resample import aspect_crop, render_view, renders_uint8
from tasks.inputs import ImageSpec

GROUP_SIZE = 8  # images decoded and resampled per map call (see _load_fn)
MIXED_RATIO_MIN_SAVED_PIXELS = 25_000  # 0.02 ms a switch / 0.8 ns a pixel (see _worthwhile_ratios)
JPEG_RATIOS = (8, 4, 2, 1)
_REQUIRED = ("path", "sha256")
PREFETCH_BATCHES = 2


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache
def tune_allocator() -> bool:
    """Keep the pipeline's buffers (decoded images ~0.5 MB, batches ~5-20 MB) in the malloc heap for reuse.

    By default glibc serves every allocation above 128 kB with a fresh ``mmap`` and unmaps it on free, so each
    decoded image and each batch costs thousands of page faults and zeroed pages: 10-15% of the pipeline's CPU
    (BENCHMARKS.md). Raising the mmap threshold to 32 MB and keeping up to 256 MB of freed heap (trim threshold)
    removes that churn; memory stays bounded (the streaming check in bench/loader.py). Process-wide, applied once
    when the first dataset is built; a no-op off glibc or when ``RETRAINFLOW_MALLOC_TUNING=0``.
    """
    if os.environ.get("RETRAINFLOW_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1 and ok
    return mallopt(_M_TOP_PAD, 64 << 20) == 1 and ok


def _map_parallelism() -> int:
    """One map worker per usable core: the work per image is CPU-bound (decode, warp) and evenly sized."""
    return max(1, len(os.sched_getaffinity(0)))


def _pipeline_options() -> Any:
    """tf.data options shared by every dataset here: fixed parallelism in a private pool, autotuning off.

    Measured (bench/loader.py, BENCHMARKS.md): with AUTOTUNE, some passes ran at the speed of ONE worker (the
    autotuner's model settled on parallelism 1 for a while), a bimodal 1.8x slowdown; fixed one-worker-per-core maps
    and a 2-batch prefetch are as fast as AUTOTUNE's best passes and never slow.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = _map_parallelism()
    options.autotune.enabled = False
    return options


# ------------------------------------------------------------------------------------------------ sources
def jpeg_ratio(
    width: int, height: int, image_size: tuple[int, int], crop_to_aspect_ratio: bool = False
) -> int:
    """The largest JPEG DCT reduction (8, 4, 2, 1) whose decoded image (its centred aspect crop, with
    ``crop_to_aspect_ratio``) still covers ``image_size`` (h, w)."""
    out_h, out_w = image_size
    if crop_to_aspect_ratio and width > 0 and height > 0:
        _, _, width, height = aspect_crop(height, width, image_size)
    for ratio in JPEG_RATIOS:
        if width // ratio >= out_w and height // ratio >= out_h:
            return ratio
    return 1


def _worthwhile_ratios(ratio: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """The per-row DCT ratios, or all 1 when mixed ratios would cost more than they save.

    One ratio for every row is a Python int in the graph (free). Mixed ratios make the decoder switch per image,
    measured at 0.02 ms of CPU on EVERY image, while a reduced decode saves about 0.8 ns per pixel not produced
    (a 490x490 photo at ratio 2: 0.13 ms; a 12-Mpixel photo at ratio 8: about 10 ms). So mixed ratios are kept
    when the mean number of pixels saved per row is at least ``MIXED_RATIO_MIN_SAVED_PIXELS`` (BENCHMARKS.md):
    a few 2x-too-big photos among small ones decode at full scale, a few 12-Mpixel ones are still reduced.
    """
    if len(ratio) == 0 or len(np.unique(ratio)) == 1:
        return ratio
    saved = width.astype(np.float64) * height * (1.0 - 1.0 / ratio.astype(np.float64) ** 2)
    return ratio if saved.mean() >= MIXED_RATIO_MIN_SAVED_PIXELS else np.ones_like(ratio)


def _check_size(image_size: Any) -> tuple[int, int]:
    if (
        not isinstance(image_size, tuple | list)
        or len(image_size) != 2
        or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0 for v in image_size)
    ):
        raise ValueError(
            f"expected image_size as a (height, width) pair of positive integers, got {image_size!r}"
        )
    return int(image_size[0]), int(image_size[1])


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"expected {name} >= 1, got {value!r}")
    return int(value)


def _source_columns(
    rows: Any, data_root: Path, image_size: tuple[int, int], crop_to_aspect_ratio: bool = False
) -> dict[str, np.ndarray]:
    """Per-row inputs of the map function, as numpy columns (small: paths and a few integers per image)."""
    missing = [c for c in _REQUIRED if c not in getattr(rows, "columns", ())]
    if missing:
        raise ValueError(f"expected index rows with columns {list(_REQUIRED)}; missing {missing}")
    n = len(rows)
    root = Path(data_root)
    paths = np.asarray([str(root / p) for p in rows["path"]], dtype=object)
    width = rows["width"].to_numpy(np.int64) if "width" in rows else np.zeros(n, np.int64)
    height = rows["height"].to_numpy(np.int64) if "height" in rows else np.zeros(n, np.int64)
    orientation = rows["orientation"].to_numpy(np.int32) if "orientation" in rows else np.ones(n, np.int32)
    if "format" in rows:
        known_jpeg = np.asarray([str(f).upper() == "JPEG" for f in rows["format"]], dtype=bool)
        is_jpeg = known_jpeg
    else:  # unknown format: a JPEG may be reduced, but the format is sniffed per image
        known_jpeg, is_jpeg = np.zeros(n, bool), np.ones(n, bool)
    ratio = np.asarray(
        [
            jpeg_ratio(int(w), int(h), image_size, crop_to_aspect_ratio) if j else 1
            for w, h, j in zip(width, height, is_jpeg, strict=True)
        ],
        dtype=np.int32,
    )
    ratio = _worthwhile_ratios(ratio, width, height)
    return {
        "path": paths,
        "sha256": np.asarray([str(s) for s in rows["sha256"]], dtype=object),
        "height": height,
        "width": width,
        "orientation": orientation,
        "ratio": ratio,
        "known_jpeg": known_jpeg,
    }


def _render_fn(
    policy: AugmentPolicy | None, image_size: tuple[int, int], interpolation: str, crop_to_aspect_ratio: bool
) -> Callable[..., np.ndarray]:
    """The numpy side of the map: one view of one decoded image (see ``tasks.data.resample.render_view``)."""

    def render(
        image: np.ndarray, sha256: bytes, pass_number: Any, height: Any, width: Any, ratio: Any
    ) -> np.ndarray:
        dec_h, dec_w = image.shape[:2]
        full_h, full_w, r = int(height), int(width), int(ratio)
        # DCT-reduced decode: the geometry comes from the full-resolution size. Otherwise (not a JPEG, sizes
        # unknown) the decoded image is the source.
        reduced = r > 1 and (dec_h, dec_w) == (math.ceil(full_h / r), math.ceil(full_w / r))
        source, used = ((full_h, full_w), r) if reduced else (None, 1)
        sha = sha256.decode() if isinstance(sha256, bytes) else str(sha256)
        return render_view(
            np.ascontiguousarray(image),
            sha,
            int(pass_number),
            policy,
            image_size=image_size,
            source_size=source,
            ratio=used,
            interpolation=interpolation,
            keep_uint8=True,
            crop_to_aspect_ratio=crop_to_aspect_ratio,
        )

    return render


def _single_threaded_opencv() -> None:
    """The parallel map already runs one image per core; OpenCV's own thread pool would only oversubscribe."""
    import cv2

    cv2.setNumThreads(1)


def _load_fn(
    policy: AugmentPolicy | None,
    image_size: tuple[int, int],
    interpolation: str,
    cols: dict[str, np.ndarray],
    crop_to_aspect_ratio: bool = False,
    group: int = 1,
) -> Callable[..., Any]:
    """The graph side of the map, for a GROUP of ``group`` images: read and decode each (the one decoder), then
    resample all of them in ONE ``tf.numpy_function`` call; returns ``[group, H, W, 3]``.

    One call per group instead of per image: a numpy_function call, its Python entry and its GIL hand-offs, and a
    tf.data element each cost per call (measured: groups of 8 are 9-11% faster than single images, 16 and 32 are
    slower again, bench/loader.py and BENCHMARKS.md). When every row shares one orientation (or one DCT ratio) it
    is passed to the decoder as a Python int, and when the index says every file is a JPEG the format is not
    sniffed: a smaller graph (no per-image transpose/reverse, no switch over the 4 ratios, no format branch).
    """
    import tensorflow as tf

    from tasks.data.images import decode_rgb

    render = _render_fn(policy, image_size, interpolation, crop_to_aspect_ratio)
    _single_threaded_opencv()
    fixed_orientation = _only_value(cols["orientation"])
    fixed_ratio = _only_value(cols["ratio"])
    all_jpeg = True if len(cols["known_jpeg"]) and bool(np.all(cols["known_jpeg"])) else None
    out_dtype = np.uint8 if renders_uint8(policy) else np.float32  # uint8: 4x less to copy into batches
    out_shape = (group, image_size[0], image_size[1], 3)

    def render_group(
        sha256: np.ndarray,
        pass_number: np.ndarray,
        height: np.ndarray,
        width: np.ndarray,
        ratio: np.ndarray,
        *images: np.ndarray,
    ) -> np.ndarray:
        out = np.empty(out_shape, out_dtype)
        for i, image in enumerate(images):
            out[i] = render(image, sha256[i], pass_number[i], height[i], width[i], ratio[i])
        return out

    def load(
        path: Any, sha256: Any, height: Any, width: Any, orientation: Any, ratio: Any, pass_number: Any
    ) -> Any:
        images = [
            decode_rgb(
                tf.io.read_file(path[i]),
                orientation[i] if fixed_orientation is None else fixed_orientation,
                ratio[i] if fixed_ratio is None else fixed_ratio,
                jpeg=all_jpeg,
            )
            for i in range(group)
        ]
        out = tf.numpy_function(
            render_group,
            [sha256, pass_number, height, width, ratio, *images],
            tf.as_dtype(out_dtype),
            stateful=False,
        )
        return tf.ensure_shape(out, out_shape)

    return load


def _group_spans(n: int) -> list[tuple[int, int, int]]:
    """``(start, stop, group)`` spans covering rows 0..n-1: whole groups of ``GROUP_SIZE``, then one shorter
    group for the rest, each span with its own (static) group size, so no group is padded or sliced."""
    group = max(1, min(GROUP_SIZE, n))
    full = (n // group) * group
    spans = [(0, full, group)] if full else []
    if n > full or not spans:  # the rest (or, for no rows, one empty span so the dataset has its structure)
        spans.append((full, n, max(1, n - full)))
    return spans


def _concatenate(parts: Iterable[Any]) -> Any:
    """The datasets of ``parts`` one after the other (the groups of each span of :func:`_group_spans`)."""
    return functools.reduce(lambda first, second: first.concatenate(second), parts)


def _only_value(column: np.ndarray) -> int | None:
    values = np.unique(column)
    return int(values[0]) if len(values) == 1 else None


def _finish_fn(rescale: float | None, preprocess: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    """Batch-level: to float32, ``rescale`` (ImageDataGenerator's), then the base's preprocessing."""
    import tensorflow as tf

    def finish(images: Any) -> Any:
        images = tf.cast(images, tf.float32)
        if rescale is not None:
            images = images * float(rescale)
        if preprocess is not None:
            images = preprocess(images)
        return images

    return finish


def _check_common(
    rows: Any,
    image: Any,
    batch_size: Any,
    policy: Any,
    preprocess: Any,
) -> tuple[tuple[int, int], int]:
    if not isinstance(image, ImageSpec):
        raise TypeError(
            f"expected image to be a tasks.inputs.ImageSpec, got {type(image).__name__}: {image!r}"
        )
    size = _check_size(image.size)
    batch = _check_positive("batch_size", batch_size)
    if policy is not None and not isinstance(policy, AugmentPolicy):
        raise TypeError(
            f"expected policy to be an AugmentPolicy or None, got {type(policy).__name__}: {policy!r}"
        )
    if preprocess is not None and not callable(preprocess):
        raise TypeError(f"expected preprocess to be callable or None, got {preprocess!r}")
    rescale = image.rescale
    if rescale is not None and (isinstance(rescale, bool) or not isinstance(rescale, int | float)):
        raise ValueError(f"expected rescale to be a number or None, got {rescale!r}")
    if image.interpolation not in INTERPOLATIONS:
        raise ValueError(f"expected interpolation in {INTERPOLATIONS}, got {image.interpolation!r}")
    return size, batch


# ----------------------------------------------------------------------------------------------- datasets
def view_dataset(
    rows: Any,
    data_root: str | Path,
    image: ImageSpec,
    *,
    batch_size: int,
    policy: AugmentPolicy | None = None,
    pass_number: int = 0,
    preprocess: Callable[[Any], Any] | None = None,
) -> Any:
    """Float32 image batches ``[B, H, W, 3]`` of ``rows`` in row order: the clean view (``policy=None``) or view
    ``pass_number`` of ``policy``, at ``image.size`` with ``image.interpolation``. Values are 0-255 unless
    ``image.rescale`` / ``preprocess`` are given. With ``image.crop_to_aspect_ratio`` every image is first cropped
    (centred) to the target's aspect ratio, then resized without distortion (Keras' option of the same name)."""
    import tensorflow as tf

    size, batch = _check_common(rows, image, batch_size, policy, preprocess)
    interpolation, crop_to_aspect_ratio = image.interpolation, image.crop_to_aspect_ratio
    if isinstance(pass_number, bool) or not isinstance(pass_number, int | np.integer) or pass_number < 0:
        raise ValueError(f"view_dataset: expected pass_number >= 0, got {pass_number!r}")
    tune_allocator()
    cols = _source_columns(rows, Path(data_root), size, bool(crop_to_aspect_ratio))
    n = len(cols["path"])
    columns = (
        cols["path"].astype(str),
        cols["sha256"].astype(str),
        cols["height"],
        cols["width"],
        cols["orientation"],
        cols["ratio"],
        np.full(n, int(pass_number), np.int64),
    )
    ds = _concatenate(
        tf.data.Dataset.from_tensor_slices(tuple(c[start:stop] for c in columns))
        .batch(group)
        .map(
            _load_fn(policy, size, interpolation, cols, bool(crop_to_aspect_ratio), group),
            num_parallel_calls=_map_parallelism(),
            deterministic=True,
        )
        for start, stop, group in _group_spans(n)
    )
    ds = ds.rebatch(batch).apply(tf.data.experimental.assert_cardinality(math.ceil(n / batch)))
    ds = ds.map(
        _finish_fn(image.rescale, preprocess), num_parallel_calls=_map_parallelism(), deterministic=True
    )
    return ds.prefetch(PREFETCH_BATCHES).with_options(_pipeline_options())


def training_dataset(
    rows: Any,
    data_root: str | Path,
    image: ImageSpec,
    *,
    batch_size: int,
    class_mode: str,
    num_classes: int,
    seed: int,
    policy: AugmentPolicy | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    first_pass: int = 0,
    first_epoch: int = 0,
) -> tuple[Any, int]:
    """A repeating ``(images, labels)`` dataset and its steps per epoch (``ceil(len(rows) / batch_size)``).

    Epoch e is the permutation ``argsort(stateless_uniform(seed=[seed, e]))`` of the rows, cut into batches (the
    last one partial), so no sample is dropped or seen twice within an epoch and the order changes every epoch.
    With a policy, epoch e uses view pass ``first_pass + e`` of every image (finetune starts past the passes the
    feature cache holds, so it never trains on the exact views the head was fitted to).

    The dataset starts at epoch ``first_epoch`` (0-based, as Keras counts): its first epoch is epoch
    ``first_epoch`` of a fresh dataset, so a fit resumed at epoch k (``BackupAndRestore``) continues the sequence.
    """
    import tensorflow as tf

    size, batch = _check_common(rows, image, batch_size, policy, preprocess)
    interpolation, crop_to_aspect_ratio = image.interpolation, image.crop_to_aspect_ratio
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"training_dataset: expected an integer seed, got {seed!r}")
    if isinstance(first_pass, bool) or not isinstance(first_pass, int | np.integer) or first_pass < 0:
        raise ValueError(f"training_dataset: expected first_pass >= 0, got {first_pass!r}")
    if isinstance(first_epoch, bool) or not isinstance(first_epoch, int | np.integer) or first_epoch < 0:
        raise ValueError(f"training_dataset: expected first_epoch >= 0, got {first_epoch!r}")
    n = len(rows)
    if n == 0:
        raise ValueError("training_dataset: expected at least one row, got an empty table")
    if "class_id" not in rows:
        raise ValueError("training_dataset: expected index rows with a 'class_id' column")
    labels = encode_labels(rows["class_id"].to_numpy(), class_mode, num_classes)
    tune_allocator()
    cols = _source_columns(rows, Path(data_root), size, bool(crop_to_aspect_ratio))
    spans = [
        (start, stop, group, _load_fn(policy, size, interpolation, cols, bool(crop_to_aspect_ratio), group))
        for start, stop, group in _group_spans(n)
    ]
    table = {
        "path": tf.constant(cols["path"].astype(str)),
        "sha256": tf.constant(cols["sha256"].astype(str)),
        "height": tf.constant(cols["height"]),
        "width": tf.constant(cols["width"]),
        "orientation": tf.constant(cols["orientation"]),
        "ratio": tf.constant(cols["ratio"]),
        "label": tf.constant(labels),
    }
    seed64 = tf.constant(int(seed) & 0x7FFFFFFF, tf.int64)

    def one_group(indices: Any, epoch: Any, load: Callable[..., Any], group: int) -> Any:
        def take(name: str) -> Any:
            return tf.gather(table[name], indices)

        images = load(
            take("path"),
            take("sha256"),
            take("height"),
            take("width"),
            take("orientation"),
            take("ratio"),
            tf.fill([group], epoch + int(first_pass)),
        )
        return images, take("label")

    def epoch_dataset(epoch: Any) -> Any:
        order = tf.argsort(tf.random.stateless_uniform([n], seed=tf.stack([seed64, epoch])))
        return _concatenate(
            tf.data.Dataset.from_tensor_slices(tf.reshape(order[start:stop], [-1, group])).map(
                lambda indices, load=load, group=group: one_group(indices, epoch, load, group),
                num_parallel_calls=_map_parallelism(),
                deterministic=True,
            )
            for start, stop, group, load in spans
        ).rebatch(batch)

    ds = tf.data.Dataset.counter(start=int(first_epoch), dtype=tf.int64).flat_map(epoch_dataset)
    finish = _finish_fn(image.rescale, preprocess)
    ds = ds.map(lambda x, y: (finish(x), y), num_parallel_calls=_map_parallelism(), deterministic=True)
    return ds.prefetch(PREFETCH_BATCHES).with_options(_pipeline_options()), math.ceil(n / batch)
