"""Typed, frozen, validated configuration: ``params.yaml`` is read here, once.

Every stage receives a :class:`Params` (or one of its sections); no other module opens ``params.yaml``.
Validation happens up front and every problem is reported with its key path and the value received, e.g.::

    augment.zoom_range: expected a number in [0, 1) or a [low, high] pair, got 'big'

The schema's defaults are the one source of defaults, and they are ``params.yaml``'s values: the file states every
key with the value given here (``tests/test_params_defaults.py`` fails when the two differ), and the augmentation
policy (``tasks.data.augment.AugmentPolicy``) takes its defaults from :class:`AugmentConfig`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

# the registry of base names and alphas; one-way (tasks.models.bases imports no tasks module) and no TensorFlow
from tasks.models.bases import BASE_MODELS

DEFAULT_PARAMS_FILE = Path("params.yaml")
OVERRIDE_SOURCE = "--set override"  # how problems that a KEY=VALUE override caused are labelled


class ParamsError(ValueError):
    """A params file or override is invalid; ``problems`` lists one ``key.path: message`` line each.

    The message labels each problem with where it came from: ``invalid params.yaml:`` (``source``) or
    ``invalid --set override:`` for the lines in ``overridden`` (the problems an override caused).
    """

    def __init__(self, problems: list[str], source: str = "params", *, overridden: Collection[str] = ()):
        self.problems = problems
        self.source = source
        self.overridden = [p for p in problems if p in overridden]
        own = [p for p in problems if p not in overridden]
        blocks = [(OVERRIDE_SOURCE, self.overridden), (source, own)]
        super().__init__(
            "\n".join(f"invalid {label}:\n  " + "\n  ".join(lines) for label, lines in blocks if lines)
        )


class _KeyProblem(ValueError):
    """Raised by a validator about one key at or below the one it validates: the reported line names that key's
    path and echoes that key's value, not the whole section (``augment.grid.zoom_range: ..., got 'big'``).
    ``key`` is dotted and relative to the validated section (None: the section itself)."""

    def __init__(self, key: str | None, message: str, value: Any):
        self.key, self.message, self.value = key, message, value
        super().__init__(message)


def _allows_bool(annotation: Any) -> bool:
    """Does a field's type accept a boolean (``bool`` itself, ``Any``, or a union/container holding one)?"""
    if annotation is bool or annotation is Any:
        return True
    return any(_allows_bool(arg) for arg in get_args(annotation))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, data: Any) -> Any:
        """YAML ``true`` must not become ``1`` for a numeric key: hand it on as text so that the field rejects it."""
        if isinstance(data, Mapping):
            fields = cls.model_fields
            data = {
                key: (
                    str(value).lower()
                    if isinstance(value, bool) and key in fields and not _allows_bool(fields[key].annotation)
                    else value
                )
                for key, value in data.items()
            }
        return data


def _number_or_pair(value: Any, *, low: float, high: float, high_open: bool) -> Any:
    """ImageDataGenerator's ``zoom_range`` vocabulary: a float z means [1 - z, 1 + z]; a pair is taken as is."""
    bracket = ")" if high_open else "]"
    expected = f"expected a number in [{low:g}, {high:g}{bracket} or a [low, high] pair"
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, int | float):
        ok = low <= value < high if high_open else low <= value <= high
        if not ok:
            raise ValueError(expected)
        return float(value)
    if isinstance(value, list | tuple) and len(value) == 2:
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            lo, hi = float(value[0]), float(value[1])
            if 0 < lo <= hi:
                return (lo, hi)
        raise ValueError("expected a [low, high] pair of positive numbers with low <= high")
    raise ValueError(expected)


