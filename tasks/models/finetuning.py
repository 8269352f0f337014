"""The ``finetune`` stage's library: partial unfreezing of the full model at a low learning rate (the stage itself,
loading the top-only model and writing the outputs, is :mod:`tasks.stages.run_finetune`).

The full model (raw pixels in, the head chosen by ``train_top`` on top) is :mod:`tasks.models.full_model`'s.

Fine-tuning unfreezes the last ``finetune.unfreeze_blocks`` blocks of the base (registry block names), or the layers
whose name matches ``finetune.layer_regex`` when it is set (it replaces ``unfreeze_blocks``); every BatchNormalization
layer stays frozen (head included). It trains on the original training images (augmented only with
``finetune.augment``, and then on views the feature cache does not hold: epoch e uses augmentation pass
``augment.passes + e``, because the head already fits the cached views almost perfectly and they carry no
gradient), validates each epoch, and keeps the best weights by val loss (an epoch must beat the best by
``finetune.min_improvement``, relative), where "epoch 0" is the
top-only model itself: fine-tuning can never leave a model worse on val than the one it started from.

A killed run resumes from its last finished epoch: ``keras.callbacks.BackupAndRestore`` (weights, optimizer, epoch)
plus this module's early-stopping state (best val loss, its weights, patience counter) and the epoch log live under
``layout.finetune_checkpoints`` and are removed on success. ``finetune.epochs: 0`` skips training: the top-only
model (same full-model form) is the result.

Outputs: ``layout.candidate_model`` + ``classes.json`` beside it, ``metrics/finetune.json`` (model-quality figures
only, :data:`FINETUNE_METRIC_KEYS`), ``plots/finetune_history.csv`` and ``layout.run_record("finetune")`` (seconds,
resume, trainable layers, and :func:`weights_decision`'s sentence saying which weights were kept and why).
Progress: one :class:`tasks.progress.Step` per epoch (``tasks.progress.keras_epochs``).
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import FinetuneConfig, Params
from tasks.errors import InputError
from tasks.features.activations import ActivationRows, batches
from tasks.inputs import ImageSpec
from tasks.io.atomic import atomic_write, atomic_write_text
from tasks.layout import FinetuneWork, Layout
from tasks.models.optimizers import make_optimizer
from tasks.progress import Reporter, keras_epochs

STAGE = "finetune"  # the stage's name: its progress task and its run record
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class FinetuneManifest:
    """What ``run_finetune`` returns (JSON-able)."""

    model_file: str
    skipped: bool
    epochs_run: int  # epochs trained in total (across a resume)
    best_epoch: int  # 0: the top-only weights were kept
    resumed_from_epoch: int  # 0 for a fresh run
    top_only_val_loss: float | None
    top_only_val_accuracy: float | None
    val_loss: float | None  # of the weights kept
    val_accuracy: float | None
    best_tried_epoch: (
        int | None
    )  # the fine-tuning epoch with the lowest val loss, kept or not (None: none ran)
    best_tried_val_loss: float | None
    kept: str  # "top-only" or "fine-tuned"
    decision: str  # which weights were kept and why, with the figures (:func:`weights_decision`)
    trainable_layers: list[str]
    trainable_params: int
    seconds: float
    path: str = "full"  # "tail" (cached cut-point activations), "full" (decoded images) or "skipped"
    path_reason: str = ""
    cut: str | None = None  # the tail path's cut layer
    seconds_per_epoch: float | None = None  # of the epochs this run trained, validation pass included


# the manifest fields metrics/finetune.json keeps (what judges the model; the rest goes to the run record)
FINETUNE_METRIC_KEYS = (
    "skipped",
    "epochs_run",
    "best_epoch",
    "top_only_val_loss",
    "top_only_val_accuracy",
    "val_loss",
    "val_accuracy",
    "best_tried_epoch",
    "best_tried_val_loss",
    "trainable_params",
    "path",
)


# ------------------------------------------------------------------------------------------ model building
def layers_to_unfreeze(base: Any, spec: Any, cfg: FinetuneConfig) -> set[str]:
    """Names of the base layers to train: those of the last ``cfg.unfreeze_blocks`` named blocks (registry block
    names, :func:`tasks.models.bases.block_layer_names`), or those matching ``cfg.layer_regex`` when it is set.

    Raises when the regex matches no layer of the base.
    """
    from tasks.models.bases import block_layer_names

    if cfg.layer_regex is not None:
        pattern = re.compile(cfg.layer_regex)
        chosen = {layer.name for layer in base.layers if pattern.search(layer.name)}
        if not chosen:
            raise InputError(f"finetune.layer_regex: {cfg.layer_regex!r} matches no layer of the base")
        return chosen
    return set(block_layer_names(base, spec, cfg.unfreeze_blocks))


def set_trainable(model: Any, base: Any, spec: Any, cfg: FinetuneConfig) -> list[str]:
    """Unfreeze the chosen base layers (and the head), freeze everything else and every BatchNorm.

    Returns the names of the base layers left trainable that have weights.
    """
    import keras

    from tasks.models.heads import freeze_batchnorm

    chosen = layers_to_unfreeze(base, spec, cfg)
    model.trainable = True  # Keras 3 sets this recursively; then each base layer is set explicitly
    for layer in base.layers:
        layer.trainable = layer.name in chosen and not isinstance(layer, keras.layers.BatchNormalization)
    freeze_batchnorm(model)
    return [layer.name for layer in base.layers if layer.trainable and layer.weights]


# -------------------------------------------------------------------------------------------- resumability
def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data))


def _save_weights_atomic(model: Any, path: Path) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.savez(fh, *model.get_weights())

    atomic_write(path, write)


def _load_weights(model: Any, path: Path) -> None:
    with np.load(path) as data:
        model.set_weights([data[f"arr_{i}"] for i in range(len(data.files))])


def improves(val_loss: float, best_val_loss: float, min_improvement: float) -> bool:
    """Whether an epoch's val loss replaces the best so far: lower by more than ``min_improvement`` of it.

    The first "best" is the top-only model (epoch 0). On a few hundred val images a 2-4% lower val loss is noise:
    every such candidate measured on cats_vs_dogs was worse on test than top-only (BENCHMARKS.md), so the default
    margin is 5%.
    """
    return val_loss < best_val_loss * (1.0 - min_improvement)


def resumable_early_stopping(work: FinetuneWork, patience: int, min_improvement: float = 0.0) -> Any:
    """Early stopping on val loss that restores the best weights and survives a kill.

    State (best val loss, best epoch, patience counter) and the best weights are ``work``'s files, written
    after every epoch; a new ``fit`` continues from them. :func:`start_state` seeds them with "epoch 0".
    """
    import keras

    class ResumableEarlyStopping(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.state: dict[str, Any] = {}

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.state = json.loads(work.state_file.read_text())

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            val_loss = float((logs or {})["val_loss"])
            if improves(val_loss, self.state["best_val_loss"], min_improvement):
                _save_weights_atomic(self.model, work.best_weights)
                self.state.update(
                    best_val_loss=val_loss,
                    best_val_accuracy=float((logs or {}).get("val_accuracy", float("nan"))),
                    best_epoch=epoch + 1,
                    wait=0,
                )
            else:  # as keras.callbacks.EarlyStopping: stop after `patience` epochs without improvement
                self.state["wait"] += 1
                self.state["stopped"] = self.state["wait"] >= patience
            self.state["epochs_done"] = epoch + 1
            _write_json_atomic(work.state_file, self.state)
            if self.state.get("stopped"):
                self.model.stop_training = True

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            _load_weights(self.model, work.best_weights)
            self.state["finished"] = True  # a kill from here on (while saving) resumes by loading best.npz
            _write_json_atomic(work.state_file, self.state)

    return ResumableEarlyStopping()


def start_state(
    model: Any, work: FinetuneWork, val_loss: float, val_accuracy: float, fingerprint: str = ""
) -> None:
    """Seed the early-stopping state with the starting (top-only) model as epoch 0."""
    _save_weights_atomic(model, work.best_weights)
    state = {
        "best_val_loss": val_loss,
        "best_val_accuracy": val_accuracy,
        "best_epoch": 0,
        "wait": 0,
        "epochs_done": 0,
        "top_only_val_loss": val_loss,
        "top_only_val_accuracy": val_accuracy,
        "fingerprint": fingerprint,
    }
    _write_json_atomic(work.state_file, state)


def read_epoch_log(path: Path) -> list[dict[str, str]]:
    """The CSVLogger rows, one per epoch (a re-run epoch after a resume keeps its last row), epochs 1-based."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("epoch") not in (None, "", "epoch")]
    by_epoch = {int(r["epoch"]): r for r in rows}
    return [{**by_epoch[e], "epoch": str(e + 1)} for e in sorted(by_epoch)]


