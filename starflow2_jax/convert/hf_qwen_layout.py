"""The key table of Hugging Face Qwen2.5-VL checkpoints ↔ our ``{'text': …, 'vision': …}`` params.

Hub layout (what ``save_pretrained`` and the official checkpoints write)::

    model.embed_tokens.weight, model.layers.N.<LAYER_KEYS>, model.norm.weight, lm_head.weight,
    visual.patch_embed.proj.weight, visual.blocks.N.…, visual.merger.…

transformers 5's in-memory layout (``model.state_dict()``) spells the prefixes
``model.language_model.`` and ``model.visual.``; ``hub_key`` maps it to the hub layout. Per-tensor
transforms (transposes, head splits, the fused vision qkv) are the hooks in ``vlm.params`` and
``vlm.vision_params``; this module only routes keys to them. A tied checkpoint has no
``lm_head.weight`` (transformers ignores one if present; so do we).
"""

from __future__ import annotations

import re

import numpy as np

from starflow2_jax.vlm.config import QwenVLConfig
from starflow2_jax.vlm.params import LAYER_KEYS, layer_param_from_torch, layer_param_to_torch
from starflow2_jax.vlm.vision_params import torch_shapes, vision_tensor_from_torch, vision_tensor_to_torch

TEXT, VISION, LM_HEAD = "model.", "visual.", "lm_head.weight"
IN_MEMORY_PREFIXES = (("model.language_model.", TEXT), ("model.visual.", VISION))  # in-memory → hub
_TEXT_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")

Slot = tuple[tuple[str, ...], "int | None", np.ndarray]  # (path in our params, layer or None, value)


def hub_key(key: str) -> str:
    """``key`` in the hub layout (in-memory ``model.language_model.`` / ``model.visual.`` rewritten)."""
    for memory, hub in IN_MEMORY_PREFIXES:
        if key.startswith(memory):
            return hub + key[len(memory):]
    return key


def hub_shapes(config: QwenVLConfig) -> dict[str, tuple[int, ...]]:
    """Every hub-layout key a checkpoint of ``config`` holds → its torch shape, in checkpoint order
    (text, LM head unless tied, vision tower)."""
    t = config.text
    d, f, hd = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_heads * hd, t.num_kv_heads * hd
    layer = {"input_layernorm.weight": (d,), "self_attn.q_proj.weight": (q, d), "self_attn.q_proj.bias": (q,),
             "self_attn.k_proj.weight": (kv, d), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.weight": (kv, d),
             "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.weight": (d, q), "post_attention_layernorm.weight": (d,),
             "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
    assert set(layer) == set(LAYER_KEYS)
    shapes = {TEXT + "embed_tokens.weight": (t.vocab_size, d)}
    for n in range(t.num_layers):
        shapes.update({f"{TEXT}layers.{n}.{k}": s for k, s in layer.items()})
    shapes[TEXT + "norm.weight"] = (d,)
    if not t.tie_word_embeddings:
        shapes[LM_HEAD] = (t.vocab_size, d)
    shapes.update({VISION + k: s for k, s in torch_shapes(config.vision).items()})
    return shapes


def to_ours(key: str, value: np.ndarray, config: QwenVLConfig) -> list[Slot]:
    """One checkpoint tensor (hub key) → ``[(path, layer, value)]`` in our layout (dtype kept);
    ``layer`` is the index into a stacked (num_layers, …) parameter, None for unstacked ones."""
    if key.startswith(VISION):
        return [(("vision",) + tuple(path.split("/")), layer, v)
                for path, layer, v in vision_tensor_from_torch(key[len(VISION):], value, config.vision)]
    if key == TEXT + "embed_tokens.weight":
        return [(("text", "embed_tokens"), None, value)]
    if key == TEXT + "norm.weight":
        return [(("text", "final_norm", "scale"), None, value)]
    if key == LM_HEAD:
        return [(("text", "lm_head", "kernel"), None, value.T)]
    match = _TEXT_LAYER.fullmatch(key)
    if match is None or match.group(2) not in LAYER_KEYS:
        raise KeyError(f"unexpected Qwen2.5-VL checkpoint key {key!r}")
    suffix = match.group(2)
    return [(("text", "layers") + LAYER_KEYS[suffix], int(match.group(1)),
             layer_param_from_torch(suffix, value, config.text))]


def to_torch(key: str, params, config: QwenVLConfig) -> np.ndarray:
    """The checkpoint tensor ``key`` (hub layout) from our params, in the params' dtype (inverse of
    ``to_ours``); stacked parameters are read one layer at a time."""
    if key.startswith(VISION):
        return vision_tensor_to_torch(key[len(VISION):], params["vision"], config.vision)
    text = params["text"]
    if key == TEXT + "embed_tokens.weight":
        return np.asarray(text["embed_tokens"])
    if key == TEXT + "norm.weight":
        return np.asarray(text["final_norm"]["scale"])
    if key == LM_HEAD:
        return np.asarray(text["lm_head"]["kernel"]).T
    match = _TEXT_LAYER.fullmatch(key)
    if match is None or match.group(2) not in LAYER_KEYS:
        raise KeyError(f"unexpected Qwen2.5-VL checkpoint key {key!r}")
    node = text["layers"]
    for part in LAYER_KEYS[match.group(2)]:
        node = node[part]
    return layer_param_to_torch(match.group(2), np.asarray(node[int(match.group(1))]), config.text)
