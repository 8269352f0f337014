"""Classification heads (the ``HEADS`` registry) and the small model parts a saved model needs.

A head maps pooled base features ``[N, D]`` to class probabilities: one sigmoid unit for ``binary``,
``num_classes`` softmax units for ``categorical`` / ``sparse``. Heads are built from a
:class:`tasks.config.HeadSpec`; the registry is an explicit dict from ``HeadSpec.type`` to a builder.

This module also holds :class:`BasePreprocess`, the registered (safe-mode loadable, no ``Lambda``) layer that puts
``augment.rescale`` and a base's input preprocessing inside the full model, so a saved model takes raw RGB pixels
(0-255), and the saved model bundle (``.keras`` + ``classes.json``: :func:`save_bundle`, :func:`load_bundle`, the one
writer of that file :func:`write_classes_file`). Defining the layer needs Keras, so this module imports Keras at
import time: only model code imports it (the CLI imports it lazily).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from tasks.atomic import Staged, atomic_write_json, stage
from tasks.augment import INTERPOLATIONS
from tasks.bases import sha256_file
from tasks.config import HeadSpec
from tasks.layout import Layout
from tasks.pipeline import CLASS_MODES


@dataclass(frozen=True)
class OutputSpec:
    """The output layer and loss that match a class mode."""

    units: int
    activation: str
    loss: str


def output_spec(class_mode: str, num_classes: int) -> OutputSpec:
    """Output units / activation / loss for ``class_mode`` (``binary`` needs exactly 2 classes)."""
    if class_mode not in CLASS_MODES:
        raise ValueError(f"class_mode: expected one of {CLASS_MODES}, got {class_mode!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
    if class_mode == "binary":
        if num_classes != 2:
            raise ValueError(f"class_mode 'binary' needs exactly 2 classes, got num_classes={num_classes!r}")
        return OutputSpec(1, "sigmoid", "binary_crossentropy")
    loss = "categorical_crossentropy" if class_mode == "categorical" else "sparse_categorical_crossentropy"
    return OutputSpec(num_classes, "softmax", loss)


def _hidden_layers(spec: HeadSpec) -> list[Any]:
    """Dense blocks: Dense -> (BatchNorm) -> ReLU -> (Dropout), one per entry of ``spec.units``."""
    layers: list[Any] = []
    for i, units in enumerate(spec.units):
        layers.append(keras.layers.Dense(units, use_bias=not spec.batchnorm, name=f"dense_{i}"))
        if spec.batchnorm:
            layers.append(keras.layers.BatchNormalization(name=f"batchnorm_{i}"))
        layers.append(keras.layers.ReLU(name=f"relu_{i}"))
        if spec.dropout > 0:
            layers.append(keras.layers.Dropout(spec.dropout, name=f"dropout_{i}"))
    return layers


def _build_linear(spec: HeadSpec) -> list[Any]:
    """``linear``: (optional dropout on the features) straight into the output layer."""
    if spec.units or spec.batchnorm:
        raise ValueError(
            f"head {spec.name!r}: type 'linear' takes no units or batchnorm, got units={list(spec.units)!r}, "
            f"batchnorm={spec.batchnorm!r}"
        )
    return [keras.layers.Dropout(spec.dropout, name="dropout_in")] if spec.dropout > 0 else []


def _build_dense(spec: HeadSpec) -> list[Any]:
    """``dense``: one or more Dense(units) + ReLU blocks, each with optional batchnorm and dropout."""
    if not spec.units:
        raise ValueError(f"head {spec.name!r}: type 'dense' needs at least one entry in units, got []")
    return _hidden_layers(spec)


HEADS: dict[str, Callable[[HeadSpec], list[Any]]] = {
    "linear": _build_linear,
    "dense": _build_dense,
}


def build_head(spec: HeadSpec, input_dim: int, class_mode: str, num_classes: int) -> keras.Model:
    """A ``keras.Sequential`` head named ``head`` from ``spec``: ``[N, input_dim]`` features -> probabilities.

    Call :func:`keras.utils.set_random_seed` first for reproducible initial weights.
    """
    if spec.type not in HEADS:
        raise ValueError(f"head {spec.name!r}: unknown type {spec.type!r}; expected one of {sorted(HEADS)}")
    if not isinstance(input_dim, int) or input_dim < 1:
        raise ValueError(f"input_dim: expected a positive integer, got {input_dim!r}")
    out = output_spec(class_mode, num_classes)
    layers = [keras.Input((input_dim,), name="features"), *HEADS[spec.type](spec)]
    layers.append(keras.layers.Dense(out.units, activation=out.activation, name="predictions"))
    return keras.Sequential(layers, name="head")


# ------------------------------------------------------------------------------ preprocessing inside the model
def check_rescale(rescale: Any) -> float | None:
    """``augment.rescale`` as the model applies it: ``None`` (no scaling) or a finite float (the input pipeline's
    ``rescale=`` takes the same values)."""
    if rescale is None:
        return None
    if isinstance(rescale, bool) or not isinstance(rescale, int | float) or not math.isfinite(rescale):
        raise ValueError(f"rescale: expected a finite number or None, got {rescale!r}")
    return float(rescale)


@keras.saving.register_keras_serializable(package="retrainflow", name="BasePreprocess")
class BasePreprocess(keras.layers.Layer):
    """Raw RGB pixels (0-255, float) -> ``rescale * pixels`` (when ``rescale`` is set) -> what the named base
    expects, via ``tasks.bases.BASE_MODELS[...].preprocess``: the same arithmetic as the features stage's input
    pipeline (``view_dataset(..., rescale=, preprocess=)``), so a full model sees what its head was trained on.

    A registered Layer subclass (not a ``Lambda``), so a saved model loads with ``safe_mode=True`` once this
    module is imported. Models saved before ``rescale`` existed load with ``rescale=None``.
    """

    def __init__(self, base_name: str, rescale: float | None = None, **kwargs: Any):
        from tasks.bases import BASE_MODELS

        if base_name not in BASE_MODELS:
            raise ValueError(f"base_name: expected one of {sorted(BASE_MODELS)}, got {base_name!r}")
        scale = check_rescale(rescale)
        super().__init__(**kwargs)
        self.base_name = base_name
        self.rescale = scale

    def call(self, inputs: Any) -> Any:
        from tasks.bases import BASE_MODELS

        x = keras.ops.cast(inputs, "float32")
        if self.rescale is not None:
            x = x * self.rescale
        return BASE_MODELS[self.base_name].preprocess(x)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "base_name": self.base_name, "rescale": self.rescale}


def freeze_batchnorm(model: keras.Model) -> int:
    """Set ``trainable = False`` on every BatchNormalization layer inside ``model`` (nested too); return how many."""
    count = 0
    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            count += 1
    return count


def iter_layers(model: Any) -> list[Any]:
    """Every leaf-or-nested layer of ``model``, depth first (nested models are listed and descended into)."""
    out: list[Any] = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        if getattr(layer, "layers", None):
            out.extend(iter_layers(layer))
    return out


# ------------------------------------------------------------------------------------- the saved model bundle
def save_model_atomic(model: Any, path: Path) -> tuple[Staged, str]:
    """Save ``model`` to a temp ``.keras`` file beside ``path`` (:func:`tasks.atomic.stage`: saved, fsynced, not
    yet in place); return it and its sha256. The caller publishes it with :func:`publish_model` once whatever must
    describe it is written."""
    if path.suffix != ".keras":
        raise ValueError(f"model path: expected a .keras file, got {str(path)!r}")
    staged = stage(path, lambda tmp: model.save(tmp))
    return staged, sha256_file(staged.tmp)


def publish_model(staged: Staged, path: Path) -> None:
    """The commit of a model save: rename the temp file over ``path`` (and make the rename durable)."""
    if Path(staged.path) != Path(path):
        raise ValueError(f"publish_model: the staged file is for {staged.path}, not {path}")
    staged.commit()


def save_described_model(model: Any, path: Path, describe: Callable[[str], object]) -> Path:
    """Save ``model`` to ``path`` with a description file that records its sha256, so a kill never pairs a new
    model with an old description: (1) the model saved to a temp file and hashed (:func:`save_model_atomic`);
    (2) ``describe(sha256)`` writes the description (atomically); (3) :func:`publish_model`, the commit. An error
    before (3) removes the temp file (a kill leaves it to the next save's sweep)."""
    staged, sha = save_model_atomic(model, path)  # (1)
    try:
        describe(sha)  # (2)
        publish_model(staged, path)  # (3)
    except BaseException:
        staged.discard()
        raise
    return path


def check_model_hash(model_file: Path, info_file: Path, recorded: Any, rerun: str) -> None:
    """Refuse a model file whose sha256 is not the one its description file recorded (a save killed between
    its two writes); files written before the hash was recorded (``recorded`` is None) are accepted."""
    if recorded is None:
        return
    actual = sha256_file(model_file)
    if actual != recorded:
        raise ValueError(
            f"{model_file} is not the model {info_file} describes (sha256 {actual[:12]}, recorded "
            f"{str(recorded)[:12]}): a save was interrupted between its two writes; run `{rerun}` again"
        )


def classes_record(
    names: tuple[str, ...],
    class_mode: str,
    interpolation: str,
    model_sha256: str | None = None,
    crop_to_aspect_ratio: bool = False,
) -> dict[str, Any]:
    """The content of a model's ``classes.json`` (validated): names in output order, class mode (the index's
    format), how the model's training images were resized (interpolation, centred aspect crop or stretch), and the
    sha256 of the ``.keras`` file it describes (absent for a SavedModel export)."""
    output_spec(class_mode, len(names))  # validates the pair
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation: expected one of {INTERPOLATIONS}, got {interpolation!r}")
    if not isinstance(crop_to_aspect_ratio, bool):
        raise ValueError(f"crop_to_aspect_ratio: expected true or false, got {crop_to_aspect_ratio!r}")
    record: dict[str, Any] = {
        "names": list(names),
        "class_mode": class_mode,
        "num_classes": len(names),
        "interpolation": interpolation,
        "crop_to_aspect_ratio": crop_to_aspect_ratio,
    }
    if model_sha256 is not None:
        record["model_sha256"] = model_sha256
    return record


def write_classes_file(
    folder: Path,
    names: tuple[str, ...],
    class_mode: str,
    interpolation: str,
    model_sha256: str | None = None,
    crop_to_aspect_ratio: bool = False,
) -> Path:
    """Write ``folder/classes.json`` atomically: the one writer of that format (:func:`save_bundle`, the SavedModel
    export). Validates everything before writing anything."""
    record = classes_record(names, class_mode, interpolation, model_sha256, crop_to_aspect_ratio)
    path = Layout.bundle_classes(folder)
    atomic_write_json(path, record)
    return path


@dataclass(frozen=True)
class ModelBundle:
    """A saved classifier: the ``.keras`` model (raw RGB in) and the class order / mode of its outputs."""

    model: Any
    names: tuple[str, ...]
    class_mode: str
    interpolation: str = "bilinear"
    crop_to_aspect_ratio: bool = False  # bundles saved before this field existed were stretched

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` the model takes."""
        shape = self.model.input_shape
        return int(shape[1]), int(shape[2])


def save_bundle(
    model: Any,
    path: Path,
    names: tuple[str, ...],
    class_mode: str,
    interpolation: str = "bilinear",
    crop_to_aspect_ratio: bool = False,
) -> Path:
    """Save ``model`` to ``path`` (``.keras``) and ``classes.json`` beside it (:func:`classes_record`).

    Order, for a kill at any moment: (0) validate every argument, write nothing on error; (1) save the model to a
    temp file and hash it; (2) replace ``classes.json`` (it records that hash); (3) rename the model into place,
    the commit. Killed before (2): the old pair. Between (2) and (3): new classes beside the old model, which
    :func:`load_bundle` refuses (hash mismatch) instead of pairing them. After (3): the new pair. A new model is
    never beside old classes.
    """
    path = Path(path)
    classes_record(
        names, class_mode, interpolation, crop_to_aspect_ratio=crop_to_aspect_ratio
    )  # (0) validate
    return save_described_model(  # (1)-(3)
        model,
        path,
        lambda sha: write_classes_file(
            path.parent,
            names,
            class_mode,
            interpolation,
            model_sha256=sha,
            crop_to_aspect_ratio=crop_to_aspect_ratio,
        ),
    )


def _read_classes_file(path: Path) -> tuple[Path, Any]:
    file = Layout.bundle_classes(Path(path).parent)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: the classes file beside the model is missing")
    return file, json.loads(file.read_text())


def _interpolation_of(file: Path, raw: Any) -> str:
    value = raw.get("interpolation", "bilinear") if isinstance(raw, dict) else "bilinear"
    if value not in INTERPOLATIONS:
        raise ValueError(f"{file}: interpolation: expected one of {INTERPOLATIONS}, got {value!r}")
    return value


def _crop_of(file: Path, raw: Any) -> bool:
    value = raw.get("crop_to_aspect_ratio", False) if isinstance(raw, dict) else False
    if not isinstance(value, bool):
        raise ValueError(f"{file}: crop_to_aspect_ratio: expected true or false, got {value!r}")
    return value


def _classes_of(file: Path, raw: Any) -> tuple[tuple[str, ...], str]:
    names = raw.get("names") if isinstance(raw, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) < 2:
        raise ValueError(
            f"{file}: expected {{'names': [at least 2 strings], 'class_mode': ...}}, got {raw!r}"
        )
    class_mode = raw.get("class_mode", "binary" if len(names) == 2 else "categorical")
    output_spec(class_mode, len(names))
    return tuple(names), class_mode


def read_bundle_interpolation(path: Path) -> str:
    """The resize interpolation recorded beside the model file ``path`` (bilinear for older bundles)."""
    return _interpolation_of(*_read_classes_file(path))


def read_bundle_model_sha256(path: Path) -> str | None:
    """The sha256 of the ``.keras`` file that the ``classes.json`` beside ``path`` records (None for bundles saved
    before it was recorded)."""
    _, raw = _read_classes_file(path)
    value = raw.get("model_sha256") if isinstance(raw, dict) else None
    return value if isinstance(value, str) else None


def read_bundle_classes(path: Path) -> tuple[tuple[str, ...], str]:
    """``(names, class_mode)`` from the ``classes.json`` beside the model file ``path``."""
    return _classes_of(*_read_classes_file(path))


def load_bundle(path: Path) -> ModelBundle:
    """Load a saved model with Keras' safe mode (no arbitrary code) plus its classes file.

    Refuses a model file that is not the one ``classes.json`` records (see :func:`save_bundle`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    file, raw = _read_classes_file(path)
    names, class_mode = _classes_of(file, raw)
    interpolation = _interpolation_of(file, raw)
    crop = _crop_of(file, raw)
    check_model_hash(path, file, raw.get("model_sha256"), "retrainflow finetune")
    model = keras.saving.load_model(path, safe_mode=True, compile=False)
    out_units = int(model.output_shape[-1])
    if out_units != output_spec(class_mode, len(names)).units:
        raise ValueError(
            f"{path}: the model has {out_units} outputs but classes.json lists {len(names)} classes ({class_mode})"
        )
    return ModelBundle(model, names, class_mode, interpolation, crop)
