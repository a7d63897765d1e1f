"""Classifier-free guidance rules applied to a [conditional; unconditional] batch of affine parameters.

- 'linear' (TarFlow): a ← a + g(a − a_u) and/or b ← b + g(b − b_u), then σ = σ(a).
- 'gaussian' (STARFlow, product of Gaussians p_c^{1+g} / p_u^g with a variance clip):
  s = min(σ_c/σ_u, 1)², σ* = σ_c / sqrt(1 + g − g·s), μ* = ((1 + g)·μ_c − g·s·μ_u) / (1 + g − g·s).
Both halves of the batch receive the guided value, so both KV caches see the same sequence.
"""

from __future__ import annotations

import jax.numpy as jnp

from starflow2_jax.flow.block import sigma_from_preact
from starflow2_jax.flow.config import FlowConfig

RULES = {"tarflow": "linear", "starflow": "gaussian"}


def guided_affine(config: FlowConfig, a, b, scale, guide: str = "ab"):
    """a, b (2B, Q, d) for [cond; uncond] rows; scale broadcastable to (Q,) → (μ, σ) for all 2B rows."""
    half = a.shape[0] // 2
    g = jnp.asarray(scale, jnp.float32)
    g = g.reshape((1,) + g.shape + (1,)) if g.ndim else g
    a_c, a_u, b_c, b_u = a[:half], a[half:], b[:half], b[half:]
    if RULES[config.variant] == "linear":
        if "a" in guide:
            a_c = a_c + g * (a_c - a_u)
        if "b" in guide:
            b_c = b_c + g * (b_c - b_u)
        sigma, _ = sigma_from_preact(config, a_c)
        mu = b_c
    else:
        sigma_c, _ = sigma_from_preact(config, a_c)
        sigma_u, _ = sigma_from_preact(config, a_u)
        s = jnp.square(jnp.minimum(sigma_c / sigma_u, 1.0))
        denom = 1.0 + g - g * s
        sigma = sigma_c / jnp.sqrt(denom)
        mu = ((1.0 + g) * b_c - g * s * b_u) / denom
    return jnp.concatenate([mu, mu], axis=0), jnp.concatenate([sigma, sigma], axis=0)
