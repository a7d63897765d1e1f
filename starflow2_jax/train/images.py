"""Sample grids as images: tiling, [−1, 1] → uint8, and atomic PNG files."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from starflow2_jax import atomic


def to_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 ``round((x + 1) · 127.5)`` clipped to 0..255, same shape (non-finite values → 0)."""
    x = np.nan_to_num(np.asarray(images, np.float32), nan=-1.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def tile(grid: np.ndarray, pad: int = 1) -> np.ndarray:
    """(rows, cols, H, W, C) → one (rows·(H+pad)+pad, cols·(W+pad)+pad, C) image with ``pad``-pixel
    white gutters."""
    grid = np.asarray(grid)
    if grid.ndim != 5:
        raise ValueError(f"tile: expected a (rows, cols, H, W, C) grid, got shape {grid.shape}")
    rows, cols, h, w, c = grid.shape
    fill = 255 if grid.dtype == np.uint8 else 1.0
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, grid.dtype)
    for r in range(rows):
        for k in range(cols):
            out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = grid[r, k]
    return out


def side_by_side(panels: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Equal-height (H, W_i, C) images joined left to right with ``gap`` white columns."""
    if not panels:
        raise ValueError("side_by_side: no panels")
    h, _, c = panels[0].shape
    if any(p.shape[0] != h or p.shape[2] != c for p in panels):
        raise ValueError(f"side_by_side: panels differ in height/channels: {[p.shape for p in panels]}")
    spacer = np.full((h, gap, c), 255, np.uint8)
    parts = []
    for i, p in enumerate(panels):
        parts.extend([spacer, p] if i else [p])
    return np.concatenate(parts, axis=1)


def save_png(path: os.PathLike | str, image: np.ndarray, scale: int = 1) -> str:
    """Writes a uint8 (H, W, 1|3) image to ``path`` (nearest-neighbour upscaled by ``scale``) with
    ``atomic.write_png``: a reader never sees a half-written PNG. Returns the path."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"save_png: expected uint8 (H, W, 1|3), got {image.dtype} {image.shape}")
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    return atomic.write_png(path, image)
