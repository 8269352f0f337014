"""The ONE image decoder (``decode_rgb``) and the ONE per-file check (``check_image_file``, index and predict).

``decode_rgb`` is used by index validation, the training input pipeline and predict, so all three see the same
upright RGB uint8 pixels:

* JPEG (incl. grayscale and CMYK, and MPO camera files: their first picture), with optional DCT scaling
  (``ratio`` 1/2/4/8, a cheap downscale while decoding);
* PNG (8 and 16 bit, grey, grey+alpha, palette, RGBA; 16-bit is scaled to 8 bit; alpha is dropped);
* BMP (24/32-bit and 8-bit grey), GIF (first frame), still WebP;
* EXIF orientation 1-8 applied after decoding (the value comes from the index, or :func:`exif_orientation`).

What TensorFlow 2.21 cannot decode correctly, :func:`inspect_image` rejects with a reason before it reaches
training: palette/RLE BMPs (TF ignores the colour table and the compression and returns wrong pixels without an
error), 1-bit BMPs, animated WebP (TF's WebP decoder cannot read it and crashed the process in our probe), TIFF and
other formats. Sizes are checked from the header against ``data.max_pixels`` before anything is decoded.

TensorFlow is imported lazily: importing this module costs nothing until a decode happens.
"""

from __future__ import annotations

import hashlib
import io
import numbers
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from tasks.errors import ImageRejected  # noqa: F401  (raised here; defined with the other domain errors)

# Pillow format name -> the name stored in the index (MPO is a JPEG whose first picture TF decodes).
ACCEPTED_FORMATS: dict[str, str] = {
    "JPEG": "JPEG",
    "MPO": "JPEG",
    "PNG": "PNG",
    "BMP": "BMP",
    "GIF": "GIF",
    "WEBP": "WEBP",
}
JPEG_RATIOS = (1, 2, 4, 8)
# No encoded image within data.max_pixels is larger than this many bytes per pixel (16-bit RGBA PNG stored raw is
# 8, an MPO holds two pictures) plus room for metadata (EXIF, ICC, XMP, thumbnails): a bigger file is rejected
# before it is read, so a multi-gigabyte file named .jpg never lands in memory.
MAX_BYTES_PER_PIXEL = 16
MAX_METADATA_BYTES = 8 * 1024 * 1024
EXIF_ORIENTATION_TAG = 0x0112
_BMP_MODES = ("RGB", "RGBA", "L")  # what TF's BMP decoder returns correctly (24/32-bit, 8-bit grey)


@dataclass(frozen=True)
class ImageInfo:
    """What the index stores about one valid image. ``width``/``height`` are after EXIF orientation."""

    format: str
    width: int
    height: int
    orientation: int
    mode: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- decode
def decode_rgb(contents: Any, orientation: Any = 1, ratio: Any = 1, *, jpeg: bool | None = None) -> Any:
    """Decode encoded image bytes into an upright ``tf.Tensor`` uint8 ``[H, W, 3]``.

    ``contents``: a scalar string tensor or ``bytes``. ``orientation``: EXIF orientation 1-8 (a Python int or a
    scalar integer tensor; values outside 1-8 mean "as stored"). ``ratio``: JPEG DCT downscale in {1, 2, 4, 8}
    (Python int or scalar tensor), ignored for other formats. ``jpeg=True``: the bytes are known to be a JPEG
    (the index says so), so the format is not sniffed (a graph without the branch: 4% of the input pipeline's
    CPU); bytes that are not a JPEG after all still decode right (TF's DecodeJpeg kernel reads the real format,
    tested). Works eagerly and inside ``tf.data`` maps.
    """
    import tensorflow as tf

    if isinstance(ratio, numbers.Integral) and not isinstance(ratio, bool) and int(ratio) not in JPEG_RATIOS:
        raise ValueError(f"decode_rgb: expected ratio in {JPEG_RATIOS}, got {ratio!r}")
    if isinstance(orientation, bool) or not (
        isinstance(orientation, numbers.Integral) or tf.is_tensor(orientation)
    ):
        raise ValueError(f"decode_rgb: expected an int or integer tensor orientation, got {orientation!r}")
    if jpeg not in (None, True):
        raise ValueError(f"decode_rgb: expected jpeg to be True or None, got {jpeg!r}")
    contents = tf.convert_to_tensor(contents, dtype=tf.string)
    if jpeg:
        image = _decode_jpeg(contents, ratio)
    else:
        image = tf.cond(
            tf.io.is_jpeg(contents),
            lambda: _decode_jpeg(contents, ratio),
            lambda: _decode_other(contents),
        )
    image = tf.ensure_shape(image, [None, None, 3])
    return _orient(image, orientation)


def _decode_jpeg(contents: Any, ratio: Any) -> Any:
    import tensorflow as tf

    if not tf.is_tensor(ratio):
        return tf.io.decode_jpeg(contents, channels=3, ratio=int(ratio))
    ratio = tf.cast(ratio, tf.int32)
    tf.debugging.assert_equal(
        tf.reduce_any(tf.equal(ratio, JPEG_RATIOS)), True, message="decode_rgb: ratio must be 1, 2, 4 or 8"
    )
    index = tf.argmax(tf.cast(tf.equal(tf.constant(JPEG_RATIOS), ratio), tf.int32), output_type=tf.int32)
    branches = [lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r) for r in JPEG_RATIOS]
    return tf.switch_case(index, branches)


