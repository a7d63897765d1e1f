"""The photo-tile builder (scikit-image photos + digits, 64×64 RGB) and ImagePreprocess's resize/channel options."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from starflow2_jax.data import (PHOTOS, PHOTOS_LEVELS, PHOTOS_SHAPE, ImagePreprocess, build_photos,
                                digits_split_indices, make_pipeline)

NUM_PHOTO_TILES = {"train": 268, "test": 56}  # as documented in starflow2_jax/data/photos.py
NUM_RECORDS = {"train": 1768, "test": 353}


@pytest.fixture(scope="module")
def photos_builder(tmp_path_factory):
    """The ``starflow2_photos`` builder, prepared once for this module in a temporary directory."""
    return build_photos(tmp_path_factory.mktemp("tfds_photos"))


@pytest.fixture(scope="module")
def records(photos_builder):
    """``{split: {'image': (N, 64, 64, 3), 'source': [str], 'label': (N,), 'index': (N,)}}``, all records."""
    out = {}
    for split in ("train", "test"):
        source = photos_builder.as_data_source(split)
        examples = [source[i] for i in range(len(source))]
        out[split] = {
            "image": np.stack([example["image"] for example in examples]),
            "source": [example["source"].decode() for example in examples],
            "label": np.array([example["label"] for example in examples]),
            "index": np.array([example["index"] for example in examples]),
        }
    return out


def _oracle_tiles(name: str) -> np.ndarray:
    """Recomputes a photo's tiles from the file in the scikit-image wheel: short side 256, centred 64-px grid."""
    import skimage.data
    import skimage.io
    from skimage.transform import resize

    files = {"coins": "coins.png", "hubble_deep_field": "hubble_deep_field.jpg", "chelsea": "chelsea.png"}
    pixels = skimage.io.imread(os.path.join(skimage.data.data_dir, files[name]))
    height, width = pixels.shape[:2]
    shape = (round(height * 256 / min(height, width)), round(width * 256 / min(height, width)))
    resized = resize(pixels, shape, order=1, mode="reflect", anti_aliasing=True, preserve_range=True)
    resized = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    if resized.ndim == 2:
        resized = np.stack([resized] * 3, axis=-1)
    rows, cols = shape[0] // 64, shape[1] // 64
    top, left = (shape[0] - 64 * rows) // 2, (shape[1] - 64 * cols) // 2
    return np.stack([resized[top + 64 * r: top + 64 * (r + 1), left + 64 * c: left + 64 * (c + 1)]
                     for r in range(rows) for c in range(cols)])


def test_record_counts_and_splits(photos_builder, records):
    assert {split: info.num_examples for split, info in photos_builder.info.splits.items()} == NUM_RECORDS
    again = build_photos(Path(photos_builder.data_dir).parents[1])  # DATA_DIR/starflow2_photos/1.0.0: reused
    assert again.info.splits["test"].num_examples == NUM_RECORDS["test"]
    digits = digits_split_indices()
    for split, data in records.items():
        is_photo = np.array([source != "digits" for source in data["source"]])
        assert is_photo.sum() == NUM_PHOTO_TILES[split] and (~is_photo).sum() == len(digits[split])
        assert np.all(is_photo[: NUM_PHOTO_TILES[split]])  # photo tiles first, then digits
        assert np.all(np.diff(data["index"][is_photo]) > 0) and np.all(np.diff(data["index"][~is_photo]) > 0)
        assert np.all(data["label"][is_photo] == -1)
        assert set(data["source"]) == set(PHOTOS) | {"digits"}
        # the digits' index is the offset (number of photo tiles) + the load_digits() index
        assert np.array_equal(data["index"][~is_photo] - sum(NUM_PHOTO_TILES.values()), digits[split])
    train, test = set(records["train"]["index"]), set(records["test"]["index"])
    assert not train & test
    assert sorted(train | test) == list(range(sum(NUM_RECORDS.values())))


def test_images_are_rgb_uint8_tiles(records):
    for data in records.values():
        assert data["image"].dtype == np.uint8 and data["image"].shape[1:] == PHOTOS_SHAPE == (64, 64, 3)
        assert data["image"].max() <= PHOTOS_LEVELS
    photos = records["train"]["image"][: NUM_PHOTO_TILES["train"]].astype(np.int64)
    colour = np.abs(photos[..., 0] - photos[..., 1]).max(axis=(1, 2)) > 0
    assert colour.sum() > 100  # the colour photos are really in colour (grey ones repeat the channel)


def test_digit_tiles_are_the_sklearn_digits_scaled_and_upscaled(records, sklearn_digits):
    images, targets = sklearn_digits
    for split in ("train", "test"):
        data, indices = records[split], digits_split_indices()[split]
        offset = NUM_PHOTO_TILES[split]
        for position in (0, 1, 100, len(indices) - 1):
            digit = indices[position]
            expected = np.floor(images[digit] * 255 / 16 + 0.5).astype(np.uint8)  # 0..16 → 0..255
            expected = np.kron(expected, np.ones((8, 8), np.uint8))[..., None].repeat(3, axis=-1)
            record = offset + position
            assert data["source"][record] == "digits" and data["label"][record] == targets[digit]
            assert np.array_equal(data["image"][record], expected)
    white = records["train"]["image"][NUM_PHOTO_TILES["train"]:]
    assert white.max() == 255 and np.all(white[:, :8, :8] == 0)  # white strokes on black, corners empty


