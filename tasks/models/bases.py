"""Registry of frozen pretrained bases (``keras.applications``) and how their weights are found and fingerprinted.

``BASE_MODELS`` is an explicit dict: each :class:`BaseSpec` holds its constructor and preprocess function (small
wrappers that import Keras lazily, so importing this module, as ``tasks.config`` does, never imports TensorFlow),
its default input size, feature size, named blocks and accepted ``alpha`` values. The dependency is one-way:
``tasks.config`` validates ``base.name`` / ``base.alpha`` against this registry, and this module never imports
``tasks.config``; the functions that load a base take any object with ``name``, ``weights`` and ``alpha``
(:class:`BaseChoice`, which ``tasks.config.BaseConfig`` satisfies).

Named blocks are layer-name prefixes, first to last, verified against the Keras 3.15 models. A layer belongs to a
block when its name is the prefix or starts with ``prefix + "_"``; a block spans from its first such layer to the
first layer of the next block (padding/pooling layers between them belong to the earlier block).
:func:`block_layer_names` gives the layers of the last N blocks (what the finetune stage unfreezes).

``base.weights``: ``imagenet`` (the Keras cache ``$KERAS_HOME/models``, else a download), ``none`` (a seeded,
deterministic random init) or a weights file path. The weights fingerprint (:func:`weights_fingerprint`) is the
sha256 of the weights file actually loaded, or of the initialised arrays for ``none``: never the word "imagenet".
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tasks.errors import WeightsUnavailableError  # noqa: F401  (raised here; defined with the other domain errors)

RANDOM_INIT_SEED = 1234  # weights "none": every build of the same architecture gets the same arrays
_GCS = "https://storage.googleapis.com/tensorflow/keras-applications/"


class BaseChoice(Protocol):
    """Which base to load and with which weights: ``params.base`` (``tasks.config.BaseConfig``) or any object with
    these three attributes. Typed here so that this module does not import the config (the registry is what
    the config validates against, never the other way round)."""

    @property
    def name(self) -> str: ...  # a key of BASE_MODELS

    @property
    def weights(self) -> str: ...  # "imagenet", "none" or the path of a weights file

    @property
    def alpha(self) -> float | None: ...  # a width multiplier of the base, or None for its default


@dataclass(frozen=True, kw_only=True)
class WeightsFile:
    """The file ``keras.applications`` uses for ImageNet weights (no top) and where it comes from."""

    name: str
    url: str
    md5: str | None = None


# ------------------------------------------------------------------------------------------- constructors
def _mobilenet_v2(**kwargs: Any) -> Any:
    from keras.applications import MobileNetV2

    return MobileNetV2(**kwargs)


def _mobilenet(**kwargs: Any) -> Any:
    from keras.applications import MobileNet

    return MobileNet(**kwargs)


def _efficientnet_b0(**kwargs: Any) -> Any:
    kwargs.pop("alpha", None)
    from keras.applications import EfficientNetB0

    return EfficientNetB0(**kwargs)


def _resnet50(**kwargs: Any) -> Any:
    kwargs.pop("alpha", None)
    from keras.applications import ResNet50

    return ResNet50(**kwargs)


def _vgg16(**kwargs: Any) -> Any:
    kwargs.pop("alpha", None)
    from keras.applications import VGG16

    return VGG16(**kwargs)


# ------------------------------------------------------------------------------------------- preprocessing
def _own_copy(x: Any) -> Any:
    """Keras' numpy preprocessing works in place: give it a float32 copy, leave tensors as they are."""
    import numpy as np

    return np.array(x, dtype=np.float32, copy=True) if isinstance(x, np.ndarray) else x


def _preprocess_mobilenet_v2(x: Any) -> Any:
    from keras.applications.mobilenet_v2 import preprocess_input

    return preprocess_input(_own_copy(x))


def _preprocess_mobilenet(x: Any) -> Any:
    from keras.applications.mobilenet import preprocess_input

    return preprocess_input(_own_copy(x))


def _preprocess_efficientnet(x: Any) -> Any:
    from keras.applications.efficientnet import preprocess_input

    return preprocess_input(_own_copy(x))


def _preprocess_resnet50(x: Any) -> Any:
    from keras.applications.resnet50 import preprocess_input

    return preprocess_input(_own_copy(x))


def _preprocess_vgg16(x: Any) -> Any:
    from keras.applications.vgg16 import preprocess_input

    return preprocess_input(_own_copy(x))


