"""Augmentation policies with ImageDataGenerator's vocabulary and semantics, applied as ONE resampling per image.

A policy (:class:`AugmentPolicy`) is a frozen value built from ``params.augment``; its ``short_hash`` names it in
view ids (``"<hash>:<pass>"``, ``"clean"`` for the un-augmented view) and in the feature cache. It has no defaults
of its own: a field left out takes the value of the config schema's default (``AugmentConfig()``, which is
``params.yaml``'s), converted by the one rule :func:`policy_from_config` uses. :data:`NO_AUGMENTATION` is the
policy that changes nothing (ImageDataGenerator's own defaults), the baseline of :meth:`AugmentPolicy.describe`.

Semantics follow Keras' legacy ``ImageDataGenerator.get_random_transform`` / ``apply_transform`` (resize to the
target size first, then the affine transform with scipy's fill modes, then channel shift, flips, brightness):

* ``rotation_range`` degrees, uniform in [-r, r]; ``shear_range`` degrees, uniform in [-s, s];
* ``width_shift_range`` / ``height_shift_range``: a fraction of the target width / height, or pixels when >= 1;
* ``zoom_range`` z -> [1 - z, 1 + z] (or a [low, high] pair), independent zx and zy; > 1 zooms out;
* ``horizontal_flip`` / ``vertical_flip`` with probability 1/2 each;
* ``fill_mode`` constant (``cval``) / nearest / reflect / wrap exactly as scipy.ndimage treats them, in the resized
  frame (``wrap`` has period size - 1 and ``constant`` does not interpolate into the border, as in
  ImageDataGenerator);
* ``channel_shift_range``: one intensity added to every channel, clipped to the image's min/max;
* ``brightness_range``: a factor, result clipped to [0, 255].

Deviations from the legacy code, on purpose: the width shift moves along the width and the height shift along the
height, and the transform is centred on the true image centre (legacy Keras swaps both for non-square images;
for square images and equal shift ranges the two agree). Brightness is not rounded to uint8. ``rescale`` is part
of the policy's hash but is applied by the input pipeline (``rescale=``), to every view alike. A sample that lands
exactly on the image edge (within 1e-3 px) counts as inside, where scipy's float64 round-off may say outside.

Resize (and the optional centred aspect crop) and geometry are composed into one affine per image, and the source
is sampled once (bilinear or nearest) by OpenCV, its output already at the target size: ``reflect`` (the default)
by one ``warpAffine`` mirroring about the (cropped) source's edge, the same line as the resized image's edge (exact
at whole target pixels; see :func:`warp` for the half pixel beyond each edge); ``nearest``, ``wrap`` and
``constant`` by one ``remap`` whose coordinates are folded in the target frame [0, size - 1] exactly as if the
image had been resized first (nearest clamps to the resized image's edge, wrap and constant follow scipy's edge
rules); the clean view by one ``cv2.resize`` (or a ``warpAffine`` for nearest resizing and DCT-reduced decodes).
uint8 images are resampled as RGBA, which OpenCV vectorises (same pixels). OpenCV was measured about 10x faster here than TensorFlow's
``ImageProjectiveTransformV3`` or a gather-based TF resampler (see BENCHMARKS.md).

Randomness: the ten uniforms of a view come from sha512(image sha256, policy seed, pass) (:func:`view_uniforms`),
so a view is a pure function of (pixels, sha256, pass, policy): independent of batch, order, worker count and
machine. No TensorFlow here; OpenCV is imported lazily.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import struct
import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tasks.config import AUGMENT_GRID_KEYS, AugmentConfig

CLEAN_VIEW = "clean"
# Bump ENGINE_VERSION when rendering changes what a view looks like: every policy hash (and cache key) moves.
# 2: nearest fills from the resized image's edge, like constant and wrap in the target frame (1 replicated the
#    source's edge pixel).
ENGINE_VERSION = 2
FILL_MODES = ("constant", "nearest", "reflect", "wrap")
INTERPOLATIONS = ("bilinear", "nearest")
_OPENCV_MAX_SIDE = 32767
_EDGE_EPS = 1e-3  # px: a sample this close to a whole pixel is snapped to it (constant / wrap edges)
# Fixed slots of the per-image uniform draw: adding a parameter never changes the others' values.
_SLOTS = ("theta", "tx", "ty", "shear", "zx", "zy", "flip_h", "flip_v", "channel", "brightness")


def _zoom_pair(value: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(value, int | float):
        return (1.0 - float(value), 1.0 + float(value))
    return (float(value[0]), float(value[1]))


def _policy_values(cfg: AugmentConfig) -> dict[str, Any]:
    """The policy's fields (all but ``name``) for ``cfg``: the one conversion from config to policy."""
    return {
        "seed": cfg.seed,
        "rotation_range": float(cfg.rotation_range),
        "width_shift_range": float(cfg.width_shift_range),
        "height_shift_range": float(cfg.height_shift_range),
        "shear_range": float(cfg.shear_range),
        "zoom_range": _zoom_pair(cfg.zoom_range),
        "channel_shift_range": float(cfg.channel_shift_range),
        "brightness_range": None if cfg.brightness_range is None else tuple(map(float, cfg.brightness_range)),
        "horizontal_flip": bool(cfg.horizontal_flip),
        "vertical_flip": bool(cfg.vertical_flip),
        "fill_mode": cfg.fill_mode,
        "cval": float(cfg.cval),
        "rescale": None if cfg.rescale is None else float(cfg.rescale),
    }


