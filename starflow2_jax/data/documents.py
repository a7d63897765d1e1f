"""Stored examples → documents: one item list for interleaved documents and image–text pairs alike.

A **document** is ``{'items': [...], 'index': int64, 'pair': bool}`` with items in reading order::

    {'text': str[, 'loss': bool]}                        a text segment (``loss`` False: context, not
                                                         trained; absent: trained)
    {'image': float32 (H, W, C), 'target': bool}         an image in [-1, 1] (+ noise), and whether it
                                                         is a generation target (True) or context

and ``pair`` True when it came from an image–text pair (the model's layout may reorder those).

``DocumentPreprocess`` is a grain random-map transform (``f(example, rng) -> document``) that
accepts both stored formats, so both go through one pipeline (``grain.MapDataset.mix`` them, then
the model's sequence layout, then ``data.packing``):

- an interleaved example (``starflow2_interleaved``: ``kinds``, ``texts``, ``images``,
  ``image_target``; optionally ``text_loss``, as generated documents have) gives its items as stored;
- an image–text pair (``starflow2_image_text``, ``starflow2_digits``, ...: ``image`` and
  ``captions``) is the document **caption, then image** (a generation target): one caption, chosen
  at random (or the first), as for ``ImagePreprocess``; an example without captions gives the image
  alone. ``label`` is not part of a document.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from starflow2_jax.data.images import decode_image, scale_pixels
from starflow2_jax.data.interleaved import document_items
from starflow2_jax.data.preprocess import ImagePreprocess, add_noise, convert_channels, resize_square


def pair_items(example: Mapping[str, Any], caption: int = 0) -> list[dict[str, Any]]:
    """The items of an image–text pair: ``[{'text': captions[caption]}, {'image': stored pixels, 'target': True}]``.

    The text item is left out when the example has no captions.
    """
    captions = list(example.get("captions", ()))
    items = []
    if captions:
        if not 0 <= caption < len(captions):
            raise ValueError(f"pair_items: caption {caption}; the example has {len(captions)} captions")
        text = captions[caption]
        items.append({"text": text.decode("utf-8") if isinstance(text, bytes) else str(text)})
    items.append({"image": example["image"], "target": True})
    return items


@dataclasses.dataclass(frozen=True)
class DocumentPreprocess:
    """Stored example (interleaved or pair) → document (module doc), images scaled and noised.

    Attributes:
      levels, noise, noise_std: as ``ImagePreprocess`` (the largest stored pixel value; ``'none'``,
        ``'uniform'`` dequantisation or ``'gaussian'`` noise, independently per image).
      image_size, channels: as ``ImagePreprocess`` (0: as stored): each image is resized and converted
        on the scaled values **before** the noise, so the dequantisation noise is per output pixel.
      random_caption: for pairs, pick one caption uniformly at random; else the first.
    """

    levels: int = 255
    noise: str = "none"
    noise_std: float = 0.0
    random_caption: bool = True
    image_size: int = 0
    channels: int = 0

    def __post_init__(self):
        ImagePreprocess(levels=self.levels, noise=self.noise, noise_std=self.noise_std, image_size=self.image_size,
                        channels=self.channels)  # same checks, same errors

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """``{'items': [...], 'index': int64, 'pair': bool}``; random draws in a fixed order: caption, then
        each image's noise."""
        pair = "kinds" not in example
        if not pair:
            items = document_items(example)
        elif "image" in example:
            count = len(example.get("captions", ()))
            items = pair_items(example, int(rng.integers(count)) if count and self.random_caption else 0)
        else:
            raise ValueError(f"DocumentPreprocess: example with fields {sorted(example)}; expected an interleaved "
                             "example (kinds, texts, images, image_target) or a pair (image, captions)")
        for item in items:
            if "image" in item:
                image = scale_pixels(decode_image(item["image"]), self.levels)
                image = convert_channels(resize_square(image, self.image_size), self.channels)
                item["image"] = add_noise(image, rng, self.noise, self.noise_std, self.levels).astype(np.float32)
        return {"items": items, "index": np.int64(example.get("index", -1)), "pair": pair}
