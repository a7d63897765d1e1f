"""DINOv2 image encoder, numerically as transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``.

images (B, H, W, C) in [-1, 1] → [0, 1] → normalised by ``image_mean`` / ``image_std`` → patches of
``patch_size``² (flattened in (row, column, channel) order) → linear patch embedding → [CLS] + patches
(+ position embeddings, resized to the input grid) → [CLS] + registers + patches → ``num_layers``
pre-norm layers (attention, MLP or SwiGLU, each scaled by a learned per-channel layer scale) → LayerNorm.

Position embeddings are trained for ``image_size``; for another grid transformers resizes them with
torch's bicubic ``interpolate`` (``align_corners=False``; plain DINOv2 skips it for the native square
grid, the registers variant always resizes and with ``antialias=True``). Grids are static, so the
resize is two host-side (out, in) weight matrices (``resize_matrix``) applied to the parameter.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.nn import MLP, REMAT_POLICIES, Attention, LayerNorm, dense, param_with_axes, remat_layer

MODEL_TYPES = ("dinov2", "dinov2_with_registers")
ARCHITECTURES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
DTYPES = ("float32", "bfloat16", "float16")
HIDDEN_ACTS = ("gelu",)  # exact (erf) GELU, transformers' ACT2FN['gelu']


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """A DINOv2 encoder. ``image_size``: the native (square) size the position embeddings were trained at."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    num_register_tokens: int = 0
    use_swiglu_ffn: bool = False
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0  # init value of the layer scales
    qkv_bias: bool = True
    hidden_act: str = "gelu"  # MLP activation (the SwiGLU FFN always uses SiLU)
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    dtype: str = "float32"  # compute dtype; parameters are float32, layer norms run in float32
    remat: str = "none"  # one of nn.REMAT_POLICIES

    @property
    def variant(self) -> str:
        """'dinov2_with_registers' with register tokens, else 'dinov2' (the HF model_type)."""
        return MODEL_TYPES[1] if self.num_register_tokens > 0 else MODEL_TYPES[0]

    @property
    def num_prefix_tokens(self) -> int:
        """[CLS] + register tokens ahead of the patch tokens in the hidden sequence."""
        return 1 + self.num_register_tokens

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def native_grid(self) -> int:
        """Patches per side at ``image_size`` (position embeddings: native_grid² + 1)."""
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        """FFN width exactly as transformers: int(hidden·mlp_ratio), for SwiGLU 2/3 of it rounded up to 8."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else hidden

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of patches of a height × width image; ValueError unless both divide by patch_size."""
        bad = [f"{name} {size}" for name, size in (("height", height), ("width", width))
               if size < self.patch_size or size % self.patch_size]
        if bad:
            raise ValueError(f"image {height}×{width}: {', '.join(bad)} is not a positive multiple of "
                             f"patch_size={self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def validate(self) -> "Dinov2Config":
        """Returns self; raises ValueError naming the first bad field and what was expected."""
        for name in ("hidden_size", "num_layers", "num_heads", "patch_size", "image_size", "num_channels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive int")
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens={self.num_register_tokens}: expected >= 0")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if not self.mlp_ratio > 0 or self.mlp_hidden < 1:
            raise ValueError(f"mlp_ratio={self.mlp_ratio}: expected > 0 (an FFN of at least one unit)")
        if not self.use_swiglu_ffn and self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: expected one of {HIDDEN_ACTS}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != self.num_channels:
                raise ValueError(f"{name}={getattr(self, name)} has {len(getattr(self, name))} entries; "
                                 f"expected num_channels={self.num_channels}")
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std={self.image_std}: every entry must be positive")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {tuple(REMAT_POLICIES)}")
        return self

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, dtype: str = "float32", remat: str = "none") -> "Dinov2Config":
        """Parses a Hugging Face ``config.json`` dict of model_type 'dinov2' or 'dinov2_with_registers'
        (defaults: transformers 5.24's). ValueError for another model or an unsupported option."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r}: expected one of {MODEL_TYPES}")
        registers = model_type == MODEL_TYPES[1]
        sizes = {}
        for name, default in (("image_size", 224), ("patch_size", 16 if registers else 14)):
            value = hf.get(name, default)
            if isinstance(value, (list, tuple)):
                if len(value) != 2 or value[0] != value[1]:
                    raise ValueError(f"{name}={list(value)}: only square sizes are supported")
                value = value[0]
            sizes[name] = int(value)
        hidden, heads = int(hf.get("hidden_size", 768)), int(hf.get("num_attention_heads", 12))
        if hf.get("head_dim") is not None and heads and int(hf["head_dim"]) * heads != hidden:
            raise ValueError(f"head_dim={hf['head_dim']}: only hidden_size / num_attention_heads = "
                             f"{hidden // heads} is supported")
        num_registers = int(hf.get("num_register_tokens", 4)) if registers else 0
        if registers and num_registers < 1:
            raise ValueError(f"num_register_tokens={num_registers} for a {model_type} model: expected >= 1")
        return cls(hidden_size=hidden, num_layers=int(hf.get("num_hidden_layers", 12)), num_heads=heads,
                   mlp_ratio=float(hf.get("mlp_ratio", 4)), num_channels=int(hf.get("num_channels", 3)),
                   num_register_tokens=num_registers, use_swiglu_ffn=bool(hf.get("use_swiglu_ffn", False)),
                   layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)), qkv_bias=bool(hf.get("qkv_bias", True)),
                   layerscale_value=float(hf.get("layerscale_value", 1.0)), hidden_act=hf.get("hidden_act", "gelu"),
                   dtype=dtype, remat=remat, **sizes).validate()

    def to_hf(self) -> dict:
        """A ``config.json`` dict that ``transformers.Dinov2Config(**d)`` / ``Dinov2WithRegistersConfig(**d)``
        and ``from_pretrained`` read back (plain DINOv2 without the pre-training mask token)."""
        ratio = self.mlp_ratio
        out = dict(model_type=self.variant, architectures=[ARCHITECTURES[self.variant]],
                   hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                   num_attention_heads=self.num_heads, mlp_ratio=int(ratio) if float(ratio).is_integer() else ratio,
                   hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps, image_size=self.image_size,
                   patch_size=self.patch_size, num_channels=self.num_channels, qkv_bias=self.qkv_bias,
                   layerscale_value=self.layerscale_value, use_swiglu_ffn=self.use_swiglu_ffn)
        if self.num_register_tokens:
            out["num_register_tokens"] = self.num_register_tokens
        else:
            out["use_mask_token"] = False
        return out


# ---- position-embedding resize (host) -----------------------------------------------------------
def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    """(out_size, in_size) float64 weights of 1-D torch ``interpolate(mode='bicubic', align_corners=False)``.

    Without antialias: Keys' cubic (a = −0.75) at source ``(i + ½)·in/out − ½``, borders replicated.
    With antialias (ATen's separable AA kernel): cubic a = −0.5 stretched by in/out when shrinking,
    taps clipped to the input and renormalised.
    """
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        if antialias:
            support, inv = (2.0 * scale, 1.0 / scale) if scale >= 1 else (2.0, 1.0)
            center = scale * (i + 0.5)
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
            taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
            weights[i, lo:hi] = taps / taps.sum()
        else:
            real = scale * (i + 0.5) - 0.5
            x0 = math.floor(real)
            t = real - x0
            for k, w in enumerate(_cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
                weights[i, min(max(x0 - 1 + k, 0), in_size - 1)] += w
    weights.setflags(write=False)  # shared through the cache
    return weights


def resize_position_embeddings(config: Dinov2Config, pos: jax.Array, rows: int, cols: int) -> jax.Array:
    """pos (1 + n², D) at the native n × n grid → (1 + rows·cols, D) float32, as transformers resizes it."""
    n = config.native_grid
    if config.variant == "dinov2" and (rows, cols) == (n, n):
        return pos  # transformers' Dinov2 skips the resize here (the registers variant never does)
    antialias = config.variant == "dinov2_with_registers"
    mh = jnp.asarray(resize_matrix(n, rows, antialias), jnp.float32)
    mw = jnp.asarray(resize_matrix(n, cols, antialias), jnp.float32)
    grid = pos[1:].astype(jnp.float32).reshape(n, n, -1)
    grid = jnp.einsum("hi,wj,ijd->hwd", mh, mw, grid, precision=jax.lax.Precision.HIGHEST)  # (rows, cols, D)
    return jnp.concatenate([pos[:1].astype(jnp.float32), grid.reshape(rows * cols, -1)], axis=0)


# ---- modules ------------------------------------------------------------------------------------
def _layer_scale(module: nn.Module, name: str, config: Dinov2Config) -> jax.Array:
    init = lambda key, shape, dtype=jnp.float32: jnp.full(shape, config.layerscale_value, dtype)  # noqa: E731
    return param_with_axes(module, name, init, (config.hidden_size,), ("embed",))


class Dinov2Layer(nn.Module):
    """``Dinov2Layer``: h += ls1·Attn(LN(h)); h += ls2·FFN(LN(h)). Scanned: (h, None) → (h, None)."""

    config: Dinov2Config

    @nn.compact
    def __call__(self, h, _):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        y = LayerNorm(epsilon=cfg.layer_norm_eps, name="norm1")(h)
        y, _ = Attention(num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.head_dim,
                         use_bias=cfg.qkv_bias, out_bias=True, mask="bidirectional", dtype=dtype, name="attn")(y)
        h = h + y * _layer_scale(self, "layer_scale1", cfg).astype(dtype)
        y = LayerNorm(epsilon=cfg.layer_norm_eps, name="norm2")(h)
        y = MLP(hidden=cfg.mlp_hidden, kind="gated" if cfg.use_swiglu_ffn else "gelu", gated_activation="silu",
                dtype=dtype, name="mlp")(y)
        h = h + y * _layer_scale(self, "layer_scale2", cfg).astype(dtype)
        return nn.with_logical_constraint(h, ("act_batch", "act_seq", "act_embed")), None


class Dinov2(nn.Module):
    """Normalised pixels (B, H, W, C) → last hidden state (B, 1 + R + rows·cols, hidden) after the final
    LayerNorm, in the compute dtype. Layers are one ``nn.scan`` (params stacked on 'layers')."""

    config: Dinov2Config

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        dtype, d, p = jnp.dtype(cfg.dtype), cfg.hidden_size, cfg.patch_size
        batch, height, width, channels = pixels.shape
        rows, cols = cfg.grid(height, width)
        patches = pixels.reshape(batch, rows, p, cols, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, rows * cols, p * p * channels).astype(dtype)  # (B, N, p·p·C)
        x = dense(d, ("patch",), ("embed",), fan_in=p * p * channels, dtype=dtype, name="patch_embed")(patches)
        trunc = nn.initializers.truncated_normal(0.02)
        cls = param_with_axes(self, "cls_token", trunc, (d,), ("embed",))
        pos = param_with_axes(self, "position_embeddings", trunc, (cfg.native_grid ** 2 + 1, d), (None, "embed"))
        pos = resize_position_embeddings(cfg, pos, rows, cols)  # (1 + N, D)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (batch, 1, d)), x], axis=1) + pos.astype(dtype)
        if cfg.num_register_tokens:  # after the position embeddings, as transformers inserts them
            registers = param_with_axes(self, "register_tokens", nn.initializers.zeros,
                                        (cfg.num_register_tokens, d), (None, "embed"))
            registers = jnp.broadcast_to(registers.astype(dtype), (batch, cfg.num_register_tokens, d))
            x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
        x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))
        layers = nn.scan(remat_layer(Dinov2Layer, cfg.remat), variable_axes={"params": 0},
                         split_rngs={"params": True}, length=cfg.num_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
        x, _ = layers(x, None)
        return LayerNorm(epsilon=cfg.layer_norm_eps, name="final_norm")(x)


# ---- functional API -----------------------------------------------------------------------------
def check_images(config: Dinov2Config, images) -> tuple[int, int]:
    """The patch grid (rows, cols) of ``images`` (B, H, W, C); ValueError for a bad shape."""
    shape = tuple(np.shape(images))
    if len(shape) != 4:
        raise ValueError(f"images must have shape (batch, height, width, channels), got rank {len(shape)} {shape}")
    if shape[3] != config.num_channels:
        hint = " (grey?)" if shape[3] == 1 else " (alpha channel?)" if shape[3] == 4 else ""
        kind = "RGB images" if config.num_channels == 3 else "images"
        raise ValueError(f"expected {kind} with {config.num_channels} channels, got {shape[3]}{hint}: "
                         f"images of shape {shape}")
    return config.grid(shape[1], shape[2])


def normalize_images(config: Dinov2Config, images: jax.Array) -> jax.Array:
    """images in [-1, 1] → (images01 − image_mean) / image_std, float32 (B, H, W, C)."""
    mean = jnp.asarray(config.image_mean, jnp.float32)
    std = jnp.asarray(config.image_std, jnp.float32)
    return ((jnp.asarray(images, jnp.float32) + 1.0) * 0.5 - mean) / std


def init_dinov2_boxed(config: Dinov2Config, rng: jax.Array) -> dict:
    """A fresh params tree (not wrapped in {'params': …}) with ``nn.Partitioned`` leaves carrying the
    logical axis names, for ``parallel.variable_shardings`` / ``init_sharded`` with ``FAE_RULES``."""
    config.validate()
    size = config.image_size
    pixels = jnp.zeros((1, size, size, config.num_channels), jnp.float32)
    return Dinov2(config).init(rng, pixels)["params"]


@functools.lru_cache(maxsize=8)
def _init_fn(config: Dinov2Config):
    return jax.jit(lambda key: nn.meta.unbox(init_dinov2_boxed(config, key)))


def init_dinov2(config: Dinov2Config, rng: jax.Array) -> dict:
    """A fresh float32 params tree (plain arrays), as ``dinov2_features`` takes it."""
    return _init_fn(config.validate())(rng)


@functools.lru_cache(maxsize=32)
def _forward_fn(config: Dinov2Config, patches_only: bool):
    module = Dinov2(config)
    start = config.num_prefix_tokens if patches_only else 0

    def forward(params, images):
        return module.apply({"params": params}, normalize_images(config, images))[:, start:]

    return jax.jit(forward)


def dinov2_hidden(config: Dinov2Config, params, images) -> jax.Array:
    """The full last hidden state (B, 1 + R + rows·cols, hidden): [CLS], R registers, then the patches
    in raster order, in the compute dtype. images: (B, H, W, C) floats in [-1, 1], H and W multiples
    of patch_size (any size: position embeddings are resized)."""
    config.validate()
    check_images(config, images)
    return _forward_fn(config, False)(params, images)


def dinov2_features(config: Dinov2Config, params, images) -> jax.Array:
    """Patch features (B, rows·cols, hidden) in raster order — transformers'
    ``last_hidden_state[:, 1 + R:]``. images: (B, H, W, C) floats in [-1, 1] (this package's pixel
    convention; mapped to [0, 1] and normalised here)."""
    config.validate()
    check_images(config, images)
    return _forward_fn(config, True)(params, images)
