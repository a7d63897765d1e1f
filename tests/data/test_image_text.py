"""The generic image–text builder on real scikit-image photos: JSONL and class folders, resize/crop, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from skimage.transform import resize

from starflow2_jax.data import ImagePreprocess, build_image_text, make_pipeline, resize_and_center_crop

SIZE = 32


def _center_crop_resized(photo: np.ndarray, size: int) -> np.ndarray:
    """Independent oracle: the central square of ``photo`` resized by scikit-image, uint8-scaled floats."""
    height, width = photo.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = photo[top: top + side, left: left + side]
    return resize(square, (size, size), anti_aliasing=True, preserve_range=True).astype(np.float64)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """``(folder, {name: array})`` with astronaut/coffee (PNG), chelsea (JPEG) and camera (grey PNG)."""
    folder = tmp_path_factory.mktemp("photos")
    arrays = {"astronaut": skdata.astronaut(), "coffee": skdata.coffee(), "chelsea": skdata.chelsea(),
              "camera": skdata.camera()}
    for name, array in arrays.items():
        suffix = "jpg" if name == "chelsea" else "png"
        Image.fromarray(array).save(folder / f"{name}.{suffix}")
    return folder, arrays


@pytest.fixture(scope="module")
def jsonl_builder(photos, tmp_path_factory):
    folder, _ = photos
    lines = [
        {"image": "astronaut.png", "text": "an astronaut in a white suit"},
        {"image": str(folder / "coffee.png"), "text": ["a cup of coffee", "coffee on a saucer"]},
        {"image": "chelsea.jpg", "text": "a tabby cat", "label": 3},
        {"image": "camera.png", "text": "a man with a camera"},
    ]
    listing = folder / "pairs.jsonl"
    listing.write_text("\n".join(json.dumps(line) for line in lines[:2]) + "\n\n"
                       + "\n".join(json.dumps(line) for line in lines[2:]) + "\n")
    return build_image_text(listing, tmp_path_factory.mktemp("tfds_jsonl"), SIZE, name="photos")


def test_jsonl_examples_are_resized_center_crops(jsonl_builder, photos):
    _, arrays = photos
    source = jsonl_builder.as_data_source("train")
    assert len(source) == 4
    names = ["astronaut", "coffee", "chelsea", "camera"]
    for position, name in enumerate(names):
        example = source[position]
        assert example["index"] == position
        assert example["image"].dtype == np.uint8 and example["image"].shape == (SIZE, SIZE, 3)
        photo = arrays[name] if arrays[name].ndim == 3 else np.repeat(arrays[name][..., None], 3, axis=-1)
        error = np.abs(example["image"].astype(np.float64) - _center_crop_resized(photo, SIZE)).mean()
        # Filters differ (PIL bicubic vs scikit-image Gaussian antialiasing): 2.6-5.5 levels measured;
        # a crop shifted by one output pixel is off by 11-29.
        assert error < 8, (name, error)
    assert source[3]["image"].std(axis=-1).max() == 0  # grey photo → equal RGB channels
    assert [c.decode() for c in source[1]["captions"]] == ["a cup of coffee", "coffee on a saucer"]
    assert [source[i]["label"] for i in range(4)] == [-1, -1, 3, -1]


def test_jsonl_pipeline_batches(jsonl_builder):
    batch = next(iter(make_pipeline(jsonl_builder.as_data_source("train"), batch_size=4, seed=0, shuffle=False,
                                    preprocess=ImagePreprocess(levels=255), num_epochs=1, process_index=0,
                                    process_count=1)))
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["caption"][0] == "an astronaut in a white suit"
    assert batch["caption"][1] in ("a cup of coffee", "coffee on a saucer")
    assert np.array_equal(batch["label"], [-1, -1, 3, -1])


def test_rebuild_reuses_and_rejects_another_size(jsonl_builder, photos):
    folder, _ = photos
    data_dir = Path(jsonl_builder.data_dir).parents[2]  # DATA_DIR/starflow2_image_text/photos/1.0.0
    again = build_image_text(folder / "pairs.jsonl", data_dir, SIZE, name="photos")
    assert again.info.splits["train"].num_examples == 4
    with pytest.raises(ValueError, match="was built from .* at image_size 32"):
        build_image_text(folder / "pairs.jsonl", data_dir, 16, name="photos")


def test_class_folders_with_two_splits(photos, tmp_path):
    folder, arrays = photos
    for split, members in {"train": {"cat": ["chelsea.jpg"], "coffee_cup": ["coffee.png", "astronaut.png"]},
                           "test": {"coffee_cup": ["coffee.png"]}}.items():
        for class_name, files in members.items():
            (tmp_path / split / class_name).mkdir(parents=True)
            for file in files:
                (tmp_path / split / class_name / file).write_bytes((folder / file).read_bytes())
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    builder = build_image_text({"train": tmp_path / "train", "test": tmp_path / "test"}, tmp_path / "tfds", 16,
                               name="folders")
    assert builder.info.metadata["class_names"] == ["cat", "coffee_cup"]
    train, test = builder.as_data_source("train"), builder.as_data_source("test")
    assert len(train) == 3 and len(test) == 1
    assert [train[i]["label"] for i in range(3)] == [0, 1, 1]
    assert train[0]["captions"] == [b"a photo of a cat"]
    assert test[0]["captions"] == [b"a photo of a coffee cup"] and test[0]["label"] == 1
    assert train[0]["image"].shape == (16, 16, 3)
    assert np.abs(test[0]["image"] - _center_crop_resized(arrays["coffee"], 16)).mean() < 8


@pytest.mark.parametrize("name, size, crop", [("astronaut", 32, (0, 512)), ("coffee", 25, (100, 500))])
def test_resize_and_center_crop_matches_block_means(name, size, crop):
    """Integer scale factors (16): the result is close to the exact mean of each 16×16 block of the center."""
    photo = getattr(skdata, name)()
    square = photo[:, crop[0]: crop[1]]  # both photos are 512 or 400 high: the square is the full height
    blocks = square.reshape(size, 16, size, 16, 3).mean(axis=(1, 3))
    ours = np.asarray(resize_and_center_crop(Image.fromarray(photo), size), np.float64)
    assert ours.shape == (size, size, 3)
    assert np.abs(ours - blocks).mean() < 3.5
    same = np.asarray(resize_and_center_crop(Image.fromarray(photo), photo.shape[0]))
    assert np.array_equal(same, square)  # output size = the square's side: an exact crop


def _write(path, text):
    path.write_text(text)
    return path


def test_bad_inputs_raise_clear_errors(photos, tmp_path):
    folder, _ = photos
    image = json.dumps({"image": str(folder / "coffee.png"), "text": "coffee"})
    cases = [
        (tmp_path / "missing.jsonl", r"missing\.jsonl.* does not exist"),
        (_write(tmp_path / "no_image.jsonl", image + '\n{"text": "x"}\n'), r"no_image\.jsonl:2: missing \"image\""),
        (_write(tmp_path / "bad_json.jsonl", "{oops\n"), r"bad_json\.jsonl:1: not valid JSON"),
        (_write(tmp_path / "no_text.jsonl", '{"image": "coffee.png"}\n'), r"no_text\.jsonl:1: \"text\" None"),
        (_write(tmp_path / "gone.jsonl", '{"image": "gone.png", "text": "x"}\n'),
         r"gone\.jsonl:1: image file .*gone\.png"),
        (_write(tmp_path / "empty.jsonl", "\n"), r"empty\.jsonl.* lists no images"),
        (_write(tmp_path / "list.txt", "x"), r"list\.txt.* not \.jsonl"),
    ]
    for source, match in cases:
        with pytest.raises(ValueError, match=match):
            build_image_text(source, tmp_path / "tfds", 8, name="bad")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match=r"flat.* has no class subfolders"):
        build_image_text(tmp_path / "flat", tmp_path / "tfds", 8, name="bad")
    (tmp_path / "flat" / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"empty_class.* has no image files"):
        build_image_text(tmp_path / "flat", tmp_path / "tfds", 8, name="bad")
    with pytest.raises(ValueError, match="image_size 0"):
        build_image_text(folder / "pairs.jsonl", tmp_path / "tfds", 0)
    with pytest.raises(ValueError, match="name 'my photos'"):
        build_image_text(folder / "pairs.jsonl", tmp_path / "tfds", 8, name="my photos")


def test_unreadable_image_names_the_file_and_leaves_no_dataset(photos, tmp_path):
    _write(tmp_path / "broken.png", "this is not a PNG")
    listing = _write(tmp_path / "pairs.jsonl", '{"image": "broken.png", "text": "x"}\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: image file .*broken\.png.* is not a readable image"):
        build_image_text(listing, tmp_path / "tfds", 8, name="broken")
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))
