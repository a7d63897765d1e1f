"""The interleaved-documents builder on real scikit-image photos; documents from both stored formats; errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from skimage.transform import resize

from starflow2_jax.data import (DIGITS_LEVELS, DocumentPreprocess, PackingSpec, build_interleaved, digit_captions,
                                digits_split_indices, document_items, make_packed_pipeline, unpack_row)

SIZE = 16


def _center_crop_resized(photo: np.ndarray, size: int) -> np.ndarray:
    """Independent oracle: the central square of ``photo`` resized by scikit-image (RGB, float)."""
    photo = photo if photo.ndim == 3 else np.repeat(photo[..., None], 3, axis=-1)
    height, width = photo.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return resize(photo[top: top + side, left: left + side], (size, size), anti_aliasing=True, preserve_range=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """``(folder, {name: array})``: astronaut, coffee (PNG), chelsea (JPEG), camera (grey PNG)."""
    folder = tmp_path_factory.mktemp("photos")
    arrays = {"astronaut": skdata.astronaut(), "coffee": skdata.coffee(), "chelsea": skdata.chelsea(),
              "camera": skdata.camera()}
    for name, array in arrays.items():
        Image.fromarray(array).save(folder / f"{name}.{'jpg' if name == 'chelsea' else 'png'}")
    return folder, arrays


DOCUMENTS = [
    [{"text": "An astronaut:"}, {"image": "astronaut.png"}, {"text": "and a cat"}, {"image": "chelsea.jpg",
                                                                                    "target": False}],
    [{"image": "camera.png", "target": False}, {"text": "Describe it: a man with a camera."}],
    [{"text": "Text only, no image."}],
    [{"image": "coffee.png", "target": True}],
]


@pytest.fixture(scope="module")
def builder(photos, tmp_path_factory):
    folder, _ = photos
    listing = folder / "docs.jsonl"
    lines = [json.dumps(document) for document in DOCUMENTS]
    lines[3] = json.dumps([{"image": str(folder / "coffee.png"), "target": True}])  # an absolute path
    listing.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line is skipped
    return build_interleaved(listing, tmp_path_factory.mktemp("tfds_interleaved"), SIZE, name="docs")


def test_round_trip_of_documents_with_real_images(builder, photos):
    _, arrays = photos
    source = builder.as_data_source("train")
    assert len(source) == 4
    images = {"astronaut.png": "astronaut", "chelsea.jpg": "chelsea", "camera.png": "camera", "coffee.png": "coffee"}
    for index, document in enumerate(DOCUMENTS):
        example = source[index]
        assert example["index"] == index
        items = document_items(example)
        assert len(items) == len(document)
        for item, written in zip(items, document):
            if "text" in written:
                assert item == {"text": written["text"]}
                continue
            assert item["target"] == written.get("target", True)  # default: a generation target
            assert item["image"].dtype == np.uint8 and item["image"].shape == (SIZE, SIZE, 3)
            oracle = _center_crop_resized(arrays[images[written["image"]]], SIZE)
            # PIL bicubic vs scikit-image Gaussian antialiasing differ by a few levels; a wrong crop by tens.
            assert np.abs(item["image"].astype(np.float64) - oracle).mean() < 8, written
    assert list(source[2]["images"]) == [] and [int(k) for k in source[2]["kinds"]] == [0]
    again = build_interleaved(builder.info.metadata["sources"]["train"], builder.data_dir.split("/starflow2")[0],
                              SIZE, name="docs")
    assert again.info.splits["train"].num_examples == 4
    with pytest.raises(ValueError, match="was built from .* at image_size 16"):
        build_interleaved(builder.info.metadata["sources"]["train"], builder.data_dir.split("/starflow2")[0],
                          8, name="docs")


def test_pairs_and_documents_become_the_same_kind_of_document(builder, digits_builder, sklearn_digits):
    images, _ = sklearn_digits
    preprocess = DocumentPreprocess(levels=DIGITS_LEVELS, random_caption=False)
    pair = digits_builder.as_data_source("test")[0]
    document = preprocess(pair, np.random.default_rng(0))
    digit = digits_split_indices()["test"][0]
    assert document["index"] == digit and len(document["items"]) == 2
    assert document["items"][0] == {"text": digit_captions(int(pair["label"]))[0]}  # caption, then image
    assert document["items"][1]["target"] is True
    assert np.array_equal(document["items"][1]["image"][..., 0], images[digit] / 8 - 1)
    interleaved = DocumentPreprocess(levels=255)(builder.as_data_source("train")[0], np.random.default_rng(0))
    assert [sorted(item) for item in interleaved["items"]] == [["text"], ["image", "target"], ["text"],
                                                               ["image", "target"]]
    stored = builder.as_data_source("train")[0]["images"][0]
    assert np.array_equal(interleaved["items"][1]["image"], stored.astype(np.float32) / 127.5 - 1)
    noisy = DocumentPreprocess(levels=255, noise="uniform")(builder.as_data_source("train")[0],
                                                            np.random.default_rng(0))
    difference = noisy["items"][1]["image"] - interleaved["items"][1]["image"]
    assert 0 < np.abs(difference).max() <= 1 / 255
    with pytest.raises(ValueError, match=r"ImagePreprocess.noise 'salt'"):
        DocumentPreprocess(noise="salt")


def _layout(document):
    """A toy sequence layout (the model's own lives in ``pretzel``): bytes of text, then 1000 + 2 slots per image."""
    tokens, index, images, targets = [], [], [], []
    for item in document["items"]:
        if "text" in item:
            tokens += list(item["text"].encode()[:6])
            index += [-1] * len(item["text"].encode()[:6])
        else:
            tokens += [1000, 1001, 1001]
            index += [-1, len(images), len(images)]
            images.append(item["image"])
            targets.append(item["target"])
    return {"tokens": np.asarray(tokens, np.int32), "image_index": np.asarray(index, np.int32),
            "images": np.asarray(images, np.float32).reshape(-1, SIZE, SIZE, 3),
            "image_target": np.asarray(targets, bool)}


def test_both_sources_through_one_packed_pipeline(builder, photos, tmp_path):
    from starflow2_jax.data import build_image_text

    folder, _ = photos
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": str(folder / "coffee.png"), "text": "coffee"}) + "\n")
    pairs = build_image_text(tmp_path / "pairs.jsonl", tmp_path / "tfds", SIZE, name="pairs").as_data_source("train")
    documents = builder.as_data_source("train")
    source = [documents[0], pairs[0], documents[1], documents[2], documents[3]]
    preprocess = DocumentPreprocess(levels=255)
    spec = PackingSpec(length=24, max_images=3, token_fields={"tokens": 0, "image_index": -1},
                       image_fields={"images": 0.0, "image_target": False})
    batches = list(make_packed_pipeline(source, spec=spec, batch_size=1, seed=0, shuffle=False,
                                        preprocess=lambda example, rng: _layout(preprocess(example, rng)),
                                        num_epochs=1, process_index=0, process_count=1, drop_remainder=False))
    unpacked = [doc for batch in batches for doc in unpack_row({k: v[0] for k, v in batch.items()}, spec)]
    expected = [_layout(preprocess(example, np.random.default_rng(0))) for example in source]  # no noise, one caption
    assert len(unpacked) == len(expected)
    for want in expected:  # first-fit may place a later document in an earlier row: match each one once
        matches = [i for i, got in enumerate(unpacked) if all(np.array_equal(got[key], want[key]) for key in want)]
        assert matches, want["tokens"]
        unpacked.pop(matches[0])
    assert expected[1]["tokens"][:6].tolist() == list(b"coffee") and expected[1]["image_target"].tolist() == [True]


def _write(path, text):
    path.write_text(text)
    return path


def test_every_bad_line_names_file_line_and_expectation(photos, tmp_path):
    folder, _ = photos
    image = json.dumps([{"image": str(folder / "coffee.png")}])
    cases = [
        ("bad_json", "[{oops\n", r"bad_json\.jsonl:1: not valid JSON"),
        ("not_list", image + '\n{"text": "x"}\n', r"not_list\.jsonl:2: expected a JSON list of items"),
        ("empty_doc", image + "\n\n[]\n", r"empty_doc\.jsonl:3: empty document \[\]"),
        ("unknown", '[{"text": "a"}, {"video": "v.mp4"}]\n', r"unknown\.jsonl:1: item 1: unknown item kind, keys "
                                                            r"\['video'\]; expected \{\"text\""),
        ("both", '[{"text": "a", "image": "coffee.png"}]\n', r"both\.jsonl:1: item 0: unknown item kind"),
        ("not_dict", '["just a string"]\n', r"not_dict\.jsonl:1: item 0: item \"just a string\""),
        ("text_target", '[{"text": "a", "target": true}]\n', r"text_target\.jsonl:1: item 0: unexpected keys "
                                                             r"\['target'\] in a text item"),
        ("empty_text", '[{"text": ""}]\n', r"empty_text\.jsonl:1: item 0: \"text\" ''; expected a non-empty"),
        ("bad_target", f'[{{"image": "{folder / "coffee.png"}", "target": "yes"}}]\n',
         r"bad_target\.jsonl:1: item 0: \"target\" 'yes'; expected true or false"),
        ("missing", '[{"text": "a"}, {"image": "gone.png"}]\n', r"missing\.jsonl:1: item 1: image file .*gone\.png"
                                                               r".* does not exist"),
        ("blank", "\n\n", r"blank\.jsonl.* lists no documents"),
    ]
    for name, text, match in cases:
        with pytest.raises(ValueError, match=match):
            build_interleaved(_write(tmp_path / f"{name}.jsonl", text), tmp_path / "tfds", 8, name="bad")
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))
    with pytest.raises(ValueError, match=r"source .*nothing\.jsonl.* is not a file"):
        build_interleaved(tmp_path / "nothing.jsonl", tmp_path / "tfds", 8)
    with pytest.raises(ValueError, match=r"image_size 0"):
        build_interleaved(tmp_path / "blank.jsonl", tmp_path / "tfds", 0)


def test_unreadable_image_names_file_and_line_and_leaves_no_dataset(tmp_path):
    _write(tmp_path / "broken.png", "this is not a PNG")
    listing = _write(tmp_path / "docs.jsonl", '[{"text": "fine"}]\n[{"text": "x"}, {"image": "broken.png"}]\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: image file .*broken\.png.* is not a readable image"):
        build_interleaved(listing, tmp_path / "tfds", 8, name="broken")
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))
