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

Rendering a view (resize, optional centred aspect crop, the affine, fill modes, photometric changes: OpenCV) is
:mod:`tasks.data.resample`'s: this module is the policy side only (what a policy is, its hash, its grid, view ids, and
the per-view random draws), importable by the stages that only name views (reading cached features) without the
resampler. ``ENGINE_VERSION`` stays here because it is part of every policy hash: bump it when
:mod:`tasks.data.resample` changes what a view looks like.

Randomness: the ten uniforms of a view come from sha512(image sha256, policy seed, pass) (:func:`view_uniforms`),
so a view is a pure function of (pixels, sha256, pass, policy): independent of batch, order, worker count and
machine. No TensorFlow, no OpenCV here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import struct
from dataclasses import asdict, dataclass
from typing import Any, get_args

from tasks.config import AUGMENT_GRID_KEYS, AugmentConfig, ImageConfig

CLEAN_VIEW = "clean"
# Bump ENGINE_VERSION when rendering changes what a view looks like: every policy hash (and cache key) moves.
# 2: nearest fills from the resized image's edge, like constant and wrap in the target frame (1 replicated the
#    source's edge pixel).
ENGINE_VERSION = 2
FILL_MODES = ("constant", "nearest", "reflect", "wrap")
# The resize interpolations (``image.interpolation``), as the params schema lists them: read here by the resampler,
# the input pipeline and the model bundles (tasks.models.heads, tasks.models.full_model) without importing OpenCV.
INTERPOLATIONS: tuple[str, ...] = get_args(ImageConfig.model_fields["interpolation"].annotation)
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
