"""Augmentation engine: each transform against a hand-computed reference and against the legacy
ImageDataGenerator on tiny images; parameter draws; policies, hashes, view ids and grids."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tasks.config import AugmentConfig, ParamsError, params_from_dict
from tasks.data.augment import (
    CLEAN_VIEW,
    FILL_MODES,
    NO_AUGMENTATION,
    AugmentPolicy,
    ViewParameters,
    draw_parameters,
    expand_grid,
    policies_for,
    policy_from_config,
    view_id,
    view_uniforms,
)
from tasks.data.resample import aspect_crop, photometric, render_view, transform_matrix, warp

N = 5  # tiny square images: centre pixel 2


def make_policy(**changes) -> AugmentPolicy:
    """:data:`NO_AUGMENTATION` with ``changes``: exactly the parameters a test names, nothing from params.yaml."""
    return replace(NO_AUGMENTATION, name="test", **changes)


def ramp(n: int = N) -> np.ndarray:
    """[n, n, 3] float32, value 10 * row + col in every channel (so each pixel says where it came from)."""
    rows, cols = np.mgrid[0:n, 0:n]
    return np.repeat((10.0 * rows + cols)[..., None], 3, axis=2).astype(np.float32)


def apply(
    params: ViewParameters, image: np.ndarray, fill_mode: str = "nearest", cval: float = 0.0
) -> np.ndarray:
    size = image.shape[:2]
    return warp(image, transform_matrix(params, size), image_size=size, fill_mode=fill_mode, cval=cval)[
        ..., 0
    ]


# --------------------------------------------------------------------------------- hand-computed references
def test_rotation_90_degrees_is_rot90():
    image = ramp()
    out = apply(ViewParameters(theta=90.0), image)
    np.testing.assert_allclose(out, np.rot90(image[..., 0], k=1), atol=1e-3)
    out = apply(ViewParameters(theta=-90.0), image)
    np.testing.assert_allclose(out, np.rot90(image[..., 0], k=-1), atol=1e-3)


def test_pure_shift_moves_content_by_whole_pixels():
    image = ramp()
    out = apply(ViewParameters(tx=2.0), image)  # output x samples input x + 2
    np.testing.assert_array_equal(out[:, :3], image[:, 2:, 0])
    out = apply(ViewParameters(ty=-1.0), image)  # output y samples input y - 1
    np.testing.assert_array_equal(out[1:], image[:-1, :, 0])


def test_shear_keeps_the_centre_row_and_slides_the_others():
    image = ramp(7)
    angle = 30.0  # sin = 0.5: one row away from the centre slides by half a pixel
    out = apply(ViewParameters(shear=angle), image)
    c = 3
    cos = np.cos(np.radians(angle))
    # x_in = x - sin(s) (y - c), y_in = c + cos(s) (y - c): the centre row is the identity
    np.testing.assert_allclose(out[c], image[c, :, 0], atol=1e-3)
    # row c + 2: x_in = x - 1 (whole pixel), y_in = c + 2 cos(s) -> bilinear between rows 4 and 5
    y_in = c + 2 * cos
    frac = y_in - np.floor(y_in)
    expected = (1 - frac) * (10 * np.floor(y_in) + np.arange(-1, 6)) + frac * (
        10 * np.ceil(y_in) + np.arange(-1, 6)
    )
    np.testing.assert_allclose(out[c + 2, 1:], expected[1:], atol=1e-2)


def test_zoom_in_and_out_about_the_centre():
    image = ramp()
    zin = apply(ViewParameters(zx=0.5, zy=0.5), image)  # input = centre + 0.5 (output - centre)
    assert zin[2, 2] == pytest.approx(22.0)
    assert zin[2, 0] == pytest.approx(21.0)  # x_in = 1
    assert zin[2, 1] == pytest.approx(21.5)  # x_in = 1.5: halfway between cols 1 and 2
    assert zin[0, 2] == pytest.approx(12.0)  # y_in = 1
    zout = apply(ViewParameters(zx=2.0, zy=1.0), image, fill_mode="nearest")  # x_in = 2 + 2 (x - 2)
    np.testing.assert_allclose(zout[3], [30, 30, 32, 34, 34], atol=1e-3)  # -2 and 6 clamp to 0 and 4


def test_flips_mirror_the_output():
    image = ramp()
    np.testing.assert_allclose(apply(ViewParameters(flip_h=True), image), image[:, ::-1, 0], atol=1e-4)
    np.testing.assert_allclose(apply(ViewParameters(flip_v=True), image), image[::-1, :, 0], atol=1e-4)


@pytest.mark.parametrize(
    ("fill_mode", "expected"),
    [
        ("constant", [9, 9, 0, 1, 2]),
        ("nearest", [0, 0, 0, 1, 2]),
        ("reflect", [1, 0, 0, 1, 2]),  # half-sample symmetric: b a | a b c
        ("wrap", [2, 3, 0, 1, 2]),  # scipy's wrap (ImageDataGenerator): period size - 1
    ],
)
def test_fill_modes_differ_at_the_border_like_image_data_generator(fill_mode, expected):
    image = ramp()
    out = apply(ViewParameters(tx=-2.0), image, fill_mode=fill_mode, cval=9.0)
    np.testing.assert_allclose(out[0], expected, atol=1e-4)


# -------------------------------------------------------------------------- against the legacy generator
LEGACY_CASES = [
    {"theta": 90},
    {"tx": 2},
    {"ty": -3},
    {"shear": 17},
    {"zx": 0.5, "zy": 0.7},
    {"zx": 1.4, "zy": 1.2},
    {"theta": 33, "tx": 1.3, "ty": -0.7, "shear": 8, "zx": 0.9, "zy": 1.1},
    {"tx": 1.5, "flip_horizontal": True, "flip_vertical": True},
]


@pytest.mark.parametrize("fill_mode", FILL_MODES)
def test_matches_legacy_apply_transform_on_square_images(fill_mode):
    """ImageDataGenerator.apply_transform (scipy) is the reference; on square images the semantics agree."""
    legacy = pytest.importorskip("tensorflow.keras.preprocessing.image")
    pytest.importorskip("scipy")
    generator = legacy.ImageDataGenerator(fill_mode=fill_mode, cval=7.0)
    image = np.random.default_rng(0).uniform(0, 255, (9, 9, 3)).astype(np.float32)
    for case in LEGACY_CASES:
        reference = generator.apply_transform(image, case)
        geometry = {k: v for k, v in case.items() if not k.startswith("flip")}
        params = ViewParameters(
            **geometry, flip_h=case.get("flip_horizontal", False), flip_v=case.get("flip_vertical", False)
        )
        ours = warp(image, transform_matrix(params, (9, 9)), image_size=(9, 9), fill_mode=fill_mode, cval=7.0)
        np.testing.assert_allclose(ours, reference, atol=0.05, err_msg=f"{fill_mode} {case}")


def test_photometric_matches_legacy_channel_shift_and_brightness():
    image = np.random.default_rng(1).uniform(20, 200, (6, 6, 3)).astype(np.float32)
    shifted = photometric(image, ViewParameters(channel=30.0))
    np.testing.assert_allclose(shifted, np.clip(image + 30, image.min(), image.max()), atol=1e-4)
    assert shifted.max() == pytest.approx(image.max())  # clipped to the image's own range
    bright = photometric(image, ViewParameters(brightness=1.5))
    np.testing.assert_allclose(bright, np.clip(image * 1.5, 0, 255), atol=1e-3)
    assert bright.dtype == np.float32


def test_resize_is_folded_into_the_same_resampling():
    """A horizontal ramp resized from 40 to 10 columns keeps its (half-pixel-centred) values."""
    source = np.repeat(np.repeat(np.arange(40, dtype=np.float32)[None, :, None], 20, 0), 3, 2)
    clean = warp(source, None, image_size=(5, 10))
    np.testing.assert_allclose(clean[0, :, 0], 4 * np.arange(10) + 1.5, atol=0.05)
    # the same geometry at full and at DCT-reduced resolution (the reduced image is the 2x2 block average)
    reduced = source.reshape(20, 20, 2, 3).mean(axis=2)[::2]
    half = warp(reduced, None, image_size=(5, 10), source_size=(20, 40), ratio=2)
    np.testing.assert_allclose(half, clean, atol=0.05)
    # augmentation + resize in one step: a horizontal flip of the resized ramp
    flipped = warp(source, transform_matrix(ViewParameters(flip_h=True), (5, 10)), image_size=(5, 10))
    np.testing.assert_allclose(flipped[0, :, 0], clean[0, ::-1, 0], atol=0.05)


def resize_then_transform(
    source: np.ndarray, matrix: np.ndarray, size: tuple[int, int], fill_mode: str, cval: float
) -> np.ndarray:
    """The stated semantics step by step: ``cv2.resize`` to ``size`` first, then the affine transform in the
    resized frame with scipy.ndimage (order 1, the fill mode), as ImageDataGenerator.apply_transform does."""
    import cv2
    from scipy import ndimage

    resized = cv2.resize(source, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    (a, b, c), (d, e, f) = matrix[0], matrix[1]  # (x, y) -> (x, y); scipy indexes (row, col) = (y, x)
    rows_cols, offset = np.array([[e, d], [b, a]]), np.array([f, c])
    return np.stack(
        [
            ndimage.affine_transform(resized[..., k], rows_cols, offset, order=1, mode=fill_mode, cval=cval)
            for k in range(3)
        ],
        axis=-1,
    )


DOWNSCALE = ((40, 30), (8, 10))  # non-square source -> non-square target, 5x down in y, 3x in x
# whole target pixels: each output samples the resized image exactly at its pixels, any image content
WHOLE_PIXEL_CASES = [
    {"tx": -3},
    {"tx": 4, "ty": -5},
    {"tx": -13, "ty": 9},  # beyond one period of every fill mode
    {"theta": 90},  # the centres (4.5, 3.5) differ by a whole pixel: stays on the grid
    {"tx": -2, "flip_h": True, "flip_v": True},
]
# any coordinates: on a linear ramp the resize and the bilinear sampling are exact, so one resampling and two
# agree everywhere, the fill regions included (the half pixel beyond each edge is where folding could go wrong)
FRACTIONAL_CASES = [
    {"tx": -0.3},
    {"tx": 2.5, "ty": -0.5},
    {"zx": 1.5, "zy": 1.3},
    {"theta": 33, "tx": 1.3, "ty": -0.7, "shear": 8, "zx": 0.9, "zy": 1.1},
    {"zx": 3.3, "zy": 0.7, "theta": 20},  # several periods out
]


@pytest.mark.parametrize("fill_mode", FILL_MODES)
def test_folded_resize_matches_resize_first_then_transform(fill_mode):
    """The resize folded into the warp must equal resizing first, fill modes applied in the resized frame."""
    pytest.importorskip("scipy")
    (src_h, src_w), size = DOWNSCALE
    noise = np.random.default_rng(3).uniform(0, 255, (src_h, src_w, 3)).astype(np.float32)
    rows, cols = np.mgrid[0:src_h, 0:src_w].astype(np.float32)
    plane = np.stack([2 * cols + 5 * rows, 3 * cols + rows, 200 - cols - 2 * rows], axis=-1)
    for image, cases in ((noise, WHOLE_PIXEL_CASES), (plane, FRACTIONAL_CASES)):
        for case in cases:
            matrix = transform_matrix(ViewParameters(**case), size)
            ours = warp(image, matrix, image_size=size, fill_mode=fill_mode, cval=7.0)
            reference = resize_then_transform(image, matrix, size, fill_mode, cval=7.0)
            exact = np.ones(size, bool)
            if fill_mode == "reflect":  # documented: not in the half target pixel beyond an edge (see warp)
                exact = ~reflect_edge_strip(matrix, size)
                assert exact.mean() > 0.5
            np.testing.assert_allclose(
                ours[exact], reference[exact], atol=0.01, err_msg=f"{fill_mode} {case}"
            )


def test_aspect_crop_follows_keras_crop_to_aspect_ratio():
    """Keras' rule (smart_resize): the largest centred crop with the target's aspect ratio, integer pixels."""
    assert aspect_crop(375, 500, (224, 224)) == (62, 0, 375, 375)
    assert aspect_crop(500, 375, (224, 224)) == (0, 62, 375, 375)
    assert aspect_crop(40, 30, (8, 10)) == (0, 8, 30, 24)
    assert aspect_crop(30, 40, (30, 40)) == (0, 0, 40, 30)  # same aspect: the whole image
    assert aspect_crop(1, 1000, (10, 10)) == (499, 0, 1, 1)


@pytest.mark.parametrize("fill_mode", FILL_MODES)
def test_crop_to_aspect_ratio_is_crop_first_then_the_same_semantics(fill_mode):
    """With crop_to_aspect_ratio a view equals cropping the centred aspect crop first, then the plain semantics."""
    pytest.importorskip("scipy")
    (src_h, src_w), size = DOWNSCALE
    noise = np.random.default_rng(5).uniform(0, 255, (src_h, src_w, 3)).astype(np.float32)
    x0, y0, w, h = aspect_crop(src_h, src_w, size)
    cropped = np.ascontiguousarray(noise[y0 : y0 + h, x0 : x0 + w])
    clean = warp(noise, None, image_size=size, crop_to_aspect_ratio=True)
    np.testing.assert_allclose(clean, warp(cropped, None, image_size=size), atol=1e-4)
    assert not np.allclose(clean, warp(noise, None, image_size=size), atol=1.0)  # stretching differs
    for case in WHOLE_PIXEL_CASES:
        matrix = transform_matrix(ViewParameters(**case), size)
        ours = warp(noise, matrix, image_size=size, fill_mode=fill_mode, cval=7.0, crop_to_aspect_ratio=True)
        reference = resize_then_transform(cropped, matrix, size, fill_mode, cval=7.0)
        np.testing.assert_allclose(ours, reference, atol=0.01, err_msg=f"{fill_mode} {case}")


def test_crop_to_aspect_ratio_keeps_its_geometry_when_decoded_at_a_reduced_scale():
    """A DCT-reduced decode (ratio 2) maps the crop to the same place as the full-resolution image does."""
    for width in (200, 202):  # crop corner at x 40 (a whole decoded pixel: cv2.resize) and 41 (a warp)
        rows, cols = np.mgrid[0:120, 0:width].astype(np.float32)
        full = np.repeat((cols + 0.5 * rows)[..., None], 3, axis=2)  # linear: resampling is exact
        half = full[::2, ::2] + 0.5 + 0.25  # the 2x2 block means of a linear image (centres at 2i + .5)
        ours = warp(
            half, None, image_size=(12, 12), source_size=(120, width), ratio=2, crop_to_aspect_ratio=True
        )
        reference = warp(full, None, image_size=(12, 12), crop_to_aspect_ratio=True)
        np.testing.assert_allclose(ours, reference, atol=0.01, err_msg=f"width {width}")


def reflect_edge_strip(matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Output pixels whose target coordinate, mirrored into [-0.5, size - 0.5], lies in the half pixel beyond an
    edge ((-0.5, 0) or (size - 1, size - 0.5), either axis): where warp's reflect samples the source's outermost
    pixels while resize-first is flat."""
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    strip = np.zeros(size, bool)
    for row, n in ((matrix[0], width), (matrix[1], height)):
        t = row[0] * xs + row[1] * ys + row[2] + 0.5
        t = np.mod(t, 2 * n)
        t = np.where(t > n, 2 * n - t, t) - 0.5  # mirrored into [-0.5, n - 0.5]
        strip |= (t < -1e-6) | (t > n - 1 + 1e-6)
    return strip


