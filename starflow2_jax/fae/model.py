"""The FAE's learned parts: encoder, feature decoder, pixel decoder (see ``fae.config`` for the map).

Each is its own Linen module with its own parameter tree, so training stages can freeze or swap them
(``{'encoder', 'feature_decoder', 'pixel_decoder'}``, plus the GAN's ``'discriminator'``). Decoder
layers are bidirectional pre-norm transformer layers stacked with ``nn.scan`` and wrapped in
``nn.remat`` with the config's policy. All outputs are float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax.fae.config import FAEConfig
from starflow2_jax.nn import MLP, Attention, LayerNorm, RMSNorm, dense, param_with_axes, remat_layer
from starflow2_jax.nn.rope import starflow_rope_angles


def _dtype(config: FAEConfig):
    return jnp.dtype(config.dtype)


class DecoderLayer(nn.Module):
    """h += Attn(Norm(h)); h += MLP(Norm(h)). ``norm``: 'rmsnorm' (SwiGLU MLP) | 'layernorm' (GELU MLP)."""

    width: int
    heads: int
    mlp_hidden: int
    norm: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, angles):
        make = (lambda name: RMSNorm(epsilon=1e-6, offset=False, name=name)) if self.norm == "rmsnorm" else (
            lambda name: LayerNorm(epsilon=1e-6, name=name))
        y, _ = Attention(num_heads=self.heads, num_kv_heads=self.heads, head_dim=self.width // self.heads,
                         mask="bidirectional", rope_style="half", dtype=self.dtype, name="attn")(
            make("attn_norm")(h), angles=angles)
        h = h + y
        kind = "gated" if self.norm == "rmsnorm" else "gelu"
        y = MLP(hidden=self.mlp_hidden, kind=kind, gated_activation="silu", dtype=self.dtype, name="mlp")(
            make("mlp_norm")(h))
        h = h + y
        return nn.with_logical_constraint(h, ("act_batch", "act_seq", "act_embed")), None


def _stack(config: FAEConfig, layers: int, **kwargs) -> nn.Module:
    scanned = nn.scan(remat_layer(DecoderLayer, config.remat), variable_axes={"params": 0},
                      split_rngs={"params": True}, in_axes=(nn.broadcast,), length=layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(dtype=_dtype(config), **kwargs, name="layers")


class FAEEncoder(nn.Module):
    """DINOv2 features (B, N, C) → ``(mean, logvar)``, each (B, N, D) float32.

    One bidirectional self-attention layer with a skip (F + Attn(LayerNorm(F)), ``encoder_heads``
    wide heads, no RoPE: DINOv2 features already carry position), then LayerNorm and a linear map to 2·D.
    """

    config: FAEConfig

    @nn.compact
    def __call__(self, features):
        cfg = self.config
        c = cfg.feature_dim
        x = features.astype(_dtype(cfg))
        y, _ = Attention(num_heads=cfg.encoder_heads, num_kv_heads=cfg.encoder_heads, head_dim=c // cfg.encoder_heads,
                         mask="bidirectional", dtype=_dtype(cfg), name="attn")(LayerNorm(1e-6, name="attn_norm")(x))
        x = x + y
        x = LayerNorm(1e-6, name="out_norm")(x)
        stats = dense(2 * cfg.latent_dim, ("embed",), ("latent",), fan_in=c, dtype=_dtype(cfg), name="to_latent")(x)
        mean, logvar = jnp.split(stats.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)


class FeatureDecoder(nn.Module):
    """Latents (B, N, D) → reconstructed DINOv2 features (B, N, C): linear in, ``feature_decoder_layers``
    layers (2D RoPE on the latent grid, RMSNorm, SwiGLU), RMSNorm, linear out."""

    config: FAEConfig

    @nn.compact
    def __call__(self, latents):
        cfg = self.config
        w = cfg.feature_decoder_width
        hd = w // cfg.feature_decoder_heads
        angles = jnp.asarray(starflow_rope_angles((cfg.grid, cfg.grid), hd, pt_seq_len=cfg.grid,
                                                  theta=cfg.rope_theta))  # (N, hd/2): integer row/col positions
        h = dense(w, ("latent",), ("embed",), fan_in=cfg.latent_dim, dtype=_dtype(cfg), name="proj_in")(
            latents.astype(_dtype(cfg)))
        h, _ = _stack(cfg, cfg.feature_decoder_layers, width=w, heads=cfg.feature_decoder_heads,
                      mlp_hidden=int(w * cfg.feature_decoder_mlp_ratio), norm="rmsnorm")(h, angles)
        h = RMSNorm(epsilon=1e-6, offset=False, name="final_norm")(h)
        out = dense(cfg.feature_dim, ("embed",), ("mlp",), fan_in=w, dtype=_dtype(cfg), name="proj_out")(h)
        return out.astype(jnp.float32)


class PixelDecoder(nn.Module):
    """Features (B, N, C) → images (B, S, S, 3) (S = image_size, roughly in [−1, 1]): linear in +
    learned position embedding, ``pixel_decoder_layers`` ViT layers (LayerNorm, GELU), LayerNorm,
    linear to P·P·3 per token (P = ``output_patch``), patches put back in raster order."""

    config: FAEConfig

    @nn.compact
    def __call__(self, features):
        cfg = self.config
        w, n, p = cfg.pixel_decoder_width, cfg.num_tokens, cfg.output_patch
        h = dense(w, ("mlp",), ("embed",), fan_in=cfg.feature_dim, dtype=_dtype(cfg), name="proj_in")(
            features.astype(_dtype(cfg)))
        pos = param_with_axes(self, "pos_embed", nn.initializers.normal(0.02), (n, w), ("seq", "embed"))
        h = h + pos.astype(h.dtype)
        h, _ = _stack(cfg, cfg.pixel_decoder_layers, width=w, heads=cfg.pixel_decoder_heads,
                      mlp_hidden=int(w * cfg.pixel_decoder_mlp_ratio), norm="layernorm")(h, None)
        h = LayerNorm(1e-6, name="final_norm")(h)
        patches = dense(p * p * 3, ("embed",), ("patch",), fan_in=w, dtype=_dtype(cfg), name="proj_out")(h)
        return unpatchify(patches.astype(jnp.float32), cfg.grid, p)


def unpatchify(patches: jax.Array, grid: int, p: int) -> jax.Array:
    """(B, grid², p·p·C) raster tokens, features (i, j, c) → (B, grid·p, grid·p, C)."""
    b, n, d = patches.shape
    c = d // (p * p)
    x = patches.reshape(b, grid, grid, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * p, grid * p, c)


def patchify(images: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) → (B, (H/p)·(W/p), p·p·C), raster tokens, features (i, j, c); inverse of ``unpatchify``."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """mean + exp(logvar / 2)·ε, ε ~ N(0, I) (the reparameterised posterior sample)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)

