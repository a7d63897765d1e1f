"""The Qwen2.5-VL vision tower, exactly as transformers' ``Qwen2_5_VisionTransformerPretrainedModel``.

Input: ``pixel_values`` (N, C·tp·p·p), the patches of all images concatenated (each image's rows in
spatial-merge order, as ``Qwen2VLImageProcessorPil`` lays them out) and ``grid_thw`` (num_images, 3),
the (t, h, w) patch grid of each. Output: one feature per m×m merge unit, (N / m², out_hidden_size).

Everything that depends on the grids — the window permutation, the attention segments, the 2D RoPE
angles — is computed on the host with numpy (``vision_layout``), so the tower itself is one jitted
function of static shapes:

- window permutation: merge units (m×m patches) are regrouped into windows of
  ``window_size / patch_size / m`` × that many units per frame (t-major, then windows in raster
  order, units inside a window in raster order; edge windows are partial). The whole tower runs in
  this order and the merged features are put back into the input order at the end.
- attention segments: windowed layers attend within a window, full-attention layers
  (``fullatt_block_indexes``) within a frame (h·w patches) — never across images or frames.
- RoPE: patch (row r, column c) of a frame rotates half-split pairs by angles ``[r·f, c·f]`` with
  ``f_j = θ^(−4j / head_dim)``, ``j < head_dim / 4`` (θ = ``rope_theta``, 10000).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.nn import REMAT_POLICIES, MLP, Attention, RMSNorm, dense, remat_layer, rope_frequencies
from starflow2_jax.vlm.config import QwenVisionConfig

# ---- host-side layout ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Host arrays that steer the tower for one list of grids (all in the windowed order).

    patch_order (N,) int32: input row of each position; angles (N, head_dim/2) float32 RoPE angles;
    window_segments / frame_segments (N,) int32: attention segment of each position for windowed /
    full-attention layers; merged_order (N/m²,) int32: windowed position of each output feature.
    """

    patch_order: np.ndarray
    angles: np.ndarray
    window_segments: np.ndarray
    frame_segments: np.ndarray
    merged_order: np.ndarray

    @property
    def num_patches(self) -> int:
        return int(self.patch_order.shape[0])

    @property
    def num_merged(self) -> int:
        return int(self.merged_order.shape[0])

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.patch_order, self.angles, self.window_segments, self.frame_segments, self.merged_order)


def patch_features(config: QwenVisionConfig) -> int:
    """Width of one flattened patch row: C · temporal_patch · patch · patch."""
    return config.in_channels * config.temporal_patch_size * config.patch_size * config.patch_size


def check_config(config: QwenVisionConfig) -> None:
    """Raises ValueError for a vision config the tower cannot run (names the field)."""
    if config.hidden_size % config.num_heads:
        raise ValueError(f"vision hidden_size={config.hidden_size} is not a multiple of num_heads={config.num_heads}")
    if config.head_dim % 4:
        raise ValueError(f"vision head_dim={config.head_dim} (hidden_size / num_heads) must be a multiple of 4 "
                         f"for the 2D RoPE")
    if config.window_size // config.spatial_merge_size // config.patch_size < 1:
        raise ValueError(f"vision window_size={config.window_size} is smaller than one merge unit "
                         f"(patch_size·spatial_merge_size = {config.patch_size * config.spatial_merge_size} px)")
    if config.remat not in REMAT_POLICIES:
        raise ValueError(f"vision remat={config.remat!r}: expected one of {tuple(REMAT_POLICIES)}")
    bad = [i for i in config.fullatt_block_indexes if not 0 <= i < config.depth]
    if bad:
        raise ValueError(f"vision fullatt_block_indexes {list(config.fullatt_block_indexes)}: {bad} outside "
                         f"[0, depth={config.depth})")


def normalize_grids(config: QwenVisionConfig, grid_thw) -> tuple[tuple[int, int, int], ...]:
    """``grid_thw`` (num_images, 3) as a tuple of int triples; ValueError for a malformed grid."""
    grids = np.asarray(grid_thw)
    if grids.ndim != 2 or grids.shape[1] != 3 or grids.shape[0] == 0 or not np.issubdtype(grids.dtype, np.integer):
        raise ValueError(f"grid_thw must be integer (t, h, w) rows of shape (num_images, 3), "
                         f"got {grids.dtype} {grids.shape}")
    m = config.spatial_merge_size
    for i, (t, h, w) in enumerate(grids.tolist()):
        if min(t, h, w) < 1:
            raise ValueError(f"grid_thw[{i}] = {(t, h, w)}: every entry must be positive")
        if h % m or w % m:
            raise ValueError(f"grid_thw[{i}] = {(t, h, w)}: h and w must be multiples of "
                             f"spatial_merge_size={m}")
    return tuple(tuple(int(v) for v in row) for row in grids.tolist())


