"""``retrainflow augment-preview``: see what an augmentation policy does before spending compute on it.

For each policy the features stage renders (``tasks.data.augment.policies_for``: the configured one, or the policies of
``augment.grid``, ``augment.grid_samples`` of them drawn with ``augment.seed``) one PNG: N images (rows) x the clean
view plus M augmented views (columns), rendered by the real input pipeline (``tasks.data.pipeline.view_dataset``, with
``image.interpolation``), with the policy's name, hash and parameters in the caption. Images come from the index's
train split when the index exists, otherwise straight from the class folders under ``data.root`` (within
``data.max_pixels``).
"""

from __future__ import annotations

import hashlib
import textwrap
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import Params
from tasks.data.augment import AugmentPolicy, policies_for
from tasks.errors import InputError
from tasks.inputs import ImageSpec, resolve_inputs
from tasks.layout import Layout

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class PreviewManifest:
    """What ``augment-preview`` wrote: one PNG per policy."""

    files: tuple[str, ...]
    policies: tuple[str, ...]
    images: int
    views: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _spread(count: int, n: int, seed: int) -> list[int]:
    """``n`` positions out of ``count``, reproducibly chosen, in ascending order."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(count, size=min(n, count), replace=False).tolist())


def rows_from_folders(root: Path, n: int, seed: int = 0, *, max_pixels: int) -> Any:
    """Index-shaped rows for ``n`` images found under ``root`` (class folders), for use before ``index`` ran;
    images above ``max_pixels`` (``data.max_pixels``) are skipped, as the index stage rejects them."""
    import pandas as pd

    from tasks.data.images import ImageRejected, read_header

    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (set data.root, or run `retrainflow index`)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    records = []
    for i in _spread(len(files), 4 * n, seed):  # some may be unreadable: look at a few more than needed
        contents = files[i].read_bytes()
        try:
            fmt, width, height, orientation, _ = read_header(contents, max_pixels)
        except ImageRejected:
            continue
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        records.append(
            {
                "path": files[i].relative_to(root).as_posix(),
                "sha256": hashlib.sha256(contents).hexdigest(),
                "width": width,
                "height": height,
                "orientation": orientation,
                "format": fmt,
            }
        )
        if len(records) == n:
            break
    if not records:
        raise FileNotFoundError(f"no readable images within data.max_pixels={max_pixels} under {root}")
    return pd.DataFrame(records)


def preview_rows(params: Params, layout: Layout, n: int, data_root: Path) -> Any:
    """N rows of the index's train split (or of the image folder ``data_root`` when there is no index yet)."""
    if layout.index_table.is_file():
        from tasks.data.index_table import read_index

        table = read_index(layout)
        train = table[table["split"] == "train"]
        table = train if len(train) else table
        return table.iloc[_spread(len(table), n, params.seed)].reset_index(drop=True)
    return rows_from_folders(data_root, n, params.seed, max_pixels=params.data.max_pixels)


def render_grid(
    rows: Any,
    data_root: Path,
    policy: AugmentPolicy,
    image: ImageSpec,
    *,
    views: int,
) -> np.ndarray:
    """uint8 ``[N, 1 + views, H, W, 3]``: the clean view then passes 0..views-1, through the real pipeline at
    ``image`` (size, the resize interpolation and crop rule: ``image.interpolation``, ``image.crop_to_aspect_ratio``;
    pixels 0-255, so ``image.rescale`` should be None)."""
    from tasks.data.pipeline import view_dataset

    columns = []
    for policy_or_none, pass_number in [(None, 0), *((policy, p) for p in range(views))]:
        ds = view_dataset(
            rows, data_root, image, batch_size=len(rows), policy=policy_or_none, pass_number=pass_number
        )
        columns.append(np.concatenate([np.asarray(b) for b in ds]))
    return np.clip(np.stack(columns, axis=1), 0, 255).round().astype(np.uint8)


def write_png(grid: np.ndarray, policy: AugmentPolicy, path: Path) -> Path:
    """Save the grid as a PNG (matplotlib, Agg) with the policy named in the caption."""
    import matplotlib

    from tasks.reports.plots import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, m = grid.shape[:2]
    fig, axes = plt.subplots(n, m, figsize=(1.6 * m, 1.6 * n + 0.9), squeeze=False)
    for i in range(n):
        for j in range(m):
            ax = axes[i][j]
            ax.imshow(grid[i, j])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("clean" if j == 0 else f"pass {j - 1}", fontsize=8)
    caption = f"policy {policy.name} ({policy.short_hash}, seed {policy.seed}): {policy.describe()}"
    fig.suptitle("\n".join(textwrap.wrap(caption, width=int(18 * m) + 20)), fontsize=8)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)
    return path


def preview_policies(params: Params, policy_name: str | None = None) -> list[AugmentPolicy]:
    """The policies the features stage renders (:func:`tasks.data.augment.policies_for`), or the one named
    ``policy_name`` (its name or short hash)."""
    policies = policies_for(params.augment)
    if policy_name is None:
        return policies
    chosen = [p for p in policies if policy_name in (p.name, p.short_hash)]
    if not chosen:
        names = [p.name for p in policies]
        raise InputError(f"augment-preview: no policy named {policy_name!r}; the policies are {names}")
    return chosen


def run_preview(
    params: Params,
    layout: Layout,
    *,
    images: int = 6,
    views: int = 5,
    policy_name: str | None = None,
    out: Path | None = None,
) -> PreviewManifest:
    """Write one preview PNG per selected policy to ``layout.reports_dir`` (or ``out`` for a single policy)."""
    if isinstance(images, bool) or not isinstance(images, int) or not 1 <= images <= 64:
        raise ValueError(f"augment-preview: expected 1 to 64 images, got {images!r}")
    if isinstance(views, bool) or not isinstance(views, int) or not 1 <= views <= 32:
        raise ValueError(f"augment-preview: expected 1 to 32 views, got {views!r}")
    policies = preview_policies(params, policy_name)
    if out is not None and len(policies) > 1:
        raise InputError(
            f"augment-preview: --out names one file but the grid has {len(policies)} policies; "
            "choose one with --policy or leave --out unset"
        )
    inputs = resolve_inputs(params, layout)
    image = replace(inputs.image, rescale=None)  # the preview shows pixels (0-255), not the scaled values
    rows = preview_rows(params, layout, images, inputs.data_root)
    written = []
    for policy in policies:
        grid = render_grid(rows, inputs.data_root, policy, image, views=views)
        path = out if out is not None else layout.augment_preview(policy.short_hash)
        written.append(str(write_png(grid, policy, path)))
    return PreviewManifest(
        files=tuple(written),
        policies=tuple(f"{p.name} ({p.short_hash})" for p in policies),
        images=len(rows),
        views=views,
    )