def test_nearest_repeats_the_resized_edge_and_reflect_mirrors_about_the_same_edge():
    """A 40 -> 10 px ramp (resized: 4 x + 1.5): what lies beyond the left edge comes from the resized image."""
    source = np.repeat(np.repeat(np.arange(40, dtype=np.float32)[None, :, None], 4, 0), 3, 2)
    size = (2, 10)

    def shifted(fill_mode: str, tx: float) -> np.ndarray:
        matrix = transform_matrix(ViewParameters(tx=tx), size)
        return warp(source, matrix, image_size=size, fill_mode=fill_mode)[0, :, 0]

    np.testing.assert_allclose(shifted("nearest", -3.0)[:5], [1.5, 1.5, 1.5, 1.5, 5.5], atol=1e-3)
    # reflect: half-sample symmetric about -0.5, the same line in the source and the resized frame, so every
    # whole target pixel is the resized image's mirror image ...
    np.testing.assert_allclose(shifted("reflect", -3.0)[:4], [9.5, 5.5, 1.5, 1.5], atol=1e-3)
    # ... but within the half pixel beyond the edge (here target x -0.5) it samples the source's own edge pixel
    # (0) where resize-first is flat at the resized edge (1.5): the documented price of one warpAffine
    np.testing.assert_allclose(shifted("reflect", -0.5)[:2], [0.0, 3.5], atol=1e-3)


