"""Cut-point activations for tail fine-tuning: which fine-tuning path runs, the activations' cache key, and reading
them back as a stream.

Fine-tuning unfreezes the last ``finetune.unfreeze_blocks`` blocks of the base; everything before the first
unfrozen block is frozen (BatchNorm in inference mode), so its output, the cut tensor
(:func:`tasks.models.bases.cut_point`), is a fixed function of the view. The features stage stores it beside the
pooled features in the same forward pass, in the same content-addressed store (:mod:`tasks.features.cache`; the
key adds the cut layer and its shape), for every view fine-tuning uses: train's clean view and cached augmented
passes, val's clean view. The finetune stage then trains only the tail on them (:func:`batches`).

:func:`finetune_path` decides the path once, from the params: ``tail`` (cached activations), ``full`` (the whole
raw-pixels model on decoded images: a ``layer_regex``, every block unfrozen, or ``finetune.path: full``) or
``skipped`` (``finetune.epochs: 0``). No TensorFlow at import.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.features.cache import FeatureCache, KeySpec, Pair
from tasks.features.read import key_spec_for, split_views

if TYPE_CHECKING:
    from tasks.config import Params
    from tasks.inputs import Inputs
    from tasks.layout import Layout
    from tasks.models.bases import CutPoint

ACTIVATION_SPLITS = ("train", "val")  # what fine-tuning trains and validates on
MAX_SHARD_BYTES = 64 << 20  # an activation shard buffers at most this much before it is written


@dataclass(frozen=True, kw_only=True)
class FinetunePath:
    """Which fine-tuning path a run takes and why (the reason goes to ``metrics/finetune.json``'s record)."""

    path: str  # "tail" | "full" | "skipped"
    reason: str

    @property
    def wants_activations(self) -> bool:
        return self.path == "tail"


def finetune_path(params: Params) -> FinetunePath:
    """The one place that chooses the path from ``finetune`` (``path``, ``epochs``, ``layer_regex``,
    ``unfreeze_blocks``) and the base's block count."""
    from tasks.models.bases import get_spec

    cfg = params.finetune
    if cfg.epochs == 0:
        return FinetunePath(path="skipped", reason="finetune.epochs is 0")
    if cfg.path == "full":
        return FinetunePath(path="full", reason="finetune.path is full")
    if cfg.layer_regex is not None:
        return FinetunePath(
            path="full", reason="finetune.layer_regex may unfreeze layers that are not a tail"
        )
    blocks = len(get_spec(params.base.name).blocks)
    if cfg.unfreeze_blocks >= blocks:
        if cfg.path == "tail":
            from tasks.errors import InputError

            raise InputError(
                f"finetune.path: tail needs a frozen part to cache, but finetune.unfreeze_blocks "
                f"{cfg.unfreeze_blocks} unfreezes all {blocks} blocks of {params.base.name}; use path full. "
                f"Received: {cfg.path!r}"
            )
        return FinetunePath(path="full", reason=f"finetune.unfreeze_blocks unfreezes all {blocks} blocks")
    return FinetunePath(
        path="tail", reason=f"the last {cfg.unfreeze_blocks} blocks train on cached activations"
    )


def activation_key_spec(
    inputs: Inputs, params: Params, weights_sha256: str, cut: CutPoint, engine: str | None = None
) -> KeySpec:
    """The pooled features' key components plus the cut layer and its shape (pooling does not apply)."""
    from dataclasses import replace

    pooled = key_spec_for(inputs, params.features, weights_sha256, engine)
    return replace(
        pooled, pooling="none", feature_dim=int(np.prod(cut.shape)), cut=cut.layer, shape=tuple(cut.shape)
    )


def activation_views(params: Params) -> dict[str, list[str]]:
    """View ids whose activations fine-tuning reads: every cached train view (the clean one and the augmented
    passes, so ``finetune.augment`` can be switched without computing anything) and val's clean view."""
    return {
        "train": [view for view, _, _ in split_views(params, "train", "all")],
        "val": [view for view, _, _ in split_views(params, "val", "clean")],
    }


def shard_rows(spec: KeySpec, shard_size: int) -> int:
    """Rows per activation shard: ``features.shard_size``, fewer when a row is big (ResNet50's 7x7x2048)."""
    row_bytes = spec.feature_dim * np.dtype(spec.dtype).itemsize
    return max(1, min(shard_size, MAX_SHARD_BYTES // row_bytes))


# ------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ActivationRows:
    """Where one split's activations are: per view, the (shard, row) of each index row, and the labels."""

    cache: FeatureCache
    locations: dict[str, tuple[np.ndarray, np.ndarray]]  # view id -> (shard indices, rows), index order
    labels: np.ndarray  # encoded labels, index order

    def __len__(self) -> int:
        return len(self.labels)


def activation_rows(
    cache: FeatureCache, shas: Sequence[str], views: Sequence[str], labels: np.ndarray
) -> ActivationRows:
    """Look up every (sha256, view) of ``views`` (all must be cached: the caller checks :meth:`missing`)."""
    return ActivationRows(
        cache=cache,
        locations={view: cache.row_locations([(sha, view) for sha in shas]) for view in views},
        labels=labels,
    )


def batches(
    rows: ActivationRows, view: str, order: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, Any]]:
    """``(activations float32 [B, *shape], labels [B])`` of ``view`` in ``order``, gathered batch by batch from
    memory-mapped shards: memory stays one batch, whatever the dataset size."""
    shape = rows.cache.spec.shape or (rows.cache.spec.feature_dim,)
    shard_of, row_of = rows.locations[view]
    arrays: dict[int, np.ndarray] = {}
    for start in range(0, len(order), batch_size):
        take = order[start : start + batch_size]
        out = np.empty((len(take), rows.cache.spec.feature_dim), dtype=np.float32)
        shards, within = shard_of[take], row_of[take]
        for shard in np.unique(shards):
            if shard not in arrays:
                arrays[int(shard)] = rows.cache.shard_array(int(shard))
            mask = shards == shard
            out[mask] = arrays[int(shard)][np.sort(within[mask])][np.argsort(np.argsort(within[mask]))]
        yield out.reshape(len(take), *shape), rows.labels[take]


def pairs_needed(params: Params, table: Any) -> list[Pair]:
    """Every (sha256, view) of the index whose activation fine-tuning reads (:func:`activation_views`)."""
    views = activation_views(params)
    out: list[Pair] = []
    for split in ACTIVATION_SPLITS:
        shas = list(dict.fromkeys(str(s) for s in table.loc[table["split"] == split, "sha256"]))
        out += [(sha, view) for view in views[split] for sha in shas]
    return out


def open_activations(
    layout: Layout, params: Params, inputs: Inputs, cut: CutPoint, table: Any
) -> FeatureCache:
    """The activation store the last features run filled for ``cut``, checked against ``params`` and holding
    every pair the index needs; else :class:`~tasks.errors.FeaturesMismatchError` saying what differs."""
    import json

    from tasks.errors import FeaturesMismatchError
    from tasks.features.read import RERUN

    path = layout.activations_manifest
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    if recorded.get("path") != "tail":
        raise FeaturesMismatchError(
            f"finetune: the features stage computed no cut-point activations ({path}: "
            f"{recorded.get('reason', 'missing')}); {RERUN}"
        )
    facts = recorded["key_spec"]
    spec = activation_key_spec(inputs, params, facts["weights_sha256"], cut, facts.get("engine"))
    if spec.key != recorded["cache_key"]:
        raise FeaturesMismatchError(
            f"finetune: the cut-point activations were computed at {recorded['cut']} {recorded['shape']} "
            f"(key {recorded['cache_key']}), the params ask for {cut.layer} {list(cut.shape)} (key {spec.key}); "
            f"{RERUN}"
        )
    cache = FeatureCache.open(inputs.cache_root, spec, create=False)
    absent = cache.missing(pairs_needed(params, table))
    if absent:
        raise FeaturesMismatchError(
            f"finetune: {len(absent)} (image, view) activations the current index needs are not in cache "
            f"{spec.key} (the index changed since the features ran?); {RERUN}"
        )
    return cache
