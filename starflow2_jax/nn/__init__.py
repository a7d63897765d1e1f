"""Building blocks shared by every model: attention with an explicit KV cache, RoPE, norms, MLPs."""

from starflow2_jax.nn.attention import Attention, KVCache, attention_mask
from starflow2_jax.nn.axes import dense, param_with_axes, torch_linear_init
from starflow2_jax.nn.mlp import MLP
from starflow2_jax.nn.norms import LayerNorm, RMSNorm, make_norm
from starflow2_jax.nn.remat import REMAT_POLICIES, remat_layer
from starflow2_jax.nn.rope import apply_rope, multimodal_rope_angles, rope_frequencies, starflow_rope_angles

__all__ = [
    "Attention",
    "KVCache",
    "LayerNorm",
    "MLP",
    "REMAT_POLICIES",
    "RMSNorm",
    "apply_rope",
    "attention_mask",
    "dense",
    "make_norm",
    "multimodal_rope_angles",
    "param_with_axes",
    "remat_layer",
    "rope_frequencies",
    "starflow_rope_angles",
    "torch_linear_init",
]
