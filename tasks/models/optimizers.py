"""Keras optimizers by name: the one table train_top and finetune build theirs from (``top.optimizer``,
``finetune.optimizer``)."""

from __future__ import annotations

from typing import Any


def make_optimizer(name: str, lr: float, momentum: float = 0.0) -> Any:
    """A fresh Keras optimizer from an explicit table (``adam``, ``sgd``, ``rmsprop``)."""
    import keras

    table = {
        "adam": lambda: keras.optimizers.Adam(learning_rate=lr),
        "sgd": lambda: keras.optimizers.SGD(learning_rate=lr, momentum=momentum),
        "rmsprop": lambda: keras.optimizers.RMSprop(learning_rate=lr, momentum=momentum),
    }
    if name not in table:
        raise ValueError(f"optimizer: expected one of {sorted(table)}, got {name!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected a positive number, got {lr!r}")
    return table[name]()
