"""Predict with a saved model (``retrainflow predict``) and export it as a TF SavedModel (``retrainflow export``).

The model is one ``.keras`` file with ``classes.json`` beside it, loaded with Keras' safe mode. Files and folders
(recursively, hidden files skipped) are checked with the index stage's check (:func:`tasks.data.images.check_image_file`)
and fed in batches through the same input pipeline as evaluation (:func:`tasks.data.pipeline.view_dataset`, the one
decoder :func:`tasks.data.images.decode_rgb`); a file that cannot be read or decoded gets a row with an ``error``
instead of stopping the run. Progress: ``Step("predict", files done, total)`` after each batch.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import DataConfig
from tasks.inputs import ImageSpec
from tasks.progress import Reporter, counter

# the same decompression-bomb guard as the index stage: data.max_pixels' default (one place: tasks/config.py)
DEFAULT_MAX_PIXELS: int = DataConfig.model_fields["max_pixels"].default
OUTPUT_FORMATS = ("csv", "json")


@dataclass(frozen=True)
class Prediction:
    """One input file: the predicted label and confidence with all class probabilities, or an error."""

    path: str
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class _Checked:
    path: Path
    sha256: str
    orientation: int
    width: int
    height: int
    format: str


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders as their files (recursive, sorted, hidden files and folders skipped).

    A path that does not exist is kept: it becomes an error row.
    """
    if not paths:
        raise ValueError("predict: expected at least one file or folder, got none")
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path).parts
                if child.is_file() and not any(part.startswith(".") for part in rel):
                    out.append(child)
        else:
            out.append(path)
    return out


def check_file(path: Path, max_pixels: int) -> _Checked:
    """The index stage's check of one file (:func:`tasks.data.images.check_image_file`: the same size, pixel and
    decode limits); raises ``OSError`` / ``ImageRejected`` (a ``ValueError``) with a reason."""
    from tasks.data.images import check_image_file

    checked = check_image_file(path, max_pixels=max_pixels)
    info = checked.info
    return _Checked(
        path=path.resolve(),
        sha256=checked.sha256,
        orientation=info.orientation,
        width=info.width,
        height=info.height,
        format=info.format,
    )


def _rows(checked: Sequence[_Checked]) -> Any:
    """An index-shaped table for ``view_dataset``: absolute paths written relative to the filesystem root."""
    import pandas as pd

    return pd.DataFrame(
        {
            "path": [c.path.relative_to(c.path.anchor).as_posix() for c in checked],
            "label": ["" for _ in checked],
            "class_id": [0 for _ in checked],
            "split": ["test" for _ in checked],
            "sha256": [c.sha256 for c in checked],
            "width": [c.width for c in checked],
            "height": [c.height for c in checked],
            "bytes": [c.path.stat().st_size for c in checked],
            "orientation": [c.orientation for c in checked],
            "format": [c.format for c in checked],
        }
    )


def _predict_checked(
    model: Any, checked: Sequence[_Checked], image: ImageSpec, batch_size: int
) -> np.ndarray:
    from tasks.data.pipeline import view_dataset

    anchor = Path(checked[0].path.anchor)
    dataset = view_dataset(_rows(checked), anchor, image, batch_size=batch_size)
    outputs = [np.asarray(model.predict_on_batch(batch)) for batch in dataset]
    return np.concatenate(outputs) if outputs else np.zeros((0, 1))


def _to_prediction(path: Path, output: np.ndarray, names: tuple[str, ...]) -> Prediction:
    from tasks.models.full_model import probability_matrix

    probs = probability_matrix(output[None, :], len(names))[0]
    best = int(probs.argmax())
    return Prediction(
        path=str(path),
        label=names[best],
        confidence=float(probs[best]),
        probabilities={name: float(p) for name, p in zip(names, probs, strict=True)},
    )


