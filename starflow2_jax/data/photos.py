"""Embedded data for the feature auto-encoder: scikit-image photos + scikit-learn digits as 64×64 RGB tiles.

``build_photos(data_dir)`` writes ``data_dir/starflow2_photos/1.0.0`` as ArrayRecord files. Nothing is
downloaded: the photos are the image files inside the scikit-image wheel (``skimage/data/``, loaded
with ``skimage.data.<loader>()``), the digits ship inside the scikit-learn wheel. Every example holds

- ``image``: PNG, uint8 ``(64, 64, 3)`` RGB, values ``0..255`` (``PHOTOS_LEVELS``);
- ``source``: the photo's name (a key of ``PHOTOS``) or ``'digits'``;
- ``label``: int64, the digit for digits, -1 for photo tiles;
- ``index``: int64, the example's position in the full (unsplit) record order below — unique over
  both splits, so it identifies a tile: photo tiles first (``PHOTOS`` order, each photo's tiles in
  raster order), then the 1797 digits in ``load_digits()`` order (``index = num_photo_tiles + i``).

Photos (``PHOTOS``): 10 colour photos (astronaut, chelsea, coffee, rocket, hubble_deep_field, retina,
immunohistochemistry, colorwheel, motorcycle_left, motorcycle_right) and 7 grey ones (camera, coins,
moon, grass, gravel, brick, page) made RGB by repeating the channel. Other files there are left out:
binary/alpha/synthetic images (horse, logo, chessboards, phantom), and, by choice, microaneurysms
(102 px), text, clock and cell (page already covers document texture).

Tiling (``photo_tiles``): each photo is resized, deterministically, so that its *shorter* side is
``PHOTO_SHORT_SIDE`` = 256 px and the longer one ``round(long * 256 / short)`` px
(``skimage.transform.resize``, bilinear, anti-aliased with its default Gaussian σ = (factor - 1)/2,
``preserve_range``, then rounded and clipped to uint8); then cut into non-overlapping ``TILE``×``TILE``
tiles on a grid centred in the image (the leftover ``< 64`` px split evenly, the extra pixel at the
bottom/right). Tiles are numbered in raster order (row by row).

Digits: the 8×8 grey levels ``0..16`` mapped to ``round(v * 255 / 16)``, upscaled 8× by pixel
repetition to 64×64, channel repeated to RGB; white digits on black, as stored by scikit-learn.

Splits (fixed, deterministic): digits use ``digits_split_indices()`` (1500 train / 297 test, the
digits dataset's split); a photo's tile ``t`` (raster order) is in ``test`` iff ``t % 7 == 0``
(``PHOTO_TEST_EVERY``), i.e. ``ceil(n / 7)`` of its ``n`` tiles (56 of 324, ~17%), spread over the image. Test
tiles come from the same photos as the training tiles (a held-out reconstruction check, not a
distribution-shift test). Each split stores its photo tiles, then its digits, each by ascending
``index`` (TFDS shuffling disabled).

Record counts (scikit-image 0.26): 324 photo tiles (268 train / 56 test; 192 of them from the
colour photos) + 1797 digits (1500 / 297) → **1768 train / 353 test**, 2121 in all.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from starflow2_jax.data.digits import DIGITS_LEVELS, digits_split_indices
from starflow2_jax.data.images import encode_png

TILE = 64
PHOTOS_SHAPE = (TILE, TILE, 3)
PHOTOS_LEVELS = 255
PHOTO_SHORT_SIDE = 256
PHOTO_TEST_EVERY = 7  # tile t of a photo (raster order) is a test tile iff t % 7 == 0
DIGITS_SOURCE = "digits"
DIGITS_UPSCALE = TILE // 8
# name → the skimage.data loader (a function name, or (function name, item) for loaders returning tuples).
PHOTOS = {
    "astronaut": "astronaut",
    "chelsea": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "hubble_deep_field": "hubble_deep_field",
    "retina": "retina",
    "immunohistochemistry": "immunohistochemistry",
    "colorwheel": "colorwheel",
    "motorcycle_left": ("stereo_motorcycle", 0),
    "motorcycle_right": ("stereo_motorcycle", 1),
    # grey photos, channel repeated to RGB
    "camera": "camera",
    "coins": "coins",
    "moon": "moon",
    "grass": "grass",
    "gravel": "gravel",
    "brick": "brick",
    "page": "page",
}


def load_photo(name: str) -> np.ndarray:
    """The photo ``name`` (a key of ``PHOTOS``) as uint8 RGB ``(H, W, 3)``, from the scikit-image wheel."""
    import skimage.data

    if name not in PHOTOS:
        raise ValueError(f"photo {name!r}; expected one of {tuple(PHOTOS)}")
    loader = PHOTOS[name]
    if isinstance(loader, tuple):
        pixels = getattr(skimage.data, loader[0])()[loader[1]]
    else:
        pixels = getattr(skimage.data, loader)()
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"photo {name!r}: dtype {pixels.dtype}; expected uint8")
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"photo {name!r}: shape {pixels.shape}; expected (H, W) grey or (H, W, 3) RGB")
    return pixels


def photo_tiles(name: str) -> np.ndarray:
    """uint8 ``(n, TILE, TILE, 3)``: the photo resized to short side ``PHOTO_SHORT_SIDE``, tiled (module doc)."""
    from skimage.transform import resize

    pixels = load_photo(name)
    height, width = pixels.shape[:2]
    scale = PHOTO_SHORT_SIDE / min(height, width)
    shape = (round(height * scale), round(width * scale))
    resized = resize(pixels, shape + (3,), order=1, mode="reflect", anti_aliasing=True, preserve_range=True)
    resized = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    rows, cols = shape[0] // TILE, shape[1] // TILE
    top, left = (shape[0] - rows * TILE) // 2, (shape[1] - cols * TILE) // 2
    grid = resized[top:top + rows * TILE, left:left + cols * TILE]
    return grid.reshape(rows, TILE, cols, TILE, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, TILE, TILE, 3)


def digit_tiles(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 64, 64, 3)`` from digits ``(N, 8, 8)`` with levels 0..16: ``round(v*255/16)``, 8× repeated, RGB."""
    levels = np.rint(np.asarray(images, np.float64) * (PHOTOS_LEVELS / DIGITS_LEVELS)).astype(np.uint8)
    big = np.repeat(np.repeat(levels, DIGITS_UPSCALE, axis=-2), DIGITS_UPSCALE, axis=-1)
    return np.repeat(big[..., None], 3, axis=-1)