def test_warps_on_several_threads_equal_the_sequential_ones():
    """The coordinate maps are per-thread scratch buffers: threads and changing sizes must not mix them up."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(4)
    jobs = [
        (rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), size, mode)
        for size in ((8, 10), (12, 9))
        for mode in FILL_MODES
        for _ in range(3)
    ]
    matrix = {
        size: transform_matrix(ViewParameters(theta=20, tx=-1.5, zx=1.2), size) for size in ((8, 10), (12, 9))
    }

    def one(job):
        image, size, mode = job
        return warp(image, matrix[size], image_size=size, fill_mode=mode, cval=5.0)

    sequential = [one(job) for job in jobs]
    kept = [out.copy() for out in sequential]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(one, jobs * 4))
    for i, out in enumerate(threaded):
        np.testing.assert_array_equal(out, sequential[i % len(jobs)])
    for out, copy in zip(
        sequential, kept, strict=True
    ):  # no result shares memory with a later call's buffers
        np.testing.assert_array_equal(out, copy)


def test_very_long_images_are_resampled_too():
    """OpenCV's warps refuse sides >= 32767 px: such a source is subsampled first, the geometry kept."""
    source = np.zeros((40000, 4, 3), np.uint8)
    source[20000:] = 200  # bottom half bright
    out = warp(source, None, image_size=(8, 8))
    assert out.shape == (8, 8, 3)
    np.testing.assert_allclose(out[:4], 0, atol=1)
    np.testing.assert_allclose(out[4:], 200, atol=1)