def write_history_csv(path: Path, rows: list[dict[str, str]]) -> None:
    """``epoch,loss,accuracy,val_loss,val_accuracy`` (header only when fine-tuning was skipped), atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(HISTORY_COLUMNS)
    for r in rows:
        writer.writerow([r.get(c, "") for c in HISTORY_COLUMNS])
    atomic_write_text(path, buf.getvalue())


def best_tried(history: list[dict[str, str]]) -> tuple[int, float] | None:
    """``(epoch, val loss)`` of the fine-tuning epoch with the lowest val loss (the first on ties), None without
    epoch rows."""
    tried = [(int(r["epoch"]), float(r["val_loss"])) for r in history if r.get("val_loss") not in (None, "")]
    return min(tried, key=lambda item: (item[1], item[0])) if tried else None


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.3g}%"


def weights_decision(
    *,
    skipped: bool,
    best_epoch: int,
    top_only_val_loss: float | None,
    val_loss: float | None,
    tried: tuple[int, float] | None,
    min_improvement: float,
    path: str | None = None,
    val_accuracy: tuple[float | None, float | None] | None = None,
) -> str:
    """One sentence: which weights the candidate holds (top-only or a fine-tuning epoch's) and why, with the
    val losses that decided it (:func:`improves`' rule); with ``path`` and ``val_accuracy`` (top-only, kept) it
    also says what fine-tuning changed on val accuracy and which path trained."""
    if skipped:
        return "kept the top-only weights: fine-tuning was skipped (finetune.epochs 0)"
    return _decision(best_epoch, top_only_val_loss, val_loss, tried, min_improvement) + _path_note(
        path, val_accuracy
    )


_PATH_NAMES = {"tail": "tail path, on cached cut-point activations", "full": "full path, on decoded images"}


def _path_note(path: str | None, val_accuracy: tuple[float | None, float | None] | None) -> str:
    notes = []
    if val_accuracy is not None and None not in val_accuracy:
        before, after = val_accuracy
        notes.append(f"val accuracy {_percent(before)} -> {_percent(after)}")
    if path in _PATH_NAMES:
        notes.append(_PATH_NAMES[path])
    return f"; {'; '.join(notes)}" if notes else ""


def _decision(
    best_epoch: int,
    top_only_val_loss: float | None,
    val_loss: float | None,
    tried: tuple[int, float] | None,
    min_improvement: float,
) -> str:
    by = f" by {_percent(min_improvement)}" if min_improvement > 0 else ""
    if best_epoch == 0:
        best = f" (best epoch {tried[0]}: {tried[1]:.4f})" if tried else ""
        return f"kept the top-only weights: no fine-tuning epoch lowered val loss {top_only_val_loss:.4f}{by}{best}"
    drop = 1.0 - val_loss / top_only_val_loss if top_only_val_loss else 0.0
    margin = (
        f", more than finetune.min_improvement {_percent(min_improvement)}" if min_improvement > 0 else ""
    )
    return (
        f"kept the fine-tuned weights of epoch {best_epoch}: val loss {top_only_val_loss:.4f} -> {val_loss:.4f} "
        f"({_percent(drop)} lower{margin})"
    )


# ------------------------------------------------------------------------------------------------ datasets
def labelled_view(rows: Any, data_root: Path, image: ImageSpec, batch_size: int, labels: np.ndarray) -> Any:
    """The clean view of ``rows`` (as ``image`` says: raw pixels for a full model, :func:`tasks.models.full_model.raw_pixels`)
    zipped with their encoded labels, batched."""
    import tensorflow as tf

    from tasks.data.pipeline import view_dataset

    images = view_dataset(rows, data_root, image, batch_size=batch_size)
    return tf.data.Dataset.zip((images, tf.data.Dataset.from_tensor_slices(labels).batch(batch_size)))


def training_views(
    rows: Any,
    data_root: Path,
    image: ImageSpec,
    *,
    batch_size: int,
    class_mode: str,
    num_classes: int,
    seed: int,
    policy: Any | None,
    first_pass: int,
) -> Callable[[int], tuple[Any, int]]:
    """``train(first_epoch) -> (repeating labelled dataset, steps per epoch)`` for :func:`finetune_model`: epoch e
    renders augmentation pass ``first_pass + e`` of ``policy`` (the clean view without one)."""
    from tasks.data.pipeline import training_dataset

    def train(first_epoch: int) -> tuple[Any, int]:
        return training_dataset(
            rows,
            data_root,
            image,
            batch_size=batch_size,
            class_mode=class_mode,
            num_classes=num_classes,
            seed=seed,
            policy=policy,
            first_pass=first_pass,
            first_epoch=first_epoch,
        )

    return train


def cached_training_views(
    rows: ActivationRows, epoch_views: Sequence[str], *, batch_size: int, seed: int
) -> Callable[[int], tuple[Any, int]]:
    """The tail path's ``train(first_epoch) -> (repeating dataset, steps per epoch)``: epoch e reads the cached
    activations of view ``epoch_views[e % len(epoch_views)]`` in a shuffled order that depends on (seed, e) only,
    so a resumed fit continues the killed one's sequence."""
    import math

    def train(first_epoch: int) -> tuple[Any, int]:
        n = len(rows)

        def epochs() -> Any:
            epoch = first_epoch
            while True:
                order = np.random.default_rng([seed, epoch]).permutation(n)
                yield from batches(rows, epoch_views[epoch % len(epoch_views)], order, batch_size)
                epoch += 1

        return _from_batches(epochs, rows), math.ceil(n / batch_size)

    return train


def cached_view(rows: ActivationRows, view: str, batch_size: int) -> Any:
    """The cached activations of ``view`` in index order with their labels, batched (finite: the val pass)."""
    import math

    import tensorflow as tf

    order = np.arange(len(rows))
    dataset = _from_batches(lambda: batches(rows, view, order, batch_size), rows)
    # a known length, so that Keras knows where the pass ends (no "ran out of data" warning)
    return dataset.apply(tf.data.experimental.assert_cardinality(math.ceil(len(rows) / batch_size)))


def _from_batches(make: Callable[[], Any], rows: ActivationRows) -> Any:
    import tensorflow as tf

    shape = tuple(rows.cache.spec.shape or (rows.cache.spec.feature_dim,))
    labels = rows.labels
    signature = (
        tf.TensorSpec((None, *shape), tf.float32),
        tf.TensorSpec((None, *labels.shape[1:]), tf.as_dtype(labels.dtype)),
    )
    return tf.data.Dataset.from_generator(make, output_signature=signature).prefetch(2)


# ----------------------------------------------------------------------------------------------- the stage
def compile_for_finetune(model: Any, cfg: FinetuneConfig, class_mode: str, num_classes: int) -> None:
    """Compile with the low-learning-rate optimizer of ``finetune`` and the loss of the class mode."""
    from tasks.models.heads import output_spec

    model.compile(
        optimizer=make_optimizer(cfg.optimizer, cfg.lr, cfg.momentum),
        loss=output_spec(class_mode, num_classes).loss,
        metrics=["accuracy"],
    )


def run_fingerprint(params: Params, layout: Layout) -> str:
    """What a resumable run must share with the killed one: its params, the trained head and the index."""
    import hashlib

    digest = hashlib.sha256(
        params.section_hash("seed", "data", "image", "augment", "base", "features", "finetune").encode()
    )
    for path in (layout.top_head_model, layout.index_table):
        digest.update(path.read_bytes() if path.is_file() else b"-")
    return digest.hexdigest()[:16]


def backup_is_readable(backup_dir: Path) -> bool:
    """Whether every file ``BackupAndRestore`` left in ``backup_dir`` is whole (an absent backup is fine)."""
    if not backup_dir.exists():
        return True
    import h5py

    try:
        for path in backup_dir.rglob("*"):
            if path.suffix == ".h5":
                with h5py.File(path, "r") as fh:
                    fh.visit(lambda name: None)
            elif path.suffix == ".json":
                json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def resume_epoch(backup_dir: Path) -> int:
    """The epoch ``BackupAndRestore`` resumes at (what its backup records; 0 without one)."""
    meta = backup_dir / "training_metadata.json"
    return int(json.loads(meta.read_text())["epoch"]) if meta.is_file() else 0


def finetune_model(
    model: Any,
    base: Any,
    spec: Any,
    train: Callable[[int], tuple[Any, int]],
    val: Any,
    cfg: FinetuneConfig,
    class_mode: str,
    num_classes: int,
    work_dir: Path,
    seed: int,
    fingerprint: str = "",
    *,
    fit_model: Any | None = None,
    progress: Reporter | None = None,
) -> dict[str, Any]:
    """Unfreeze, compile and fit ``model`` in place (resuming from ``work_dir`` if a killed run left state there).

    ``fit_model`` is what is fitted when it is not ``model`` itself: the tail path's
    :func:`tasks.models.full_model.tail_model`, which shares ``model``'s layers (``train`` and ``val`` then hold
    cut-point activations, not images), so fitting it trains ``model``.

    ``train(first_epoch)`` builds ``(repeating dataset, steps per epoch)`` starting at that epoch (a resumed fit
    continues the shuffle and augmentation sequence where the killed one stopped), ``val`` is a finite labelled
    dataset. Returns a summary;
    the model ends with the best weights (possibly the starting ones, "epoch 0"). ``progress`` gets one
    ``Step("finetune", epoch, cfg.epochs, "epoch")`` per finished epoch.
    """
    import keras

    keras.utils.set_random_seed(seed)
    trainable = set_trainable(model, base, spec, cfg)
    full_model, model = model, fit_model if fit_model is not None else model
    compile_for_finetune(model, cfg, class_mode, num_classes)
    work = FinetuneWork(Path(work_dir))
    backup_dir, log_file = work.keras_backup, work.epoch_log
    resumed = (work.state_file).is_file()
    if resumed and json.loads(work.state_file.read_text()).get("fingerprint") != fingerprint:
        resumed = False  # state left by a run with other params, head or index: start over
    if resumed and not backup_is_readable(backup_dir):
        resumed = False  # killed while Keras wrote its backup: never read a torn file, start over
    if not resumed:
        shutil.rmtree(work_dir, ignore_errors=True)
        val_loss, val_accuracy = model.evaluate(val, verbose=0)
        start_state(model, work, float(val_loss), float(val_accuracy), fingerprint)
    state = json.loads(work.state_file.read_text())
    done = state.get("finished") or state.get("stopped") or state["epochs_done"] >= cfg.epochs
    fit_seconds = 0.0
    if resumed and done:  # killed after training ended (e.g. while saving): the best weights are on disk
        _load_weights(model, work.best_weights)
        epochs_ran: list[int] = []
    else:
        first_epoch = resume_epoch(backup_dir) if resumed else 0
        dataset, steps = train(first_epoch)
        fit_start = time.perf_counter()
        history = model.fit(
            dataset,
            steps_per_epoch=steps,
            epochs=cfg.epochs,
            validation_data=val,
            shuffle=False,  # training_dataset reshuffles every epoch itself
            callbacks=[
                keras.callbacks.CSVLogger(str(log_file), append=True),
                resumable_early_stopping(work, cfg.patience, cfg.min_improvement),
                keras.callbacks.BackupAndRestore(str(backup_dir)),
                keras_epochs(progress, "finetune", cfg.epochs, first_epoch),
            ],
            verbose=0,
        )
        epochs_ran = list(history.epoch)
        fit_seconds = time.perf_counter() - fit_start
        state = json.loads(work.state_file.read_text())
    per_epoch = round(fit_seconds / len(epochs_ran), 3) if epochs_ran else None
    resumed_from = 0
    if resumed:  # the first epoch this fit ran, i.e. how many epochs the killed run had finished
        resumed_from = int(epochs_ran[0]) if epochs_ran else int(state["epochs_done"])
    return {
        "trainable_layers": trainable,
        "trainable_params": int(sum(int(np.prod(w.shape)) for w in full_model.trainable_weights)),
        "resumed_from_epoch": resumed_from,
        "state": state,
        "history": read_epoch_log(log_file),
        "seconds_per_epoch": per_epoch,
    }


def finetune_manifest(
    layout: Layout,
    cfg: FinetuneConfig,
    summary: dict[str, Any],
    history: list[dict[str, str]],
    seconds: float,
    *,
    path: str = "full",
    path_reason: str = "",
    cut: str | None = None,
) -> FinetuneManifest:
    """The stage's manifest from :func:`finetune_model`'s summary (or a skipped run's), with
    :func:`weights_decision`'s sentence."""
    state = summary["state"]
    tried = best_tried(history)
    best_epoch = int(state["best_epoch"])
    decision = weights_decision(
        skipped=cfg.epochs == 0,
        best_epoch=best_epoch,
        top_only_val_loss=state.get("top_only_val_loss"),
        val_loss=state.get("best_val_loss"),
        tried=tried,
        min_improvement=cfg.min_improvement,
        path=path,
        val_accuracy=(state.get("top_only_val_accuracy"), state.get("best_val_accuracy")),
    )
    return FinetuneManifest(
        model_file=layout.candidate_model.as_posix(),
        skipped=cfg.epochs == 0,
        epochs_run=int(state["epochs_done"]),
        best_epoch=best_epoch,
        resumed_from_epoch=int(summary["resumed_from_epoch"]),
        top_only_val_loss=state.get("top_only_val_loss"),
        top_only_val_accuracy=state.get("top_only_val_accuracy"),
        val_loss=state.get("best_val_loss"),
        val_accuracy=state.get("best_val_accuracy"),
        best_tried_epoch=tried[0] if tried else None,
        best_tried_val_loss=tried[1] if tried else None,
        kept="top-only" if best_epoch == 0 else "fine-tuned",
        decision=decision,
        trainable_layers=list(summary["trainable_layers"]),
        trainable_params=int(summary["trainable_params"]),
        seconds=round(seconds, 3),
        path=path,
        path_reason=path_reason,
        cut=cut,
        seconds_per_epoch=summary.get("seconds_per_epoch"),
    )