# --------------------------------------------------------------------------------------------------- data
class SplitFractions(_Section):
    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.15, ge=0, le=1)
    test: float = Field(0.15, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            fractions = {"train": self.train, "val": self.val, "test": self.test}
            raise _KeyProblem(
                None, f"expected train + val + test to sum to 1 (they sum to {total:g})", fractions
            )
        if self.train <= 0:
            raise _KeyProblem("train", "expected a fraction above 0", self.train)
        return self


class DataConfig(_Section):
    """Where the images are and how they become an index (the ``index`` stage)."""

    source: Literal["directory", "csv"] = "directory"
    root: Path = Path("data/images")
    csv: Path | None = None
    path_column: str = "path"
    label_column: str = "label"
    classes: tuple[str, ...] | None = None
    class_mode: Literal["auto", "binary", "categorical", "sparse"] = "auto"
    split: SplitFractions = SplitFractions()
    split_seed: int = Field(0, ge=0)
    min_per_split: int = Field(2, ge=0)
    max_pixels: int = Field(89_478_485, gt=0)
    follow_symlinks: bool = False
    workers: int = Field(0, ge=0)

    @field_validator("classes", mode="before")
    @classmethod
    def _class_list(cls, value: Any) -> Any:
        """A list of names or one comma-separated string (``--set data.classes=cats,dogs``), names stripped."""
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",")]
            if not all(value):
                raise ValueError("expected comma-separated class names, with no empty name")
        if isinstance(value, list | tuple):
            names = [name for name in value if isinstance(name, str)]
            if any(not name.strip() for name in names):
                raise ValueError("expected class names that are not empty")
            if len(set(names)) != len(names):
                raise ValueError("expected unique names")
        return value

    @model_validator(mode="after")
    def _csv_needs_file(self) -> DataConfig:
        if self.source == "csv" and self.csv is None:
            raise _KeyProblem("csv", "required when data.source is 'csv'", None)
        if self.classes is not None and len(self.classes) < 2:
            raise _KeyProblem("classes", "expected at least 2 classes", list(self.classes))
        return self


# -------------------------------------------------------------------------------------------------- image
class ImageConfig(_Section):
    """Input size fed to the base; ``null`` size means the base's default."""

    size: tuple[int, int] | None = (224, 224)
    interpolation: Literal["bilinear", "nearest"] = "bilinear"
    # Centre-crop every image to the target's aspect ratio before resizing (Keras' crop_to_aspect_ratio) instead
    # of stretching it: on cats_vs_dogs (500x375 photos to 224x224) val loss fell 20% (BENCHMARKS.md).
    crop_to_aspect_ratio: bool = True

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if (
            not isinstance(value, list | tuple)
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= 2048 for v in value)
        ):
            raise ValueError("expected an integer or a [height, width] pair of integers in [8, 2048]")
        return tuple(value)


# ------------------------------------------------------------------------------------------------ augment
FillMode = Literal["constant", "nearest", "reflect", "wrap"]


class FrozenMapping(Mapping[str, tuple[Any, ...]]):
    """A read-only, hashable mapping of key -> tuple of values (``augment.grid``): reads like a dict, item
    assignment raises ``TypeError``; dumps as a plain dict (so section hashes are those of the dict)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, tuple[Any, ...]] = MappingProxyType({})):
        object.__setattr__(self, "_items", MappingProxyType(dict(items)))

    def __getitem__(self, key: str) -> tuple[Any, ...]:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self._items)!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # pickle / deepcopy (a mappingproxy itself cannot be pickled)
        return (type(self), (dict(self._items),))

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(
            cls,
            handler(dict[str, tuple[Any, ...]]),
            serialization=core_schema.plain_serializer_function_ser_schema(dict),
        )


class AugmentConfig(_Section):
    """ImageDataGenerator's augmentation vocabulary and semantics, plus the number of augmented passes."""

    passes: int = Field(2, ge=0, le=100)
    seed: int = Field(0, ge=0)
    rotation_range: float = Field(15.0, ge=0, le=360)
    width_shift_range: float = Field(0.1, ge=0)
    height_shift_range: float = Field(0.1, ge=0)
    shear_range: float = Field(10.0, ge=0, le=90)
    zoom_range: float | tuple[float, float] = 0.2
    channel_shift_range: float = Field(0.0, ge=0, le=255)
    brightness_range: tuple[float, float] | None = None
    horizontal_flip: bool = True
    vertical_flip: bool = False
    fill_mode: FillMode = "reflect"
    cval: float = 0.0
    rescale: float | None = None
    grid: FrozenMapping | None = None  # read-only: the config is frozen all the way down
    grid_samples: int = Field(0, ge=0)

    @field_validator("zoom_range", mode="before")
    @classmethod
    def _zoom(cls, value: Any) -> Any:
        return _number_or_pair(value, low=0, high=1, high_open=True)

    @field_validator("brightness_range", mode="before")
    @classmethod
    def _brightness(cls, value: Any) -> Any:
        if value is None:
            return None
        if (
            isinstance(value, list | tuple)
            and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            and 0 <= value[0] <= value[1]
        ):
            return (float(value[0]), float(value[1]))
        raise ValueError("expected null or a [low, high] pair with 0 <= low <= high")

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, Mapping) or not value:
            raise ValueError("expected a mapping of augmentation parameter -> list of values")
        allowed = set(AUGMENT_GRID_KEYS)
        out: dict[str, tuple[Any, ...]] = {}
        for key, values in value.items():
            if key not in allowed:
                raise _KeyProblem(str(key), f"unknown key; expected one of {sorted(allowed)}", values)
            if not isinstance(values, list | tuple) or not values:
                raise _KeyProblem(key, "expected a non-empty list of values", values)
            out[key] = tuple(tuple(v) if isinstance(v, list) else v for v in values)
        return out

    @model_validator(mode="after")
    def _grid_values_valid(self) -> AugmentConfig:
        if self.grid:
            base = self.model_dump(exclude={"grid", "grid_samples"})
            for key, values in self.grid.items():
                for v in values:
                    try:
                        AugmentConfig.model_validate({**base, key: v})
                    except ValidationError as err:
                        echo = list(v) if isinstance(v, tuple) else v  # as written in params.yaml
                        raise _KeyProblem(f"grid.{key}", _first_msg(err), echo) from None
        return self


AUGMENT_GRID_KEYS = (
    "rotation_range",
    "width_shift_range",
    "height_shift_range",
    "shear_range",
    "zoom_range",
    "channel_shift_range",
    "brightness_range",
    "horizontal_flip",
    "vertical_flip",
    "fill_mode",
    "cval",
)


# --------------------------------------------------------------------------------------------------- base
class BaseConfig(_Section):
    """The frozen pretrained base: a name from the registry in ``tasks.models.bases`` and where its weights come from."""

    name: str = "mobilenet_v2"
    weights: str = "imagenet"  # "imagenet" (Keras cache or download), "none", or a file path
    alpha: float | None = None  # width multiplier for MobileNet / MobileNetV2

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in BASE_MODELS:
            raise ValueError(f"expected one of {sorted(BASE_MODELS)}")
        return value

    @model_validator(mode="after")
    def _alpha_fits_the_base(self) -> BaseConfig:
        """``alpha`` is one of the width multipliers the base has (the registry's list), or null."""
        spec = BASE_MODELS[self.name]
        if self.alpha is not None and not spec.alphas:
            raise _KeyProblem(
                "alpha", f"{self.name} takes no alpha (width multiplier); expected null", self.alpha
            )
        if self.alpha is not None and float(self.alpha) not in spec.alphas:
            raise _KeyProblem("alpha", f"expected one of {list(spec.alphas)} for {self.name}", self.alpha)
        return self

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        if value in ("imagenet", "none"):
            return value
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError("expected 'imagenet', 'none' or the path of an existing weights file")
        suffix = path.suffix.lower()
        if suffix not in (".h5", ".keras", ".hdf5"):
            raise ValueError("expected a weights file ending in .h5, .hdf5 or .keras")
        with path.open("rb") as fh:
            head = fh.read(8)
        magic = _ZIP_MAGIC if suffix == ".keras" else _HDF5_MAGIC
        if not head.startswith(magic):
            kind = "a .keras (zip) file" if suffix == ".keras" else "an HDF5 file"
            raise ValueError(f"expected {kind} of weights, but the file's first bytes are {head!r}")
        return value


_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"


# ----------------------------------------------------------------------------------------------- features
class FeaturesConfig(_Section):
    pooling: Literal["avg", "max"] = "avg"
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = Field(16, ge=1, le=4096)  # fastest MobileNetV2 224 batch measured (bench/features.py)
    shard_size: int = Field(1024, ge=1)
    cache_dir: Path | None = None  # default: the layout's features cache
    # the frozen forward pass (tasks.models.engines): auto = litert on a CPU when installed, keras on a GPU
    engine: Literal["auto", "keras", "litert"] = "auto"
    # where the missing views are computed (tasks.features.chunks, flows/scale.py): local = in this process;
    # dask = chunks of chunk_size images (rounded up to whole batches), each a Prefect task run on a Dask
    # cluster: a distributed.LocalCluster of dask_workers processes with one thread each (dask_address null),
    # or the scheduler at dask_address (tcp://host:8786), whose workers share cache_dir and the data root
    runner: Literal["local", "dask"] = "local"
    dask_address: str | None = None
    dask_workers: int = Field(2, ge=1, le=512)
    chunk_size: int = Field(512, ge=1)

    @field_validator("dask_address")
    @classmethod
    def _dask_address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(tcp|tls|ucx|inproc)://[^\s/]+", value):
            raise ValueError("expected a Dask scheduler address such as tcp://host:8786, or null")
        return value