# ------------------------------------------------------------------------------------------------ draws
def test_draw_parameters_follow_image_data_generator_ranges():
    policy = make_policy(
        rotation_range=15,
        width_shift_range=0.1,
        height_shift_range=3,  # pixels when >= 1
        shear_range=10,
        zoom_range=(0.8, 1.2),
        horizontal_flip=True,
        channel_shift_range=20,
        brightness_range=(0.5, 1.5),
    )
    lowest = draw_parameters(policy, (0.0,) * 10, (40, 60))
    highest = draw_parameters(policy, (1.0 - 1e-9,) * 10, (40, 60))
    assert lowest.theta == pytest.approx(-15) and highest.theta == pytest.approx(15)
    assert lowest.tx == pytest.approx(-6) and highest.tx == pytest.approx(6)  # 0.1 of the width 60
    assert lowest.ty == pytest.approx(-3) and highest.ty == pytest.approx(3)  # 3 pixels
    assert (
        lowest.shear == pytest.approx(-10)
        and highest.zx == pytest.approx(1.2)
        and lowest.zy == pytest.approx(0.8)
    )
    assert lowest.flip_h and not highest.flip_h and not lowest.flip_v  # vertical flip disabled
    assert lowest.channel == pytest.approx(-20) and highest.brightness == pytest.approx(1.5)
    none = draw_parameters(NO_AUGMENTATION, (0.3,) * 10, (40, 60))
    assert none == ViewParameters()