# ------------------------------------------------------------------------------------------ imagenet files
def _square_rows(image_size: tuple[int, int], known: Sequence[int]) -> int:
    """Keras picks the weights file of the input size when it is square and known, else the 224 one."""
    rows, cols = image_size
    return rows if rows == cols and rows in known else 224


def _file_mobilenet_v2(alpha: float, image_size: tuple[int, int]) -> WeightsFile:
    rows = _square_rows(image_size, (96, 128, 160, 192, 224))
    name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"
    return WeightsFile(name=name, url=_GCS + "mobilenet_v2/" + name)


def _file_mobilenet(alpha: float, image_size: tuple[int, int]) -> WeightsFile:
    rows = _square_rows(image_size, (128, 160, 192, 224))
    text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}[float(alpha)]
    name = f"mobilenet_{text}_{rows}_tf_no_top.h5"
    return WeightsFile(name=name, url=_GCS + "mobilenet/" + name)


def _file_efficientnet_b0(alpha: float, image_size: tuple[int, int]) -> WeightsFile:
    name = "efficientnetb0_notop.h5"
    return WeightsFile(
        name=name,
        url="https://storage.googleapis.com/keras-applications/" + name,
        md5="50bc09e76180e00e4465e1a485ddc09d",
    )


def _file_resnet50(alpha: float, image_size: tuple[int, int]) -> WeightsFile:
    name = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return WeightsFile(name=name, url=_GCS + "resnet/" + name, md5="4d473c1dd8becc155b73f8504c6f6626")


def _file_vgg16(alpha: float, image_size: tuple[int, int]) -> WeightsFile:
    name = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return WeightsFile(name=name, url=_GCS + "vgg16/" + name, md5="6d6bbae143d832006294945121d1f1fc")


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True, kw_only=True)
class BaseSpec:
    """What the pipeline needs to know about one keras.applications architecture (built with keywords only,
    timm's default-cfg style: an entry reads as a table of named facts)."""

    name: str
    constructor: Callable[
        ..., Any
    ]  # keras.applications.<Model>(include_top=..., weights=..., input_shape=...)
    preprocess: Callable[[Any], Any]  # float32 RGB 0-255 in, the base's input range out (numpy or tensor)
    preprocess_mode: str  # Keras' preprocessing mode: part of the feature cache key
    default_size: tuple[int, int]
    feature_dim: int  # channels of the last feature map at the default alpha
    blocks: tuple[str, ...]  # layer-name prefixes of the named blocks, first to last
    imagenet_file: Callable[[float, tuple[int, int]], WeightsFile]
    alphas: tuple[float, ...] = ()  # accepted width multipliers; empty: the architecture takes no alpha
    default_alpha: float | None = None
    min_size: int = 32

    def resolve_alpha(self, alpha: float | None) -> float | None:
        """The width multiplier to build with: validated, defaulted; ``None`` for bases without one."""
        if not self.alphas:
            if alpha is not None:
                raise ValueError(f"base.alpha: {self.name} takes no alpha (width multiplier), got {alpha!r}")
            return None
        if alpha is None:
            return self.default_alpha
        if float(alpha) not in self.alphas:
            raise ValueError(
                f"base.alpha: expected one of {list(self.alphas)} for {self.name}, got {alpha!r}"
            )
        return float(alpha)

    def feature_dim_for(self, alpha: float | None) -> int:
        """Channels of the pooled features for this width multiplier (MobileNetV2 keeps 1280 up to alpha 1)."""
        alpha = self.resolve_alpha(alpha)
        if alpha is None or alpha == 1.0:
            return self.feature_dim
        if self.name == "mobilenet_v2":
            return self.feature_dim if alpha <= 1.0 else int(self.feature_dim * alpha)
        return int(self.feature_dim * alpha)

    def build(self, cfg: BaseChoice, image_size: tuple[int, int]) -> Any:
        """The base (include_top=False, no pooling) with ``cfg.weights`` loaded; see :func:`load_base`."""
        return load_base(cfg, image_size).model


