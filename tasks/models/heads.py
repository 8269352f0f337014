"""Classification heads (the ``HEADS`` registry), the head train_top saves, and saving a model with the file
that describes it.

A head maps pooled base features ``[N, D]`` to class probabilities: one sigmoid unit for ``binary``,
``num_classes`` softmax units for ``categorical`` / ``sparse``. Heads are built from a
:class:`tasks.config.HeadSpec`; the registry is an explicit dict from ``HeadSpec.type`` to a builder.

The saved head is ``layout.top_head_model`` with ``layout.top_head_info`` (``head.json``) beside it
(:func:`save_head`, :func:`read_head_info`, :func:`load_head`). :func:`save_described_model` is the kill-safe save
of any model with its description file (the head's ``head.json``, the full model's ``classes.json``:
:mod:`tasks.models.full_model`). This module imports Keras at import time: only model code imports it (the CLI imports
it lazily).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from tasks.config import HeadSpec
from tasks.data.labels import CLASS_MODES
from tasks.errors import InputError
from tasks.io.atomic import Staged, atomic_write_json, stage
from tasks.layout import Layout
from tasks.models.bases import sha256_file


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


# ------------------------------------------------------------------------ saving a model with its description
def save_model_atomic(model: Any, path: Path) -> tuple[Staged, str]:
    """Save ``model`` to a temp ``.keras`` file beside ``path`` (:func:`tasks.io.atomic.stage`: saved, fsynced, not
    yet in place); return it and its sha256. The caller publishes it with :func:`publish_model` once whatever must
    describe it is written."""
    if path.suffix != ".keras":
        raise InputError(f"model path: expected a .keras file, got {str(path)!r}")
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
        raise InputError(
            f"{model_file} is not the model {info_file} describes (sha256 {actual[:12]}, recorded "
            f"{str(recorded)[:12]}): a save was interrupted between its two writes; run `{rerun}` again"
        )


# ------------------------------------------------------------------------------------------- the saved head
def save_head(model: Any, spec: HeadSpec, layout: Layout, info: dict[str, Any]) -> Path:
    """Write ``layout.top_head_model`` and ``layout.top_head_info`` (spec, class info, feature dim, base, and the
    sha256 of the model file), through :func:`save_described_model`.

    Order, for a kill at any moment: (1) the model to a temp file, hashed; (2) ``head.json`` replaced (it records
    that hash); (3) the model renamed into place, the commit. Killed before (2): the old pair; between (2) and (3):
    the new json beside the old model, which :func:`load_head` refuses (hash mismatch) instead of pairing them;
    after (3): the new pair.
    """
    record = {"spec": spec.model_dump(mode="json"), **info}
    json.dumps(record)  # not JSON-able: fail before writing anything
    return save_described_model(
        model,
        layout.top_head_model,
        lambda sha: atomic_write_json(layout.top_head_info, {**record, "model_sha256": sha}),
    )


def read_head_info(layout: Layout) -> dict[str, Any]:
    """The ``head.json`` written by :func:`save_head` (raises if train_top has not run)."""
    path = layout.top_head_info
    if not path.is_file():
        raise FileNotFoundError(f"no trained head at {path}: run `retrainflow train-top` first")
    return json.loads(path.read_text())


def load_head(layout: Layout) -> Any:
    """The best head saved by train_top (safe mode); refuses a ``head.keras`` that is not the one ``head.json``
    describes (a save killed between its two writes)."""
    path = layout.top_head_model
    if not path.is_file():
        raise FileNotFoundError(f"no trained head at {path}: run `retrainflow train-top` first")
    info = read_head_info(layout)
    check_model_hash(path, layout.top_head_info, info.get("model_sha256"), "retrainflow train-top")
    return keras.saving.load_model(path, safe_mode=True, compile=False)