def test_zoom_factors_are_independent():
    policy = make_policy(zoom_range=(0.5, 1.5))
    draws = [draw_parameters(policy, view_uniforms(f"{i:064x}", 0, 0), (8, 8)) for i in range(200)]
    zx = np.array([d.zx for d in draws])
    zy = np.array([d.zy for d in draws])
    assert zx.min() >= 0.5 and zx.max() <= 1.5
    assert abs(np.corrcoef(zx, zy)[0, 1]) < 0.3 and not np.allclose(zx, zy)


def test_view_uniforms_are_a_pure_function_of_sha_seed_and_pass():
    a = view_uniforms("ab" * 32, 0, 1)
    assert a == view_uniforms("ab" * 32, 0, 1)
    assert len(a) == 10 and all(0 <= u < 1 for u in a)
    assert a != view_uniforms("ab" * 32, 1, 1)
    assert a != view_uniforms("ab" * 32, 0, 2)
    assert a != view_uniforms("cd" * 32, 0, 1)


def test_render_view_is_deterministic_and_clean_without_policy():
    image = (ramp(8) * 3).astype(np.uint8)
    policy = make_policy(rotation_range=40, zoom_range=(0.7, 1.3), horizontal_flip=True, fill_mode="wrap")
    one = render_view(image, "aa" * 32, 3, policy, image_size=(6, 6))
    np.testing.assert_array_equal(one, render_view(image, "aa" * 32, 3, policy, image_size=(6, 6)))
    assert not np.array_equal(one, render_view(image, "aa" * 32, 4, policy, image_size=(6, 6)))
    clean = render_view(image, "aa" * 32, 0, None, image_size=(6, 6))
    np.testing.assert_array_equal(clean, render_view(image, "aa" * 32, 9, NO_AUGMENTATION, image_size=(6, 6)))
    assert one.dtype == np.float32 and one.shape == (6, 6, 3)