_MOBILENET_V2_BLOCKS = ("Conv1", "expanded_conv", *(f"block_{i}" for i in range(1, 17)), "Conv_1")
_MOBILENET_BLOCKS = ("conv1", *(f"conv_dw_{i}" for i in range(1, 14)))
_EFFICIENTNET_B0_BLOCKS = (
    "stem",
    *(
        f"block{stage}{sub}"
        for stage, n in ((1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 1))
        for sub in "abcd"[:n]
    ),
    "top",
)
_RESNET50_BLOCKS = (
    "conv1",
    *(f"conv{stage}_block{b}" for stage, n in ((2, 3), (3, 4), (4, 6), (5, 3)) for b in range(1, n + 1)),
)
_VGG16_BLOCKS = tuple(f"block{i}" for i in range(1, 6))

BASE_MODELS: dict[str, BaseSpec] = {
    "mobilenet_v2": BaseSpec(
        name="mobilenet_v2",
        constructor=_mobilenet_v2,
        preprocess=_preprocess_mobilenet_v2,
        preprocess_mode="tf",
        default_size=(224, 224),
        feature_dim=1280,
        blocks=_MOBILENET_V2_BLOCKS,
        imagenet_file=_file_mobilenet_v2,
        alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
        default_alpha=1.0,
    ),
    "mobilenet": BaseSpec(
        name="mobilenet",
        constructor=_mobilenet,
        preprocess=_preprocess_mobilenet,
        preprocess_mode="tf",
        default_size=(224, 224),
        feature_dim=1024,
        blocks=_MOBILENET_BLOCKS,
        imagenet_file=_file_mobilenet,
        alphas=(0.25, 0.5, 0.75, 1.0),
        default_alpha=1.0,
    ),
    "efficientnet_b0": BaseSpec(
        name="efficientnet_b0",
        constructor=_efficientnet_b0,
        preprocess=_preprocess_efficientnet,
        preprocess_mode="none",  # EfficientNet rescales and normalises inside the model
        default_size=(224, 224),
        feature_dim=1280,
        blocks=_EFFICIENTNET_B0_BLOCKS,
        imagenet_file=_file_efficientnet_b0,
    ),
    "resnet50": BaseSpec(
        name="resnet50",
        constructor=_resnet50,
        preprocess=_preprocess_resnet50,
        preprocess_mode="caffe",
        default_size=(224, 224),
        feature_dim=2048,
        blocks=_RESNET50_BLOCKS,
        imagenet_file=_file_resnet50,
    ),
    "vgg16": BaseSpec(
        name="vgg16",
        constructor=_vgg16,
        preprocess=_preprocess_vgg16,
        preprocess_mode="caffe",
        default_size=(224, 224),
        feature_dim=512,
        blocks=_VGG16_BLOCKS,
        imagenet_file=_file_vgg16,
    ),
}


def get_spec(name: str) -> BaseSpec:
    """The registry entry for ``name``, or a ValueError that lists the known names."""
    if name not in BASE_MODELS:
        raise ValueError(f"base.name: expected one of {sorted(BASE_MODELS)}, got {name!r}")
    return BASE_MODELS[name]


def resolve_image_size(size: tuple[int, int] | None, spec: BaseSpec) -> tuple[int, int]:
    """``image.size`` or, when null, the base's default size; validated against the base's minimum."""
    out = tuple(size) if size is not None else spec.default_size
    if len(out) != 2 or min(out) < spec.min_size:
        raise ValueError(
            f"image.size: {spec.name} needs at least {spec.min_size}x{spec.min_size} pixels, got {size!r}"
        )
    return (int(out[0]), int(out[1]))


# ----------------------------------------------------------------------------------------------- weights
def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights: ``$KERAS_HOME/models`` (read now, not at Keras' import)."""
    home = os.environ.get("KERAS_HOME")
    if home:
        return Path(home).expanduser() / "models"
    base = Path.home()
    if not os.access(base, os.W_OK):
        base = Path("/tmp")
    return base / ".keras" / "models"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks): weights files here, saved models in tasks.models.heads."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_arrays(arrays: Sequence[Any]) -> str:
    """sha256 over (dtype, shape, bytes) of each array, in order: a fingerprint of a model's weights."""
    import numpy as np

    digest = hashlib.sha256()
    for arr in arrays:
        a = np.ascontiguousarray(np.asarray(arr))
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def imagenet_weights_file(spec: BaseSpec, alpha: float | None, image_size: tuple[int, int]) -> WeightsFile:
    """The ImageNet weights file Keras loads for this base, resolved width (``None``: 1.0) and input size."""
    return spec.imagenet_file(alpha if alpha is not None else 1.0, image_size)


