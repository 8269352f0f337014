"""Engines for the frozen base's forward pass: Keras/TensorFlow, or the same network converted to LiteRT.

On a CPU the features stage is bound by the frozen base's inference. LiteRT (``ai-edge-litert``, its XNNPACK
delegate) runs the same float32 network about 2-3x faster there (BENCHMARKS.md, Engines), with features equal to
Keras's within 1e-4 max abs. ``features.engine`` picks one (``auto``: litert on a CPU when it is installed, keras
when TensorFlow sees a GPU): :func:`choose_engine` is the one place that decides.

The converted model is a cached artefact of the feature cache, ``<cache root>/.engines/<key>.tflite``,
content-addressed by the weights hash, base, alpha, input size, pooling and outputs (:func:`conversion_key`),
converted once per key (:func:`convert_base`, atomically) and reused. A base that does not convert falls back to
keras with one warning naming it (:func:`prepare_forward`). The feature cache key records the engine
(``KeySpec.engine``), so features from different engines never mix.

A forward function maps a float32 batch (already preprocessed) to ``(pooled features, cut activations or None)``
as numpy arrays, whatever the engine. No TensorFlow or LiteRT at import.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.io.atomic import atomic_write_bytes
from tasks.progress import Reporter, Step, report

Forward = Callable[[Any], tuple[np.ndarray, np.ndarray | None]]
ENGINE_DIR = ".engines"  # inside the feature cache root; `cache list` skips dot folders
CONVERT_TASK = "convert litert"  # the progress task of a conversion


@dataclass(frozen=True, kw_only=True)
class EngineInfo:
    """One engine of the registry: the module that must import for it, and what it is."""

    name: str
    module: str
    distribution: str
    description: str


ENGINES: dict[str, EngineInfo] = {
    "keras": EngineInfo(
        name="keras",
        module="keras",
        distribution="keras",
        description="the Keras/TensorFlow forward pass (the reference; on a GPU when one is visible)",
    ),
    "litert": EngineInfo(
        name="litert",
        module="ai_edge_litert",
        distribution="ai-edge-litert",
        description="LiteRT with its XNNPACK delegate (float32, CPU): about 2-3x Keras on a CPU",
    ),
}
ENGINE_SETTINGS = ("auto", *ENGINES)


@dataclass(frozen=True, kw_only=True)
class EngineChoice:
    """The engine a run uses and why; ``key`` is what the feature cache key records (None for keras, so keras
    keys are unchanged)."""

    name: str
    reason: str

    @property
    def key(self) -> str | None:
        if self.name == "keras":
            return None
        return f"{self.name}-{installed_version(ENGINES[self.name])}"


def installed_version(info: EngineInfo) -> str | None:
    """The installed version of the engine's distribution, or None when it does not import."""
    if importlib.util.find_spec(info.module) is None:
        return None
    try:
        return importlib.metadata.version(info.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_visible() -> bool:
    """Whether TensorFlow sees a GPU. ``tensorflow-cpu`` never does, and is answered without importing TF."""
    try:
        importlib.metadata.version("tensorflow-cpu")
        return False
    except importlib.metadata.PackageNotFoundError:
        pass
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def choose_engine(setting: str) -> EngineChoice:
    """The engine for ``features.engine`` (``auto``, ``keras`` or ``litert``; validated by the config)."""
    litert = ENGINES["litert"]
    if setting == "keras":
        return EngineChoice(name="keras", reason="features.engine is keras")
    if setting == "litert":
        if installed_version(litert) is None:
            from tasks.errors import InputError

            raise InputError(
                f"features.engine: litert needs the {litert.distribution} package "
                f"(pip install {litert.distribution}); use keras or auto. Received: {setting!r}"
            )
        return EngineChoice(name="litert", reason="features.engine is litert")
    if installed_version(litert) is None:
        return EngineChoice(name="keras", reason=f"auto: {litert.distribution} is not installed")
    if gpu_visible():
        return EngineChoice(name="keras", reason="auto: TensorFlow sees a GPU")
    return EngineChoice(name="litert", reason="auto: a CPU, and LiteRT is installed")


# ------------------------------------------------------------------------------------------- forward passes
def keras_forward(model: Any, pooling: str, image_size: tuple[int, int], cut_layer: str | None) -> Forward:
    """One compiled forward pass of the Keras base in inference mode, also emitting ``cut_layer``'s output."""
    import keras
    import tensorflow as tf

    reduce = tf.reduce_mean if pooling == "avg" else tf.reduce_max
    if cut_layer is not None:
        model = keras.Model(model.input, [model.get_layer(cut_layer).output, model.output])

    @tf.function(input_signature=[tf.TensorSpec([None, *image_size, 3], tf.float32)])
    def infer(batch: Any) -> Any:
        if cut_layer is None:
            return reduce(model(batch, training=False), axis=[1, 2]), None
        cut, out = model(batch, training=False)
        return reduce(out, axis=[1, 2]), cut

    def forward(batch: Any) -> tuple[np.ndarray, np.ndarray | None]:
        pooled, cut = infer(batch)
        return pooled.numpy(), None if cut is None else cut.numpy()

    return forward


def litert_threads() -> int:
    """The interpreter's threads: every core. On 2 cores this measured fastest with the tf.data decode threads
    beside it (bench/engines.py --threads)."""
    return os.cpu_count() or 1


def litert_forward(path: Path, batch_size: int, threads: int | None = None) -> Forward:
    """The converted model at ``path`` as a forward function. Batches are padded to ``batch_size`` (one
    allocation, the same arithmetic for every row)."""
    from ai_edge_litert.interpreter import Interpreter

    with _quiet_fds():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on every start
        interpreter = Interpreter(model_path=str(path), num_threads=threads or litert_threads())
        (source,) = interpreter.get_input_details()
        interpreter.resize_tensor_input(source["index"], [batch_size, *source["shape"][1:]])
        interpreter.allocate_tensors()
    outputs = interpreter.get_output_details()
    pooled_at = next(o["index"] for o in outputs if len(o["shape"]) == 2)
    cut_at = next((o["index"] for o in outputs if len(o["shape"]) == 4), None)

    def forward(batch: Any) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.asarray(batch, dtype=np.float32)
        n = len(x)
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), np.float32)])
        interpreter.set_tensor(source["index"], x)
        interpreter.invoke()
        pooled = interpreter.get_tensor(pooled_at)[:n].copy()
        cut = None if cut_at is None else interpreter.get_tensor(cut_at)[:n].copy()
        return pooled, cut

    return forward


