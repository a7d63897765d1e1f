"""STARFlow2 / Pretzel: a frozen Qwen2.5-VL text stream and a deep-flow stream under one causal mask.

    cfg = pretzel.preset("tiny")                           # or "7b"; PretzelConfig
    doc = pretzel.layout_document(cfg, ["a caption", image])   # per-document arrays (the packer's input)
    params = pretzel.init(cfg, rng)                        # trainable only; the VLM comes from its checkpoint
    loss, metrics = pretzel.loss(cfg, params, vlm_params, packed_batch, latent_vars=..., rng=rng)
    out = pretzel.text_to_image(cfg, params, vlm_params, latent_vars, prompt_doc, rng=rng, guidance=3.0)

Modules: ``config`` (PretzelConfig, presets), ``layout`` (documents, chat template), ``model`` (the
coupled forward), ``losses``, ``step`` (incremental steps with explicit caches: ``step.step``,
``step.deep_step``; the module, not re-exported, so ``pretzel.step`` stays the module), ``generate`` (the
three modes and the segment API they are made of: ``State``, ``prefill``, ``feed_token``,
``image_segment``, ``text_segment``, ``invert_shallow``; ``check_image_temperature``, the images' noise
scale T; and ``cache_difference``, the no-re-encoding check against one teacher-forced pass).
"""

from starflow2_jax.pretzel.config import (PRESETS, PretzelConfig, config_from_dict, config_to_dict, preset, sevenb,
                                          tiny)
from starflow2_jax.pretzel.generate import (State, cache_difference, check_image_temperature, feed_token,
                                            image_segment, image_to_text, interleaved, invert_shallow, prefill,
                                            text_segment, text_to_image)
from starflow2_jax.pretzel.layout import Image, Text, chat_items, layout_document
from starflow2_jax.pretzel.losses import loss, per_example
from starflow2_jax.pretzel.model import (Caches, Output, apply_model, check_batch, create_caches, encode_images,
                                         forward, image_nll, init, init_boxed, lm_logits)
from starflow2_jax.pretzel.step import StepOutput

__all__ = [
    "Caches", "Image", "Output", "PRESETS", "PretzelConfig", "State", "StepOutput", "Text", "apply_model",
    "cache_difference", "chat_items", "check_batch", "check_image_temperature", "config_from_dict", "config_to_dict",
    "create_caches", "encode_images", "feed_token", "forward", "image_nll", "image_segment", "image_to_text", "init",
    "init_boxed", "interleaved", "invert_shallow", "layout_document", "lm_logits", "loss", "per_example", "prefill",
    "preset", "sevenb", "text_segment", "text_to_image", "tiny",
]