# The schema's defaults (AugmentConfig's model fields, i.e. params.yaml's values), as policy fields: the only
# defaults a policy has.
_SCHEMA = _policy_values(AugmentConfig())


@dataclass(frozen=True)
class AugmentPolicy:
    """One augmentation policy: ImageDataGenerator's parameters plus the seed of its random draws.

    Build it with :func:`policy_from_config`; a field left out takes the config schema's default (see the module
    docstring), never a value of its own."""

    name: str = "default"
    seed: int = _SCHEMA["seed"]
    rotation_range: float = _SCHEMA["rotation_range"]
    width_shift_range: float = _SCHEMA["width_shift_range"]
    height_shift_range: float = _SCHEMA["height_shift_range"]
    shear_range: float = _SCHEMA["shear_range"]
    zoom_range: tuple[float, float] = _SCHEMA["zoom_range"]
    channel_shift_range: float = _SCHEMA["channel_shift_range"]
    brightness_range: tuple[float, float] | None = _SCHEMA["brightness_range"]
    horizontal_flip: bool = _SCHEMA["horizontal_flip"]
    vertical_flip: bool = _SCHEMA["vertical_flip"]
    fill_mode: str = _SCHEMA["fill_mode"]
    cval: float = _SCHEMA["cval"]
    rescale: float | None = _SCHEMA["rescale"]

    def __post_init__(self) -> None:
        if self.fill_mode not in FILL_MODES:
            raise ValueError(f"AugmentPolicy: expected fill_mode in {FILL_MODES}, got {self.fill_mode!r}")
        if len(self.zoom_range) != 2 or not 0 < self.zoom_range[0] <= self.zoom_range[1]:
            raise ValueError(
                f"AugmentPolicy: expected zoom_range (low, high) with 0 < low <= high, got {self.zoom_range!r}"
            )
        for key in (
            "rotation_range",
            "width_shift_range",
            "height_shift_range",
            "shear_range",
            "channel_shift_range",
        ):
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
        """12 hex chars of sha256 over the canonical JSON of :meth:`fields` and the engine version: stable across
        runs and machines; it changes when the policy or the way views are rendered changes."""
        blob = json.dumps(
            {"engine": ENGINE_VERSION, **self.fields()}, sort_keys=True, separators=(",", ":")
        ).encode()
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
        """A short human caption: the parameters that differ from :data:`NO_AUGMENTATION`."""
        parts = [
            f"{k}={v}"
            for k, v in asdict(self).items()
            if k not in ("name", "seed") and v != getattr(NO_AUGMENTATION, k)
        ]
        return ", ".join(parts) or "no augmentation"


