from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from msc_ray import images


def _png(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="png") if mode else Image.fromarray(arr).save(buf, format="png")
    return buf.getvalue()


def _enc(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _tif(arr):
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


GRAY8 = (np.arange(48 * 40) % 256).astype(np.uint8).reshape(40, 48)


@pytest.mark.parametrize(
    "data, channels",
    [
        (_png(GRAY8), 1),
        (_png(GRAY8.astype(np.uint16) * 257), 1),  # 16-bit PNG
        (_png(np.stack([GRAY8] * 3, -1)), 3),
        (_png(np.stack([GRAY8] * 4, -1)), 3),  # RGBA: alpha dropped
        (_enc(GRAY8, "jpeg"), 1),
        (_tif(GRAY8), 1),
        (_tif(GRAY8.astype(np.uint16) * 257), 1),  # 16-bit TIFF
        (_tif(np.stack([GRAY8] * 3, -1)), 3),
    ],
    ids=["png8", "png16", "rgb", "rgba", "jpeg", "tif8", "tif16", "tif-rgb"],
)
def test_decode_gives_one_representation(data, channels):
    img = images.decode(data, "x")
    assert img.dtype == np.float32 and img.shape == (channels, 40, 48)
    assert 0.0 <= img.min() and img.max() <= 1.0
    # the intensity ramp survives every format and bit depth (JPEG within its loss)
    assert abs(float(img[0, 0, 10]) - 10 / 255) < 0.03
    assert images.image_size(data, "x") == (48, 40)


@pytest.mark.parametrize(
    "data, channels, lossless",
    [
        (_png(GRAY8), 1, True),
        (_png(np.stack([GRAY8] * 4, -1)), 3, True),
        (_enc(GRAY8, "jpeg"), 1, False),
        (_tif(GRAY8), 1, True),
    ],
    ids=["png8", "rgba", "jpeg", "tif8"],
)
def test_uint8_decoding_is_the_stored_values(data, channels, lossless):
    """Archive scoring decodes to uint8: for an 8-bit image exactly what ``decode`` gives, times 255."""
    u8 = images.decode_u8(data, "x")
    assert u8.dtype == np.uint8 and u8.shape == (channels, 40, 48) and u8.flags.c_contiguous and u8.flags.writeable
    assert np.array_equal(u8, np.rint(images.decode(data, "x") * 255.0).astype(np.uint8))
    if lossless:
        assert all(np.array_equal(u8[c], GRAY8) for c in range(channels))


def test_uint8_decoding_rounds_sixteen_bits_to_the_nearest_level():
    arr = (np.arange(64, dtype=np.uint16) * 1031).reshape(8, 8)
    for data in (_png(arr), _tif(arr)):
        u8 = images.decode_u8(data, "x")
        assert u8.dtype == np.uint8 and np.abs(u8[0] / 255.0 - arr / 65535.0).max() <= 0.5 / 255 + 1e-7
    with pytest.raises(images.TruncatedImageError, match="^bad.png: "):
        images.decode_u8(_png(GRAY8)[:100], "bad.png")


def test_sixteen_bit_keeps_its_precision():
    arr = np.full((8, 8), 1000, np.uint16)
    for data in (_png(arr), _tif(arr)):
        assert images.decode(data, "x")[0, 0, 0] == pytest.approx(1000 / 65535, abs=1e-7)


@pytest.mark.parametrize(
    "data, cls",
    [
        (b"", images.EmptyImageError),
        (_png(GRAY8)[: len(_png(GRAY8)) // 2], images.TruncatedImageError),
        (b"this is a text file, not an image" * 10, images.NotAnImageError),
        (_tif(GRAY8)[:60], images.TruncatedImageError),
    ],
    ids=["empty", "truncated-png", "text", "truncated-tif"],
)
def test_failures_are_typed_and_name_the_file(data, cls):
    with pytest.raises(cls) as err:
        images.decode(data, "sstack/1/bad.png")
    msg = str(err.value)
    assert msg.startswith("sstack/1/bad.png: ") and "\n" not in msg
    assert isinstance(err.value, images.ImageError)


@pytest.mark.parametrize("data", [_png(GRAY8), _tif(GRAY8)], ids=["png", "tif"])
def test_pixel_limit(data):
    with pytest.raises(images.ImageTooLargeError, match="big.png"):
        images.decode(data, "big.png", max_pixels=100)
    with pytest.raises(images.ImageTooLargeError):
        images.image_size(data, "big.png", max_pixels=100)


def test_extension_case_is_ignored():
    assert images.is_image_name("A.PNG") and images.is_image_name("b.TiFf") and images.is_image_name("c.JPEG")
    assert not images.is_image_name("notes.txt")


def test_to_channels():
    g = np.random.default_rng(0).random((1, 4, 4), dtype=np.float32)
    assert images.to_channels(g, 3).shape == (3, 4, 4)
    assert np.allclose(images.to_channels(images.to_channels(g, 3), 1), g)


def _png_with(img, **save):
    """PNG bytes of an array or a PIL image, saved by PIL with ``save`` options."""
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format="png", **save)
    return buf.getvalue()


RGB8 = np.stack([GRAY8, GRAY8[::-1], 255 - GRAY8], -1)


@pytest.mark.parametrize(
    "data, fast",
    [
        (_png(GRAY8), True),
        (_png(np.arange(65536, dtype=np.uint16).reshape(256, 256)), True),  # every 16-bit value
        (_png(np.stack([GRAY8, GRAY8], -1), "LA"), True),
        (_png(RGB8), True),
        (_png(np.concatenate([RGB8, GRAY8[..., None]], -1)), True),
        (_png_with(GRAY8, transparency=7), True),
        (_png_with(Image.fromarray(RGB8).convert("P")), False),
        (_png_with(Image.fromarray(GRAY8 > 100)), False),
    ],
    ids=["gray8", "gray16-all-values", "gray-alpha", "rgb", "rgba", "gray-trns", "palette", "one-bit"],
)
def test_pngs_decoded_by_torchvision_equal_the_pil_path(data, fast):
    """Scoring decodes gray and RGB(A) PNGs of 8 and 16 bits with torchvision's decoder (faster), and
    must give exactly the PIL path's uint8; palette and one-bit PNGs are left to PIL."""
    got = images._png_u8(data, "x", images.DEFAULT_MAX_PIXELS)
    assert (got is not None) == fast
    want = images._decode_u8_pil(data, "x", images.DEFAULT_MAX_PIXELS)
    assert np.array_equal(images.decode_u8(data, "x"), want)
    if fast:
        assert got.dtype == np.uint8 and got.flags.c_contiguous and np.array_equal(got, want)
    with pytest.raises(images.ImageTooLargeError, match="^big.png: "):
        images.decode_u8(data, "big.png", max_pixels=10)
