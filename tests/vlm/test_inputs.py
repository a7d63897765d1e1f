"""vlm.inputs: tokenizer + image processor → model inputs, with the image-pad expansion done by us."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import Qwen2VLImageProcessorPil

from qwen_hf_tiny import END, IMAGE, START, build
from starflow2_jax.vlm import inputs
from tiny_tokenizer import save_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tiny_tokenizer(directory)
    return inputs.load_tokenizer(directory)


def image(height, width, seed=0):
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def test_encode_expands_image_pads_and_left_pads(tokenizer):
    config = build("gqa2_untied")[1]
    processor = inputs.load_image_processor(config=config, max_pixels=28 * 28 * 20)
    texts = [f"w20 {inputs.IMAGE_PLACEHOLDER} w21 {inputs.IMAGE_PLACEHOLDER}", "w22"]
    batch = inputs.encode(config, tokenizer, texts, [[image(60, 90), image(100, 40, 1)], []], image_processor=processor)
    grids = batch["image_grid_thw"]
    expected_grids = [list(g) for g in processor(images=[image(60, 90), image(100, 40, 1)],
                                                 return_tensors="np")["image_grid_thw"]]
    assert grids.tolist() == expected_grids
    counts = [t * h * w // 4 for t, h, w in grids]
    row0 = [20, START] + [IMAGE] * counts[0] + [END, 21, START] + [IMAGE] * counts[1] + [END]
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    assert ids.shape == (2, len(row0)) and ids.dtype == np.int32
    assert ids[0].tolist() == row0 and mask[0].all()
    assert ids[1, -1] == 22 and mask[1].tolist() == [0] * (len(row0) - 1) + [1]
    assert ids[1, 0] == tokenizer.pad_token_id
    np.testing.assert_array_equal(types, (ids == IMAGE) & (mask == 1))
    assert batch["pixel_values"].shape == (int(sum(t * h * w for t, h, w in grids)), 3 * 2 * 14 * 14)
    single = inputs.encode(config, tokenizer, "w23 w24")
    assert set(single) == {"input_ids", "attention_mask", "mm_token_type_ids"}
    assert single["input_ids"].tolist() == [[23, 24]]


def test_image_processor_from_the_checkpoint_directory(tmp_path):
    # the file the official Qwen2.5-VL checkpoints ship
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    processor = inputs.load_image_processor(tmp_path)
    assert isinstance(processor, Qwen2VLImageProcessorPil)
    assert processor.size["shortest_edge"] == 3136 and processor.size["longest_edge"] == 12845056
    pixel_values, grids = inputs.process_images(processor, [image(280, 420)])
    assert grids.tolist() == [[1, 20, 30]] and pixel_values.shape == (600, 1176)
    small = inputs.load_image_processor(tmp_path, max_pixels=28 * 28 * 4)
    assert inputs.process_images(small, [image(280, 420)])[1].tolist() == [[1, 2, 4]]  # 28 × 56 pixels
    default = inputs.load_image_processor()
    assert default.size["shortest_edge"] == inputs.DEFAULT_MIN_PIXELS
    assert default.size["longest_edge"] == inputs.DEFAULT_MAX_PIXELS


def test_chat_prompt(tokenizer):
    prompt = inputs.chat_prompt(tokenizer, "w30", num_images=2, system="w31")
    assert prompt == ("<|im_start|>system\nw31<|im_end|>\n<|im_start|>user\n" + inputs.IMAGE_PLACEHOLDER * 2
                      + "w30<|im_end|>\n<|im_start|>assistant\n")

    class NoTemplate:
        chat_template = None

    assert inputs.chat_prompt(NoTemplate(), "w30", num_images=1) == inputs.IMAGE_PLACEHOLDER + "w30"


def test_placeholder_count_must_match_the_images(tokenizer):
    config = build("gqa2_untied")[1]
    with pytest.raises(ValueError, match=r"holds 1 image placeholder\(s\) .* but 2 image\(s\) were given"):
        inputs.expand_image_tokens(config, [20, START, IMAGE, END], np.array([[1, 2, 2], [1, 2, 2]]))
    assert inputs.expand_image_tokens(config, [IMAGE, 20], np.array([[1, 4, 6]])) == [IMAGE] * 6 + [20]
    with pytest.raises(ValueError, match="2 texts but 1 image lists"):
        inputs.encode(config, tokenizer, ["w20", "w21"], [[]])