def is_test_tile(tile: int) -> bool:
    """Whether a photo's tile number ``tile`` (raster order) is held out for ``test``."""
    return tile % PHOTO_TEST_EVERY == 0


class Starflow2Photos(tfds.core.GeneratorBasedBuilder):
    """TFDS builder ``starflow2_photos``: 64×64 RGB tiles of scikit-image's photos + scikit-learn's digits."""

    name = "starflow2_photos"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "17 scikit-image photos (short side 256) as 64×64 tiles + 1797 digits; "
                              "1768 train / 353 test."}

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly, not dataset_info_from_configs: the latter reads metadata files from this package.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=PHOTOS_SHAPE, encoding_format="png"),
                "source": tfds.features.Text(),
                "label": np.int64,
                "index": np.int64,
            }),
            disable_shuffling=True,
            homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ship with scikit-image and scikit-learn
        from sklearn.datasets import load_digits

        digits = load_digits()
        tiles = {name: photo_tiles(name) for name in PHOTOS}  # computed once, shared by both splits
        return {split: self._generate_examples(split, tiles, digits, indices)
                for split, indices in digits_split_indices().items()}

    def _generate_examples(self, split, tiles, digits, digit_indices):
        index = 0
        for name, photo in tiles.items():
            for tile, pixels in enumerate(photo):
                if is_test_tile(tile) == (split == "test"):
                    yield index, {"image": encode_png(pixels), "source": name, "label": -1, "index": index}
                index += 1
        images = digit_tiles(digits.images[digit_indices])
        for position, digit in enumerate(digit_indices):
            key = index + int(digit)
            yield key, {"image": encode_png(images[position]), "source": DIGITS_SOURCE,
                        "label": int(digits.target[digit]), "index": key}


def build_photos(data_dir: str | os.PathLike) -> Starflow2Photos:
    """Prepares (once; later calls reuse the files) and returns the ``starflow2_photos`` builder in ``data_dir``.

    Read a split with ``builder.as_data_source('train' | 'test')``: a random-access source whose
    examples are ``{'image': uint8 (64, 64, 3), 'source': bytes, 'label': int, 'index': int}``; train
    with ``ImagePreprocess(levels=PHOTOS_LEVELS)``. Needs scikit-image (the photos) and scikit-learn.
    """
    builder = Starflow2Photos(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder

