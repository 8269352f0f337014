"""What the stages feed the base, resolved once from the params (timm's ``resolve_data_config``).

Every stage and pipeline function that reads images takes one :class:`Inputs` instead of loose ``image_size``,
``interpolation``, ``crop_to_aspect_ratio``, ``rescale`` ... parameters, so the rules that turn params into
these values live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.config import Params
    from tasks.layout import Layout
    from tasks.models.bases import BaseSpec


@dataclass(frozen=True)
class ImageSpec:
    """How a decoded image becomes the pixels a model sees: what the input pipeline needs, and all it needs.

    ``size`` (height, width); ``interpolation`` and ``crop_to_aspect_ratio`` of the resize; ``rescale`` applied
    to every view (``augment.rescale``). A saved model's bundle records the same fields (predict builds its
    ``ImageSpec`` from there, not from params).
    """

    size: tuple[int, int]
    interpolation: str = "bilinear"
    crop_to_aspect_ratio: bool = False
    rescale: float | None = None


@dataclass(frozen=True)
class Inputs:
    """The resolved input settings of a run: the ``image`` spec; ``preprocessing_id`` names it plus the base's
    preprocessing mode (part of the feature cache key); ``data_root`` is the folder the index paths are relative
    to; ``cache_root`` the feature cache; ``base`` the registry entry and ``alpha`` its resolved width."""

    image: ImageSpec
    preprocessing_id: str
    data_root: Path
    cache_root: Path
    base: BaseSpec
    alpha: float | None

    @property
    def image_size(self) -> tuple[int, int]:
        return self.image.size


def resolve_inputs(params: Params, layout: Layout) -> Inputs:
    """The one place that derives the input settings from ``params`` (and the workspace ``layout``)."""
    from tasks.models.bases import get_spec, resolve_image_size

    spec = get_spec(params.base.name)
    return Inputs(
        image=ImageSpec(
            size=resolve_image_size(params.image.size, spec),
            interpolation=params.image.interpolation,
            crop_to_aspect_ratio=params.image.crop_to_aspect_ratio,
            rescale=params.augment.rescale,
        ),
        preprocessing_id=preprocessing_id(params, spec),
        data_root=Path(params.data.root),
        cache_root=cache_root(params, layout),
        base=spec,
        alpha=spec.resolve_alpha(params.base.alpha),
    )


def preprocessing_id(params: Params, spec: BaseSpec) -> str:
    """What happens to pixels between decoding and the base: ``<base's mode>/<interpolation>``, plus ``/crop``
    with ``image.crop_to_aspect_ratio`` and ``/rescale=<factor>`` when ``augment.rescale`` is set (a stretched,
    unscaled input keeps the id, and so every existing key, unchanged)."""
    out = f"{spec.preprocess_mode}/{params.image.interpolation}"
    if params.image.crop_to_aspect_ratio:
        out += "/crop"
    rescale = params.augment.rescale
    return out if rescale is None else f"{out}/rescale={float(rescale)!r}"


def cache_root(params: Params, layout: Layout) -> Path:
    """``features.cache_dir`` when set (relative paths resolve against the workspace), else the layout's.

    In a DVC experiment's copy of the repo (``dvc exp run --queue`` / ``--temp``) the workspace-relative cache is
    the origin repo's: the copies share one cache, so a queued top-only change computes no feature.
    """
    cfg_dir = params.features.cache_dir
    if cfg_dir is not None and cfg_dir.is_absolute():
        return cfg_dir
    origin = experiment_origin(layout.root)
    home = layout if origin is None else replace(layout, root=origin)
    return home.features_cache if cfg_dir is None else home.root / cfg_dir


def experiment_origin(root: Path) -> Path | None:
    """The repo a DVC experiment copy at ``root`` was made from, or None: DVC runs queued and ``--temp``
    experiments in ``<repo>/.dvc/tmp/exps/<temp dir>/`` (``dvc.repo.experiments.executor.local``)."""
    for folder in Path(root).resolve().parents:
        if (folder.name, folder.parent.name, folder.parent.parent.name) == ("exps", "tmp", ".dvc"):
            return folder.parent.parent.parent
    return None