def policy_from_config(cfg: AugmentConfig, name: str = "default") -> AugmentPolicy:
    """The policy described by ``params.augment`` (its grid, if any, is ignored: see :func:`expand_grid`)."""
    if not isinstance(cfg, AugmentConfig):
        raise TypeError(f"policy_from_config: expected an AugmentConfig, got {type(cfg).__name__}: {cfg!r}")
    return AugmentPolicy(name=name, **_policy_values(cfg))


# The policy that changes nothing: ImageDataGenerator()'s own defaults (no ranges, no flips, 'nearest' fill with
# cval 0, no rescale), stated as a config. Captions (describe) name what a policy does beyond it.
NO_AUGMENTATION = policy_from_config(
    AugmentConfig(
        rotation_range=0,
        width_shift_range=0,
        height_shift_range=0,
        shear_range=0,
        zoom_range=0,
        channel_shift_range=0,
        brightness_range=None,
        horizontal_flip=False,
        vertical_flip=False,
        fill_mode="nearest",
        cval=0,
        rescale=None,
    ),
    name="none",
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
        one = AugmentConfig.model_validate(
            {**base, **{k: list(v) if isinstance(v, tuple) else v for k, v in update.items()}}
        )
        name = ",".join(f"{k}={_grid_value_label(v)}" for k, v in update.items())
        policies.append(policy_from_config(one, name=name))
    return policies


def policies_for(cfg: AugmentConfig) -> list[AugmentPolicy]:
    """The augmentation policies of ``cfg`` that the features stage renders and ``augment-preview`` shows: the
    configured policy, or the policies of its grid sampled with ``cfg.seed`` (the augmentation's own seed, not the
    top-level ``seed``). The one place this rule lives."""
    return expand_grid(cfg, cfg.seed)


def view_id(policy: AugmentPolicy | None, pass_number: int) -> str:
    """``"clean"`` for the un-augmented view, else ``"<policy hash>:<pass>"``."""
    if isinstance(pass_number, bool) or not isinstance(pass_number, int) or pass_number < 0:
        raise ValueError(f"view_id: expected a pass number >= 0, got {pass_number!r}")
    if policy is None:
        return CLEAN_VIEW
    if not isinstance(policy, AugmentPolicy):
        raise TypeError(
            f"view_id: expected an AugmentPolicy or None, got {type(policy).__name__}: {policy!r}"
        )
    return f"{policy.short_hash}:{pass_number}"


# ------------------------------------------------------------------------------------------- random draws
@dataclass(frozen=True)
class ViewParameters:
    """ImageDataGenerator's ``transform_parameters`` for one view; shifts in target pixels (tx along x/width)."""

    theta: float = 0.0
    tx: float = 0.0
    ty: float = 0.0
    shear: float = 0.0
    zx: float = 1.0
    zy: float = 1.0
    flip_h: bool = False
    flip_v: bool = False
    channel: float | None = None
    brightness: float | None = None


def view_uniforms(sha256: str, policy_seed: int, pass_number: int) -> tuple[float, ...]:
    """The per-view uniforms in [0, 1): sha512 of (image sha256, policy seed, pass), one fixed slot each.

    Pure Python hashing: the same on every machine, independent of batch, order and worker count.
    """
    digest = hashlib.sha512(f"{sha256}|{int(policy_seed)}|{int(pass_number)}".encode()).digest()
    return tuple(v / 2**32 for v in struct.unpack_from(f"<{len(_SLOTS)}I", digest))


def draw_parameters(
    policy: AugmentPolicy, uniforms: tuple[float, ...], image_size: tuple[int, int]
) -> ViewParameters:
    """``get_random_transform`` from fixed uniforms: theta, shifts (fraction of size, or pixels when >= 1), shear,
    independent zx/zy in the zoom range, flips with probability 1/2, channel shift, brightness."""
    if len(uniforms) < len(_SLOTS):
        raise ValueError(f"draw_parameters: expected {len(_SLOTS)} uniforms, got {len(uniforms)}")
    height, width = image_size
    u = dict(zip(_SLOTS, uniforms, strict=False))

    def sym(value: float, slot: str) -> float:
        return (2.0 * u[slot] - 1.0) * float(value)

    def shift(value: float, size: int, slot: str) -> float:
        return sym(value, slot) * (float(size) if value < 1 else 1.0)

    low, high = policy.zoom_range
    zoomed = (low, high) != (1.0, 1.0)
    brightness = None
    if policy.brightness_range is not None:
        b_low, b_high = policy.brightness_range
        brightness = b_low + (b_high - b_low) * u["brightness"]
    return ViewParameters(
        theta=sym(policy.rotation_range, "theta"),
        tx=shift(policy.width_shift_range, width, "tx"),
        ty=shift(policy.height_shift_range, height, "ty"),
        shear=sym(policy.shear_range, "shear"),
        zx=low + (high - low) * u["zx"] if zoomed else 1.0,
        zy=low + (high - low) * u["zy"] if zoomed else 1.0,
        flip_h=policy.horizontal_flip and u["flip_h"] < 0.5,
        flip_v=policy.vertical_flip and u["flip_v"] < 0.5,
        channel=sym(policy.channel_shift_range, "channel") if policy.channel_shift_range else None,
        brightness=brightness,
    )


Affine = tuple[float, float, float, float, float, float]  # [[a, b, c], [d, e, f], [0, 0, 1]]


def _compose(*affines: Affine) -> Affine:
    """The product of 2-D affine maps, left to right, in plain floats (numpy is slower for 3x3 matrices)."""
    a, b, c, d, e, f = affines[0]
    for a2, b2, c2, d2, e2, f2 in affines[1:]:
        a, b, c, d, e, f = (
            a * a2 + b * d2,
            a * b2 + b * e2,
            a * c2 + b * f2 + c,
            d * a2 + e * d2,
            d * b2 + e * e2,
            d * c2 + e * f2 + f,
        )
    return a, b, c, d, e, f


def transform_matrix(parameters: ViewParameters, image_size: tuple[int, int]) -> np.ndarray:
    """3x3 float64 map output (x, y, 1) -> input (x, y, 1) in target pixels, as ``apply_affine_transform``:
    M = R(theta) T(tx, ty) S(shear) Z(zx, zy) about the image centre, then ImageDataGenerator's output flips."""
    height, width = image_size
    theta, shear = math.radians(parameters.theta), math.radians(parameters.shear)
    cos, sin = math.cos(theta), math.sin(theta)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    fx, fy = float(parameters.flip_h), float(parameters.flip_v)
    a, b, c, d, e, f = _compose(
        (1.0, 0.0, cx, 0.0, 1.0, cy),  # offset to the centre
        (cos, -sin, 0.0, sin, cos, 0.0),  # rotation
        (1.0, 0.0, parameters.tx, 0.0, 1.0, parameters.ty),  # shift
        (1.0, -math.sin(shear), 0.0, 0.0, math.cos(shear), 0.0),  # shear
        (parameters.zx, 0.0, 0.0, 0.0, parameters.zy, 0.0),  # zoom
        (1.0, 0.0, -cx, 0.0, 1.0, -cy),  # reset from the centre
        (1 - 2 * fx, 0.0, fx * (width - 1), 0.0, 1 - 2 * fy, fy * (height - 1)),  # output flips
    )
    return np.array([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]])


