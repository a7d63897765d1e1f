"""Feed-forward blocks: a GELU MLP (exact erf, torch's default) and a gated MLP (SwiGLU family)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax.nn.axes import dense

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


class MLP(nn.Module):
    """``kind='gelu'``: wo(gelu_erf(wi(x))). ``kind='gated'``: down(act(gate(x)) * up(x)).

    ``gated_activation`` is 'gelu_tanh' for STARFlow's ``use_swiglu`` and 'silu' for Qwen.
    """

    hidden: int
    kind: str = "gelu"
    gated_activation: str = "gelu_tanh"
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    dense_2d: bool = False  # layers as 2-D matmuls (``nn.axes.dense``; faster gradients on CPU)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        common = dict(use_bias=self.use_bias, dtype=self.dtype, dense_2d=self.dense_2d)
        if self.kind == "gelu":
            h = dense(self.hidden, ("embed",), ("mlp",), fan_in=dim, name="wi", **common)(x)
            h = _ACTIVATIONS["gelu"](h)
        elif self.kind == "gated":
            if self.gated_activation not in _ACTIVATIONS:
                raise ValueError(f"gated_activation {self.gated_activation!r}: expected one of {sorted(_ACTIVATIONS)}")
            gate = dense(self.hidden, ("embed",), ("mlp",), fan_in=dim, name="gate", **common)(x)
            up = dense(self.hidden, ("embed",), ("mlp",), fan_in=dim, name="up", **common)(x)
            h = _ACTIVATIONS[self.gated_activation](gate) * up
        else:
            raise ValueError(f"MLP kind {self.kind!r}: expected 'gelu' or 'gated'")
        h = nn.with_logical_constraint(h, ("act_batch", "act_seq", "act_mlp"))
        return dense(dim, ("mlp",), ("embed",), fan_in=self.hidden, name="wo", **common)(h)