def _short_error(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{type(err).__name__}: {text}"[:300]


def predict_files(
    model: Any,
    names: tuple[str, ...],
    files: Iterable[Path],
    *,
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    interpolation: str = "bilinear",
    crop_to_aspect_ratio: bool = False,
    progress: Reporter | None = None,
) -> list[Prediction]:
    """One :class:`Prediction` per file, in order; unreadable or undecodable files get an ``error``.
    ``interpolation`` and ``crop_to_aspect_ratio``: the resize the model was trained with (its bundle's).
    ``progress`` gets ``Step("predict", done, total)``: files that failed their check count as done at once,
    the others after their batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    files = list(files)
    advance = counter(progress, "predict", len(files))
    size = (int(model.input_shape[1]), int(model.input_shape[2]))
    image = ImageSpec(size, interpolation, crop_to_aspect_ratio)  # raw pixels: the model applies any rescale
    results: dict[int, Prediction] = {}
    good: list[tuple[int, _Checked]] = []
    for i, path in enumerate(files):
        try:
            good.append((i, check_file(path, max_pixels)))
        except Exception as err:  # a bad file is reported in its row, never fatal
            results[i] = Prediction(path=str(path), error=_short_error(err))
    for start in range(0, len(good), batch_size):
        chunk = good[start : start + batch_size]
        try:
            outputs = _predict_checked(model, [c for _, c in chunk], image, batch_size)
            pairs = list(zip(chunk, outputs, strict=True))
        except Exception:  # one file broke the batch: retry one by one so only that file gets an error
            pairs = []
            for item in chunk:
                try:
                    pairs.append((item, _predict_checked(model, [item[1]], image, 1)[0]))
                except Exception as err:
                    results[item[0]] = Prediction(path=str(files[item[0]]), error=_short_error(err))
        for (i, _), output in pairs:
            results[i] = _to_prediction(files[i], output, names)
        advance(len(files) - len(good) + start + len(chunk))
    if not good:
        advance(len(files))
    return [results[i] for i in range(len(files))]


def predict_paths(
    model_file: Path, paths: Sequence[str | Path], *, batch_size: int = 32, progress: Reporter | None = None
) -> list[Prediction]:
    """Load ``model_file`` (safe mode, classes beside it) and predict every file under ``paths``."""
    from tasks.models.full_model import load_bundle

    bundle = load_bundle(Path(model_file))
    return predict_files(
        bundle.model,
        bundle.names,
        expand_paths(paths),
        batch_size=batch_size,
        interpolation=bundle.interpolation,
        crop_to_aspect_ratio=bundle.crop_to_aspect_ratio,
        progress=progress,
    )


def format_predictions(predictions: Sequence[Prediction], names: Sequence[str], fmt: str) -> str:
    """CSV (``path,label,confidence,p_<class>...,error``) or JSON (a list of objects)."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"format: expected one of {OUTPUT_FORMATS}, got {fmt!r}")
    if fmt == "json":
        return json.dumps([p.__dict__ for p in predictions], indent=2) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "confidence", *(f"p_{n}" for n in names), "error"])
    for p in predictions:
        probs = [f"{p.probabilities[n]:.6f}" if n in p.probabilities else "" for n in names]
        conf = f"{p.confidence:.6f}" if p.confidence is not None else ""
        writer.writerow([p.path, p.label or "", conf, *probs, p.error or ""])
    return buf.getvalue()


EXPORT_FORMATS = ("savedmodel", "tflite")
TFLITE_FILE = "model.tflite"  # the LiteRT export's model, beside classes.json


def export_model(model_file: Path, output_dir: Path, export_format: str = "savedmodel") -> Path:
    """Export the ``.keras`` model with the bundle's ``classes.json`` (names, class mode, interpolation) beside
    it, written by the bundle's writer: ``savedmodel``, a TF SavedModel (``serve`` endpoint: float32
    ``[B, H, W, 3]`` 0-255 in), or ``tflite``, ``model.tflite`` (LiteRT float32, the same input and output;
    :func:`tasks.models.engines.litert_classifier` runs it).

    The export is built in a temp folder beside ``output_dir`` and renamed into place
    (:func:`tasks.io.atomic.atomic_dir`): a killed export leaves no half-written export at ``output_dir``.
    """
    from tasks.io.atomic import atomic_dir
    from tasks.models.full_model import load_bundle, write_classes_file

    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export: format must be one of {EXPORT_FORMATS}. Received: {export_format!r}")
    bundle = load_bundle(Path(model_file))
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"export: {output_dir} exists and is not empty; choose another --output")

    def fill(tmp: Path) -> None:
        if export_format == "tflite":
            from tasks.models.engines import convert_model

            tmp.mkdir()
            (tmp / TFLITE_FILE).write_bytes(convert_model(bundle.model))
        else:
            bundle.model.export(str(tmp), format="tf_saved_model", verbose=False)
        write_classes_file(
            tmp,
            bundle.names,
            bundle.class_mode,
            bundle.interpolation,
            crop_to_aspect_ratio=bundle.crop_to_aspect_ratio,
        )

    return atomic_dir(output_dir, fill)  # onto a missing or empty folder