@pytest.mark.parametrize("name", ["hubble_deep_field", "coins", "chelsea"])
def test_photo_tiles_match_an_independent_recomputation(records, name):
    expected = _oracle_tiles(name)
    found = {}
    for split, data in records.items():
        for position, source in enumerate(data["source"]):
            if source == name:
                found[int(data["index"][position])] = (split, data["image"][position])
    first = min(found)
    assert sorted(found) == list(range(first, first + len(expected)))  # consecutive indices, raster order
    for index, (split, image) in found.items():
        tile = index - first
        assert split == ("test" if tile % 7 == 0 else "train")
        assert np.array_equal(image, expected[tile]), (name, tile)
    assert sum(split == "test" for split, _ in found.values()) == math.ceil(len(expected) / 7)


def test_area_downsampling_is_the_block_mean():
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    scaled = pixels.astype(np.float64) / 127.5 - 1
    for size in (32, 16, 8, 1):
        k = 64 // size
        out = ImagePreprocess(levels=255, image_size=size)({"image": pixels}, np.random.default_rng(0))["image"]
        expected = scaled.reshape(size, k, size, k, 3).mean(axis=(1, 3))
        assert out.dtype == np.float32 and out.shape == (size, size, 3)
        np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)


def test_nearest_upsampling_repeats_pixels():
    pixels = np.random.default_rng(1).integers(0, 17, (8, 8, 1), dtype=np.uint8)
    out = ImagePreprocess(levels=16, image_size=32)({"image": pixels}, np.random.default_rng(0))["image"]
    expected = np.repeat(np.repeat(pixels.astype(np.float32) / 8 - 1, 4, axis=0), 4, axis=1)
    assert out.shape == (32, 32, 1) and np.array_equal(out, expected)
    same = ImagePreprocess(levels=16, image_size=8)({"image": pixels}, np.random.default_rng(0))["image"]
    assert np.array_equal(same, pixels / np.float32(8) - 1)


def test_channel_conversion():
    grey = np.random.default_rng(2).integers(0, 256, (16, 16, 1), dtype=np.uint8)
    rgb = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    out = ImagePreprocess(levels=255, channels=3)({"image": grey}, rng)["image"]
    assert out.shape == (16, 16, 3) and all(np.array_equal(out[..., c], grey[..., 0] / np.float32(127.5) - 1)
                                            for c in range(3))
    assert np.array_equal(ImagePreprocess(levels=255, channels=3)({"image": rgb}, rng)["image"],
                          rgb / np.float32(127.5) - 1)
    luma = ImagePreprocess(levels=255, channels=1)({"image": rgb}, rng)["image"]
    expected = (rgb.astype(np.float64) / 127.5 - 1) @ np.array([0.299, 0.587, 0.114])
    assert luma.shape == (16, 16, 1)
    np.testing.assert_allclose(luma[..., 0], expected, rtol=0, atol=1e-6)
    both = ImagePreprocess(levels=255, image_size=32, channels=3)({"image": grey}, rng)["image"]
    assert both.shape == (32, 32, 3) and np.array_equal(both[::2, ::2, 1], grey[..., 0] / np.float32(127.5) - 1)


def test_defaults_keep_the_stored_image_and_noise_comes_after_resizing():
    pixels = np.random.default_rng(4).integers(0, 17, (8, 8, 1), dtype=np.uint8)
    example = {"image": pixels, "label": 3, "index": 5}
    plain = ImagePreprocess(levels=16)(example, np.random.default_rng(0))
    explicit = ImagePreprocess(levels=16, image_size=0, channels=0)(example, np.random.default_rng(0))
    assert np.array_equal(plain["image"], pixels / np.float32(8) - 1) and np.array_equal(plain["image"],
                                                                                        explicit["image"])
    noisy = ImagePreprocess(levels=16, noise="uniform", image_size=32)(example, np.random.default_rng(0))["image"]
    clean = np.repeat(np.repeat(pixels / np.float32(8) - 1, 4, axis=0), 4, axis=1)
    offset = noisy - clean
    assert noisy.shape == (32, 32, 1) and np.abs(offset).max() <= 1 / 16
    assert len(np.unique(offset[:4, :4])) == 16  # fresh noise per output pixel, not upsampled noise


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=-1), "image_size -1"),
    (dict(image_size=True), "image_size True"),
    (dict(image_size=32.0), "image_size 32.0"),
    (dict(channels=2), "channels 2"),
    (dict(channels=4), "channels 4"),
    (dict(channels=3.0), "channels 3.0"),
])
def test_resize_and_channel_options_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImagePreprocess(levels=255, **kwargs)


@pytest.mark.parametrize("shape, kwargs, match", [
    ((64, 64, 3), dict(image_size=48), r"image_size 48: the stored size 64x64 .* 48x48"),
    ((64, 64, 3), dict(image_size=100), r"image_size 100: the stored size 64x64 .* 100x100"),
    ((8, 8, 1), dict(image_size=12), r"stored size 8x8 .* 12x12"),
    ((32, 64, 3), dict(image_size=32), r"32x64, not square"),
    ((8, 8, 4), dict(channels=3), r"channels 3: cannot convert a stored image with 4 channels"),
    ((8, 8, 1), dict(channels=1, image_size=6), r"stored size 8x8"),
])
def test_impossible_conversions_raise_naming_the_sizes(shape, kwargs, match):
    preprocess = ImagePreprocess(levels=255, **kwargs)
    with pytest.raises(ValueError, match=match):
        preprocess({"image": np.zeros(shape, np.uint8)}, np.random.default_rng(0))


def test_pipeline_smoke(photos_builder):
    dataset = make_pipeline(photos_builder.as_data_source("train"), batch_size=8, seed=0, shuffle=True,
                            preprocess=ImagePreprocess(levels=255, image_size=32), process_index=0,
                            process_count=1)
    iterator = iter(dataset)
    for _ in range(3):
        batch = next(iterator)
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert batch["index"].shape == (8,) and batch["label"].dtype == np.int32
