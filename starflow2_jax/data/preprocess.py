"""Per-example preprocessing: decode, scale to [-1, 1], resize/channels, noise augmentation, label/caption dropout.

``ImagePreprocess`` is a grain random-map transform: ``preprocess(example, rng) -> example`` where
``rng`` is the ``np.random.Generator`` that ``grain.MapDataset.random_map`` seeds from the pipeline
seed and the element's position in the (shuffled, repeated) stream. Every random value therefore
depends only on (seed, epoch, position), so a restored iterator reproduces it exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from starflow2_jax.data.images import decode_image, scale_pixels

NOISE_KINDS = ("none", "uniform", "gaussian")
CHANNEL_OPTIONS = (0, 1, 3)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """Turns a stored example into ``{'image', 'label', 'caption', 'index'}`` for training.

    Attributes:
      levels: the largest stored pixel value (16 for the digits, 255 for photos); ``x = v / (levels/2) - 1``.
      noise: ``'none'``; ``'uniform'`` dequantisation ``x + (u - 1/2) * (2 / levels)``, ``u ~ U[0, 1)``,
        which spreads each value uniformly over its bin (width ``2 / levels``, centred on ``x``);
        or ``'gaussian'`` ``x + noise_std * eps``, ``eps ~ N(0, 1)``.
      noise_std: the Gaussian σ (in ``[-1, 1]`` units); must be > 0 for ``'gaussian'``, 0 otherwise.
      label_dropout: probability that the label is replaced by -1 (unconditional, for guidance).
      caption_dropout: probability that the caption is replaced by ``""``.
      random_caption: pick one of the example's captions uniformly at random; else always the first.
      image_size: 0 keeps the stored size; else the output side ``S``: a square stored image of side
        ``k * S`` is area-averaged (mean over ``k × k`` blocks), one of side ``S / k`` is upsampled by
        pixel repetition (nearest); other sizes (non-square, non-integer factor) raise ValueError.
      channels: 0 keeps the stored channels; 3 makes grey (1 channel) RGB by repeating it (RGB stays);
        1 makes RGB grey with the ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (grey stays).
        Any other stored channel count raises ValueError.

    Resizing and channel conversion act on the scaled float image (both are linear, so this equals
    doing them on the pixel values first) and happen before the noise is added; the uniform
    dequantisation keeps its bin width ``2 / levels``.
    """

    levels: int
    noise: str = "none"
    noise_std: float = 0.0
    label_dropout: float = 0.0
    caption_dropout: float = 0.0
    random_caption: bool = True
    image_size: int = 0
    channels: int = 0

    def __post_init__(self):
        if isinstance(self.levels, bool) or not isinstance(self.levels, (int, np.integer)) or self.levels < 1:
            raise ValueError(f"ImagePreprocess.levels {self.levels!r}; expected a positive int (16 digits, 255 photos)")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"ImagePreprocess.noise {self.noise!r}; expected one of {NOISE_KINDS}")
        if self.noise == "gaussian" and not self.noise_std > 0:
            raise ValueError(f"ImagePreprocess.noise_std {self.noise_std!r}; expected > 0 for noise='gaussian'")
        if self.noise != "gaussian" and self.noise_std != 0:
            raise ValueError(f"ImagePreprocess.noise_std {self.noise_std!r} is only used with noise='gaussian' "
                             f"(noise is {self.noise!r}); leave it 0")
        for field in ("label_dropout", "caption_dropout"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ImagePreprocess.{field} {value!r}; expected a probability in [0, 1]")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, (int, np.integer)) \
                or self.image_size < 0:
            raise ValueError(f"ImagePreprocess.image_size {self.image_size!r}; expected an int >= 0 "
                             "(0 keeps the stored size)")
        if isinstance(self.channels, bool) or not isinstance(self.channels, (int, np.integer)) \
                or self.channels not in CHANNEL_OPTIONS:
            raise ValueError(f"ImagePreprocess.channels {self.channels!r}; expected one of {CHANNEL_OPTIONS} "
                             "(0 keeps the stored channels, 1 grey, 3 RGB)")

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """``{'image': float32 (H, W, C), 'label': int32, 'caption': str, 'index': int64}``.

        ``H = W = image_size`` and ``C = channels`` where those are set, else the stored ones.

        ``example`` is what a TFDS data source returns: ``image`` (uint8 array or encoded bytes),
        optional ``label`` (default -1), optional ``captions`` (list of str/bytes; default none → ""),
        optional ``index`` (default -1). The random draws happen in a fixed order (label, caption,
        noise), so turning noise on or off leaves the dropout decisions unchanged.
        """
        label = int(example.get("label", -1))
        if rng.random() < self.label_dropout:
            label = -1
        captions = list(example.get("captions", ()))
        choice = int(rng.integers(len(captions))) if captions and self.random_caption else 0
        caption = captions[choice] if captions else ""
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8")
        if rng.random() < self.caption_dropout:
            caption = ""
        image = scale_pixels(decode_image(example["image"]), self.levels)  # (H, W, C)
        image = convert_channels(resize_square(image, self.image_size), self.channels)
        image = add_noise(image, rng, self.noise, self.noise_std, self.levels)
        return {
            "image": image.astype(np.float32),
            "label": np.int32(label),
            "caption": caption,
            "index": np.int64(example.get("index", -1)),
        }


def add_noise(image: np.ndarray, rng: np.random.Generator, noise: str, noise_std: float, levels: int) -> np.ndarray:
    """``image`` plus ``noise`` (``ImagePreprocess``'s: none, uniform dequantisation or Gaussian); same shape."""
    if noise == "uniform":
        return image + (rng.random(image.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(2 / levels)
    if noise == "gaussian":
        return image + np.float32(noise_std) * rng.standard_normal(image.shape, dtype=np.float32)
    return image


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` (H, W, C) float resized to ``(size, size, C)`` by an integer factor; ``size`` 0 keeps it.

    Downsampling by ``k`` (``H = W = k * size``) takes the mean of each ``k × k`` block (area
    averaging); upsampling by ``k`` (``size = k * H``) repeats each pixel ``k × k`` times (nearest).
    Anything else raises ValueError naming both sizes.
    """
    if size == 0:
        return image
    height, width, channels = image.shape
    if height != width:
        raise ValueError(f"ImagePreprocess.image_size {size}: the stored image is {height}x{width}, not square; "
                         "only square images can be resized by an integer factor")
    if height == size:
        return image
    if height % size == 0:
        factor = height // size
        return image.reshape(size, factor, size, factor, channels).mean(axis=(1, 3), dtype=np.float32)
    if size % height == 0:
        factor = size // height
        return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    raise ValueError(f"ImagePreprocess.image_size {size}: the stored size {height}x{width} is not an integer "
                     f"multiple or divisor of {size}x{size}")


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """``image`` (H, W, C) with ``channels`` channels (0 keeps them): grey→RGB repeats, RGB→grey is BT.601 luma."""
    stored = image.shape[-1]
    if channels == 0 or stored == channels:
        return image
    if channels == 3 and stored == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 1 and stored == 3:
        return (image @ _LUMA)[..., None]
    raise ValueError(f"ImagePreprocess.channels {channels}: cannot convert a stored image with {stored} channels "
                     "(expected 1 = grey or 3 = RGB)")
