"""Decoding (vlm.generate) against transformers' ``generate`` and against our own full forward.

Oracle: tiny random ``Qwen2_5_VLForConditionalGeneration`` models (qwen_hf_tiny) with the tiny local
tokenizer (tiny_tokenizer); prompts go through ``vlm.inputs`` (chat template, image processor, pad
expansion). Greedy ids are compared up to and including the first eos (id 2), after which
transformers pads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwen_hf_tiny import IMAGE, build
from starflow2_jax import vlm
from starflow2_jax.vlm import inputs
from starflow2_jax.vlm.vision_params import vision_params_from_torch
from tiny_tokenizer import save_tiny_tokenizer

EOS = 2


@functools.lru_cache(maxsize=None)
def model_and_params(name: str):
    model, config, params = build(name)
    return model, config, {**params, "vision": vision_params_from_torch(model.state_dict(), config.vision)}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tiny_tokenizer(directory)
    return inputs.load_tokenizer(directory)


@pytest.fixture(scope="module")
def processor():
    return inputs.load_image_processor(max_pixels=28 * 28 * 12)  # small grids: at most 12 merged tokens


def image(seed: int, height: int = 60, width: int = 90) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def hf_generate(model, batch: dict, max_new_tokens: int = 32) -> np.ndarray:
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        if k in tensors:
            tensors[k] = tensors[k].long()
    model.model.rope_deltas = None
    with torch.no_grad():
        out = model.generate(**tensors, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[:, batch["input_ids"].shape[1]:].numpy()


def assert_same_until_eos(ours: dict, theirs: np.ndarray):
    for row, (ids, length) in enumerate(zip(ours["ids"], ours["lengths"])):
        ref = theirs[row].tolist()
        stop = ref.index(EOS) + 1 if EOS in ref else len(ref)
        assert length == stop, (row, length, stop)
        assert ids[:length].tolist() == ref[:stop], row


@pytest.mark.parametrize("name", ["gqa2_untied", "mha_tied"])
def test_greedy_text_prompt_matches_transformers(tokenizer, name):
    model, config, params = model_and_params(name)
    prompt = inputs.chat_prompt(tokenizer, "describe " + " ".join(f"w{i}" for i in (25, 300, 41, 999, 77)))
    out = vlm.generate(config, params, tokenizer, prompt, max_new_tokens=32)
    batch = inputs.encode(config, tokenizer, prompt)
    assert_same_until_eos(out, hf_generate(model, batch))
    assert out["ids"].shape == (1, 32) and out["ids"].dtype == np.int32
    assert out["text"] == [tokenizer.decode(out["ids"][0, :out["lengths"][0]].tolist(), skip_special_tokens=True)]


def test_greedy_image_prompt_matches_transformers(tokenizer, processor):
    model, config, params = model_and_params("gqa2_untied")
    prompt = inputs.chat_prompt(tokenizer, "describe a picture w70", num_images=1)
    out = vlm.generate(config, params, tokenizer, prompt, images=[image(0)], image_processor=processor)
    batch = inputs.encode(config, tokenizer, prompt, [image(0)], image_processor=processor)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6]] and int(batch["mm_token_type_ids"].sum()) == 6
    assert_same_until_eos(out, hf_generate(model, batch))


@pytest.mark.slow
def test_left_padded_batch_matches_transformers_and_single_rows(tokenizer, processor):
    """Two prompts of different lengths, an image only in the second: one batched loop."""
    model, config, params = model_and_params("gqa4_untied_hd32")
    prompts = [inputs.chat_prompt(tokenizer, "w30 w31 w32 w33 w34 w35 w36 w37 w38"),
               inputs.chat_prompt(tokenizer, "describe w500", num_images=1)]
    images = [[], [image(1, 84, 56)]]
    batch = inputs.encode(config, tokenizer, prompts, images, image_processor=processor)
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"] == 0).any()
    out = vlm.generate(config, params, tokenizer, batch, max_new_tokens=24)
    assert_same_until_eos(out, hf_generate(model, batch, 24))
    for row, (prompt, row_images) in enumerate(zip(prompts, images)):
        single = vlm.generate(config, params, tokenizer, prompt, images=row_images, image_processor=processor,
                              max_new_tokens=24)
        assert single["ids"][0].tolist() == out["ids"][row].tolist()


@pytest.mark.slow
def test_loop_logits_equal_the_full_forward(tokenizer, processor):
    """The logits of every decoding step equal the full forward over prompt + generated tokens."""
    _, config, params = model_and_params("gqa2_untied")
    prompt = inputs.chat_prompt(tokenizer, "describe w90 w91", num_images=1)
    batch = inputs.encode(config, tokenizer, prompt, [image(2)], image_processor=processor)
    out = vlm.generate(config, params, tokenizer, batch, max_new_tokens=12, stop_tokens=[], return_logits=True)
    assert out["lengths"].tolist() == [12]
    ids = np.concatenate([batch["input_ids"], out["ids"]], axis=1)
    full = np.asarray(vlm.forward(config, params, ids, pixel_values=batch["pixel_values"],
                                  image_grid_thw=batch["image_grid_thw"],
                                  mm_token_type_ids=(ids == IMAGE).astype(np.int32)))
    length = batch["input_ids"].shape[1]
    np.testing.assert_allclose(out["logits"], full[:, length - 1:-1], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out["ids"], full[:, length - 1:-1].argmax(-1))


def test_stop_tokens_lengths_and_padding():
    _, config, params = model_and_params("gqa2_untied")
    ids = np.random.default_rng(3).integers(20, 1000, (2, 7))
    free = vlm.generate(config, params, None, ids, max_new_tokens=10, stop_tokens=[])
    assert free["text"] is None and free["lengths"].tolist() == [10, 10]
    stop = int(free["ids"][0, 3])
    first = free["ids"][0].tolist().index(stop)
    out = vlm.generate(config, params, None, ids, max_new_tokens=10, stop_tokens=[stop])
    assert out["lengths"][0] == first + 1
    assert out["ids"][0, :first + 1].tolist() == free["ids"][0, :first + 1].tolist()
    assert (out["ids"][0, first + 1:] == stop).all()  # no pad id in the config: padded with the stop token
    if stop not in free["ids"][1].tolist():
        assert out["lengths"][1] == 10 and out["ids"][1].tolist() == free["ids"][1].tolist()


def test_sampling_temperature_and_top_p():
    _, config, params = model_and_params("mha_tied")
    ids = np.random.default_rng(4).integers(20, 1000, (2, 5))
    greedy = vlm.generate(config, params, None, ids, max_new_tokens=8, stop_tokens=[])["ids"]
    key = jax.random.key(7)
    nucleus_of_one = vlm.generate(config, params, None, ids, max_new_tokens=8, temperature=1.0, top_p=1e-6,
                                  stop_tokens=[], rng=key)["ids"]
    np.testing.assert_array_equal(nucleus_of_one, greedy)  # top_p → 0 keeps only the argmax
    hot = [vlm.generate(config, params, None, ids, max_new_tokens=8, temperature=5.0, stop_tokens=[],
                        rng=jax.random.key(seed))["ids"] for seed in (1, 1, 2)]
    np.testing.assert_array_equal(hot[0], hot[1])
    assert not np.array_equal(hot[0], hot[2])


def test_sample_logits_nucleus():
    """top_p = 0.6 over probabilities (0.5, 0.3, 0.2) keeps the first two tokens, in proportion 5:3."""
    logits = jnp.log(jnp.asarray([[0.3, 0.5, 0.2]] * 4000))
    draw = jax.jit(functools.partial(vlm.sample_logits, greedy=False))
    tokens = np.asarray(draw(logits, jax.random.key(0), 1.0, 0.6))
    counts = np.bincount(tokens, minlength=3) / tokens.size
    assert counts[2] == 0 and abs(counts[1] - 0.625) < 0.03
    assert np.asarray(vlm.sample_logits(logits[:2], jax.random.key(0), 1.0, 1.0, greedy=True)).tolist() == [1, 1]


# ---- bad inputs ---------------------------------------------------------------------------------
def test_image_token_count_must_match_the_grid(tokenizer, processor):
    _, config, params = model_and_params("gqa2_untied")
    with pytest.raises(ValueError, match=r"2 image placeholder\(s\) .* but 1 image\(s\) were given"):
        inputs.encode(config, tokenizer, inputs.chat_prompt(tokenizer, "w20", num_images=2), [image(0)],
                      image_processor=processor)
    batch = inputs.encode(config, tokenizer, inputs.chat_prompt(tokenizer, "w20", num_images=1), [image(0)],
                          image_processor=processor)
    ids = np.delete(batch["input_ids"], np.flatnonzero(batch["input_ids"][0] == IMAGE)[0], axis=1)  # 5 of 6
    with pytest.raises(ValueError, match=r"5 image tokens .* image_grid_thw \[\[1, 4, 6\]\] describes 6 merged"):
        vlm.generate(config, params, tokenizer, ids, pixel_values=batch["pixel_values"],
                     image_grid_thw=batch["image_grid_thw"])
    with pytest.raises(ValueError, match="6 image tokens .* but no pixel_values"):
        vlm.generate(config, params, tokenizer, batch["input_ids"])


def test_bad_generate_arguments():
    _, config, params = model_and_params("gqa2_untied")
    ids = np.full((2, 4), 30)
    with pytest.raises(ValueError, match=r"rows \[1\] end in padding"):
        vlm.generate(config, params, None, ids, attention_mask=np.array([[1, 1, 1, 1], [1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        vlm.generate(config, params, None, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        vlm.generate(config, params, None, ids, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="a text prompt needs a tokenizer"):
        vlm.generate(config, params, None, "w20 w21")
