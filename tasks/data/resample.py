"""The resampler: one view of a decoded image at the target size, as ONE OpenCV resampling per image.

What an augmentation policy (:mod:`tasks.data.augment`, the policy side: fields, hash, grid, view ids, the per-view
random draws) does to pixels, and the plain resize of the clean view: used by the input pipeline
(:mod:`tasks.data.pipeline`, inside a ``tf.numpy_function``) and so by the stages that render images (features,
finetune, evaluate, predict, augment-preview), never by those that train on cached features.

Resize (and the optional centred aspect crop) and geometry are composed into one affine per image, and the source
is sampled once (bilinear or nearest) by OpenCV, its output already at the target size: ``reflect`` (the default)
by one ``warpAffine`` mirroring about the (cropped) source's edge, the same line as the resized image's edge (exact
at whole target pixels; see :func:`warp` for the half pixel beyond each edge); ``nearest``, ``wrap`` and
``constant`` by one ``remap`` whose coordinates are folded in the target frame [0, size - 1] exactly as if the
image had been resized first (nearest clamps to the resized image's edge, wrap and constant follow scipy's edge
rules); the clean view by one ``cv2.resize`` (or a ``warpAffine`` for nearest resizing and DCT-reduced decodes).
uint8 images are resampled as RGBA, which OpenCV vectorises (same pixels). OpenCV was measured about 10x faster here than TensorFlow's
``ImageProjectiveTransformV3`` or a gather-based TF resampler (see BENCHMARKS.md).

:func:`aspect_crop` is Keras' ``crop_to_aspect_ratio`` rule (also used by the pipeline to choose JPEG DCT ratios).
A change here that changes what a view looks like must bump ``tasks.data.augment.ENGINE_VERSION`` (every policy hash,
so every cache key of augmented views, moves). No TensorFlow here; OpenCV is imported lazily.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from tasks.data.augment import (
    FILL_MODES,
    INTERPOLATIONS,
    AugmentPolicy,
    ViewParameters,
    draw_parameters,
    view_uniforms,
)

_OPENCV_MAX_SIDE = 32767
_EDGE_EPS = 1e-3  # px: a sample this close to a whole pixel is snapped to it (constant / wrap edges)


# ------------------------------------------------------------------------------------------- geometry
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
