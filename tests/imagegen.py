"""Tiny generated images for tests: learnable classes, every kind of bad file. Never downloads anything."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# Colour classes are learnable by a tiny model in a few epochs.
CLASS_COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 60, 200),
    "yellow": (220, 210, 40),
}


def coloured_image(colour: tuple[int, int, int], size: int = 40, seed: int = 0) -> Image.Image:
    """A noisy image dominated by ``colour``, with a random darker rectangle (so no two are identical)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255)
    y0, x0 = rng.integers(0, size // 2, 2)
    arr[y0 : y0 + size // 3, x0 : x0 + size // 3] *= 0.5
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def make_class_folders(
    root: Path,
    classes: dict[str, int] | list[str] = ("red", "blue"),
    per_class: int = 12,
    size: int = 40,
    fmt: str = "PNG",
    seed: int = 0,
) -> Path:
    """``root/<class>/<class>_<i>.<ext>`` with learnable colour images; returns ``root``."""
    counts = classes if isinstance(classes, dict) else {c: per_class for c in classes}
    ext = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "GIF": "gif", "WEBP": "webp"}[fmt]
    for ci, (name, n) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = CLASS_COLOURS.get(name, tuple(int(c) for c in np.random.default_rng(ci).integers(0, 255, 3)))
        for i in range(n):
            coloured_image(colour, size, seed=seed * 100_003 + ci * 10_007 + i).save(
                folder / f"{name}_{i}.{ext}", fmt
            )
    return root


def image_bytes(fmt: str = "PNG", size: int = 16, mode: str = "RGB", colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), colour if mode in ("RGB", "RGBA") else 128).save(buf, fmt)
    return buf.getvalue()
