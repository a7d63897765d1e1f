"""Qwen2.5-VL in Flax: text decoder, vision tower, multimodal position ids, the combined forward.

    config = vlm.QwenVLConfig.from_hf_dict(json.load(open("config.json")))
    logits = vlm.forward(config, params, input_ids, pixel_values=..., image_grid_thw=...,
                         mm_token_type_ids=...)            # (B, T, vocab)

``params`` is ``{'text': ..., 'vision': ...}``; the vision tower (``vlm.vision``) is imported only
when pixel values are given.
"""

from starflow2_jax.vlm.config import QwenTextConfig, QwenVisionConfig, QwenVLConfig, vision_config_from_hf
from starflow2_jax.vlm.model import (forward, init_text, position_ids_for, scatter_features, text_forward,
                                     text_init_boxed, token_type_ids)
from starflow2_jax.vlm.params import text_params_from_torch
from starflow2_jax.vlm.positions import image_slot_positions, merged_tokens, rope_index, text_positions
from starflow2_jax.vlm.text import QwenTextModel, create_cache, mrope_angles

__all__ = [
    "QwenTextConfig", "QwenTextModel", "QwenVLConfig", "QwenVisionConfig", "create_cache", "forward",
    "image_slot_positions", "init_text", "merged_tokens", "mrope_angles", "position_ids_for", "rope_index",
    "scatter_features", "text_forward", "text_init_boxed", "text_params_from_torch", "text_positions",
    "token_type_ids", "vision_config_from_hf",
]