# ------------------------------------------------------------------------------------------- conversion
def conversion_key(parts: dict[str, Any]) -> str:
    """``<base>-<16 hex>`` over the conversion's parts (weights hash, base, alpha, size, pooling, cut layer) and
    the converter's version."""
    blob = json.dumps({**parts, "tensorflow": _tf_version()}, sort_keys=True).encode()
    return f"{parts['base']}-{hashlib.sha256(blob).hexdigest()[:16]}"


def _tf_version() -> str | None:
    for name in ("tensorflow-cpu", "tensorflow"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


def convert_base(
    model: Any, pooling: str, cut_layer: str | None, path: Path, *, progress: Reporter | None = None
) -> Path:
    """Convert the base (with its pooling, and ``cut_layer``'s output when given) to a LiteRT float32 model at
    ``path``, atomically. The converter's own output is kept out of the console (it is in the error when the
    conversion fails)."""
    import keras

    pool = keras.layers.GlobalAveragePooling2D() if pooling == "avg" else keras.layers.GlobalMaxPooling2D()
    outputs = [pool(model.output)]
    if cut_layer is not None:
        outputs.append(model.get_layer(cut_layer).output)
    report(progress, Step(CONVERT_TASK, 0, 1, "model"))
    atomic_write_bytes(path, convert_model(keras.Model(model.input, outputs)))
    report(progress, Step(CONVERT_TASK, 1, 1, "model", final=True))
    return path


def convert_model(model: Any) -> bytes:
    """A Keras model as a LiteRT float32 flatbuffer (``TFLiteConverter.from_keras_model``: never
    ``from_concrete_functions``, which converted silently to NaN outputs here). :class:`ConversionError` when it
    does not convert."""
    with _quiet_fds() as captured:
        try:
            return _convert(model)
        except Exception as error:  # the converter raises many kinds; all mean "does not convert"
            raise ConversionError(f"{type(error).__name__}: {error}", captured()) from error


def _convert(model: Any) -> bytes:
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def litert_classifier(path: Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A converted full model (raw pixels in, class probabilities out) as ``pixels -> probabilities``."""
    from ai_edge_litert.interpreter import Interpreter

    with _quiet_fds():
        interpreter = Interpreter(model_path=str(path), num_threads=threads or litert_threads())
    (source,) = interpreter.get_input_details()
    (target,) = interpreter.get_output_details()
    allocated = [0]

    def classify(pixels: np.ndarray) -> np.ndarray:
        x = np.asarray(pixels, dtype=np.float32)
        if allocated[0] != len(x):
            interpreter.resize_tensor_input(source["index"], list(x.shape))
            interpreter.allocate_tensors()
            allocated[0] = len(x)
        interpreter.set_tensor(source["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(target["index"]).copy()

    return classify


class ConversionError(Exception):
    """A model did not convert to LiteRT; ``log`` is the tail of what the converter printed."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


@contextlib.contextmanager
def _quiet_fds() -> Iterator[Callable[[], str]]:
    """Send fds 1 and 2 (the converter's C++ output) and Python's sys.stdout/stderr to a temp file for the block."""
    import io
    import sys

    python = io.StringIO()
    with (
        tempfile.TemporaryFile(mode="w+b") as sink,
        contextlib.redirect_stdout(python),
        contextlib.redirect_stderr(python),
    ):
        for stream in (sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)

        def captured() -> str:
            sink.seek(0)
            return (python.getvalue() + sink.read().decode(errors="replace"))[-2000:]

        try:
            yield captured
        finally:
            for stream in (sys.__stdout__, sys.__stderr__):
                if stream is not None:
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@dataclass(frozen=True, kw_only=True)
class PreparedEngine:
    """The engine a features run uses (after a fallback, if any) and the converted model's path for litert."""

    choice: EngineChoice
    model_path: Path | None = None
    warning: str | None = None


def prepare_forward(
    choice: EngineChoice,
    store: Path,
    parts: dict[str, Any],
    build: Callable[[], Any],
    cut_layer: str | None,
    *,
    progress: Reporter | None = None,
) -> PreparedEngine:
    """For litert: the converted model of ``parts`` in ``store`` (converted from ``build()``, the Keras base,
    when it is not there yet). A base that does not convert gives keras and a one-line warning naming it."""
    if choice.name != "litert":
        return PreparedEngine(choice=choice)
    path = store / f"{conversion_key(parts)}.tflite"
    if path.is_file():
        return PreparedEngine(choice=choice, model_path=path)
    try:
        convert_base(build(), parts["pooling"], cut_layer, path, progress=progress)
    except ConversionError as error:
        first_line = str(error).splitlines()[0]
        return PreparedEngine(
            choice=EngineChoice(name="keras", reason=f"{parts['base']} does not convert to LiteRT"),
            warning=f"features.engine: {parts['base']} does not convert to LiteRT ({first_line}); using keras",
        )
    return PreparedEngine(choice=choice, model_path=path)