@pytest.mark.parametrize("fill_mode", FILL_MODES)
def test_uint8_rendering_matches_float_rendering(fill_mode):
    """The pipeline keeps uint8 views (4x less to batch) when nothing photometric happens: same pixels +-1."""
    image = np.random.default_rng(2).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    policy = make_policy(
        rotation_range=30, zoom_range=(0.7, 1.3), shear_range=10, fill_mode=fill_mode, cval=9
    )
    kept = render_view(image, "ef" * 32, 1, policy, image_size=(10, 12), keep_uint8=True)
    exact = render_view(image.astype(np.float32), "ef" * 32, 1, policy, image_size=(10, 12))
    assert kept.dtype == np.uint8 and exact.dtype == np.float32
    assert np.abs(kept.astype(np.float32) - exact).max() <= 1.0
    photo = make_policy(rotation_range=30, brightness_range=(0.5, 1.5))
    assert render_view(image, "ef" * 32, 1, photo, image_size=(10, 12), keep_uint8=True).dtype == np.float32


# --------------------------------------------------------------------------------------- policies, hashes
def test_policy_from_config_uses_image_data_generator_vocabulary():
    policy = policy_from_config(AugmentConfig(zoom_range=0.2, rotation_range=15, seed=3, fill_mode="reflect"))
    assert policy.zoom_range == pytest.approx((0.8, 1.2))
    assert policy.rotation_range == 15 and policy.seed == 3 and policy.fill_mode == "reflect"
    assert policy_from_config(AugmentConfig(zoom_range=[0.5, 1.0])).zoom_range == (0.5, 1.0)
    with pytest.raises(TypeError, match="AugmentConfig"):
        policy_from_config({"zoom_range": 0.2})


def test_short_hash_is_stable_and_covers_every_visual_field_and_the_seed():
    policy = policy_from_config(AugmentConfig())
    # literals: the hash must not change across runs, machines or Python versions (nor when defaults move: these
    # are the hashes of params.yaml's policy and of the policy that changes nothing, as in earlier releases)
    assert policy.short_hash == "40ea51065981"
    assert NO_AUGMENTATION.short_hash == "2d4a69782fde"
    assert len(policy.short_hash) == 12
    assert policy_from_config(AugmentConfig(), name="other").short_hash == policy.short_hash
    variants = {
        "seed": 1,
        "rotation_range": 1,
        "width_shift_range": 0.2,
        "height_shift_range": 0.2,
        "shear_range": 1,
        "zoom_range": 0.1,
        "channel_shift_range": 1,
        "brightness_range": [0.9, 1.1],
        "horizontal_flip": False,
        "vertical_flip": True,
        "fill_mode": "wrap",
        "cval": 3,
        "rescale": 0.5,
    }
    hashes = {policy_from_config(AugmentConfig(**{k: v})).short_hash for k, v in variants.items()}
    assert len(hashes) == len(variants) and policy.short_hash not in hashes
    assert (
        policy_from_config(AugmentConfig(passes=7)).short_hash == policy.short_hash
    )  # passes: how many, not how