# ------------------------------------------------------------------------------------------- resampling
# Coordinate maps live in per-thread float32 buffers reused from call to call (tf.data runs warps on several
# threads), and the helpers below work on them IN PLACE with one spare buffer: fresh 200 kB maps per 224x224 view
# made glibc hand their pages back and fault them in again on every call (about 500 page faults, measured at
# 0.4-0.8 ms a view under load: more than the resampling itself).
_SCRATCH = threading.local()
_SCRATCH_MAX_PIXELS = 1024 * 1024  # larger maps are allocated per call: a thread keeps at most 12 MB


def _coordinate_buffers(
    height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float32 [height, width] buffers owned by the calling thread: x map, y map, spare, and the (read-only) grids
    of every pixel's x and y, so an affine map of the grid is one ``cv2.addWeighted`` pass (a numpy broadcast
    of a row and a column was 4x slower)."""
    shape = (height, width)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None or buffers[0].shape != shape:
        grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32)
        buffers = (np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.float32))
        buffers = (*buffers, grid_x, grid_y)
        if height * width <= _SCRATCH_MAX_PIXELS:
            _SCRATCH.buffers = buffers
    return buffers


def _affine_of_grid(
    a: float, b: float, c: float, grid_x: np.ndarray, grid_y: np.ndarray, out: np.ndarray
) -> None:
    """In place: ``out = a * x + b * y + c`` over the pixel grid (one OpenCV pass)."""
    import cv2

    cv2.addWeighted(grid_x, float(a), grid_y, float(b), float(c), dst=out)


def _snap(coord: np.ndarray, spare: np.ndarray) -> None:
    """In place: coordinates within round-off of a whole pixel become that pixel (so edges are decided exactly)."""
    np.round(coord, out=spare)
    spare -= coord
    np.abs(spare, out=spare)
    near = spare < _EDGE_EPS
    np.round(coord, out=spare)
    np.copyto(coord, spare, where=near)


def _wrap(coord: np.ndarray, size: int, spare: np.ndarray) -> None:
    """In place: scipy.ndimage's 'wrap' (what ImageDataGenerator uses): period size - 1, -last maps to last."""
    if size <= 1:
        coord[...] = 0.0
        return
    last = np.float32(size - 1)
    np.divide(coord, last, out=spare)
    np.floor(spare, out=spare)
    spare *= -last
    spare += coord  # floor-mod: in [0, last)
    # scipy sends the negative multiples of `last` to `last` (not 0), and keeps `last` itself
    np.copyto(spare, last, where=(coord < 0.0) & (spare == 0.0))
    np.copyto(coord, spare, where=(coord < 0.0) | (coord > last))