def _decode_other(contents: Any) -> Any:
    import tensorflow as tf

    # PNG (8/16-bit -> uint8), GIF (first frame), BMP, WebP; channels=3 turns grey/palette/alpha into RGB.
    return tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)


# EXIF orientation -> (transpose, mirror left-right, mirror top-bottom), applied in that order: Pillow's
# ``ImageOps.exif_transpose``. The one table both the static and the tensor path below read.
_ORIENTATIONS: dict[int, tuple[bool, bool, bool]] = {
    1: (False, False, False),
    2: (False, True, False),
    3: (False, True, True),
    4: (False, False, True),
    5: (True, False, False),
    6: (True, True, False),
    7: (True, True, True),
    8: (True, False, True),
}


def _orient(image: Any, orientation: Any) -> Any:
    """Upright ``image`` for EXIF ``orientation`` (a Python int or a scalar tensor; outside 1-8: as stored).

    A tensor orientation takes no switch over the 8 values (a branch function per image cost 0.11 ms and traced
    slowly): one transpose and one reverse with arguments looked up in ``_ORIENTATIONS``; identity arguments
    leave the image as it is (tests: every value vs Pillow, static and as a tensor)."""
    import tensorflow as tf

    if not tf.is_tensor(orientation):
        transpose, flip_lr, flip_ud = _ORIENTATIONS.get(int(orientation), _ORIENTATIONS[1])
        image = tf.transpose(image, [1, 0, 2]) if transpose else image
        axes = [axis for axis, flip in ((1, flip_lr), (0, flip_ud)) if flip]
        return tf.reverse(image, axes) if axes else image
    table = tf.constant([_ORIENTATIONS[o] for o in range(1, 9)])
    value = tf.cast(orientation, tf.int32)
    transpose, flip_lr, flip_ud = tf.unstack(table[tf.where((value >= 1) & (value <= 8), value - 1, 0)])
    perm = tf.where(transpose, tf.constant([1, 0, 2]), tf.constant([0, 1, 2]))
    axes = tf.boolean_mask(tf.constant([1, 0]), tf.stack([flip_lr, flip_ud]))
    return tf.ensure_shape(tf.reverse(tf.transpose(image, perm), axes), [None, None, 3])


# ------------------------------------------------------------------------------------------------- header
def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened Pillow image; 1 when absent or invalid."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not reject an otherwise good image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _looks_like_text(contents: bytes) -> bool:
    head = contents[:512].lstrip()
    if head[:1] == b"<":
        return True
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(text) and sum(ch.isprintable() or ch.isspace() for ch in text) / len(text) > 0.95


def read_header(contents: bytes, max_pixels: int) -> tuple[str, int, int, int, str]:
    """Check what the header declares, without decoding pixels.

    Returns ``(format, stored_width, stored_height, orientation, mode)`` or raises :class:`ImageRejected`.
    """
    if max_pixels <= 0:
        raise ValueError(f"read_header: expected max_pixels > 0, got {max_pixels!r}")
    if not contents:
        raise ImageRejected("empty file (0 bytes)", "empty")
    try:
        # (no warnings.catch_warnings here: it is not thread-safe; Pillow's DecompressionBombWarning for images
        # above its own limit just shows once, and such images exceed the default data.max_pixels anyway)
        image = Image.open(io.BytesIO(contents))
    except Image.DecompressionBombError as err:  # Pillow's own guard (2 x Image.MAX_IMAGE_PIXELS) fired first
        found = re.search(r"\((\d+) pixels\)", str(err))
        declared = f"{found.group(1)} pixels" if found else "too many pixels"
        raise ImageRejected(
            f"declared size of {declared} exceeds data.max_pixels={max_pixels} or Pillow's limit"
            " (decompression-bomb guard)",
            "too_large",
        ) from None
    except UnidentifiedImageError:
        if _looks_like_text(contents):
            raise ImageRejected("text or HTML, not an image", "not_image") from None
        raise ImageRejected("not a recognised image format", "not_image") from None
    except Exception as err:  # Pillow raises many types on broken headers
        raise ImageRejected(f"unreadable image header ({type(err).__name__}: {err})", "not_image") from None
    with image:
        fmt = image.format or "unknown"
        if fmt not in ACCEPTED_FORMATS:
            raise ImageRejected(
                f"unsupported format {fmt} (accepted: JPEG, PNG, BMP, GIF, WEBP)", "unsupported"
            )
        width, height = image.size
        frames = int(getattr(image, "n_frames", 1) or 1)
        pixels = width * height
        if width < 1 or height < 1:
            raise ImageRejected(f"invalid declared size {width}x{height}", "not_image")
        if pixels > max_pixels:
            raise ImageRejected(
                f"declared size {width}x{height} = {pixels} pixels exceeds data.max_pixels={max_pixels}"
                " (decompression-bomb guard)",
                "too_large",
            )
        if fmt == "GIF" and frames > 1 and pixels * frames > max_pixels:
            raise ImageRejected(
                f"animated GIF of {frames} frames x {width}x{height} exceeds data.max_pixels={max_pixels}"
                " (the decoder reads every frame)",
                "too_large",
            )
        if fmt == "WEBP" and frames > 1:
            raise ImageRejected(
                "animated WebP: TensorFlow's WebP decoder cannot read animations", "unsupported"
            )
        if fmt == "BMP":
            compression = image.info.get("compression", 0)
            if image.mode not in _BMP_MODES or compression not in (0, 3):
                raise ImageRejected(
                    f"BMP mode {image.mode} compression {compression}: TensorFlow's BMP decoder only reads "
                    "uncompressed 24/32-bit colour and 8-bit grey BMPs",
                    "unsupported",
                )
        return ACCEPTED_FORMATS[fmt], width, height, exif_orientation(image), image.mode