def test_view_id():
    policy = make_policy(rotation_range=5)
    assert view_id(None, 0) == CLEAN_VIEW == "clean"
    assert view_id(policy, 2) == f"{policy.short_hash}:2"
    with pytest.raises(ValueError, match="-1"):
        view_id(policy, -1)
    with pytest.raises(TypeError, match="AugmentPolicy"):
        view_id("policy", 0)


def test_policy_has_no_defaults_of_its_own():
    """A field left out is the config schema's default (params.yaml's value), converted as the config is."""
    assert AugmentPolicy() == policy_from_config(AugmentConfig())
    assert AugmentPolicy(name="x", rotation_range=5) == policy_from_config(
        AugmentConfig(rotation_range=5), name="x"
    )
    assert NO_AUGMENTATION.describe() == "no augmentation" and not NO_AUGMENTATION.is_geometric


def test_describe_names_what_differs_from_no_augmentation():
    assert policy_from_config(AugmentConfig()).describe() == (
        "rotation_range=15.0, width_shift_range=0.1, height_shift_range=0.1, shear_range=10.0, "
        "zoom_range=(0.8, 1.2), horizontal_flip=True, fill_mode=reflect"
    )
    assert make_policy(vertical_flip=True, cval=3.0).describe() == "vertical_flip=True, cval=3.0"


def test_policy_validates_its_fields():
    with pytest.raises(ValueError, match="'mirror'"):
        AugmentPolicy(fill_mode="mirror")
    with pytest.raises(ValueError, match="zoom_range"):
        AugmentPolicy(zoom_range=(1.2, 0.8))


# ------------------------------------------------------------------------------------------------ grids
GRID = {
    "rotation_range": [0, 15],
    "zoom_range": [0.1, [0.9, 1.3]],
    "fill_mode": ["nearest", "reflect", "wrap"],
}


def test_grid_expands_into_named_policies_in_product_order():
    cfg = AugmentConfig(grid=GRID, shear_range=5)
    policies = expand_grid(cfg, seed=0)
    assert len(policies) == 12
    assert policies[0].name == "rotation_range=0,zoom_range=0.1,fill_mode=nearest"
    assert policies[-1].name == "rotation_range=15,zoom_range=[0.9,1.3],fill_mode=wrap"
    assert policies[-1].zoom_range == (0.9, 1.3) and policies[0].zoom_range == pytest.approx((0.9, 1.1))
    assert all(p.shear_range == 5 for p in policies)  # the non-grid values come from the config
    assert len({p.short_hash for p in policies}) == 12


def test_grid_sampling_is_reproducible_and_a_subset():
    cfg = AugmentConfig(grid=GRID, grid_samples=4)
    full = [p.name for p in expand_grid(AugmentConfig(grid=GRID), seed=0)]
    first = [p.name for p in expand_grid(cfg, seed=7)]
    assert first == [p.name for p in expand_grid(cfg, seed=7)]
    assert len(first) == 4 and set(first) <= set(full)
    assert first == [n for n in full if n in first]  # kept in product order
    others = {tuple(p.name for p in expand_grid(cfg, seed=s)) for s in range(8)}
    assert len(others) > 1  # the seed matters
    assert len(expand_grid(AugmentConfig(grid=GRID, grid_samples=50), seed=0)) == 12  # k >= product: all


def test_no_grid_is_the_single_configured_policy():
    cfg = AugmentConfig(rotation_range=12)
    assert expand_grid(cfg, seed=0) == [policy_from_config(cfg)]
    with pytest.raises(ValueError, match="'x'"):
        expand_grid(cfg, seed="x")


