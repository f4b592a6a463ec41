"""Bytes → image array, with every failure a typed error that names the file.

One representation for every input: float32 ``(C, H, W)`` in [0, 1], ``C`` = 1 for grayscale and 3
for colour (:func:`decode`); archive scoring decodes to uint8 ``(C, H, W)`` instead (:func:`decode_u8`),
a quarter of the bytes to move to the model. PNG, JPEG and TIFF in 8 or 16 bits, grayscale, RGB or
RGBA (alpha is dropped), palette images (expanded), any case of extension — the format is read from
the bytes, not the name.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 64_000_000  # a 8000 × 8000 frame; anything larger is refused before decoding


class ImageError(ValueError):
    """An image that cannot be used. ``str()`` is one line naming the file and the reason."""

    reason = "unreadable image"

    def __init__(self, name: str, detail: str = ""):
        self.name = name
        self.detail = " ".join(str(detail).split())[:200]
        super().__init__(f"{name}: {self.reason}" + (f" ({self.detail})" if self.detail else ""))


class EmptyImageError(ImageError):
    reason = "empty file (zero bytes)"


class NotAnImageError(ImageError):
    reason = "not an image"


class TruncatedImageError(ImageError):
    reason = "truncated or corrupt image"


class ImageTooLargeError(ImageError):
    reason = "image larger than the pixel limit"


class UnsupportedImageError(ImageError):
    reason = "unsupported image layout"


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_tiff(data: bytes) -> bool:
    return data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _to_hwc(arr: np.ndarray, name: str) -> np.ndarray:
    """(H, W), (H, W, C) or planar (C, H, W) array → (H, W, 1 or 3): gray, or colour without alpha."""
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise UnsupportedImageError(name, f"shape {arr.shape}")
    if arr.shape[-1] == 2:  # gray + alpha
        arr = arr[..., :1]
    elif arr.shape[-1] == 4:  # RGBA
        arr = arr[..., :3]
    return arr


def _to_chw(arr: np.ndarray, name: str) -> np.ndarray:
    """(H, W), (H, W, C) or planar (C, H, W) integer/float array → float32 (C, H, W) in [0, 1]."""
    arr = _to_hwc(arr, name)
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype in (np.uint16, np.int32, np.uint32) or arr.dtype == np.int16:
        out = arr.astype(np.float32) / 65535.0
    elif arr.dtype == np.bool_:
        out = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        hi = float(np.nanmax(out)) if out.size else 1.0
        if hi > 1.0:
            out = out / hi
    else:
        raise UnsupportedImageError(name, f"pixel type {arr.dtype}")
    return np.ascontiguousarray(np.clip(np.moveaxis(out, -1, 0), 0.0, 1.0))


def _check_pixels(w: int, h: int, name: str, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise ImageTooLargeError(name, f"{w}×{h} > {max_pixels} pixels")


def image_size(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the header alone; raises :class:`ImageError` like :func:`decode`."""
    if not data:
        raise EmptyImageError(name)
    if _is_tiff(data):
        import tifffile

        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tf:
                shape = tf.pages[0].shape
                axes = tf.pages[0].axes
        except Exception as exc:
            raise TruncatedImageError(name, exc) from None
        h, w = shape[axes.index("Y")], shape[axes.index("X")]
    else:
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except UnidentifiedImageError:
            raise NotAnImageError(name) from None
        except Exception as exc:
            raise TruncatedImageError(name, exc) from None
    _check_pixels(w, h, name, max_pixels)
    return int(w), int(h)


def decode(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``data`` (the bytes of file ``name``) to float32 ``(C, H, W)`` in [0, 1].

    Raises a subclass of :class:`ImageError` for zero bytes, bytes that are no image, truncated or
    corrupt data, images over ``max_pixels`` and unsupported layouts."""
    return _to_chw(_decode_array(data, name, max_pixels), name)


def decode_u8(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode to uint8 ``(C, H, W)`` (C = 1 or 3), the same errors as :func:`decode`. An 8-bit image
    comes as stored (``decode`` of it is exactly this / 255); 16-bit and float images are rounded to
    the nearest of 256 levels (at most half a level, 0.002 on the [0, 1] scale, from ``decode``)."""
    fast = _png_u8(data, name, max_pixels)
    return fast if fast is not None else _decode_u8_pil(data, name, max_pixels)


def _decode_u8_pil(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    arr = _to_hwc(_decode_array(data, name, max_pixels), name)
    if arr.dtype != np.uint8:
        return np.rint(_to_chw(arr, name) * 255.0).astype(np.uint8)
    return np.require(np.moveaxis(arr, -1, 0), requirements=["C", "W"])  # a decoder's buffer can be read-only


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_u8(data: bytes, name: str, max_pixels: int) -> np.ndarray | None:
    """A gray or RGB(A) PNG of 8 or 16 bits decoded by torchvision's libpng decoder — the scoring
    path's bottleneck on a GPU machine; on 512-px 16-bit PNGs 1.2× PIL's per core here, 1.5× on a
    16-core GPU machine — to exactly what the PIL
    path gives (alpha dropped; 16 bits to the nearest of 256 levels, ``(v + 128) // 257``, equal to the
    float path's rounding for every value). None for anything else (palette or sub-byte images, bytes
    that are no PNG, a decoder error): the PIL path decides, and names the error."""
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour = data[24], data[25]
    if depth not in (8, 16) or colour not in (0, 2, 4, 6):  # 0 gray, 2 RGB, 4 gray + alpha, 6 RGBA
        return None
    _check_pixels(w, h, name, max_pixels)
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_png

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.frombuffer warns that bytes are not writable
            t = decode_png(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except Exception:  # truncated or corrupt: PIL's path raises the typed error
        return None
    arr = t.numpy()
    if arr.ndim != 3 or arr.shape[0] not in (1, 2, 3, 4):
        return None
    arr = arr[:1] if arr.shape[0] == 2 else arr[:3]  # alpha dropped
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return np.ascontiguousarray(arr) if arr.dtype == np.uint8 else None


def _decode_array(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """The decoded pixel array as the format stores it (PIL's or tifffile's layout and type)."""
    if not data:
        raise EmptyImageError(name)
    if _is_tiff(data):
        import tifffile

        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tf:
                page = tf.pages[0]
                shape, axes = page.shape, page.axes
                _check_pixels(shape[axes.index("X")], shape[axes.index("Y")], name, max_pixels)
                arr = page.asarray()
        except ImageError:
            raise
        except Exception as exc:
            raise TruncatedImageError(name, exc) from None
        return arr
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise NotAnImageError(name) from None
    except Exception as exc:
        raise TruncatedImageError(name, exc) from None
    with im:
        _check_pixels(im.width, im.height, name, max_pixels)
        try:
            im.load()
        except Exception as exc:
            raise TruncatedImageError(name, exc) from None
        mode = im.mode
        if mode in ("P", "PA"):
            im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
        elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("L" if mode == "1" else "RGB")
        arr = np.asarray(im)
        if mode.startswith("I;16"):
            arr = arr.astype(np.uint16)
        elif mode == "I":  # 16-bit PNGs open as 32-bit integer images
            arr = np.clip(arr, 0, 65535).astype(np.uint16)
    return arr


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """(C, H, W) → (channels, H, W): gray is repeated for 3 channels, colour is averaged for 1."""
    c = img.shape[0]
    if c == channels:
        return img
    if channels == 3 and c == 1:
        return np.repeat(img, 3, axis=0)
    if channels == 1 and c == 3:
        return img.mean(axis=0, keepdims=True, dtype=np.float32)
    raise ValueError(f"cannot turn {c} channels into {channels}")
