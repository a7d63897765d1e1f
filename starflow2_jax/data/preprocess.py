"""Per-example preprocessing: decode, scale to [-1, 1], noise augmentation, label/caption dropout.

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
    """

    levels: int
    noise: str = "none"
    noise_std: float = 0.0
    label_dropout: float = 0.0
    caption_dropout: float = 0.0
    random_caption: bool = True

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

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """``{'image': float32 (H, W, C), 'label': int32, 'caption': str, 'index': int64}``.

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
        if self.noise == "uniform":
            image = image + (rng.random(image.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(2 / self.levels)
        elif self.noise == "gaussian":
            image = image + np.float32(self.noise_std) * rng.standard_normal(image.shape, dtype=np.float32)
        return {
            "image": image.astype(np.float32),
            "label": np.int32(label),
            "caption": caption,
            "index": np.int64(example.get("index", -1)),
        }