def test_grid_values_are_validated_up_front():
    with pytest.raises(ParamsError, match="fill_mode"):
        params_from_dict({"augment": {"grid": {"fill_mode": ["nearest", "mirror"]}}})


# ------------------------------------------------------------------------------------------------ preview
def test_augment_preview_writes_one_png_per_policy(tmp_path, imagegen):
    """``retrainflow augment-preview`` before any index exists: images straight from the class folders."""
    import yaml
    from PIL import Image
    from typer.testing import CliRunner

    from flows.cli import app

    imagegen.make_class_folders(tmp_path / "images", ["red", "blue"], per_class=3, size=40)
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "data": {"root": str(tmp_path / "images")},
                "image": {"size": [32, 32]},
                "base": {"weights": "none"},
                "augment": {"rotation_range": 20, "grid": {"fill_mode": ["reflect", "constant"]}},
            }
        )
    )
    runner = CliRunner()
    args = ["augment-preview", "-p", str(params), "-w", str(tmp_path), "-n", "3", "-m", "2"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "reports").glob("augment_preview_*.png"))
    assert len(pngs) == 2
    for png in pngs:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200
    # --out names one file: with two policies it must ask for --policy
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "one.png")])
    assert result.exit_code == 1 and "--policy" in result.output
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "one.png"), "--policy", "fill_mode=constant"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "one.png").is_file()
    result = runner.invoke(app, [*args, "--policy", "nope"])
    assert result.exit_code == 1 and "'nope'" in result.output


def test_preview_and_features_pick_the_same_sampled_policies():
    """The preview shows what the features stage renders: the grid sampled with augment.seed, not params.seed."""
    from tasks.features.read import split_views
    from tasks.reports.preview import preview_policies

    params = params_from_dict({"seed": 42, "augment": {"seed": 3, "grid": GRID, "grid_samples": 4}})
    rendered = list(dict.fromkeys(p for _, p, _ in split_views(params, "train") if p is not None))
    shown = preview_policies(params)
    assert (
        [p.short_hash for p in shown]
        == [p.short_hash for p in rendered]
        == [p.short_hash for p in policies_for(params.augment)]
    )
    assert len(shown) == 4
    # the top-level seed samples another subset: the test would catch the preview using it
    assert [p.name for p in expand_grid(params.augment, params.seed)] != [p.name for p in shown]
    one = preview_policies(params, shown[2].short_hash)
    assert one == [shown[2]] and preview_policies(params, shown[1].name) == [shown[1]]


def _preview_params(tmp_path, imagegen, **sections):
    import yaml

    from tasks.config import load_params

    imagegen.make_class_folders(tmp_path / "images", ["red", "blue"], per_class=2, size=40)
    path = tmp_path / "params.yaml"
    raw = {
        "data": {"root": str(tmp_path / "images")},
        "image": {"size": [32, 32]},
        "base": {"weights": "none"},
    }
    path.write_text(yaml.safe_dump({**raw, **sections}))
    return load_params(path)


def test_preview_resizes_with_image_interpolation(tmp_path, monkeypatch, imagegen):
    import tasks.data.pipeline
    from tasks.layout import Layout
    from tasks.reports.preview import run_preview

    seen = []
    real = tasks.data.pipeline.view_dataset

    def spy(*args, **kwargs):
        seen.append(args[2].interpolation)
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.data.pipeline, "view_dataset", spy)
    params = _preview_params(tmp_path, imagegen, image={"size": [32, 32], "interpolation": "nearest"})
    run_preview(params, Layout(tmp_path / "ws"), images=2, views=1)
    assert seen == ["nearest", "nearest"]  # the clean column and the one augmented view


def test_preview_reads_data_max_pixels(tmp_path, imagegen):
    from tasks.layout import Layout
    from tasks.reports.preview import run_preview

    params = _preview_params(tmp_path, imagegen, data={"root": str(tmp_path / "images"), "max_pixels": 1599})
    with pytest.raises(FileNotFoundError, match="data.max_pixels=1599"):  # the images are 40 x 40 = 1600 px
        run_preview(params, Layout(tmp_path / "ws"), images=2, views=1)
