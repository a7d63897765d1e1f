"""Patchify (images NHWC ↔ tokens) in both reference feature orders, and token permutations."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from starflow2_jax.flow.config import FlowConfig


def check_images(config: FlowConfig, images: jax.Array) -> None:
    """Raises ValueError unless ``images`` is (B, H, W, C) with the config's H, W and C."""
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC (B, H, W, C), got shape {tuple(images.shape)}")
    _, h, w, c = images.shape
    p = config.patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size={p}")
    if (h, w) != tuple(config.image_size):
        raise ValueError(f"image size {h}x{w} does not match the config's image_size={tuple(config.image_size)}")
    if c != config.in_channels:
        raise ValueError(f"images have {c} channels, the config expects in_channels={config.in_channels}")


def check_tokens(config: FlowConfig, tokens: jax.Array, what: str = "tokens") -> None:
    expected = (config.num_tokens, config.token_dim)
    if tokens.ndim != 3 or tuple(tokens.shape[1:]) != expected:
        raise ValueError(f"{what} must have shape (B, {expected[0]}, {expected[1]}) (tokens, patch features), "
                         f"got {tuple(tokens.shape)}")


def patchify(config: FlowConfig, images: jax.Array) -> jax.Array:
    """(B, H, W, C) → (B, T, d) tokens in raster order, features ordered by ``config.feature_order``.

    'cij': x[t, c·p² + i·p + j] (TarFlow, torch ``unfold``); 'ijc': x[t, (i·p + j)·C + c] (STARFlow).
    """
    check_images(config, images)
    b, h, w, c = images.shape
    p = config.patch_size
    x = images.reshape(b, h // p, p, w // p, p, c)
    if config.feature_order == "cij":
        x = x.transpose(0, 1, 3, 5, 2, 4)  # (B, h, w, C, p, p)
    else:
        x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(config: FlowConfig, tokens: jax.Array) -> jax.Array:
    """Inverse of ``patchify``: (B, T, d) → (B, H, W, C)."""
    check_tokens(config, tokens)
    b = tokens.shape[0]
    gh, gw = config.grid
    p, c = config.patch_size, config.in_channels
    if config.feature_order == "cij":
        x = tokens.reshape(b, gh, gw, c, p, p).transpose(0, 1, 4, 2, 5, 3)
    else:
        x = tokens.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * p, gw * p, c)


def permute(x: jax.Array, permutation: str, axis: int = 1) -> jax.Array:
    """Applies a block's token permutation; 'flip' reverses the order and is its own inverse."""
    if permutation == "identity":
        return x
    if permutation == "flip":
        return jnp.flip(x, axis=axis)
    raise ValueError(f"permutation {permutation!r}: expected 'identity' or 'flip'")


unpermute = permute  # both permutations are involutions