def _reflect_to_source(
    shifted: np.ndarray, size: int, span: tuple[float, float], step: float, offset: float, spare: np.ndarray
) -> None:
    """In place, from ``shifted`` = target coordinate + 0.5 to the source coordinate to sample: scipy.ndimage's
    'reflect' (half-sample symmetric about -0.5 and size - 0.5, period 2 * size: c b a | a b c | c b a) in the
    target frame, clipped to [0, size - 1] (so the half pixel beyond each edge is flat, as scipy's linear
    interpolation between an edge sample and its mirror image is), then mapped to source pixels with ``step`` and
    ``offset`` (the caller's map ``t * step + 0.5 * step - 0.5 + offset``). ``span`` is (min, max) of the target
    coordinate: within the first mirror image on either side (the usual case) no modulo is needed.

    With u = |shifted| (the mirror at -0.5) and z = |u - size| (the mirror at size - 0.5), the reflected target
    coordinate is size - 0.5 - z, so the clip is z in [0.5, size - 0.5] and the source coordinate is
    ``step * size - 0.5 + offset - step * z``: five passes over the map.
    """
    import cv2

    if not (-size < span[0] and span[1] < 2 * size - 1):  # farther out: into [0, 2 size) first
        period = np.float32(2 * size)
        np.divide(shifted, period, out=spare)
        np.floor(spare, out=spare)
        spare *= period
        shifted -= spare
    np.abs(shifted, out=shifted)
    shifted -= np.float32(size)
    np.abs(shifted, out=shifted)
    np.clip(shifted, 0.5, size - 0.5, out=shifted)
    cv2.addWeighted(shifted, -float(step), shifted, 0.0, float(step * size - 0.5 + offset), dst=shifted)


