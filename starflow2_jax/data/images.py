"""Image helpers shared by the dataset builders and the preprocessing: PNG bytes, resize/crop, scaling.

Pixel convention: stored images are uint8 arrays ``(H, W, C)`` whose values lie in ``0..levels``
(``levels`` = 16 for the scikit-learn digits, 255 for photos). Models see ``x = v / (levels / 2) - 1``
in ``[-1, 1]``; ``unscale_pixels`` is the inverse used to write samples back as images.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image ``(H, W)``, ``(H, W, 1)`` (grey) or ``(H, W, 3)`` (RGB), values kept as-is."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"encode_png: pixels dtype {pixels.dtype}; expected uint8")
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)):
        raise ValueError(f"encode_png: pixels shape {pixels.shape}; expected (H, W), (H, W, 1) or (H, W, 3)")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """uint8 array ``(H, W, C)`` from encoded image bytes (PNG/JPEG/...) or an already decoded array.

    A 2-D array gets a trailing channel axis of size 1.
    """
    if isinstance(data, (bytes, bytearray)):
        with Image.open(io.BytesIO(data)) as image:
            data = np.asarray(image)
    pixels = np.asarray(data)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3:
        raise ValueError(f"decode_image: image shape {pixels.shape}; expected (H, W) or (H, W, C)")
    return pixels


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Opens the image file at ``path`` as an RGB PIL image (EXIF orientation applied, alpha dropped).

    Raises ValueError naming the file when it is missing or not a readable image.
    """
    if not os.path.isfile(path):
        raise ValueError(f"image file {os.fspath(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"image file {os.fspath(path)!r} is not a readable image: {error}") from error


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central square of ``image`` (side = its shorter side) resized to ``size²`` (bicubic, antialiased).

    Same as resizing the shorter side to ``size`` then center-cropping, but done in one resampling
    from the exact (sub-pixel) central square, so the crop is never shifted by rounding.
    """
    if size <= 0:
        raise ValueError(f"resize_and_center_crop: size {size}; expected a positive int")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def scale_pixels(pixels: np.ndarray, levels: int) -> np.ndarray:
    """float32 ``x = v / (levels / 2) - 1`` in ``[-1, 1]`` for integer pixels ``v`` in ``0..levels``; same shape."""
    return np.asarray(pixels, np.float32) / np.float32(levels / 2) - np.float32(1)


def unscale_pixels(x: np.ndarray, levels: int) -> np.ndarray:
    """uint8 pixels ``round((x + 1) * levels / 2)`` clipped to ``0..levels`` (inverse of ``scale_pixels``)."""
    pixels = np.rint((np.asarray(x, np.float32) + 1) * (levels / 2))
    return np.clip(pixels, 0, levels).astype(np.uint8)
