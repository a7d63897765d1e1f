"""Pretzel's config and document layout: positions against Qwen2.5-VL's own rope_index, loss masks by
hand, the chat template, and the errors for bad documents and bad configs."""

import dataclasses
import json

import numpy as np
import pytest

from pretzel_fixtures import image, tiny, words
from starflow2_jax.pretzel import config as pconfig
from starflow2_jax.pretzel.layout import Image, Text, chat_items, layout_document
from starflow2_jax.vlm.positions import rope_index


def test_positions_equal_qwen_rope_index():
    """Slots as an h×w grid: exactly where Qwen2.5-VL puts a one-frame image whose merged grid is h×w."""
    cfg = tiny()
    rng = np.random.default_rng(0)
    doc = layout_document(cfg, [words(rng, 3), image(rng), words(rng, 4), image(rng), words(rng, 2)])
    ids = doc["tokens"][None]
    types = (ids == cfg.vlm.image_token_id).astype(np.int32)
    gh, gw = cfg.grid
    grids = np.array([[1, 2 * gh, 2 * gw]] * 2)  # patch grids before Qwen's 2×2 merge
    expected, _ = rope_index(ids, types, grids, spatial_merge_size=2)
    np.testing.assert_array_equal(doc["positions"].T, expected[:, 0])
    assert doc["positions"].dtype == np.int32 and doc["positions"].shape == (len(ids[0]), 3)


def test_layout_fields_by_hand():
    cfg = tiny()
    rng = np.random.default_rng(1)
    img = image(rng)
    doc = layout_document(cfg, [Text([5, 6], loss=False), Image(img, target=False), [7, 8], Image(img), [9]])
    s, e, p = cfg.vlm.vision_start_token_id, cfg.vlm.vision_end_token_id, cfg.vlm.image_token_id
    np.testing.assert_array_equal(doc["tokens"], [5, 6, s, p, p, p, p, e, 7, 8, s, p, p, p, p, e, 9])
    np.testing.assert_array_equal(doc["slot"], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(doc["image_index"], [-1] * 3 + [0] * 4 + [-1] * 4 + [1] * 4 + [-1] * 2)
    # t predicts t+1: trained text 7, 8 (from <|vision_end|> and 7), the target image's <|vision_start|>
    # (from 8) and 9 (from the second <|vision_end|>); nothing predicts the context image's marker
    expected = np.zeros(17, bool)
    expected[[7, 8, 9, 15]] = True
    np.testing.assert_array_equal(doc["text_loss"], expected)
    np.testing.assert_array_equal(doc["image_target"], [False, True])
    assert doc["images"].shape == (2, 8, 8, 1) and doc["images"].dtype == np.float32
    assert doc["tokens"].dtype == np.int32 and doc["image_index"].dtype == np.int32


def test_chat_template():
    cfg = tiny()
    specials = {"<|im_start|>": [1], "<|im_end|>": [2]}

    def encode(text):
        out = []
        while text:
            for name, ids in specials.items():
                if text.startswith(name):
                    out += ids
                    text = text[len(name):]
                    break
            else:
                out.append(ord(text[0]) % 200 + 20)
                text = text[1:]
        return out

    rng = np.random.default_rng(2)
    items = chat_items([("user", ["a cat"]), ("assistant", [image(rng), "ok"])], system=None,
                       add_generation_prompt=False)
    doc = layout_document(cfg, items, encode=encode)
    tokens = doc["tokens"].tolist()
    head = [1] + encode("user\n")
    assert tokens[:len(head)] == head
    assert tokens.count(1) == 2 and tokens.count(2) == 2  # two turns, each closed
    # the assistant image is a generation target, its text and its <|im_end|> are trained, the user's not
    assert doc["image_target"].tolist() == [True]
    trained_targets = [tokens[t + 1] for t in np.flatnonzero(doc["text_loss"])]
    assert trained_targets == [cfg.vlm.vision_start_token_id] + encode("ok") + [2]
    prompt = layout_document(cfg, chat_items([("user", ["hi"])], add_generation_prompt=True), encode=encode)
    assert prompt["tokens"][-len(encode("assistant\n")) - 1:].tolist() == [1] + encode("assistant\n")
    with pytest.raises(ValueError, match="chat role 'robot'"):
        chat_items([("robot", ["x"])])


def test_bad_documents():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="config expects none"):
        layout_document(tiny(max_images=0), [[1, 2], image(rng)])
    with pytest.raises(ValueError, match="at most max_images=4"):
        layout_document(tiny(), [image(rng)] * 5)
    with pytest.raises(ValueError, match="maximum length is 64"):
        layout_document(tiny(), [words(rng, 65)])
    with pytest.raises(ValueError, match="maximum length is 10"):
        layout_document(tiny(), [words(rng, 5), image(rng)], max_length=10)
    with pytest.raises(ValueError, match=r"image 0 has shape \(8, 8, 3\)"):
        layout_document(tiny(), [np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        layout_document(tiny(), [[1, 999]])
    with pytest.raises(ValueError, match="pass encode="):
        layout_document(tiny(), ["text"])


def test_config_json_round_trip():
    for cfg in (tiny(), pconfig.preset("7b")):
        data = json.loads(json.dumps(pconfig.config_to_dict(cfg)))
        assert pconfig.config_from_dict(data) == cfg
    with pytest.raises(ValueError, match=r"unknown fields \['bogus'\]"):
        pconfig.config_from_dict(dict(pconfig.config_to_dict(tiny()), bogus=1))


def test_config_presets_and_errors():
    big = pconfig.preset("7b")
    assert big.grid == (16, 16) and big.latent_dim == 32 and big.flow_heads == 48 and big.mrope_section == (8, 12, 12)
    assert [b.permutation for b in big.shallow_config().blocks] == ["identity", "flip"]
    with pytest.raises(ValueError, match="flow_width=30 is not a multiple of flow_head_dim=16"):
        tiny(flow_width=30)
    with pytest.raises(ValueError, match="caption_dropout=1.5"):
        tiny(caption_dropout=1.5)
    with pytest.raises(ValueError, match="do not fit seq_len=20"):
        tiny(seq_len=20)
    with pytest.raises(ValueError, match="deep_mrope_section"):
        tiny(deep_mrope_section=(1, 1, 1))
    with pytest.raises(ValueError, match="pretzel preset 'huge'"):
        pconfig.preset("huge")
    with pytest.raises(ValueError, match="vocabulary"):
        tiny(vlm=dataclasses.replace(tiny().vlm, image_token_id=300))
