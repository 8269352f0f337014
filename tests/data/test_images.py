"""The one decoder (`decode_rgb`) and the per-file validation the index runs (`inspect_image`)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from tasks.data.images import (
    ImageRejected,
    decode_rgb,
    exif_orientation,
    inspect_image,
    load_rgb,
    read_header,
)

BIG = 10**8


def pillow_upright(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


@pytest.mark.parametrize(
    ("fmt", "mode", "kwargs"),
    [
        ("PNG", "RGB", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "L", {}),
        ("PNG", "LA", {}),
        ("PNG", "P", {"transparency": 0}),
        ("PNG", "1", {}),
        ("BMP", "RGB", {}),
        ("BMP", "L", {}),
        ("GIF", "P", {}),
        ("WEBP", "RGB", {"lossless": True}),
        ("WEBP", "RGBA", {"lossless": True}),
    ],
)
def test_lossless_formats_decode_to_the_same_rgb_as_pillow(fmt, mode, kwargs, imagegen):
    data = imagegen.encode(Image.fromarray(imagegen.noisy_array(20, 30)).convert(mode), fmt, **kwargs)
    got = decode_rgb(data).numpy()
    assert got.dtype == np.uint8 and got.shape == (20, 30, 3)
    np.testing.assert_array_equal(got, pillow_upright(data))


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_modes_decode_to_rgb_close_to_pillow(mode, imagegen):
    data = imagegen.encode(Image.fromarray(imagegen.noisy_array(24, 32)).convert(mode), "JPEG", quality=95)
    got = decode_rgb(data).numpy()
    assert got.shape == (24, 32, 3)
    assert np.abs(got.astype(int) - pillow_upright(data).astype(int)).mean() < 3


def test_png16_is_scaled_to_8_bit(imagegen):
    data = imagegen.png16_bytes(12, 10, seed=3)
    arr16 = np.random.default_rng(3).integers(0, 65536, (12, 10, 3))
    got = decode_rgb(data).numpy()
    assert got.dtype == np.uint8 and got.shape == (12, 10, 3)
    assert np.abs(got.astype(int) - (arr16 >> 8)).max() <= 1


def test_animated_gif_gives_the_first_frame(imagegen):
    got = decode_rgb(imagegen.good_odd_image_files()["animated.gif"]).numpy()
    assert got.shape == (16, 16, 3)
    np.testing.assert_array_equal(got[0, 0], [255, 0, 0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_eager_and_in_tf_data(orientation, imagegen):
    data = imagegen.exif_rotated_jpeg(orientation, 24, 32)
    with Image.open(io.BytesIO(data)) as image:
        assert exif_orientation(image) == orientation
    expected = pillow_upright(data)
    eager = decode_rgb(data, orientation).numpy()
    ds = tf.data.Dataset.from_tensors((data, np.int64(orientation))).map(lambda c, o: decode_rgb(c, o))
    mapped = next(iter(ds)).numpy()
    assert eager.shape == expected.shape == mapped.shape
    assert np.abs(eager.astype(int) - expected.astype(int)).mean() < 3
    np.testing.assert_array_equal(eager, mapped)


@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_jpeg_dct_ratio_python_int_and_tensor(ratio, imagegen):
    data = imagegen.encode(Image.fromarray(imagegen.noisy_array(64, 48)), "JPEG")
    assert decode_rgb(data, 1, ratio).shape == (64 // ratio, 48 // ratio, 3)
    ds = tf.data.Dataset.from_tensors(data).map(lambda c: decode_rgb(c, tf.constant(6), tf.constant(ratio)))
    assert tuple(next(iter(ds)).shape) == (48 // ratio, 64 // ratio, 3)


def test_ratio_is_ignored_for_png(imagegen):
    data = imagegen.encode(Image.fromarray(imagegen.noisy_array(16, 16)), "PNG")
    assert decode_rgb(data, 1, 4).shape == (16, 16, 3)


@pytest.mark.parametrize("bad", [3, 0, 16])
def test_bad_ratio_rejected_with_value(bad):
    with pytest.raises(ValueError, match=f"got {bad}"):
        decode_rgb(b"x", 1, bad)


def test_known_jpeg_skips_sniffing_with_the_same_pixels(imagegen):
    jpeg = imagegen.encode(Image.fromarray(imagegen.noisy_array(40, 24)), "JPEG")
    np.testing.assert_array_equal(decode_rgb(jpeg, 6, 2, jpeg=True), decode_rgb(jpeg, 6, 2))
    png = imagegen.encode(Image.fromarray(imagegen.noisy_array(8, 8)), "PNG")
    # told JPEG but it is not: TF's DecodeJpeg kernel reads the real format, so still the right pixels
    np.testing.assert_array_equal(decode_rgb(png, 1, 1, jpeg=True), decode_rgb(png))
    with pytest.raises(ValueError, match="got False"):
        decode_rgb(jpeg, jpeg=False)


def test_bad_orientation_type_rejected():
    with pytest.raises(ValueError, match="orientation"):
        decode_rgb(b"x", "6")


def test_out_of_range_orientation_tensor_means_as_stored(imagegen):
    data = imagegen.encode(Image.fromarray(imagegen.noisy_array(10, 20)), "PNG")
    assert decode_rgb(data, tf.constant(42)).shape == (10, 20, 3)


EXPECTED_REASONS = {
    "zero_bytes.jpg": "empty file",
    "truncated.jpg": "TensorFlow cannot decode",
    "truncated.png": "TensorFlow cannot decode",
    "text.jpg": "text or HTML",
    "page.jpg": "text or HTML",
    "bomb.png": "exceeds data.max_pixels",
    "palette.bmp": "BMP mode P",
    "anim.webp": "animated WebP",
    "image.tiff": "unsupported format TIFF",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_REASONS))
def test_bad_files_are_rejected_with_a_reason(name, imagegen):
    with pytest.raises(ImageRejected) as info:
        inspect_image(imagegen.bad_image_files()[name], max_pixels=100_000_000)
    assert EXPECTED_REASONS[name] in info.value.reason


def test_palette_bmp_is_one_pillow_opens_but_tf_decodes_wrongly(imagegen):
    """Why palette BMPs are rejected: TF returns wrong pixels for them without any error."""
    data = imagegen.bad_image_files()["palette.bmp"]
    tf_pixels = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    assert not np.array_equal(tf_pixels, pillow_upright(data))


def test_bomb_rejected_from_the_header_with_a_small_limit(imagegen):
    data = imagegen.encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageRejected, match="10000 pixels exceeds data.max_pixels=9999"):
        read_header(data, max_pixels=9999)
    assert read_header(data, max_pixels=10000)[:3] == ("PNG", 100, 100)


def test_huge_declared_bomb_never_decoded_even_beyond_pillows_own_limit(imagegen):
    with pytest.raises(ImageRejected, match="pixels"):
        inspect_image(imagegen.bomb_png(100_000, 100_000), max_pixels=1000)


def test_odd_but_valid_files_are_accepted(good_odd_image):
    data = good_odd_image
    info = inspect_image(data, max_pixels=BIG)
    pixels = decode_rgb(data, info.orientation).numpy()
    assert pixels.shape == (info.height, info.width, 3)
    assert info.format in ("JPEG", "PNG", "BMP", "GIF", "WEBP")


def test_exif_rotated_jpeg_reports_swapped_size_and_decodes_upright(imagegen):
    data = imagegen.exif_rotated_jpeg(6, height=24, width=32)
    info = inspect_image(data, max_pixels=BIG)
    assert (info.width, info.height, info.orientation) == (24, 32, 6)
    assert decode_rgb(data, info.orientation).shape == (32, 24, 3)


def test_one_pixel_image(imagegen):
    info = inspect_image(imagegen.good_odd_image_files()["one_pixel.png"], max_pixels=BIG)
    assert (info.width, info.height) == (1, 1)


def test_load_rgb_reads_orientation_from_the_file(tmp_path, imagegen):
    path = tmp_path / "ö photo.jpg"
    path.write_bytes(imagegen.exif_rotated_jpeg(8, 24, 32))
    assert load_rgb(path).shape == (32, 24, 3)


def test_max_pixels_must_be_positive():
    with pytest.raises(ValueError, match="got 0"):
        read_header(b"abc", 0)


def test_one_bit_bmp_pillow_opens_but_tf_cannot_decode_is_rejected_by_its_header(imagegen):
    data = imagegen.encode(Image.fromarray(imagegen.noisy_array()).convert("1"), "BMP")
    with Image.open(io.BytesIO(data)) as image:
        assert image.load() is not None  # Pillow reads it ...
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_image(data, channels=3, expand_animations=False)  # ... TensorFlow cannot
    with pytest.raises(ImageRejected, match="BMP mode 1") as info:
        inspect_image(data, max_pixels=BIG)
    assert info.value.kind == "unsupported"


def test_truncated_jpeg_header_fine_but_real_decode_fails(imagegen):
    data = imagegen.bad_image_files()["truncated.jpg"]
    assert read_header(data, BIG)[:3] == ("JPEG", 64, 48)  # the header alone would let it through
    with pytest.raises(ImageRejected) as info:
        inspect_image(data, BIG)
    assert info.value.kind == "undecodable"
