"""Tiny workspaces for pipeline tests: a params file and generated class folders (no download, seconds to run)."""

from __future__ import annotations

from pathlib import Path

import yaml
from imagegen import make_class_folders

# A tiny, fast pipeline: random-weight MobileNetV2 0.35 at 32 px, one head, 2 + 1 epochs.
TINY_PARAMS = {
    "seed": 1,
    "data": {"root": "data/images", "split": {"train": 0.5, "val": 0.25, "test": 0.25}, "workers": 1},
    "image": {"size": [32, 32]},
    "augment": {"passes": 1, "horizontal_flip": True},
    "base": {"name": "mobilenet_v2", "weights": "none", "alpha": 0.35},
    "features": {"batch_size": 16},
    "top": {"heads": [{"name": "linear", "type": "linear"}], "epochs": 2, "batch_size": 16, "lr": 0.01},
    "finetune": {"epochs": 1, "unfreeze_blocks": 1, "batch_size": 8},
    "evaluate": {
        "batch_size": 16,
        "preview_images": 4,
        "min_accuracy": 0.0,
    },  # the first candidate is promoted
}


def make_workspace(root: Path, per_class: int = 12) -> Path:
    """``root/params.yaml`` (tiny params) and ``root/data/images/{red,blue}``."""
    make_class_folders(root / "data" / "images", ["red", "blue"], per_class=per_class, size=32)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    return root