def _window_index(grid: tuple[int, int, int], merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge-unit order of one image's windows and the (non-empty) window lengths in units."""
    t, h, w = grid
    lh, lw = h // merge, w // merge
    pad_h, pad_w = window - lh % window, window - lw % window  # a whole empty window when divisible
    nh, nw = (lh + pad_h) // window, (lw + pad_w) // window
    padded = np.full((t, lh + pad_h, lw + pad_w), -1, np.int64)
    padded[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
    windows = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
    lengths = (windows >= 0).sum(axis=1)
    flat = windows.reshape(-1)
    return flat[flat >= 0], lengths[lengths > 0]


def _segments(lengths: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)


def _positions(grid: tuple[int, int, int], merge: int) -> np.ndarray:
    """(t·h·w, 2) (row, column) of each patch in spatial-merge order, repeated per frame."""
    t, h, w = grid
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1))


@functools.lru_cache(maxsize=256)
def _layout(merge: int, window: int, hd: int, theta: float, grids: tuple) -> VisionLayout:
    unit = merge * merge
    unit_order, window_lengths, frame_lengths, positions = [], [], [], []
    offset = 0
    for grid in grids:
        t, h, w = grid
        order, lengths = _window_index(grid, merge, window)
        unit_order.append(order + offset)
        window_lengths.append(lengths * unit)
        frame_lengths.append(np.full(t, h * w))
        positions.append(_positions(grid, merge))
        offset += t * (h // merge) * (w // merge)
    unit_order = np.concatenate(unit_order)
    patch_order = (unit_order[:, None] * unit + np.arange(unit)).reshape(-1)
    pos = np.concatenate(positions)[patch_order].astype(np.float32)  # (N, 2) in windowed order
    freqs = rope_frequencies(hd // 4, hd // 2, theta)  # θ^(−2j / (hd/2))
    angles = np.concatenate([pos[:, :1] * freqs, pos[:, 1:] * freqs], axis=1).astype(np.float32)
    layout = VisionLayout(
        patch_order=patch_order.astype(np.int32),
        angles=angles,
        window_segments=_segments(np.concatenate(window_lengths)),
        frame_segments=_segments(np.concatenate(frame_lengths)),
        merged_order=np.argsort(unit_order, kind="stable").astype(np.int32),
    )
    for array in layout.arrays():
        array.setflags(write=False)  # shared through the cache
    return layout


def vision_layout(config: QwenVisionConfig, grid_thw) -> VisionLayout:
    """The host arrays for ``grid_thw`` (num_images, 3); see ``VisionLayout``. Cached per grid list."""
    check_config(config)
    grids = normalize_grids(config, grid_thw)
    window = config.window_size // config.spatial_merge_size // config.patch_size
    return _layout(config.spatial_merge_size, window, config.head_dim, float(config.rope_theta), grids)


# ---- modules ------------------------------------------------------------------------------------
class VisionLayer(nn.Module):
    """``Qwen2_5_VLVisionBlock``: h += Attn(RMSNorm(h)); h += SwiGLU(RMSNorm(h)), biases everywhere.

    ``is_full`` (bool scalar, scanned over layers) picks full-frame or windowed attention segments.
    """

    config: QwenVisionConfig

    @nn.compact
    def __call__(self, h, is_full, angles, window_segments, frame_segments):
        cfg = self.config
        hd = cfg.head_dim
        segments = jnp.where(is_full, frame_segments, window_segments)[None]  # (1, N)
        y = RMSNorm(epsilon=cfg.rms_norm_eps, offset=False, name="attn_norm")(h)
        y, _ = Attention(num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=hd, use_bias=True,
                         rope_style="half", mask="bidirectional", dtype=jnp.dtype(cfg.dtype), name="attn")(
            y, angles=angles, segment_ids=segments)
        h = h + y
        y = RMSNorm(epsilon=cfg.rms_norm_eps, offset=False, name="mlp_norm")(h)
        h = h + MLP(hidden=cfg.intermediate_size, kind="gated", gated_activation="silu", use_bias=True,
                    dtype=jnp.dtype(cfg.dtype), name="mlp")(y)
        h = nn.with_logical_constraint(h, (None, "act_seq", "act_embed"))
        return h, None


class PatchMerger(nn.Module):
    """``Qwen2_5_VLPatchMerger``: RMSNorm, concatenate each merge unit's m² patches, Linear-GELU-Linear."""

    config: QwenVisionConfig

    @nn.compact
    def __call__(self, h):
        """h (N, D), merge units contiguous → (N / m², out_hidden_size)."""
        cfg = self.config
        width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        h = RMSNorm(epsilon=cfg.rms_norm_eps, offset=False, name="norm")(h).reshape(-1, width)  # (N/m², m²·D)
        dtype = jnp.dtype(cfg.dtype)
        h = dense(width, ("embed",), ("mlp",), fan_in=width, dtype=dtype, name="mlp_in")(h)
        h = jax.nn.gelu(h, approximate=False)
        return dense(cfg.out_hidden_size, ("mlp",), ("embed",), fan_in=width, dtype=dtype, name="mlp_out")(h)


class VisionTower(nn.Module):
    """Patch embedding → ``depth`` layers (``nn.scan``, params stacked on 'layers') → patch merger.

    Compute dtype and remat policy come from the config (``dtype``, ``remat``).
    """

    config: QwenVisionConfig

    @nn.compact
    def __call__(self, pixel_values, patch_order, angles, window_segments, frame_segments, merged_order):
        """pixel_values (N, C·tp·p·p) in input order plus ``VisionLayout.arrays()`` → (N/m², out_hidden)."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x = jnp.take(pixel_values, patch_order, axis=0).astype(dtype)  # (N, P) windowed order
        h = dense(cfg.hidden_size, ("patch",), ("embed",), fan_in=x.shape[-1], use_bias=False, dtype=dtype,
                  name="patch_embed")(x)[None]  # (1, N, D)
        layers = nn.scan(remat_layer(VisionLayer, cfg.remat), variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
        is_full = jnp.asarray([i in tuple(cfg.fullatt_block_indexes) for i in range(cfg.depth)])
        h, _ = layers(h, is_full, angles, window_segments, frame_segments)
        merged = PatchMerger(cfg, name="merger")(h[0])  # (N/m², out) windowed order
        return jnp.take(merged, merged_order, axis=0)


# ---- functional API -----------------------------------------------------------------------------
def check_pixel_values(config: QwenVisionConfig, pixel_values, grids) -> None:
    """ValueError unless ``pixel_values`` is (Σ t·h·w of ``grids``, C·tp·p·p)."""
    shape = tuple(np.shape(pixel_values))
    width = patch_features(config)
    if len(shape) != 2 or shape[1] != width:
        raise ValueError(f"pixel_values must have shape (num_patches, in_channels·temporal_patch_size·patch_size²"
                         f" = {config.in_channels}·{config.temporal_patch_size}·{config.patch_size}² = {width}), "
                         f"got {shape}")
    expected = sum(t * h * w for t, h, w in grids)
    if shape[0] != expected:
        raise ValueError(f"pixel_values has {shape[0]} rows but image_grid_thw {[list(g) for g in grids]} "
                         f"implies Σ t·h·w = {expected}")


def init_vision_boxed(config: QwenVisionConfig, rng: jax.Array) -> dict:
    """Variables ``{'params': ...}`` of a fresh tower, parameters boxed with their logical axis names."""
    check_config(config)
    m = config.spatial_merge_size
    layout = vision_layout(config, np.array([[1, m, m]]))
    pixels = jnp.zeros((layout.num_patches, patch_features(config)), jnp.float32)
    return VisionTower(config).init(rng, pixels, *layout.arrays())


def init_vision_params(config: QwenVisionConfig, rng: jax.Array) -> dict:
    """A fresh float32 params tree (PyTorch-default init; norms at one), as ``vision_features`` takes it."""
    return _init_fn(config)(rng)


@functools.lru_cache(maxsize=8)
def _init_fn(config: QwenVisionConfig):
    return jax.jit(lambda key: nn.meta.unbox(init_vision_boxed(config, key))["params"])


@functools.lru_cache(maxsize=32)
def _tower_fn(config: QwenVisionConfig):
    """One jitted tower per config (XLA then compiles once per patch count; the layout is an argument)."""
    module = VisionTower(config)
    return jax.jit(lambda params, pixels, *layout: module.apply({"params": params}, pixels, *layout))


def vision_features(config: QwenVisionConfig, params, pixel_values, grid_thw) -> jax.Array:
    """Merged vision features ``(Σ t·h·w / m², out_hidden_size)`` in the config's compute dtype.

    params: the tower's params tree (``init_vision_params`` / ``vision_params_from_torch``).
    pixel_values: (Σ t·h·w, C·tp·p·p) patches of every image, concatenated in ``grid_thw`` order.
    grid_thw: host array (num_images, 3). Image i's features are rows [Σ_{j<i} t_j·h_j·w_j / m², …).
    """
    layout = vision_layout(config, grid_thw)  # validates config and grids
    check_pixel_values(config, pixel_values, normalize_grids(config, grid_thw))
    return _tower_fn(config)(params, jnp.asarray(pixel_values), *layout.arrays())


def num_merged_tokens(config: QwenVisionConfig, grid_thw) -> list[int]:
    """Features per image, t·h·w / m² (the number of ``<|image_pad|>`` tokens each image needs)."""
    return [t * h * w // config.spatial_merge_size ** 2 for t, h, w in normalize_grids(config, grid_thw)]
