"""Qwen2.5-VL config parsing: the hub's flat config.json, transformers 5's nested one, and export."""

import dataclasses

import pytest
from transformers import Qwen2_5_VLConfig

from qwen_hf_tiny import TEXT_CONFIGS, hf_config
from starflow2_jax import vlm

# Qwen/Qwen2.5-VL-7B-Instruct's config.json (flat layout, transformers 4.x era)
HUB_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}


def test_hub_7b_config_matches_the_spec():
    config = vlm.QwenVLConfig.from_hf_dict(HUB_7B, dtype="bfloat16")
    t, v = config.text, config.vision
    assert (t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim) == (28, 3584, 28, 4, 128)
    assert (t.intermediate_size, t.rms_norm_eps, t.rope_theta, t.mrope_section) == (18944, 1e-6, 1e6, (16, 24, 24))
    assert (t.vocab_size, t.tie_word_embeddings, t.dtype) == (152064, False, "bfloat16")
    assert (t.image_token_id, t.vision_start_token_id, t.vision_end_token_id) == (151655, 151652, 151653)
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.patch_size) == (32, 1280, 16, 3420, 14)
    assert (v.window_size, v.fullatt_block_indexes, v.out_hidden_size, v.tokens_per_second) == (
        112, (7, 15, 23, 31), 3584, 2)
    # transformers reads the same flat dict to the same numbers
    assert vlm.QwenVLConfig.from_hf_config(Qwen2_5_VLConfig(**HUB_7B), dtype="bfloat16") == config


@pytest.mark.parametrize("name", sorted(TEXT_CONFIGS))
def test_nested_layout_and_export_round_trip(name):
    hf = hf_config(name)
    config = vlm.QwenVLConfig.from_hf_config(hf)
    assert vlm.QwenVLConfig.from_hf_dict(hf.to_dict()) == config
    exported = config.to_hf_dict()
    assert exported["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert vlm.QwenVLConfig.from_hf_config(Qwen2_5_VLConfig(**exported)) == config
    assert vlm.QwenVLConfig.from_hf_dict(exported) == config


def test_unsupported_features_are_errors():
    with pytest.raises(NotImplementedError, match="sliding-window"):
        vlm.QwenVLConfig.from_hf_dict({**HUB_7B, "use_sliding_window": True})
    with pytest.raises(NotImplementedError, match="'yarn'"):
        vlm.QwenVLConfig.from_hf_dict({**HUB_7B, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match=r"mrope_section=\[16, 24, 16\] sums to 56; expected head_dim / 2 = 64"):
        vlm.QwenVLConfig.from_hf_dict({**HUB_7B, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}})
    with pytest.raises(ValueError, match="num_heads=28 is not a multiple of num_kv_heads=5"):
        dataclasses.replace(vlm.QwenTextConfig(), num_kv_heads=5).validate()
