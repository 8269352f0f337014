"""Augmentation policies with ImageDataGenerator's vocabulary and semantics, applied as ONE resampling per image.

A policy (:class:`AugmentPolicy`) is a frozen value built from ``params.augment``; its ``short_hash`` names it in
view ids (``"<hash>:<pass>"``, ``"clean"`` for the un-augmented view) and in the feature cache.

Semantics follow Keras' legacy ``ImageDataGenerator.get_random_transform`` / ``apply_transform`` (resize to the
target size first, then the affine transform with scipy's fill modes, then channel shift, flips, brightness):

* ``rotation_range`` degrees, uniform in [-r, r]; ``shear_range`` degrees, uniform in [-s, s];
* ``width_shift_range`` / ``height_shift_range``: a fraction of the target width / height, or pixels when >= 1;
* ``zoom_range`` z -> [1 - z, 1 + z] (or a [low, high] pair), independent zx and zy; > 1 zooms out;
* ``horizontal_flip`` / ``vertical_flip`` with probability 1/2 each;
* ``fill_mode`` constant (``cval``) / nearest / reflect / wrap exactly as scipy.ndimage treats them (``wrap`` has
  period size - 1 and ``constant`` does not interpolate into the border, as in ImageDataGenerator);
* ``channel_shift_range``: one intensity added to every channel, clipped to the image's min/max;
* ``brightness_range``: a factor, result clipped to [0, 255].

Deviations from the legacy code, on purpose: the width shift moves along the width and the height shift along the
height, and the transform is centred on the true image centre (legacy Keras swaps both for non-square images;
for square images and equal shift ranges the two agree). Brightness is not rounded to uint8. ``rescale`` is part
of the policy's hash but is applied by the input pipeline (``rescale=``), to every view alike.

Resize and geometry are composed: every output pixel is mapped target -> transformed target coordinates (fill
mode applied there, exactly as if the image had been resized first) -> source coordinates, and the source is
sampled once (bilinear or nearest). Randomness is stateless, keyed per image by (sha256, pass, policy seed), so a
view does not depend on batch, order, worker count or machine. TensorFlow is imported lazily.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import asdict, dataclass, replace
from typing import Any

from tasks.config import AUGMENT_GRID_KEYS, AugmentConfig

CLEAN_VIEW = "clean"
FILL_MODES = ("constant", "nearest", "reflect", "wrap")
INTERPOLATIONS = ("bilinear", "nearest")
# Fixed slots of the per-image uniform draw: adding a parameter never changes the others' values.
_EDGE_EPS = 1e-3
_SLOTS = ("theta", "tx", "ty", "shear", "zx", "zy", "flip_h", "flip_v", "channel", "brightness")


@dataclass(frozen=True)
class AugmentPolicy:
    """One augmentation policy: ImageDataGenerator's parameters plus the seed of its random draws."""

    name: str = "default"
    seed: int = 0
    rotation_range: float = 0.0
    width_shift_range: float = 0.0
    height_shift_range: float = 0.0
    shear_range: float = 0.0
    zoom_range: tuple[float, float] = (1.0, 1.0)
    channel_shift_range: float = 0.0
    brightness_range: tuple[float, float] | None = None
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: str = "nearest"
    cval: float = 0.0
    rescale: float | None = None

    def __post_init__(self) -> None:
        if self.fill_mode not in FILL_MODES:
            raise ValueError(f"AugmentPolicy: expected fill_mode in {FILL_MODES}, got {self.fill_mode!r}")
        if len(self.zoom_range) != 2 or not 0 < self.zoom_range[0] <= self.zoom_range[1]:
            raise ValueError(f"AugmentPolicy: expected zoom_range (low, high) with 0 < low <= high, got {self.zoom_range!r}")
        for key in ("rotation_range", "width_shift_range", "height_shift_range", "shear_range", "channel_shift_range"):
            if getattr(self, key) < 0:
                raise ValueError(f"AugmentPolicy: expected {key} >= 0, got {getattr(self, key)!r}")

    def fields(self) -> dict[str, Any]:
        """Everything that changes what a view looks like (all fields but ``name``), JSON-able."""
        out = asdict(self)
        out.pop("name")
        out["zoom_range"] = [float(v) for v in self.zoom_range]
        if self.brightness_range is not None:
            out["brightness_range"] = [float(v) for v in self.brightness_range]
        for key in ("rotation_range", "width_shift_range", "height_shift_range", "shear_range"):
            out[key] = float(out[key])
        out["channel_shift_range"] = float(out["channel_shift_range"])
        out["cval"] = float(out["cval"])
        out["rescale"] = None if self.rescale is None else float(self.rescale)
        return out

    @property
    def short_hash(self) -> str:
        """12 hex chars of sha256 over the canonical JSON of :meth:`fields`: stable across runs and machines."""
        blob = json.dumps(self.fields(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def is_geometric(self) -> bool:
        return bool(
            self.rotation_range
            or self.width_shift_range
            or self.height_shift_range
            or self.shear_range
            or self.zoom_range != (1.0, 1.0)
            or self.horizontal_flip
            or self.vertical_flip
        )

    def describe(self) -> str:
        """A short human caption: the non-default parameters."""
        default = AugmentPolicy()
        parts = [
            f"{k}={v}"
            for k, v in asdict(self).items()
            if k not in ("name", "seed") and v != getattr(default, k)
        ]
        return ", ".join(parts) or "no augmentation"


def _zoom_pair(value: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(value, int | float):
        return (1.0 - float(value), 1.0 + float(value))
    return (float(value[0]), float(value[1]))


def policy_from_config(cfg: AugmentConfig, name: str = "default") -> AugmentPolicy:
    """The policy described by ``params.augment`` (its grid, if any, is ignored: see :func:`expand_grid`)."""
    if not isinstance(cfg, AugmentConfig):
        raise TypeError(f"policy_from_config: expected an AugmentConfig, got {type(cfg).__name__}: {cfg!r}")
    return AugmentPolicy(
        name=name,
        seed=cfg.seed,
        rotation_range=float(cfg.rotation_range),
        width_shift_range=float(cfg.width_shift_range),
        height_shift_range=float(cfg.height_shift_range),
        shear_range=float(cfg.shear_range),
        zoom_range=_zoom_pair(cfg.zoom_range),
        channel_shift_range=float(cfg.channel_shift_range),
        brightness_range=None if cfg.brightness_range is None else tuple(map(float, cfg.brightness_range)),
        horizontal_flip=bool(cfg.horizontal_flip),
        vertical_flip=bool(cfg.vertical_flip),
        fill_mode=cfg.fill_mode,
        cval=float(cfg.cval),
        rescale=None if cfg.rescale is None else float(cfg.rescale),
    )


def _grid_value_label(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "[" + ",".join(_grid_value_label(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def expand_grid(cfg: AugmentConfig, seed: int) -> list[AugmentPolicy]:
    """Expand ``cfg.grid`` (parameter -> list of values) into named policies over ``cfg``'s other values.

    The full product is enumerated in a fixed order (grid keys in ``AUGMENT_GRID_KEYS`` order, values as listed);
    when ``cfg.grid_samples`` is k > 0 and below the product's size, k of them are drawn with ``random.Random(seed)``
    and kept in product order. No grid: a one-element list with :func:`policy_from_config`.
    """
    if not isinstance(cfg, AugmentConfig):
        raise TypeError(f"expand_grid: expected an AugmentConfig, got {type(cfg).__name__}: {cfg!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"expand_grid: expected an integer seed, got {seed!r}")
    if not cfg.grid:
        return [policy_from_config(cfg)]
    keys = [k for k in AUGMENT_GRID_KEYS if k in cfg.grid]
    combos = list(itertools.product(*(cfg.grid[k] for k in keys)))
    chosen = range(len(combos))
    if 0 < cfg.grid_samples < len(combos):
        chosen = sorted(random.Random(seed).sample(range(len(combos)), cfg.grid_samples))
    base = cfg.model_dump(exclude={"grid", "grid_samples"})
    policies = []
    for i in chosen:
        update = dict(zip(keys, combos[i], strict=True))
        one = AugmentConfig.model_validate({**base, **{k: list(v) if isinstance(v, tuple) else v for k, v in update.items()}})
        name = ",".join(f"{k}={_grid_value_label(v)}" for k, v in update.items())
        policies.append(policy_from_config(one, name=name))
    return policies


def view_id(policy: AugmentPolicy | None, pass_number: int) -> str:
    """``"clean"`` for the un-augmented view, else ``"<policy hash>:<pass>"``."""
    if isinstance(pass_number, bool) or not isinstance(pass_number, int) or pass_number < 0:
        raise ValueError(f"view_id: expected a pass number >= 0, got {pass_number!r}")
    if policy is None:
        return CLEAN_VIEW
    if not isinstance(policy, AugmentPolicy):
        raise TypeError(f"view_id: expected an AugmentPolicy or None, got {type(policy).__name__}: {policy!r}")
    return f"{policy.short_hash}:{pass_number}"


def image_key(sha256: str, policy_seed: int, pass_number: int | None = None) -> tuple[int, int]:
    """The stateless RNG key of one image's view: two int32-range integers from sha256(sha, seed[, pass]).

    With ``pass_number=None`` the key is the training-time base key; the epoch is folded in inside the graph.
    """
    text = f"{sha256}|{int(policy_seed)}" + ("" if pass_number is None else f"|{int(pass_number)}")
    digest = hashlib.sha256(text.encode()).digest()
    return (
        int.from_bytes(digest[:4], "little") & 0x7FFFFFFF,
        int.from_bytes(digest[4:8], "little") & 0x7FFFFFFF,
    )


def with_name(policy: AugmentPolicy, name: str) -> AugmentPolicy:
    return replace(policy, name=name)


# ------------------------------------------------------------------------------------------ TF: parameters
def draw_parameters(policy: AugmentPolicy, key: Any, image_size: tuple[int, int]) -> dict[str, Any]:
    """ImageDataGenerator's ``get_random_transform`` from a stateless key (int32/int64 [2]); TF scalars.

    Shifts are in target pixels: ``tx`` along the width (x), ``ty`` along the height (y).
    """
    import tensorflow as tf

    height, width = image_size
    u = tf.random.stateless_uniform([len(_SLOTS)], seed=tf.cast(key, tf.int64), dtype=tf.float32)
    slot = {name: u[i] for i, name in enumerate(_SLOTS)}

    def sym(value: float, name: str) -> Any:
        return (2.0 * slot[name] - 1.0) * float(value)

    def shift(value: float, size: int, name: str) -> Any:
        if not value:
            return tf.constant(0.0)
        return sym(value, name) * (float(size) if value < 1 else 1.0)

    low, high = policy.zoom_range
    zoom_x = low + (high - low) * slot["zx"] if (low, high) != (1.0, 1.0) else tf.constant(1.0)
    zoom_y = low + (high - low) * slot["zy"] if (low, high) != (1.0, 1.0) else tf.constant(1.0)
    brightness = None
    if policy.brightness_range is not None:
        b_low, b_high = policy.brightness_range
        brightness = b_low + (b_high - b_low) * slot["brightness"]
    return {
        "theta": sym(policy.rotation_range, "theta"),
        "tx": shift(policy.width_shift_range, width, "tx"),
        "ty": shift(policy.height_shift_range, height, "ty"),
        "shear": sym(policy.shear_range, "shear"),
        "zx": zoom_x,
        "zy": zoom_y,
        "flip_h": (slot["flip_h"] < 0.5) if policy.horizontal_flip else tf.constant(False),
        "flip_v": (slot["flip_v"] < 0.5) if policy.vertical_flip else tf.constant(False),
        "channel": sym(policy.channel_shift_range, "channel") if policy.channel_shift_range else None,
        "brightness": brightness,
    }


def transform_matrix(parameters: dict[str, Any], image_size: tuple[int, int]) -> Any:
    """The 3x3 map output (x, y, 1) -> input (x, y, 1) in target pixel coordinates (float32).

    As ``apply_affine_transform``: M = R(theta) T(tx, ty) S(shear) Z(zx, zy) about the image centre, with
    ImageDataGenerator's flips (applied to the output) composed in.
    """
    import tensorflow as tf

    height, width = image_size
    deg = tf.constant(3.141592653589793 / 180.0)
    theta = tf.cast(parameters.get("theta", 0.0), tf.float32) * deg
    shear = tf.cast(parameters.get("shear", 0.0), tf.float32) * deg
    tx = tf.cast(parameters.get("tx", 0.0), tf.float32)
    ty = tf.cast(parameters.get("ty", 0.0), tf.float32)
    zx = tf.cast(parameters.get("zx", 1.0), tf.float32)
    zy = tf.cast(parameters.get("zy", 1.0), tf.float32)
    one, zero = tf.constant(1.0), tf.constant(0.0)

    def mat(rows: list[list[Any]]) -> Any:
        return tf.stack([tf.stack([tf.cast(v, tf.float32) for v in row]) for row in rows])

    cos, sin = tf.cos(theta), tf.sin(theta)
    rotation = mat([[cos, -sin, zero], [sin, cos, zero], [zero, zero, one]])
    shift = mat([[one, zero, tx], [zero, one, ty], [zero, zero, one]])
    shear_m = mat([[one, -tf.sin(shear), zero], [zero, tf.cos(shear), zero], [zero, zero, one]])
    zoom = mat([[zx, zero, zero], [zero, zy, zero], [zero, zero, one]])
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    offset = mat([[one, zero, cx], [zero, one, cy], [zero, zero, one]])
    reset = mat([[one, zero, -cx], [zero, one, -cy], [zero, zero, one]])
    flip_h = tf.cast(parameters.get("flip_h", False), tf.float32)
    flip_v = tf.cast(parameters.get("flip_v", False), tf.float32)
    # output flips: x -> (W - 1) - x when flipped, i.e. x -> s x + (1 - s)/2 (W - 1) with s = 1 - 2 flip
    sx, sy = 1.0 - 2.0 * flip_h, 1.0 - 2.0 * flip_v
    flips = mat([[sx, zero, flip_h * (width - 1)], [zero, sy, flip_v * (height - 1)], [zero, zero, one]])
    return offset @ rotation @ shift @ shear_m @ zoom @ reset @ flips


def _snap(coord: Any) -> Any:
    """Coordinates within float32 round-off of a whole pixel become that pixel (edges are decided exactly)."""
    import tensorflow as tf

    whole = tf.round(coord)
    return tf.where(tf.abs(coord - whole) < _EDGE_EPS, whole, coord)


def _fold(coord: Any, size: int, fill_mode: str) -> Any:
    """scipy.ndimage's boundary rule for one target axis (constant is handled by a mask)."""
    import tensorflow as tf

    last = float(size - 1)
    if fill_mode == "reflect":  # half-sample symmetric: d c b a | a b c d | d c b a
        period = 2.0 * size
        y = tf.math.floormod(coord + 0.5, period)
        y = tf.where(y > size, period - y, y)
        return tf.clip_by_value(y - 0.5, 0.0, last)
    if fill_mode == "wrap" and size > 1:  # scipy's 'wrap': period size - 1 (first and last samples overlap)
        below = coord + last * (tf.floor(-coord / last) + 1.0)  # as scipy: -last maps to last, not 0
        above = coord - last * tf.floor(coord / last)
        return tf.clip_by_value(tf.where(coord < 0.0, below, tf.where(coord > last, above, coord)), 0.0, last)
    return tf.clip_by_value(coord, 0.0, last)  # nearest (and constant, masked by the caller)


def warp(
    image: Any,
    matrix: Any,
    *,
    image_size: tuple[int, int],
    source_size: Any = None,
    ratio: Any = 1,
    fill_mode: str = "nearest",
    cval: float = 0.0,
    interpolation: str = "bilinear",
) -> Any:
    """Resample ``image`` (uint8/float [h, w, 3]) ONCE into float32 ``image_size`` under ``matrix``.

    ``matrix`` (3x3, or None for a plain resize) maps output target pixels to input target pixels as if the
    image had first been resized to ``image_size``; the fill mode applies in that resized frame. ``source_size``
    (height, width) is the full-resolution size the decoded ``image`` was reduced from by JPEG DCT ``ratio``
    (None: the decoded size, ratio 1), so DCT-scaled decoding does not move the geometry.
    """
    import tensorflow as tf

    if fill_mode not in FILL_MODES:
        raise ValueError(f"warp: expected fill_mode in {FILL_MODES}, got {fill_mode!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"warp: expected interpolation in {INTERPOLATIONS}, got {interpolation!r}")
    out_h, out_w = image_size
    shape = tf.shape(image)
    dec_h, dec_w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    ratio_f = tf.cast(ratio, tf.float32)
    if source_size is None:
        full_h, full_w = dec_h * ratio_f, dec_w * ratio_f
    else:
        full_h = tf.cast(source_size[0], tf.float32)
        full_w = tf.cast(source_size[1], tf.float32)
    xs = tf.range(out_w, dtype=tf.float32)[None, :]
    ys = tf.range(out_h, dtype=tf.float32)[:, None]
    valid = None
    if matrix is not None:
        m = tf.cast(matrix, tf.float32)
        xt = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
        yt = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        if fill_mode in ("constant", "wrap"):  # float32 round-off: a 90 degree rotation lands at -1e-7, not 0
            xt, yt = _snap(xt), _snap(yt)
        if fill_mode == "constant":
            valid = (xt >= 0.0) & (xt <= out_w - 1.0) & (yt >= 0.0) & (yt <= out_h - 1.0)
        xt = _fold(xt, out_w, fill_mode)
        yt = _fold(yt, out_h, fill_mode)
    else:
        xt, yt = xs + tf.zeros_like(ys), ys + tf.zeros_like(xs)
    # target pixel centre -> full-resolution pixel centre -> decoded (DCT-reduced) pixel centre
    xsrc = (xt + 0.5) * (full_w / (ratio_f * out_w)) - 0.5
    ysrc = (yt + 0.5) * (full_h / (ratio_f * out_h)) - 0.5
    xsrc = tf.clip_by_value(xsrc, 0.0, dec_w - 1.0)
    ysrc = tf.clip_by_value(ysrc, 0.0, dec_h - 1.0)
    flat = tf.reshape(image, [-1, 3])
    width_i = shape[1]
    if interpolation == "nearest":
        index = tf.cast(tf.round(ysrc), tf.int32) * width_i + tf.cast(tf.round(xsrc), tf.int32)
        out = tf.cast(tf.gather(flat, index), tf.float32)
    else:
        x0f, y0f = tf.floor(xsrc), tf.floor(ysrc)
        wx, wy = (xsrc - x0f)[..., None], (ysrc - y0f)[..., None]
        x0, y0 = tf.cast(x0f, tf.int32), tf.cast(y0f, tf.int32)
        x1 = tf.minimum(x0 + 1, width_i - 1)
        y1 = tf.minimum(y0 + 1, shape[0] - 1)
        row0, row1 = y0 * width_i, y1 * width_i
        index = tf.stack([row0 + x0, row0 + x1, row1 + x0, row1 + x1])
        px = tf.cast(tf.gather(flat, index), tf.float32)
        top = px[0] + wx * (px[1] - px[0])
        bottom = px[2] + wx * (px[3] - px[2])
        out = top + wy * (bottom - top)
    if valid is not None:
        out = tf.where(valid[..., None], out, tf.constant(float(cval), tf.float32))
    return tf.ensure_shape(out, [out_h, out_w, 3])


def photometric(image: Any, parameters: dict[str, Any]) -> Any:
    """Channel shift (clipped to the image's min/max) then brightness (clipped to [0, 255]), as the legacy code."""
    import tensorflow as tf

    if parameters.get("channel") is not None:
        low, high = tf.reduce_min(image), tf.reduce_max(image)
        image = tf.clip_by_value(image + parameters["channel"], low, high)
    if parameters.get("brightness") is not None:
        image = tf.clip_by_value(image * parameters["brightness"], 0.0, 255.0)
    return image


def augment_image(
    image: Any,
    key: Any,
    policy: AugmentPolicy,
    *,
    image_size: tuple[int, int],
    source_size: Any = None,
    ratio: Any = 1,
    interpolation: str = "bilinear",
) -> Any:
    """One augmented view of a decoded image, already at ``image_size`` (float32, 0-255)."""
    parameters = draw_parameters(policy, key, image_size)
    matrix = transform_matrix(parameters, image_size) if policy.is_geometric else None
    out = warp(
        image,
        matrix,
        image_size=image_size,
        source_size=source_size,
        ratio=ratio,
        fill_mode=policy.fill_mode,
        cval=policy.cval,
        interpolation=interpolation,
    )
    return photometric(out, parameters)