def imagenet_weights_path(spec: BaseSpec, alpha: float | None, image_size: tuple[int, int]) -> Path:
    """The ImageNet weights file from the Keras cache, downloaded there when missing and online.

    Offline with no cached file: :class:`WeightsUnavailableError` naming the file, the folder and the remedies.
    """
    wanted = imagenet_weights_file(spec, alpha, image_size)
    folder = keras_cache_dir()
    path = folder / wanted.name
    if path.is_file():
        return path
    try:
        from keras.utils import get_file

        got = get_file(
            wanted.name, wanted.url, cache_subdir="models", cache_dir=str(folder.parent), file_hash=wanted.md5
        )
    except Exception as err:  # Keras raises a bare Exception("URL fetch failure ...") offline
        raise WeightsUnavailableError(
            f"ImageNet weights for base {spec.name!r} are not available: Keras wanted the file {wanted.name!r} "
            f"in the Keras cache folder {folder} and could not download it from {wanted.url} ({err}). "
            f"Supply it one of two ways: copy {wanted.name} into {folder} (or point the KERAS_HOME environment "
            f"variable at a folder whose models/ subfolder holds it), or set `base.weights: /path/to/{wanted.name}` "
            "in params.yaml (or --set base.weights=/path/to/file.h5)."
        ) from None
    return Path(got)


def weights_source(cfg: BaseChoice, image_size: tuple[int, int]) -> Path | None:
    """The weights file ``cfg.weights`` refers to (``None`` for a random init). Validates name and alpha."""
    spec = get_spec(cfg.name)
    alpha = spec.resolve_alpha(cfg.alpha)
    if cfg.weights == "none":
        return None
    if cfg.weights == "imagenet":
        return imagenet_weights_path(spec, alpha, image_size)
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"base.weights: no weights file at {path}, got {cfg.weights!r}")
    return path


def weights_fingerprint(cfg: BaseChoice, image_size: tuple[int, int]) -> str:
    """sha256 of the weights this config loads, without building the model when they come from a file."""
    path = weights_source(cfg, image_size)
    if path is not None:
        return sha256_file(path)
    return load_base(cfg, image_size).weights_sha256


@dataclass(frozen=True, kw_only=True)
class LoadedBase:
    model: Any  # keras.Model, include_top=False, no pooling, frozen (trainable=False)
    spec: BaseSpec
    weights_sha256: str
    alpha: float | None = None
    weights_file: Path | None = None


