"""Text-decoder parameters from a transformers Qwen2.5-VL state dict (a temporary, in-memory mapping;
``starflow2_jax/convert`` builds the streaming safetensors loader on it).

Accepts both key layouts transformers uses: in-memory ``model.language_model.layers.N…`` and the
hub/checkpoint ``model.layers.N…``; ``lm_head.weight`` is read only for untied configs.
torch ``Linear`` weights are (out, in); ours are (in, out…) with heads split out:
q (D, H, hd), k/v (D, Hkv, hd), o (H, hd, D), gate/up (D, F), down (F, D), all stacked over layers.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from starflow2_jax.vlm.config import QwenTextConfig

TEXT_PREFIXES = ("model.language_model.", "model.")


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor (bf16 has no numpy dtype: go through float32)
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def text_prefix(keys) -> str:
    """The prefix under which ``keys`` hold the text model (``embed_tokens.weight`` below it)."""
    keys = set(keys)
    for prefix in TEXT_PREFIXES:
        if prefix + "embed_tokens.weight" in keys:
            return prefix
    raise KeyError(f"no text embedding found: expected one of "
                   f"{[p + 'embed_tokens.weight' for p in TEXT_PREFIXES]} among {len(keys)} keys")


def layer_param_from_torch(name: str, weight: np.ndarray, config: QwenTextConfig) -> np.ndarray:
    """One layer's tensor (torch layout, key suffix ``name`` such as 'self_attn.q_proj.weight') in ours."""
    h, hkv, hd, d = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
    if name == "self_attn.q_proj.weight":
        return weight.T.reshape(d, h, hd)
    if name in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        return weight.T.reshape(d, hkv, hd)
    if name == "self_attn.q_proj.bias":
        return weight.reshape(h, hd)
    if name in ("self_attn.k_proj.bias", "self_attn.v_proj.bias"):
        return weight.reshape(hkv, hd)
    if name == "self_attn.o_proj.weight":
        return weight.T.reshape(h, hd, d)
    if name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
        return weight.T
    if name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return weight
    raise KeyError(f"unexpected text layer parameter {name!r}")


def layer_param_to_torch(name: str, value: np.ndarray, config: QwenTextConfig) -> np.ndarray:
    """Inverse of ``layer_param_from_torch``: one layer's tensor in our layout → torch layout (dtype kept)."""
    d = config.hidden_size
    if name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        return value.reshape(d, -1).T
    if name in ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"):
        return value.reshape(-1)
    if name == "self_attn.o_proj.weight":
        return value.reshape(-1, d).T
    if name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
        return value.T
    if name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return value
    raise KeyError(f"unexpected text layer parameter {name!r}")


# (torch key suffix inside layer N) → path in our stacked 'layers' tree
LAYER_KEYS = {
    "input_layernorm.weight": ("input_norm", "scale"),
    "self_attn.q_proj.weight": ("attn", "query", "kernel"),
    "self_attn.q_proj.bias": ("attn", "query", "bias"),
    "self_attn.k_proj.weight": ("attn", "key", "kernel"),
    "self_attn.k_proj.bias": ("attn", "key", "bias"),
    "self_attn.v_proj.weight": ("attn", "value", "kernel"),
    "self_attn.v_proj.bias": ("attn", "value", "bias"),
    "self_attn.o_proj.weight": ("attn", "out", "kernel"),
    "post_attention_layernorm.weight": ("mlp_norm", "scale"),
    "mlp.gate_proj.weight": ("mlp", "gate", "kernel"),
    "mlp.up_proj.weight": ("mlp", "up", "kernel"),
    "mlp.down_proj.weight": ("mlp", "wo", "kernel"),
}


def text_params_from_torch(state_dict: Mapping[str, object], config: QwenTextConfig) -> dict:
    """Our text params (float32 numpy) from a Qwen2.5-VL state dict (torch tensors or arrays).

    Raises KeyError listing every missing key.
    """
    prefix = text_prefix(state_dict.keys())
    missing = []

    def get(key):
        if key not in state_dict:
            missing.append(key)
            return None
        return _numpy(state_dict[key])

    layers: dict = {}
    for suffix, path in LAYER_KEYS.items():
        stacked = []
        for i in range(config.num_layers):
            value = get(f"{prefix}layers.{i}.{suffix}")
            stacked.append(None if value is None else layer_param_from_torch(suffix, value, config))
        node = layers
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = None if any(s is None for s in stacked) else np.stack(stacked)
    params = {"embed_tokens": get(prefix + "embed_tokens.weight"), "layers": layers,
              "final_norm": {"scale": get(prefix + "norm.weight")}}
    if not config.tie_word_embeddings:
        head = get("lm_head.weight")
        params["lm_head"] = {"kernel": None if head is None else head.T}
    if missing:
        raise KeyError(f"{len(missing)} text parameter(s) missing from the state dict: {missing}")
    return params