# ---------------------------------------------------------------------------------------------------- top
class HeadSpec(_Section):
    """One candidate head: a registry type in ``tasks.models.heads`` and its hyper-parameters."""

    name: str
    type: Literal["linear", "dense"] = "dense"
    units: tuple[int, ...] = ()
    dropout: float = Field(0.0, ge=0, lt=1)
    batchnorm: bool = False

    @field_validator("units", mode="before")
    @classmethod
    def _units(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
        ):
            raise ValueError("expected a positive integer or a list of positive integers")
        return tuple(value)


def _default_heads() -> tuple[HeadSpec, ...]:
    return (
        HeadSpec(name="linear", type="linear"),
        HeadSpec(name="dense256_dropout", type="dense", units=(256,), dropout=0.5),
        HeadSpec(name="dense128_bn_dropout", type="dense", units=(128,), dropout=0.3, batchnorm=True),
    )


class TopConfig(_Section):
    heads: tuple[HeadSpec, ...] = Field(default_factory=_default_heads)
    optimizer: Literal["adam", "sgd", "rmsprop"] = "adam"
    lr: float = Field(1e-3, gt=0, le=10)
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(5, ge=0)
    select_metric: Literal["val_loss", "val_accuracy"] = "val_loss"

    @field_validator("heads")
    @classmethod
    def _heads(cls, value: tuple[HeadSpec, ...]) -> tuple[HeadSpec, ...]:
        # checked after the heads themselves validate (a Field min_length would add a second, confusing line
        # "at least 1 item after validation, not 0" whenever one head is invalid)
        if not value:
            raise ValueError("expected at least 1 head")
        names = [h.name for h in value]
        if len(set(names)) != len(names):
            raise _KeyProblem(None, "expected unique head names", names)
        return value