def seeded_init(arrays: Sequence[Any], seed: int) -> list[Any]:
    """Random weights that depend on ``seed`` and the shapes only: Glorot-uniform kernels from a private numpy
    generator, constant arrays (BatchNorm statistics, biases) kept as Keras made them.

    Keras' own initialisers take their seeds from the process-wide ``random`` module, which any other thread may
    draw from while a model is being built; then two builds in one process differ (and so would the cache key).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for arr in arrays:
        a = np.asarray(arr)
        if a.ndim < 2 or np.all(a == a.flat[0]):
            out.append(a)
            continue
        receptive = int(np.prod(a.shape[:-2])) if a.ndim > 2 else 1
        fan_in, fan_out = a.shape[-2] * receptive, a.shape[-1] * receptive
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        out.append(rng.uniform(-limit, limit, a.shape).astype(a.dtype))
    return out


def load_base(cfg: BaseChoice, image_size: tuple[int, int]) -> LoadedBase:
    """Build the base at ``image_size`` with its weights; ``weights_sha256`` fingerprints what was loaded."""
    spec = get_spec(cfg.name)
    alpha = spec.resolve_alpha(cfg.alpha)
    image_size = resolve_image_size(image_size, spec)
    path = weights_source(cfg, image_size)
    kwargs: dict[str, Any] = {"include_top": False, "input_shape": (*image_size, 3), "pooling": None}
    if alpha is not None:
        kwargs["alpha"] = alpha
    if path is None:
        model = spec.constructor(weights=None, **kwargs)
        model.set_weights(seeded_init(model.get_weights(), RANDOM_INIT_SEED))
        digest = sha256_of_arrays(model.get_weights())
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", UserWarning
            )  # "weights for input shape (224, 224) will be loaded"
            model = spec.constructor(weights=str(path), **kwargs)
        digest = sha256_file(path)
    model.trainable = False
    return LoadedBase(model=model, spec=spec, weights_sha256=digest, alpha=alpha, weights_file=path)


def block_layer_names(model: Any, spec: BaseSpec, last_n: int) -> list[str]:
    """Names of the layers in the last ``last_n`` named blocks of ``model`` (in model order).

    Block starts are found in order (each search begins after the previous block's start), so a prefix such as
    ``block_1`` never matches ``block_10``. ``last_n`` above the number of blocks means every block.
    """
    if last_n < 0:
        raise ValueError(f"finetune.unfreeze_blocks: expected a number >= 0, got {last_n!r}")
    starts = block_starts(model, spec)
    if last_n == 0:
        return []
    first = starts[max(0, len(starts) - last_n)]
    return [layer.name for layer in model.layers[first:]]


def block_starts(model: Any, spec: BaseSpec) -> list[int]:
    """Index in ``model.layers`` of the first layer of each named block, first to last."""
    names = [layer.name for layer in model.layers]
    starts: list[int] = []
    pos = 0
    for prefix in spec.blocks:
        found = next((i for i in range(pos, len(names)) if _in_block(names[i], prefix)), None)
        if found is None:
            raise ValueError(f"{spec.name}: no layer of block {prefix!r} after layer {pos} in {model.name!r}")
        starts.append(found)
        pos = found + 1
    return starts


def _in_block(layer_name: str, prefix: str) -> bool:
    return layer_name == prefix or layer_name.startswith(prefix + "_")


# -------------------------------------------------------------------------------------------- cut points
@dataclass(frozen=True, kw_only=True)
class CutPoint:
    """Where the frozen part of a base ends for fine-tuning the last ``blocks`` blocks: ``layer`` is the frozen
    layer whose output the first unfrozen block (``block``) reads, ``shape`` that output's (height, width,
    channels). Everything before it is a fixed function of the view, so its output can be cached."""

    base: str
    block: str
    layer: str
    shape: tuple[int, ...]
    blocks: int


def cut_point(model: Any, spec: BaseSpec, last_n: int) -> CutPoint:
    """The cut tensor for unfreezing the last ``last_n`` named blocks of ``model`` (``0``: the base's output).

    Found from the registry's blocks and the model's graph: the one tensor made by a layer before the first
    unfrozen block and read by a layer from it on. Raises :class:`tasks.errors.CutPointError` naming the base and
    the block when there is no such single tensor (a skip connection across the cut), or when every block is
    unfrozen (nothing frozen to cache)."""
    from tasks.errors import CutPointError

    starts = block_starts(model, spec)
    if last_n == 0:
        out = model.layers[-1]
        return CutPoint(
            base=spec.name, block="(none)", layer=out.name, shape=tuple(out.output.shape[1:]), blocks=0
        )
    if last_n >= len(starts):
        raise CutPointError(
            f"{spec.name}: finetune.unfreeze_blocks {last_n} unfreezes all {len(starts)} blocks, so no frozen "
            "part is left to cache; use finetune.path: full (or fewer blocks)"
        )
    first = starts[len(starts) - last_n]
    block = spec.blocks[len(spec.blocks) - last_n]
    frozen = {layer.name for layer in model.layers[:first]}
    fed: dict[str, Any] = {}
    for layer in model.layers[first:]:
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                producer = tensor._keras_history.operation.name
                if producer in frozen:
                    fed[producer] = tensor
    if len(fed) != 1:
        raise CutPointError(
            f"{spec.name}: block {block!r} reads {len(fed)} tensors of the frozen layers ({sorted(fed)}), not one; "
            "its cut is ambiguous, so tail fine-tuning cannot cache it: use finetune.path: full"
        )
    ((layer, tensor),) = fed.items()
    return CutPoint(base=spec.name, block=block, layer=layer, shape=tuple(tensor.shape[1:]), blocks=last_n)


def cut_point_of(cfg: BaseChoice, image_size: tuple[int, int], last_n: int) -> CutPoint:
    """:func:`cut_point` of ``cfg``'s architecture at ``image_size``, built without weights (names and shapes
    are all a cut point needs): for callers that only need the activations' cache key."""
    spec = get_spec(cfg.name)
    alpha = spec.resolve_alpha(cfg.alpha)
    kwargs: dict[str, Any] = {"include_top": False, "input_shape": (*resolve_image_size(image_size, spec), 3)}
    if alpha is not None:
        kwargs["alpha"] = alpha
    return cut_point(spec.constructor(weights=None, **kwargs), spec, last_n)