def _span(row: np.ndarray, width: int, height: int) -> tuple[float, float]:
    """(min, max) of the affine ``row`` (a, b, c) over the output grid: taken at its corners."""
    values = [row[0] * x + row[1] * y + row[2] for x in (0, width - 1) for y in (0, height - 1)]
    return float(min(values)), float(max(values))


def warp(
    image: np.ndarray,
    matrix: np.ndarray | None,
    *,
    image_size: tuple[int, int],
    source_size: tuple[int, int] | None = None,
    ratio: int = 1,
    fill_mode: str = "nearest",
    cval: float = 0.0,
    interpolation: str = "bilinear",
    keep_uint8: bool = False,
    crop_to_aspect_ratio: bool = False,
) -> np.ndarray:
    """Resample ``image`` ([h, w, 3], uint8 or float32) ONCE into float32 ``image_size`` under ``matrix``
    (uint8 when ``keep_uint8`` and the input is uint8: a 4x smaller result for the pipeline to batch).

    ``matrix`` (3x3 output -> input, target pixels, or None for a plain resize) acts as if the image had been
    resized to ``image_size`` first; fill modes follow scipy.ndimage in that frame. ``source_size`` is the
    full-resolution (height, width) the decoded ``image`` was reduced from by JPEG DCT ``ratio`` (None: the decoded
    size at ratio 1), so reduced decoding does not move the geometry.

    ``reflect`` (the default): one ``cv2.warpAffine`` with ``BORDER_REFLECT`` on the (cropped) source. Mirroring
    about the source's edge is mirroring about the resized image's edge (the half-pixel line -0.5 is the same line
    in both frames), so this is exact at every whole target pixel and everywhere but in the half target pixel
    beyond each edge, where resize-first is flat (the edge pixel) and this samples the source's outermost
    pixels. A single OpenCV call releases the GIL for the whole warp: the coordinate maps of the exact fold cost
    numpy passes that two tf.data workers could not run in parallel (b/a fell from 9.3 to 7.4, BENCHMARKS.md).
    ``nearest``, ``constant``, ``wrap``: one ``cv2.remap`` with the coordinates folded here, in the target frame,
    exactly. A plain resize is ``cv2.resize`` (or ``cv2.warpAffine`` for nearest resizing and DCT-reduced
    decodes, where no fill happens). With ``crop_to_aspect_ratio`` the
    "resized image" is the centred crop of the source with the target's aspect ratio (:func:`aspect_crop`),
    resized without distortion, as Keras' ``crop_to_aspect_ratio``; otherwise the whole source is stretched.
    """
    import cv2

    if fill_mode not in FILL_MODES:
        raise ValueError(f"warp: expected fill_mode in {FILL_MODES}, got {fill_mode!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"warp: expected interpolation in {INTERPOLATIONS}, got {interpolation!r}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"warp: expected an [h, w, 3] image, got shape {image.shape}")
    out_h, out_w = image_size
    dec_h, dec_w = image.shape[:2]
    full_h, full_w = (dec_h * ratio, dec_w * ratio) if source_size is None else source_size
    if max(dec_h, dec_w) >= _OPENCV_MAX_SIDE:  # OpenCV's warps take sides below 32767: subsample first
        step = math.ceil(max(dec_h, dec_w) / (_OPENCV_MAX_SIDE - 1))
        image, ratio = np.ascontiguousarray(image[::step, ::step]), ratio * step
        dec_h, dec_w = image.shape[:2]
    x0, y0, crop_w, crop_h = (
        aspect_crop(full_h, full_w, image_size) if crop_to_aspect_ratio else (0, 0, full_w, full_h)
    )
    sx, sy = crop_w / (ratio * out_w), crop_h / (ratio * out_h)  # source px per target px
    ox, oy = x0 / ratio, y0 / ratio  # the crop's corner in decoded pixels
    flag = cv2.INTER_LINEAR if interpolation == "bilinear" else cv2.INTER_NEAREST
    aligned = all(v % ratio == 0 for v in (x0, y0, crop_w, crop_h))  # the crop is whole decoded pixels

    def crop_of(array: np.ndarray) -> np.ndarray:  # a view: OpenCV's borders are then the crop's
        return array[y0 // ratio : (y0 + crop_h) // ratio, x0 // ratio : (x0 + crop_w) // ratio]

    if (
        matrix is None
        and interpolation == "bilinear"
        and aligned
        and (dec_h * ratio, dec_w * ratio) == (full_h, full_w)
    ):
        # a plain resize with the same half-pixel geometry: cv2.resize is 3-4x faster than a warp
        out = cv2.resize(crop_of(image), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        return out if keep_uint8 and out.dtype == np.uint8 else out.astype(np.float32, copy=False)
    # OpenCV's uint8 warps are vectorised for 4 channels, not 3: RGBA in, RGB out (the same pixels, 40% faster)
    rgba = image.dtype == np.uint8
    source = cv2.cvtColor(image, cv2.COLOR_RGB2RGBA) if rgba else image

    def finish(out: np.ndarray) -> np.ndarray:
        out = cv2.cvtColor(out, cv2.COLOR_RGBA2RGB) if rgba else out
        return out if keep_uint8 and out.dtype == np.uint8 else out.astype(np.float32, copy=False)

    def warp_affine(src: np.ndarray, affine: Affine, border: int) -> np.ndarray:
        full = np.array(affine, dtype=np.float64).reshape(2, 3)
        return finish(
            cv2.warpAffine(src, full, (out_w, out_h), flags=flag | cv2.WARP_INVERSE_MAP, borderMode=border)
        )

    if matrix is None:  # a plain resize (nearest, or DCT-reduced): the output grid is inside the image
        return warp_affine(
            source, (sx, 0.0, 0.5 * sx - 0.5 + ox, 0.0, sy, 0.5 * sy - 0.5 + oy), cv2.BORDER_REPLICATE
        )
    if fill_mode == "reflect" and aligned:
        # mirror about the (cropped) source's own edge: a view of the crop, so OpenCV's border is the crop's
        scale: Affine = (sx, 0.0, 0.5 * sx - 0.5, 0.0, sy, 0.5 * sy - 0.5)
        return warp_affine(
            crop_of(source), _compose(scale, tuple(matrix[:2].ravel().tolist())), cv2.BORDER_REFLECT
        )
    # Fill modes act in the TARGET frame (as if resized first): fold the target coordinates into [0, size - 1],
    # then map them to the source. Folding in the source frame (warpAffine's borders) would replicate or mirror
    # the source's own edge pixels, not the resized image's.
    xt, yt, spare, grid_x, grid_y = _coordinate_buffers(out_h, out_w)
    steps = ((xt, out_w, sx, ox, matrix[0]), (yt, out_h, sy, oy, matrix[1]))
    valid = None
    if fill_mode == "reflect":  # the fold and the map to the source in five passes per coordinate
        for coord, size, step, offset, row in steps:
            _affine_of_grid(row[0], row[1], row[2] + 0.5, grid_x, grid_y, coord)
            _reflect_to_source(coord, size, _span(row, out_w, out_h), step, offset, spare)
    else:
        for coord, _, _, _, row in steps:
            _affine_of_grid(row[0], row[1], row[2], grid_x, grid_y, coord)
        if fill_mode in ("constant", "wrap"):  # both have a jump at the edge: decide it exactly
            _snap(xt, spare)
            _snap(yt, spare)
        if fill_mode == "constant":  # scipy 'constant': nothing is interpolated beyond the edge samples
            valid = (xt >= 0.0) & (xt <= out_w - 1.0) & (yt >= 0.0) & (yt <= out_h - 1.0)
        elif fill_mode == "wrap":
            _wrap(xt, out_w, spare)
            _wrap(yt, out_h, spare)
        # nearest is the clip alone
        for coord, size, step, offset, _ in steps:
            np.clip(coord, 0.0, size - 1.0, out=coord)  # into the resized image, then to source pixels
            cv2.addWeighted(coord, float(step), coord, 0.0, float(0.5 * step - 0.5 + offset), dst=coord)
    out = cv2.remap(source, xt, yt, flag, borderMode=cv2.BORDER_REPLICATE)
    if valid is None:
        return finish(out)
    out = cv2.cvtColor(out, cv2.COLOR_RGBA2RGB) if rgba else out
    if not (keep_uint8 and out.dtype == np.uint8 and _uint8_value(cval)):
        out = out.astype(np.float32)
    out[~valid] = cval
    return out


def aspect_crop(height: int, width: int, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred crop ``(x0, y0, crop_width, crop_height)`` of a ``height`` x ``width`` image with the aspect
    ratio of ``image_size`` (h, w): Keras' ``crop_to_aspect_ratio`` rule (``keras.preprocessing.image.smart_resize``),
    integer pixels of the full-resolution image."""
    out_h, out_w = image_size
    crop_h = max(1, min(height, int(float(width * out_h) / out_w)))
    crop_w = max(1, min(width, int(float(height * out_w) / out_h)))
    return int((width - crop_w) / 2), int((height - crop_h) / 2), crop_w, crop_h


def _uint8_value(value: float) -> bool:
    return float(value).is_integer() and 0 <= value <= 255


def renders_uint8(policy: AugmentPolicy | None) -> bool:
    """Whether :func:`render_view` with ``keep_uint8`` returns uint8 for uint8 pixels: no photometric change and
    a ``cval`` that is a whole 0-255 value (then nothing is lost by not converting to float per image)."""
    if policy is None:
        return True
    return policy.channel_shift_range == 0 and policy.brightness_range is None and _uint8_value(policy.cval)


def photometric(image: np.ndarray, parameters: ViewParameters) -> np.ndarray:
    """Channel shift (one intensity for every channel, clipped to the image's min/max), then brightness (a factor,
    clipped to [0, 255]), in ImageDataGenerator's order. ``image`` is float32; returns float32."""
    if parameters.channel is not None:
        image = np.clip(image + np.float32(parameters.channel), image.min(), image.max())
    if parameters.brightness is not None:
        image = np.clip(image * np.float32(parameters.brightness), 0.0, 255.0)
    return image.astype(np.float32, copy=False)


def render_view(
    image: np.ndarray,
    sha256: str,
    pass_number: int,
    policy: AugmentPolicy | None,
    *,
    image_size: tuple[int, int],
    source_size: tuple[int, int] | None = None,
    ratio: int = 1,
    interpolation: str = "bilinear",
    keep_uint8: bool = False,
    crop_to_aspect_ratio: bool = False,
) -> np.ndarray:
    """One view of a decoded image at ``image_size`` (float32, 0-255): the clean view when ``policy`` is None.
    With ``keep_uint8`` and uint8 pixels the result stays uint8 when :func:`renders_uint8` says so. With
    ``crop_to_aspect_ratio`` the image is first the centred crop with the target's aspect ratio (see :func:`warp`).

    A pure function of (pixels, sha256, pass, policy): what the feature cache relies on.
    """
    if policy is None:
        return warp(
            image,
            None,
            image_size=image_size,
            source_size=source_size,
            ratio=ratio,
            interpolation=interpolation,
            keep_uint8=keep_uint8,
            crop_to_aspect_ratio=crop_to_aspect_ratio,
        )
    parameters = draw_parameters(policy, view_uniforms(sha256, policy.seed, pass_number), image_size)
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
        keep_uint8=keep_uint8 and renders_uint8(policy),
        crop_to_aspect_ratio=crop_to_aspect_ratio,
    )
    return out if out.dtype == np.uint8 else photometric(out, parameters)
