"""The functional flow API: init, forward (likelihood), loss, bits/dim and score-step denoising.

Images are NHWC; latents ``z`` come back in token layout (B, T, d) (``unpatchify`` maps them to
images); ``variables`` is the Flax variables dict ``{'params': ..., 'prior': {'var': (T, d)}}``.
Conditioning ``cond`` is an int label array (B,) for class-conditional configs (−1 = dropped label
→ mean class embedding), text features (B, text_len, text_dim) for text-conditioned ones, or None.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.flow.block import FlowModel
from starflow2_jax.flow.config import FlowConfig
from starflow2_jax.flow.patchify import check_tokens, patchify


class FlowOutput(NamedTuple):
    """z (B, T, d); logdets (B, K) = log|det ∂out_k/∂in_k| per block (summed over dims);
    logdet_elements: K arrays (B, T, d); intermediates: K + 1 token arrays (input, every block output)."""

    z: jax.Array
    logdets: jax.Array
    logdet_elements: list
    intermediates: list


def split_cond(config: FlowConfig, cond, batch: int | None = None):
    """Validates ``cond`` against the config; returns ``(labels, text)`` (either may be None)."""
    text_blocks = any(b.text_conditioned for b in config.blocks)
    if cond is None:
        if text_blocks:
            raise ValueError(f"this flow is text-conditioned: cond must be text features of shape "
                             f"(B, {config.text_len}, {config.text_dim}); for 'unconditional' pass the "
                             f"empty caption's features")
        return None, None
    cond = jnp.asarray(cond)
    if config.num_classes:
        if cond.ndim != 1 or not jnp.issubdtype(cond.dtype, jnp.integer):
            raise ValueError(f"cond must be integer class labels of shape (B,), got {cond.dtype} {tuple(cond.shape)}")
        if batch is not None and cond.shape[0] != batch:
            raise ValueError(f"cond has {cond.shape[0]} labels for a batch of {batch}")
        return cond, None
    if text_blocks:
        expected = (config.text_len, config.text_dim)
        if cond.ndim != 3 or tuple(cond.shape[1:]) != expected or (batch is not None and cond.shape[0] != batch):
            raise ValueError(f"cond must be text features of shape ({batch or 'B'}, {expected[0]}, {expected[1]}), "
                             f"got {tuple(cond.shape)}")
        return None, cond
    raise ValueError("this flow is unconditional (num_classes=0, no text-conditioned block) but cond was given")


def init(config: FlowConfig, rng: jax.Array, batch: int = 1) -> dict:
    """Fresh variables ``{'params', 'prior'}`` (plain arrays; logical-axis boxes stripped)."""
    return _init(config.validate(), rng, batch)


def init_boxed(config: FlowConfig, rng: jax.Array, batch: int = 1) -> dict:
    """Like ``init``, but params stay ``nn.Partitioned`` boxes carrying their logical axis names
    (``jax.eval_shape`` of it gives the shapes and names that shardings are derived from)."""
    config.validate()
    x = jnp.zeros((batch, config.num_tokens, config.token_dim), jnp.float32)
    labels = jnp.zeros((batch,), jnp.int32) if config.num_classes else None
    text = jnp.zeros((batch, config.text_len, config.text_dim)) if any(
        b.text_conditioned for b in config.blocks) else None
    return FlowModel(config).init(rng, x, labels, text)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(config: FlowConfig, rng: jax.Array, batch: int) -> dict:
    return unbox(init_boxed(config, rng, batch))


def unbox(tree):
    import flax.linen as nn
    return nn.meta.unbox(tree)


@functools.partial(jax.jit, static_argnums=0)
def _forward_tokens(config: FlowConfig, variables, tokens, labels, text) -> FlowOutput:
    z, lds, outs = FlowModel(config).apply(variables, tokens, labels, text)
    logdets = jnp.stack([ld.reshape(ld.shape[0], -1).sum(-1) for ld in lds], axis=1)
    return FlowOutput(z=z, logdets=logdets, logdet_elements=lds, intermediates=outs)


def forward_tokens(config: FlowConfig, variables, tokens, cond=None) -> FlowOutput:
    """Likelihood pass on patch tokens (B, T, d) (raster order, the config's feature order)."""
    check_tokens(config, tokens)
    labels, text = split_cond(config, cond, tokens.shape[0])
    return _forward_tokens(config, variables, jnp.asarray(tokens, jnp.float32), labels, text)


def forward_with_intermediates(config: FlowConfig, variables, images, cond=None) -> FlowOutput:
    """Likelihood pass on images (B, H, W, C); see ``FlowOutput``."""
    return forward_tokens(config, variables, patchify(config, jnp.asarray(images, jnp.float32)), cond)


def forward(config: FlowConfig, variables, images, cond=None):
    """images (B, H, W, C) → ``(z (B, T, d), logdets (B, K))`` with per-block log|det| sums."""
    out = forward_with_intermediates(config, variables, images, cond)
    return out.z, out.logdets


def loss(config: FlowConfig, out: FlowOutput, latent_norm_reg: float | None = None) -> dict:
    """The references' training loss: mean_b[0.5·mean(z²) − Σ_k logdet_k / D] (+ λ·Σ_{j<K} mean(out_j²)).

    Returns a dict of scalars: loss, loss_z, loss_logdet, loss_latent_norm.
    """
    lam = config.latent_norm_reg if latent_norm_reg is None else latent_norm_reg
    z = out.z.astype(jnp.float32)
    loss_z = 0.5 * jnp.mean(jnp.square(z).reshape(z.shape[0], -1), axis=1)
    loss_logdet = -jnp.sum(out.logdets, axis=1) / config.num_dims
    reg = sum(jnp.mean(jnp.square(o.astype(jnp.float32))) for o in out.intermediates[:-1])
    total = jnp.mean(loss_z + loss_logdet) + lam * reg
    return dict(loss=total, loss_z=jnp.mean(loss_z), loss_logdet=jnp.mean(loss_logdet), loss_latent_norm=reg)


def nll_per_dim(config: FlowConfig, out: FlowOutput) -> jax.Array:
    """Per-sample −log p(x) / D in nats under the unit Gaussian prior (B,)."""
    z = out.z.astype(jnp.float32)
    return (0.5 * jnp.mean(jnp.square(z).reshape(z.shape[0], -1), axis=1) + 0.5 * np.log(2 * np.pi)
            - jnp.sum(out.logdets, axis=1) / config.num_dims)


def bits_per_dim(config: FlowConfig, out: FlowOutput, num_bins: int = 256) -> jax.Array:
    """Per-sample bits/dim of data in [−1, 1] dequantised into ``num_bins`` bins of width 2/num_bins:
    (NLL/D + log(num_bins/2)) / ln 2 (B,)."""
    return (nll_per_dim(config, out) + np.log(num_bins / 2.0)) / np.log(2.0)


@functools.partial(jax.jit, static_argnums=0)
def _denoise(config: FlowConfig, variables, images, labels, text, sigma):
    def nll_sum(x):
        out = _forward_tokens(config, variables, patchify(config, x), labels, text)
        z = out.z.astype(jnp.float32)
        return 0.5 * jnp.sum(jnp.square(z)) - jnp.sum(out.logdets)

    return images - jnp.square(sigma) * jax.grad(nll_sum)(images)


def denoise(config: FlowConfig, variables, images, cond=None, sigma: float = 0.05) -> jax.Array:
    """One score step x̂ = x + σ²·∇ₓ log p(x) on the flow's own likelihood (Tweedie), images NHWC."""
    images = jnp.asarray(images, jnp.float32)
    labels, text = split_cond(config, cond, images.shape[0])
    patchify(config, images)  # validates the shape with a clear error
    return _denoise(config, variables, images, labels, text, jnp.float32(sigma))