# ----------------------------------------------------------------------------------------------- finetune
class FinetuneConfig(_Section):
    # defaults chosen on val by bench/finetune_sweep.py (BENCHMARKS.md, "Fine-tuning schedule"): Adam at 1e-5 is
    # the one schedule that lowered val loss at all on flowers; at 1e-4 (Adam) or 1e-3 (SGD) the first epoch
    # collapses the pretrained blocks. With min_improvement's 5% gate an epoch that does not help stops the run
    # after `patience` epochs.
    epochs: int = Field(8, ge=0, le=10_000)
    unfreeze_blocks: int = Field(2, ge=0)
    layer_regex: str | None = None
    optimizer: Literal["sgd", "adam", "rmsprop"] = "adam"
    lr: float = Field(1e-5, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(16, ge=1)
    patience: int = Field(3, ge=0)
    augment: bool = False
    min_improvement: float = Field(0.05, ge=0, lt=1)
    # auto: train the unfrozen tail on cut-point activations cached by the features stage ("tail") when the
    # unfrozen layers are a tail of named blocks, else the whole raw-pixels model on decoded images ("full")
    path: Literal["auto", "tail", "full"] = "auto"

    @model_validator(mode="after")
    def _tail_needs_blocks(self) -> FinetuneConfig:
        if self.path == "tail" and self.layer_regex is not None:
            raise _KeyProblem(
                "path",
                "'tail' trains the last finetune.unfreeze_blocks blocks; finetune.layer_regex "
                f"{self.layer_regex!r} may unfreeze any layers: set finetune.path to full or auto",
                self.path,
            )
        return self

    @field_validator("layer_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            import re

            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"expected a valid regular expression ({err})") from None
        return value


# ----------------------------------------------------------------------------------------------- evaluate
class EvaluateConfig(_Section):
    batch_size: int = Field(32, ge=1)
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    min_accuracy: float = Field(0.0, ge=0, le=1)
    tolerance: float = Field(0.01, ge=0, le=1)
    preview_images: int = Field(16, ge=0, le=400)


# ----------------------------------------------------------------------------------------------- all
class Params(_Section):
    seed: int = Field(42, ge=0)
    data: DataConfig = DataConfig()
    image: ImageConfig = ImageConfig()
    augment: AugmentConfig = AugmentConfig()
    base: BaseConfig = BaseConfig()
    features: FeaturesConfig = FeaturesConfig()
    top: TopConfig = TopConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    def section_hash(self, *sections: str) -> str:
        """A stable short hash of the named sections (all when none given), for cache keys and the registry."""
        dumped = self.model_dump(mode="json")
        chosen = {k: dumped[k] for k in (sections or tuple(dumped))}
        blob = json.dumps(chosen, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ loading
def _first_msg(err: ValidationError) -> str:
    return _clean_msg(err.errors()[0]["msg"])


def _clean_msg(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if msg.startswith("Input should be"):
        msg = "expected " + msg[len("Input should be ") :]
    if msg == "Extra inputs are not permitted":
        msg = "unknown key"
    return msg


def _format_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        parts = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        loc = ".".join(str(p) for p in parts)
        msg = _clean_msg(e["msg"])
        got = e.get("input")
        problem = (e.get("ctx") or {}).get("error")
        if isinstance(problem, _KeyProblem):  # a validator's own key path and value
            loc = ".".join(p for p in (loc, problem.key) if p)
            msg, got = problem.message, problem.value
        line = f"{loc or '<root>'}: {msg}"
        if msg != "unknown key" or got is not None:
            line += f", got {got!r}"
        if msg == "unknown key":
            line += _did_you_mean(parts)
        lines.append(line)
    return lines


def _did_you_mean(loc: list[str | int]) -> str:
    """``; did you mean 'top.epochs'?`` for an unknown key close to a valid key of its section, else ``""``."""
    keys = _section_keys(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1) if keys else []
    if not close:
        return ""
    return f"; did you mean {'.'.join(str(p) for p in (*loc[:-1], close[0]))!r}?"


def _section_keys(path: list[str | int]) -> list[str]:
    """The valid keys of the section at ``path`` below :class:`Params` (list positions skipped), or []."""
    model: type[BaseModel] | None = Params
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds (itself, or inside ``X | None`` / ``tuple[X, ...]``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ParamsError(
                [f"{dotted}: cannot set a key inside {part!r}, which is {child!r}"], OVERRIDE_SOURCE
            )
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["top.lr=0.01", "augment.passes=0"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ParamsError([f"{item!r}: expected KEY.PATH=VALUE"], OVERRIDE_SOURCE)
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def params_from_dict(raw: Mapping[str, Any], source: str = "params") -> Params:
    """Validate a plain mapping (as read from YAML) into :class:`Params`, or raise :class:`ParamsError`."""
    if not isinstance(raw, Mapping):
        raise ParamsError([f"<root>: expected a mapping of sections, got {raw!r}"], source)
    try:
        return Params.model_validate(dict(raw))
    except ValidationError as err:
        raise ParamsError(_format_errors(err), source) from None


def load_params(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Params:
    """Read ``params.yaml`` (or ``path``), apply ``KEY=VALUE`` overrides, validate, and return frozen params."""
    path = Path(path) if path is not None else DEFAULT_PARAMS_FILE
    if not path.is_file():
        raise ParamsError([f"{path}: params file not found"], str(path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError([f"{path}: not valid YAML ({err})"], str(path)) from None
    if not isinstance(raw, dict):
        raise ParamsError([f"<root>: expected a mapping of sections, got {raw!r}"], str(path))
    tree = parse_overrides(overrides)
    try:
        return params_from_dict(_merge(raw, tree), source=str(path))
    except ParamsError as err:
        if not tree:
            raise
        caused = _caused_by_overrides(err.problems, raw, tree)
        raise ParamsError(err.problems, err.source, overridden=caused) from None


def _caused_by_overrides(problems: list[str], raw: dict[str, Any], tree: dict[str, Any]) -> list[str]:
    """The problem lines an override caused: about a key an override set (or one above or below it), or absent
    when the file is validated without the overrides (``--set data.source=csv`` -> ``data.csv: required``)."""
    try:
        params_from_dict(raw)
        file_alone: set[str] = set()
    except ParamsError as err:
        file_alone = set(err.problems)
    set_paths = list(_leaf_paths(tree))
    caused = []
    for line in problems:
        key = tuple(line.split(": ", 1)[0].split("."))
        touched = any(key[: len(p)] == p[: len(key)] for p in set_paths)
        if touched or line not in file_alone:
            caused.append(line)
    return caused


def _leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            yield from _leaf_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)
