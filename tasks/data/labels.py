"""Class modes and label encoding: the one rule that turns class ids into what Keras trains on.

A plain-numpy library (no TensorFlow, no OpenCV, no images): the input pipeline (``tasks.data.pipeline``), the heads
and the stages that train on cached features all read it here, so a stage that only needs labels does not
depend on the decoder or the resampler.

* :data:`CLASS_MODES`: the resolved class modes (``data.class_mode: auto`` resolves to one of them in the
  index stage and is recorded in ``classes.json``).
* :func:`encode_labels`: binary (float32 [N]), categorical (float32 one-hot [N, C]), sparse (int32 [N]), as
  ImageDataGenerator's class modes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLASS_MODES = ("binary", "categorical", "sparse")


def encode_labels(class_ids: Any, class_mode: str, num_classes: int) -> np.ndarray:
    """Class ids -> the labels Keras expects for ``class_mode`` (as ImageDataGenerator's class modes)."""
    if class_mode not in CLASS_MODES:
        raise ValueError(f"encode_labels: expected class_mode in {CLASS_MODES}, got {class_mode!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ValueError(f"encode_labels: expected num_classes >= 1, got {num_classes!r}")
    if class_mode == "binary" and num_classes != 2:
        raise ValueError(f"encode_labels: class_mode 'binary' needs num_classes == 2, got {num_classes!r}")
    ids = np.asarray(class_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"encode_labels: expected a 1-D array of integer class ids, got {ids!r}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(
            f"encode_labels: expected class ids in [0, {num_classes}), got values from {ids.min()} to {ids.max()}"
        )
    if class_mode == "binary":
        return ids.astype(np.float32)
    if class_mode == "sparse":
        return ids.astype(np.int32)
    out = np.zeros((ids.size, int(num_classes)), dtype=np.float32)
    out[np.arange(ids.size), ids] = 1.0
    return out
