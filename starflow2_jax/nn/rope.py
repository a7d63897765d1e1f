"""Rotary position embeddings.

``apply_rope`` rotates feature pairs; ``style='interleaved'`` pairs features (2i, 2i+1) (the
STARFlow / EVA ``VisionRotaryEmbeddingFast`` convention), ``style='half'`` pairs (i, i + hd/2)
(the Hugging Face convention). Angles are computed in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_frequencies(num: int, exponent_denominator: float, theta: float = 10000.0) -> np.ndarray:
    """``theta ** (-2 j / exponent_denominator)`` for ``j < num`` (float32, shape ``(num,)``)."""
    j = np.arange(num, dtype=np.float64)
    return (theta ** (-2.0 * j / exponent_denominator)).astype(np.float32)


def starflow_rope_angles(
    grid: tuple[int, int],
    head_dim: int,
    *,
    pt_seq_len: float,
    text_len: int = 0,
    three_d: bool = False,
    theta: float = 10000.0,
) -> np.ndarray:
    """Rotation angles for a ``[text (text_len), image (h*w raster)]`` sequence, STARFlow's 2D/3D RoPE.

    Returns ``(text_len + h*w, head_dim // 2)`` float32 angles, one per rotated feature pair.
    Image token (r, c) sits at (p_x[r], p_y[c], 0) with p = arange/sqrt(h*w)*pt_seq_len; text token j
    at (0, 0, j/text_len*pt_seq_len). In 3D mode the pair budget hd/2 is split [hd/2-8 spatial, 8 temporal].
    """
    h, w = grid
    half = head_dim // 2
    norm = math.sqrt(h * w)
    p_x = (np.arange(h, dtype=np.float32) / np.float32(norm) * np.float32(pt_seq_len)).astype(np.float32)
    p_y = (np.arange(w, dtype=np.float32) / np.float32(norm) * np.float32(pt_seq_len)).astype(np.float32)
    px, py = np.meshgrid(p_x, p_y, indexing="ij")
    px, py = px.reshape(-1), py.reshape(-1)
    if three_d:
        spatial = half - 8
        if spatial <= 0 or spatial % 2:
            raise ValueError(f"3D RoPE needs head_dim/2 - 8 positive and even, got head_dim={head_dim}")
        f_xy = rope_frequencies(spatial // 2, spatial, theta)
        f_t = (theta ** (-np.arange(8, dtype=np.float64) / 8.0)).astype(np.float32)
        image = np.concatenate([px[:, None] * f_xy, py[:, None] * f_xy, np.zeros((h * w, 8), np.float32)], axis=1)
        if text_len:
            p_t = (np.arange(text_len, dtype=np.float32) / np.float32(text_len) * np.float32(pt_seq_len))
            text = np.concatenate([np.zeros((text_len, spatial), np.float32), p_t[:, None] * f_t], axis=1)
            image = np.concatenate([text, image], axis=0)
        return image.astype(np.float32)
    if text_len:
        raise ValueError("text positions need the 3D RoPE (three_d=True)")
    if half % 2:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got head_dim={head_dim}")
    f = rope_frequencies(half // 2, half, theta)
    return np.concatenate([px[:, None] * f, py[:, None] * f], axis=1).astype(np.float32)


def multimodal_rope_angles(position_ids, mrope_section, head_dim: int, theta: float) -> jax.Array:
    """Qwen2.5-VL's multimodal RoPE angles (B, T, head_dim/2) float32 for position ids (3, B, T).

    Rotated pair j has frequency ``1 / theta^(2j / head_dim)`` (float32, as transformers computes it)
    and reads its position from row ``i mod 3`` (temporal, height, width) of the ids, where the pairs
    are split into consecutive chunks of ``mrope_section`` sizes and chunk i is the i-th.
    """
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section={list(mrope_section)} sums to {sum(mrope_section)}; expected "
                         f"head_dim / 2 = {head_dim // 2}")
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    rows = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)
    picked = jnp.asarray(position_ids)[rows].astype(jnp.float32)  # (hd/2, B, T): a gather, exact everywhere
    return jnp.moveaxis(picked, 0, -1) * inv_freq


def apply_rope(x: jax.Array, angles: jax.Array, style: str = "interleaved") -> jax.Array:
    """Rotates ``x`` (..., Q, H, hd) by ``angles`` (Q, hd/2) or (B, Q, hd/2); float32 math, cast back."""
    angles = angles.astype(jnp.float32)
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[..., None, :]  # (B|1, Q, 1, hd/2)
    sin = jnp.sin(angles)[..., None, :]
    xf = x.astype(jnp.float32)
    if style == "interleaved":
        pairs = xf.reshape(*xf.shape[:-1], -1, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1).reshape(xf.shape)
    elif style == "half":
        x0, x1 = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    else:
        raise ValueError(f"RoPE style {style!r}: expected 'interleaved' or 'half'")
    return out.astype(x.dtype)
