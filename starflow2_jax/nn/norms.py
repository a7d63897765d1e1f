"""LayerNorm and RMSNorm exactly as the reference implementations compute them (in float32)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax.nn.axes import param_with_axes


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm``: affine, biased variance, computed in float32 and cast back."""

    epsilon: float = 1e-5
    axis_name: str | None = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (dim,), (self.axis_name,))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (dim,), (self.axis_name,))
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm ``x * rsqrt(mean(x^2) + eps) * w``, in float32.

    With ``offset=True`` (STARFlow's convention) the stored parameter is the zero-initialised offset
    ``w`` and the multiplier is ``1 + w``; with ``offset=False`` (Qwen's) it is the multiplier itself.
    """

    epsilon: float = 1e-6
    offset: bool = True
    axis_name: str | None = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = param_with_axes(self, "scale", init, (dim,), (self.axis_name,))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.epsilon)
        y = y * (1.0 + scale if self.offset else scale)
        return y.astype(x.dtype)


def make_norm(kind: str, *, layernorm_eps: float = 1e-5, rmsnorm_eps: float = 1e-6,
              axis_name: str | None = "embed", name: str | None = None) -> nn.Module | None:
    """Returns the norm named by ``kind`` ('layernorm' | 'rmsnorm' | 'none' → None)."""
    if kind == "layernorm":
        return LayerNorm(epsilon=layernorm_eps, axis_name=axis_name, name=name)
    if kind == "rmsnorm":
        return RMSNorm(epsilon=rmsnorm_eps, offset=True, axis_name=axis_name, name=name)
    if kind == "none":
        return None
    raise ValueError(f"norm kind {kind!r}: expected 'layernorm', 'rmsnorm' or 'none'")
