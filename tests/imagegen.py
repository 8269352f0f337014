"""Tiny generated images for tests: learnable classes, every kind of bad file. Never downloads anything."""

from __future__ import annotations

import io
import struct
import zlib
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


# ---- every kind of awkward or bad file (index / reliability tests); all tiny, made in memory.
def noisy_array(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """Random RGB uint8 pixels (incompressible, so truncating the encoded file really cuts pixel data)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def exif_rotated_jpeg(orientation: int = 6, height: int = 24, width: int = 32, seed: int = 0) -> bytes:
    """A JPEG stored ``width`` x ``height`` whose EXIF says to display it with ``orientation`` (1-8)."""
    image = Image.fromarray(noisy_array(height, width, seed))
    exif = image.getexif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif, quality=95)


def _png(width: int, height: int, bit_depth: int, raw_scanlines: bytes) -> bytes:
    """A minimal RGB PNG written by hand (IHDR, one IDAT of ``raw_scanlines``, IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw_scanlines))
        + chunk(b"IEND", b"")
    )


def png16_bytes(height: int = 12, width: int = 10, seed: int = 0) -> bytes:
    """A 16-bit-per-channel RGB PNG (written with raw zlib: Pillow cannot write 16-bit RGB)."""
    arr = np.random.default_rng(seed).integers(0, 65536, (height, width, 3)).astype(">u2")
    return _png(width, height, 16, b"".join(b"\x00" + row.tobytes() for row in arr))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` (a decompression bomb; never decode it)."""
    return _png(width, height, 8, b"\x00" * 64)


def animated_gif_bytes(size: int = 16) -> bytes:
    frames = [Image.new("RGB", (size, size), c).convert("P") for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def bad_image_files() -> dict[str, bytes]:
    """name -> bytes of files that must be REJECTED by the index (each for its own reason)."""
    jpeg = encode(Image.fromarray(noisy_array(48, 64)), "JPEG", quality=90)
    png = encode(Image.fromarray(noisy_array(48, 64)), "PNG")
    return {
        "zero_bytes.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "text.jpg": b"just some text, not an image\n" * 3,
        "page.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
        "bomb.png": bomb_png(),
        "palette.bmp": encode(Image.fromarray(noisy_array()).convert("P"), "BMP"),
        "anim.webp": encode(
            Image.fromarray(noisy_array()), "WEBP", save_all=True, append_images=[Image.new("RGB", (32, 24))]
        ),
        "image.tiff": encode(Image.fromarray(noisy_array()), "TIFF"),
    }


def good_odd_image_files() -> dict[str, bytes]:
    """name -> bytes of unusual files that must be ACCEPTED (and decode to RGB)."""
    rgb = Image.fromarray(noisy_array())
    return {
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "grey.jpg": encode(rgb.convert("L"), "JPEG"),
        "png16.png": png16_bytes(),
        "palette_transparent.png": encode(rgb.convert("P"), "PNG", transparency=0),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "grey_alpha.png": encode(rgb.convert("LA"), "PNG"),
        "animated.gif": animated_gif_bytes(),
        "one_pixel.png": encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"),
        "still.webp": encode(rgb, "WEBP", lossless=True),
        "plain.bmp": encode(rgb, "BMP"),
        "grey.bmp": encode(rgb.convert("L"), "BMP"),
        "rotated.jpg": exif_rotated_jpeg(6),
    }