# --------------------------------------------------------------------------------------------- validation
_TF_NOISE = ("Graph execution error", "Detected at node", "File ", "[[")


def _short_tf_error(err: Exception) -> str:
    """The one informative line of a TF error (e.g. ``Invalid PNG data, size 300``), without graph noise."""
    message = getattr(err, "message", None) or str(err)
    lines = [line.strip() for line in message.splitlines()]
    useful = [line for line in lines if line and not line.startswith(_TF_NOISE)]
    text = useful[-1] if useful else (lines[0] if lines else type(err).__name__)
    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[\[.*$|\s*\[Op:[^\]]*\]\s*$", "", text).strip()[:200]


def decoded_shape(contents: bytes) -> tuple[int, int]:
    """(height, width) as stored, from a real ``decode_rgb(contents)`` (eager: one op dispatch, no retracing).

    Orientation is not applied here: it is a rotation/flip that cannot fail, and its effect on the size is known.
    Raises :class:`ImageRejected` when TensorFlow cannot decode the bytes.
    """
    import tensorflow as tf

    try:
        height, width, _ = decode_rgb(contents).shape
    except (
        tf.errors.OpError
    ) as err:  # InvalidArgument, DataLoss, ResourceExhausted...: never fatal for the run
        raise ImageRejected(
            f"TensorFlow cannot decode it (corrupt or truncated?): {_short_tf_error(err)}", "undecodable"
        ) from None
    return int(height), int(width)


def inspect_image(contents: bytes, max_pixels: int) -> ImageInfo:
    """Validate one file's bytes the way the index does: header first (cheap), then the REAL decode.

    Raises :class:`ImageRejected` with a one-line reason for anything that must not reach training.
    """
    fmt, width, height, orientation, mode = read_header(contents, max_pixels)
    got_h, got_w = decoded_shape(contents)
    if (got_w, got_h) != (width, height):
        raise ImageRejected(
            f"decoded size {got_w}x{got_h} differs from the header's {width}x{height} (corrupt file?)",
            "undecodable",
        )
    if orientation in (5, 6, 7, 8):  # transposing orientations: the upright image is height x width
        width, height = height, width
    return ImageInfo(format=fmt, width=width, height=height, orientation=orientation, mode=mode)


def max_file_bytes(max_pixels: int) -> int:
    """The largest file that can hold an image of at most ``max_pixels`` pixels (see MAX_BYTES_PER_PIXEL)."""
    return max_pixels * MAX_BYTES_PER_PIXEL + MAX_METADATA_BYTES


@dataclass(frozen=True)
class CheckedImage:
    """A file that passed :func:`check_image_file`: its content hash, size in bytes and header facts."""

    path: Path
    sha256: str
    size: int
    info: ImageInfo


def check_image_file(path: str | Path, *, max_pixels: int) -> CheckedImage:
    """The ONE per-file check, shared by the index stage and predict: a file larger than any image within
    ``max_pixels`` could be is rejected from its size without being read; then its bytes are hashed and
    :func:`inspect_image` runs (header against ``max_pixels``, the decompression-bomb guard, then the real decode).

    Raises :class:`ImageRejected` (``kind``, ``reason``) for a file that must not reach a model, ``OSError`` when it
    cannot be read.
    """
    path = Path(path)
    size = path.stat().st_size
    limit = max_file_bytes(max_pixels)
    if size > limit:
        raise ImageRejected(
            f"file of {size} bytes is larger than an image within data.max_pixels={max_pixels} can be "
            f"({limit} bytes); not read",
            "too_large",
        )
    contents = path.read_bytes()
    digest = hashlib.sha256(contents).hexdigest()
    return CheckedImage(path, digest, len(contents), inspect_image(contents, max_pixels))


def load_rgb(path: str | Path, ratio: int = 1) -> Any:
    """Read one file and decode it upright (orientation from its EXIF): what predict uses for a loose file."""
    contents = Path(path).read_bytes()
    orientation = 1
    try:
        with Image.open(io.BytesIO(contents)) as image:
            orientation = exif_orientation(image)
    except Exception:
        orientation = 1  # the decoder reports a real problem itself
    return decode_rgb(contents, orientation, ratio)
