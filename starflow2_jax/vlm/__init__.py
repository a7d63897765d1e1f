"""Qwen2.5-VL in Flax: text decoder, vision tower, multimodal position ids, the combined forward.

    config = vlm.QwenVLConfig.from_hf_dict(json.load(open("config.json")))
    logits = vlm.forward(config, params, input_ids, pixel_values=..., image_grid_thw=...,
                         mm_token_type_ids=...)            # (B, T, vocab)

``params`` is ``{'text': ..., 'vision': ...}``; the vision tower (``vlm.vision``) is imported only
when pixel values are given. ``convert.load_hf_qwen2_5_vl`` reads Hugging Face checkpoints,
``vlm.inputs`` turns text and images into model inputs, ``vlm.generate`` decodes, and
``save_checkpoint`` / ``load_checkpoint`` keep converted weights as an Orbax checkpoint.
"""

from starflow2_jax.vlm import inputs
from starflow2_jax.vlm.abstract import abstract_params, param_shardings
from starflow2_jax.vlm.checkpoint import load_checkpoint, save_checkpoint
from starflow2_jax.vlm.config import QwenTextConfig, QwenVisionConfig, QwenVLConfig, vision_config_from_hf
from starflow2_jax.vlm.generate import generate, sample_logits
from starflow2_jax.vlm.model import (forward, init_text, position_ids_for, scatter_features, text_forward,
                                     text_init_boxed, token_type_ids)
from starflow2_jax.vlm.params import text_params_from_torch
from starflow2_jax.vlm.positions import image_slot_positions, merged_tokens, rope_index, text_positions
from starflow2_jax.vlm.text import QwenTextModel, create_cache, mrope_angles, text_step

__all__ = [
    "QwenTextConfig", "QwenTextModel", "QwenVLConfig", "QwenVisionConfig", "abstract_params", "create_cache",
    "forward", "generate", "image_slot_positions", "init_text", "inputs", "load_checkpoint", "merged_tokens",
    "mrope_angles", "param_shardings", "position_ids_for", "rope_index", "sample_logits", "save_checkpoint",
    "scatter_features", "text_forward", "text_init_boxed", "text_params_from_torch", "text_positions", "text_step",
    "token_type_ids", "vision_config_from_hf",
]
