"""The Qwen2.5-VL text decoder and the combined forward against transformers' PyTorch model.

Oracle: ``Qwen2_5_VLForConditionalGeneration`` built from tiny random configs (qwen_hf_tiny), float32;
image prompts get transformers' own vision features injected (``image_features=``), so these tests
check the text side alone. Cached decoding is checked against our full forward (itself checked
against transformers); the mesh test against one device.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qwen_hf_tiny import (END, IMAGE, TEXT_CONFIGS, build, hf_config, hf_image_features, hf_logits,
                          image_run, pixels, words)
from starflow2_jax import parallel, vlm

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(TEXT_CONFIGS))
def qwen(request):
    return build(request.param)


def two_image_prompt(seed=0):
    rng = np.random.default_rng(seed)
    grids = np.array([[1, 4, 6], [1, 6, 2]])  # odd merged grids 2×3 and 3×1
    ids = words(rng, 3) + image_run(grids[0]) + words(rng, 4) + image_run(grids[1]) + words(rng, 2)
    return np.array([ids]), grids


def test_text_only_logits(qwen):
    model, config, params = qwen
    ids = np.random.default_rng(1).integers(20, 1000, (2, 13))
    types = np.zeros_like(ids)
    got = vlm.forward(config, params, ids, mm_token_type_ids=types)
    assert got.shape == (2, 13, config.text.vocab_size) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, hf_logits(model, ids, mm_token_type_ids=types), atol=ATOL, rtol=0)


def test_text_only_left_padding():
    model, config, params = build("gqa4_untied_hd32")
    ids = np.random.default_rng(2).integers(20, 1000, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    got = np.asarray(vlm.forward(config, params, ids, attention_mask=mask))
    ref = hf_logits(model, ids, attention_mask=mask)
    np.testing.assert_allclose(got[mask == 1], ref[mask == 1], atol=ATOL, rtol=0)


def test_single_image_logits(qwen):
    model, config, params = qwen
    rng = np.random.default_rng(3)
    grids = np.array([[1, 6, 4]])
    ids = np.array([words(rng, 4) + image_run(grids[0]) + words(rng, 5)])
    types = (ids == IMAGE).astype(np.int64)
    pv = pixels(grids, seed=3)
    feats = hf_image_features(model, pv, grids)
    got = vlm.forward(config, params, ids, image_grid_thw=grids, mm_token_type_ids=types, image_features=feats)
    ref = hf_logits(model, ids, pixel_values=pv, image_grid_thw=grids, mm_token_type_ids=types)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_two_image_logits(qwen):
    model, config, params = qwen
    ids, grids = two_image_prompt()
    types = (ids == IMAGE).astype(np.int64)
    pv = pixels(grids, seed=4)
    feats = hf_image_features(model, pv, grids)
    got = vlm.forward(config, params, ids, image_grid_thw=grids, mm_token_type_ids=types, image_features=feats)
    ref = hf_logits(model, ids, pixel_values=pv, image_grid_thw=grids, mm_token_type_ids=types)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    # mm_token_type_ids derived from the ids when omitted
    np.testing.assert_allclose(vlm.forward(config, params, ids, image_grid_thw=grids, image_features=feats), ref,
                               atol=ATOL, rtol=0)


def test_two_images_through_our_vision_tower():
    """pixel_values → our vision tower (starflow2_jax.vlm.vision) → scatter → decoder, end to end."""
    from starflow2_jax.vlm.vision_params import vision_params_from_torch

    model, config, params = build("gqa2_untied")
    params = {**params, "vision": vision_params_from_torch(model.state_dict(), config.vision)}
    ids, grids = two_image_prompt(seed=10)
    types = (ids == IMAGE).astype(np.int64)
    pv = pixels(grids, seed=10)
    got = vlm.forward(config, params, ids, pixel_values=pv, image_grid_thw=grids, mm_token_type_ids=types)
    ref = hf_logits(model, ids, pixel_values=pv, image_grid_thw=grids, mm_token_type_ids=types)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def batch_with_images_and_padding(seed=5):
    """Two rows, left-padded to one length, an image in each (grids consumed in order over the batch)."""
    rng = np.random.default_rng(seed)
    grids = np.array([[1, 4, 4], [1, 2, 6]])
    rows = [words(rng, 2) + image_run(grids[0]) + words(rng, 6),
            words(rng, 1) + image_run(grids[1]) + words(rng, 3)]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = row
        mask[b, length - len(row):] = 1
    return ids, mask, grids


def test_batch_images_left_padding(qwen):
    model, config, params = qwen
    ids, mask, grids = batch_with_images_and_padding()
    types = (ids == IMAGE).astype(np.int64)
    pv = pixels(grids, seed=5)
    feats = hf_image_features(model, pv, grids)
    got = np.asarray(vlm.forward(config, params, ids, image_grid_thw=grids, mm_token_type_ids=types,
                                 attention_mask=mask, image_features=feats))
    ref = hf_logits(model, ids, pixel_values=pv, image_grid_thw=grids, mm_token_type_ids=types, attention_mask=mask)
    np.testing.assert_allclose(got[mask == 1], ref[mask == 1], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_cached_decoding_equals_full_forward(qwen):
    """Prefill k tokens (containing the images) into a fixed-size cache, then one token at a time;
    every step's logits equal the full forward's at those positions (left padding in the batch)."""
    _, config, params = qwen
    ids, mask, grids = batch_with_images_and_padding(seed=6)
    types = (ids == IMAGE).astype(np.int64)
    feats = np.random.default_rng(6).standard_normal((int(types.sum()), config.text.hidden_size)).astype(np.float32)
    positions = vlm.position_ids_for(config, ids, types, grids, mask)
    full, hidden = vlm.forward(config, params, ids, image_grid_thw=grids, mm_token_type_ids=types,
                               attention_mask=mask, image_features=feats, return_hidden=True)
    full = np.asarray(full)
    embeds = jax.jit(functools.partial(vlm.QwenTextModel(config.text).apply, method=vlm.QwenTextModel.embed))(
        {"params": params["text"]}, jnp.asarray(ids))
    embeds = np.asarray(vlm.scatter_features(embeds, jnp.asarray(ids == IMAGE), jnp.asarray(feats)))
    length = ids.shape[1]
    slots = length + 3  # a cache longer than the sequence: unwritten slots must stay invisible
    key_mask = jnp.asarray(np.pad(mask, ((0, 0), (0, slots - length))))
    cache = vlm.create_cache(config.text, batch=2, length=slots)
    prefill = int(np.argmax(ids[0] == END)) + 2  # past the first row's image
    steps = [(0, prefill)] + [(s, s + 1) for s in range(prefill, length)]
    for start, stop in steps:
        logits, cache = vlm.text_forward(config.text, params["text"], inputs_embeds=embeds[:, start:stop],
                                         position_ids=jnp.asarray(positions[:, :, start:stop]),
                                         attention_mask=key_mask, cache=cache)
        valid = mask[:, start:stop] == 1
        np.testing.assert_allclose(np.asarray(logits)[valid], full[:, start:stop][valid], atol=ATOL, rtol=0)
        assert int(cache.index) == stop
    assert hidden.shape == (2, length, config.text.hidden_size)


def test_token_ids_and_embeddings_inputs_agree():
    _, config, params = build("mha_tied")
    ids = jnp.asarray(np.random.default_rng(7).integers(20, 1000, (1, 6)))
    model = vlm.QwenTextModel(config.text)
    embeds = model.apply({"params": params["text"]}, ids, method=vlm.QwenTextModel.embed)
    a = vlm.text_forward(config.text, params["text"], ids)
    b = vlm.text_forward(config.text, params["text"], inputs_embeds=embeds)
    np.testing.assert_array_equal(a, b)


def test_param_tree_matches_module():
    """The converter's tree is exactly the module's (names and shapes), tied and untied."""
    for name in ("gqa2_untied", "mha_tied"):
        _, config, params = build(name)
        fresh = jax.eval_shape(functools.partial(vlm.init_text, config.text), jax.random.key(0))
        shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)  # noqa: E731
        assert shapes(fresh) == shapes(params["text"])
        t = config.text
        layers = params["text"]["layers"]
        assert layers["attn"]["query"]["kernel"].shape == (t.num_layers, t.hidden_size, t.num_heads, t.head_dim)
        assert layers["attn"]["key"]["bias"].shape == (t.num_layers, t.num_kv_heads, t.head_dim)
        assert "bias" not in layers["attn"]["out"]
        assert ("lm_head" in params["text"]) == (not t.tie_word_embeddings)


def test_remat_and_bfloat16_compute():
    """remat='full' changes nothing; bfloat16 compute stays close to float32 and returns float32 logits."""
    _, config, params = build("gqa2_untied")
    ids = np.random.default_rng(8).integers(20, 1000, (1, 7))
    expected = np.asarray(vlm.forward(config, params, ids))
    remat = dataclasses.replace(config, text=dataclasses.replace(config.text, remat="full"))
    np.testing.assert_allclose(vlm.forward(remat, params, ids), expected, atol=1e-6)
    bf16 = dataclasses.replace(config, text=dataclasses.replace(config.text, dtype="bfloat16"))
    got = vlm.forward(bf16, params, ids)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, atol=0.05 * np.abs(expected).max())


@pytest.mark.slow
def test_forward_on_mesh_equals_one_device():
    """(2 data × 2 fsdp × 2 tensor): params sharded by DEFAULT_RULES from the boxed init, batch over
    (data, fsdp), activation constraints active; logits equal the single-device forward."""
    _, config, params = build("gqa2_untied")
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    init_fn = functools.partial(vlm.text_init_boxed, config.text)
    shardings = parallel.variable_shardings(init_fn, mesh, parallel.DEFAULT_RULES)["params"]
    assert shardings["embed_tokens"].spec == P("tensor", "fsdp")
    assert shardings["layers"]["attn"]["query"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    assert shardings["layers"]["mlp"]["wo"]["kernel"].spec == P(None, "tensor", "fsdp")
    sharded = {"text": parallel.shard_variables(params["text"], shardings)}

    rng = np.random.default_rng(9)
    grids = np.array([[1, 4, 6], [1, 2, 2], [1, 6, 2], [1, 4, 4]])
    rows = [words(rng, 2) + image_run(g) + words(rng, 3) for g in grids]
    length = max(map(len, rows))
    ids = np.full((4, length), 20, np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = row
        mask[b, length - len(row):] = 1
    types = (ids == IMAGE).astype(np.int64)
    feats = rng.standard_normal((int(types.sum()), config.text.hidden_size)).astype(np.float32)
    expected = np.asarray(vlm.forward(config, params, ids, image_grid_thw=grids, mm_token_type_ids=types,
                                      attention_mask=mask, image_features=feats))
    with parallel.activation_rules(mesh, parallel.DEFAULT_RULES):
        got = vlm.forward(config, sharded, parallel.shard_batch(ids, mesh), image_grid_thw=grids,
                          mm_token_type_ids=types, attention_mask=parallel.shard_batch(mask, mesh),
                          image_features=feats)
    assert got.sharding.mesh == mesh
    np.testing.assert_allclose(np.asarray(got)[mask == 1], expected[mask == 1], atol=1e-5, rtol=0)


# ---- bad inputs ---------------------------------------------------------------------------------
def test_image_token_count_mismatch_is_an_error():
    _, config, params = build("gqa2_untied")
    ids, grids = two_image_prompt()
    feats = np.zeros((9, config.text.hidden_size), np.float32)
    with pytest.raises(ValueError, match=r"9 image tokens .* gives 10 merged image tokens"):
        vlm.forward(config, params, ids, image_grid_thw=np.array([[1, 4, 6], [1, 8, 2]]), image_features=feats)
    with pytest.raises(ValueError, match=r"image features have shape \(8, 64\): expected \(9, 64\)"):
        vlm.forward(config, params, ids, image_grid_thw=grids, image_features=feats[:8])
    with pytest.raises(ValueError, match="9 image tokens .* neither pixel_values nor image_features"):
        vlm.forward(config, params, ids)


def test_config_for_another_architecture_is_an_error():
    good = hf_config("gqa2_untied").to_dict()
    with pytest.raises(ValueError, match=r"model_type='qwen2_vl'.*expected 'qwen2_5_vl'"):
        vlm.QwenVLConfig.from_hf_dict({**good, "model_type": "qwen2_vl"})
    with pytest.raises(ValueError, match=r"model_type='llama' \(architectures=\['LlamaForCausalLM'\]\)"):
        vlm.QwenVLConfig.from_hf_dict({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match=r"architectures=\['Qwen2VLForConditionalGeneration'\]"):
        vlm.QwenVLConfig.from_hf_dict({**good, "architectures": ["Qwen2VLForConditionalGeneration"]})


def test_missing_text_weights_are_listed():
    model, config, _ = build("gqa2_untied")
    state = dict(model.state_dict())
    del state["model.language_model.layers.1.self_attn.k_proj.bias"], state["lm_head.weight"]
    with pytest.raises(KeyError, match=r"2 text parameter\(s\) missing.*layers\.1\.self_attn\.k_proj\.bias.*lm_head"):
        vlm.text_params_from_torch(state, config.text)
