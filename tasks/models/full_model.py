"""The full model (raw RGB pixels in, class probabilities out) and its saved form, the model bundle.

Full model: raw RGB pixels (float 0-255) -> :class:`BasePreprocess` (``augment.rescale`` and the base's
preprocessing, inside the model) -> the base, called with ``training=False`` (BatchNorm in inference mode) ->
global pooling -> the head ``train_top`` chose, with its trained weights (:func:`build_full_model`,
:func:`load_top_model`). finetune trains it, evaluate and predict feed it.

The bundle: the ``.keras`` file with ``classes.json`` beside it (:func:`save_bundle`, :func:`load_bundle`; the one
writer of that file is :func:`write_classes_file`), recording the class order and mode and how the model's training
images were resized, so evaluate and predict feed each model as it was trained (:attr:`ModelBundle.image`).

:class:`BasePreprocess` is a registered Keras layer (no ``Lambda``), so a saved model loads in safe mode once this
module is imported; defining it needs Keras, so this module imports Keras at import time (only model code imports
it; the CLI imports it lazily). :func:`probability_matrix` turns any model's outputs into class probabilities.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from tasks.data.augment import INTERPOLATIONS
from tasks.errors import InputError
from tasks.inputs import ImageSpec
from tasks.io.atomic import atomic_write_json
from tasks.layout import Layout
from tasks.models.heads import check_model_hash, load_head, output_spec, read_head_info, save_described_model

if TYPE_CHECKING:
    from tasks.config import Params
    from tasks.inputs import Inputs

POOLING_LAYERS = {"avg": "GlobalAveragePooling2D", "max": "GlobalMaxPooling2D"}


# ------------------------------------------------------------------------------ preprocessing inside the model
def check_rescale(rescale: Any) -> float | None:
    """``augment.rescale`` as the model applies it: ``None`` (no scaling) or a finite float (the input pipeline's
    ``rescale`` takes the same values)."""
    if rescale is None:
        return None
    if isinstance(rescale, bool) or not isinstance(rescale, int | float) or not math.isfinite(rescale):
        raise ValueError(f"rescale: expected a finite number or None, got {rescale!r}")
    return float(rescale)


@keras.saving.register_keras_serializable(package="retrainflow", name="BasePreprocess")
class BasePreprocess(keras.layers.Layer):
    """Raw RGB pixels (0-255, float) -> ``rescale * pixels`` (when ``rescale`` is set) -> what the named base
    expects, via ``tasks.models.bases.BASE_MODELS[...].preprocess``: the same arithmetic as the features stage's input
    pipeline (``view_dataset(..., image=ImageSpec(rescale=...), preprocess=)``), so a full model sees what its head
    was trained on.

    A registered Layer subclass (not a ``Lambda``), so a saved model loads with ``safe_mode=True`` once this
    module is imported. Models saved before ``rescale`` existed load with ``rescale=None``.
    """

    def __init__(self, base_name: str, rescale: float | None = None, **kwargs: Any):
        from tasks.models.bases import BASE_MODELS

        if base_name not in BASE_MODELS:
            raise ValueError(f"base_name: expected one of {sorted(BASE_MODELS)}, got {base_name!r}")
        scale = check_rescale(rescale)
        super().__init__(**kwargs)
        self.base_name = base_name
        self.rescale = scale

    def call(self, inputs: Any) -> Any:
        from tasks.models.bases import BASE_MODELS

        x = keras.ops.cast(inputs, "float32")
        if self.rescale is not None:
            x = x * self.rescale
        return BASE_MODELS[self.base_name].preprocess(x)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "base_name": self.base_name, "rescale": self.rescale}


def raw_pixels(image: ImageSpec) -> ImageSpec:
    """What the input pipeline feeds a full model for ``image``: the same size and resize, no ``rescale`` (the
    model applies it itself, in :class:`BasePreprocess`)."""
    return replace(image, rescale=None)


# ---------------------------------------------------------------------------------------- the full model
def build_full_model(
    base: Any,
    base_name: str,
    head: Any,
    image_size: tuple[int, int],
    pooling: str,
    rescale: float | None = None,
) -> Any:
    """Raw RGB ``[B, H, W, 3]`` (0-255) -> (``augment.rescale``) -> the base's preprocessing ->
    ``base(training=False)`` -> pooling -> ``head``."""
    if pooling not in POOLING_LAYERS:
        raise ValueError(f"pooling: expected one of {sorted(POOLING_LAYERS)}, got {pooling!r}")
    pool_layers = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}
    inputs = keras.Input((*image_size, 3), name="image")
    x = BasePreprocess(base_name, rescale=rescale, name="preprocess")(inputs)
    x = base(x, training=False)
    x = pool_layers[pooling](name="pool")(x)
    outputs = head(x)
    return keras.Model(inputs, outputs, name="retrainflow_classifier")


def load_top_model(params: Params, layout: Layout, inputs: Inputs) -> tuple[Any, Any, Any]:
    """The top-only full model (base + the head train_top saved), the base model, and the base's registry spec,
    at ``inputs``' image size with its ``rescale`` inside the model. Raises :class:`InputError` when the head was
    trained on another base than ``params.base``."""
    from tasks.models.bases import load_base

    info = read_head_info(layout)
    if info.get("base", {}).get("name") != params.base.name:
        raise InputError(
            f"the trained head was made for base {info.get('base', {}).get('name')!r}, params say "
            f"{params.base.name!r}: run train-top again"
        )
    size = inputs.image.size
    loaded = load_base(params.base, size)
    head = load_head(layout)
    model = build_full_model(
        loaded.model, params.base.name, head, size, params.features.pooling, inputs.image.rescale
    )
    return model, loaded.model, loaded.spec


def tail_model(full_model: Any, base: Any, cut_layer: str) -> Any:
    """The part of ``full_model`` (:func:`build_full_model`) after the frozen cut: the base's layers from the
    output of ``cut_layer`` on (in inference mode, as in the full model), then its pooling and its head.

    The layers are the full model's own (shared weights), so training the tail trains the full model: nothing is
    copied back. Input: the cut-point activation ``[B, *cut shape]``; output: what the full model outputs."""
    cut = base.get_layer(cut_layer).output
    base_tail = keras.Model(cut, base.output, name="base_tail")
    inputs = keras.Input(tuple(cut.shape[1:]), name="cut_activation")
    x = base_tail(inputs, training=False)
    x = full_model.get_layer("pool")(x)
    outputs = full_model.layers[-1](x)
    return keras.Model(inputs, outputs, name="retrainflow_tail")


def probability_matrix(predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Model outputs -> ``[N, num_classes]`` class probabilities (a single sigmoid column becomes ``[1 - p, p]``)."""
    p = np.asarray(predictions, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2:
        raise ValueError(f"predictions: expected shape [N] or [N, C], got {p.shape!r}")
    if p.shape[1] == 1 and num_classes == 2:
        return np.concatenate([1.0 - p, p], axis=1)
    if p.shape[1] != num_classes:
        raise ValueError(f"predictions: expected {num_classes} columns, got shape {p.shape!r}")
    return p


# ------------------------------------------------------------------------------------- the saved model bundle
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

    @property
    def image(self) -> ImageSpec:
        """How to feed the model: its input size, the resize its bundle records, raw pixels (no ``rescale``: the
        model applies it)."""
        return ImageSpec(self.image_size, self.interpolation, self.crop_to_aspect_ratio)


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
