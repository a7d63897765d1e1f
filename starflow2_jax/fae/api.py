"""Functional FAE API: init, the frozen-encoder features, encode, decode, reconstruction errors.

Variables of a trained FAE (what ``fae.latent_space.FAELatentSpace`` holds)::

    {'dinov2': DINOv2 params (frozen),
     'fae': {'encoder', 'feature_decoder', 'pixel_decoder'[, 'discriminator']},
     'latent_stats': {'mean': (D,), 'std': (D,), 'count': ()}}   see ``latent_stats``

Images are float (B, S, S, 3) in [−1, 1] with S = ``config.image_size``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from starflow2_jax.fae.config import FAEConfig
from starflow2_jax.fae.dinov2 import dinov2_features, init_dinov2_boxed
from starflow2_jax.fae.model import FAEEncoder, FeatureDecoder, PixelDecoder

PARTS = ("encoder", "feature_decoder", "pixel_decoder")


def check_images(config: FAEConfig, images) -> None:
    """Raises ValueError unless ``images`` is (B, S, S, 3), S = config.image_size (RGB)."""
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"FAE images must be NHWC (B, H, W, 3), got shape {shape}")
    _, h, w, c = shape
    if c != 3:
        kind = "grey " if c == 1 else ""
        raise ValueError(f"FAE images have {c} channels ({kind}images): the FAE expects RGB images with 3 "
                         f"channels (for grey data set data.channels=3 to repeat the channel)")
    if (h, w) != (config.image_size, config.image_size):
        g = config.grid
        raise ValueError(f"FAE images are {h}x{w}: this FAE takes {config.image_size}x{config.image_size} "
                         f"(image_size; DINOv2 patch {config.dinov2.patch_size}, latent grid {g}x{g})")


def modules(config: FAEConfig) -> dict:
    """``{part: Linen module}`` for the three learned parts."""
    return {"encoder": FAEEncoder(config), "feature_decoder": FeatureDecoder(config),
            "pixel_decoder": PixelDecoder(config)}


def init_boxed(config: FAEConfig, rng: jax.Array) -> dict:
    """Fresh boxed params ``{part: params}`` (``nn.Partitioned`` leaves with logical axis names)."""
    config.validate()
    n, c, d = config.num_tokens, config.feature_dim, config.latent_dim
    keys = dict(zip(PARTS, jax.random.split(rng, len(PARTS))))
    inputs = {"encoder": jnp.zeros((1, n, c)), "feature_decoder": jnp.zeros((1, n, d)),
              "pixel_decoder": jnp.zeros((1, n, c))}
    return {name: module.init(keys[name], inputs[name])["params"] for name, module in modules(config).items()}


def encoder_features(config: FAEConfig, dinov2_params, images: jax.Array, *,
                     image_gradient: bool = False) -> jax.Array:
    """The frozen encoder's patch features (B, N, C) of ``images`` (resized to the DINOv2 input size
    with antialiased bilinear interpolation when it differs from image_size). DINOv2's weights never
    get gradients; ``image_gradient=True`` lets gradients reach ``images`` (perceptual losses)."""
    check_images(config, images)
    x = images.astype(jnp.float32)
    s = config.input_size
    if s != config.image_size:
        x = jax.image.resize(x, (x.shape[0], s, s, 3), method="linear", antialias=True)
    feats = dinov2_features(config.dinov2, jax.lax.stop_gradient(dinov2_params), x)
    return feats if image_gradient else jax.lax.stop_gradient(feats)


def encode_features(config: FAEConfig, fae_params, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """DINOv2 features (B, N, C) → posterior ``(mean, logvar)``, each (B, N, D)."""
    return FAEEncoder(config).apply({"params": fae_params["encoder"]}, features)


def decode_features(config: FAEConfig, fae_params, latents: jax.Array) -> jax.Array:
    """Latents (B, N, D) (unnormalised) → reconstructed features (B, N, C)."""
    return FeatureDecoder(config).apply({"params": fae_params["feature_decoder"]}, latents)


def decode_pixels(config: FAEConfig, fae_params, features: jax.Array) -> jax.Array:
    """Features (B, N, C) → images (B, S, S, 3)."""
    return PixelDecoder(config).apply({"params": fae_params["pixel_decoder"]}, features)


def reconstruct(config: FAEConfig, variables, images: jax.Array) -> dict[str, jax.Array]:
    """The deterministic auto-encoder path (posterior mean, no noise): 'features' F (B, N, C),
    'features_rec' FD(E(F)) (B, N, C), 'pixels' PD(FD(E(F))) and 'pixels_real' PD(F) (the pixel
    decoder on the real features), each (B, S, S, 3). ``variables``: ``{'dinov2', 'fae'}``."""
    fae = variables["fae"]
    feats = encoder_features(config, variables["dinov2"], images)
    mean, _ = encode_features(config, fae, feats)
    rec = decode_features(config, fae, mean)
    return {"features": feats, "features_rec": rec, "pixels": decode_pixels(config, fae, rec),
            "pixels_real": decode_pixels(config, fae, feats)}


def reconstruction_errors(config: FAEConfig, variables, images: jax.Array) -> dict[str, jax.Array]:
    """Per-example errors of ``reconstruct``: 'feature_mse' ‖FD(E(F)) − F‖² / (N·C) relative to
    mean(F²) (a scale-free fraction, 1 = as bad as predicting 0); 'pixel_mse' mean((PD(FD(E(F))) − x)²);
    'pixel_mse_real' mean((PD(F) − x)²). Each (B,).
    """
    r = reconstruct(config, variables, images)
    feats, axes = r["features"], (1, 2)
    feature = jnp.mean(jnp.square(r["features_rec"] - feats), axes) / jnp.mean(jnp.square(feats), axes)
    return {"feature_mse": feature, "pixel_mse": jnp.mean(jnp.square(r["pixels"] - images), (1, 2, 3)),
            "pixel_mse_real": jnp.mean(jnp.square(r["pixels_real"] - images), (1, 2, 3))}


def init_variables_boxed(config: FAEConfig, rng: jax.Array) -> dict:
    """Random variables of a whole FAE, ``{'dinov2', 'fae', 'latent_stats'}`` (the structure of a
    trained one; statistics not computed), with boxed (logically named) DINOv2 and FAE parameters."""
    k_fae, k_dino = jax.random.split(rng)
    return {"dinov2": init_dinov2_boxed(config.dinov2, k_dino), "fae": init_boxed(config, k_fae),
            "latent_stats": empty_latent_stats(config)}


def empty_latent_stats(config: FAEConfig) -> dict[str, jax.Array]:
    """Latent statistics not yet computed: mean 0, std 1, count 0."""
    d = config.latent_dim
    return {"mean": jnp.zeros((d,), jnp.float32), "std": jnp.ones((d,), jnp.float32),
            "count": jnp.zeros((), jnp.float32)}


def latent_moments(config: FAEConfig, variables, images: jax.Array) -> dict[str, jax.Array]:
    """Sums for the latent statistics of one batch: {'sum': (D,), 'sum_sq': (D,), 'count': ()} over
    every token of every image (the posterior means)."""
    feats = encoder_features(config, variables["dinov2"], images)
    mean, _ = encode_features(config, variables["fae"], feats)
    flat = mean.reshape(-1, mean.shape[-1]).astype(jnp.float32)
    return {"sum": jnp.sum(flat, 0), "sum_sq": jnp.sum(jnp.square(flat), 0),
            "count": jnp.asarray(flat.shape[0], jnp.float32)}


def finish_latent_stats(moments: dict) -> dict[str, jax.Array]:
    """Per-channel {'mean', 'std', 'count'} from accumulated ``latent_moments`` (std floored at 1e-6)."""
    count = moments["count"]
    mean = moments["sum"] / count
    var = jnp.maximum(moments["sum_sq"] / count - jnp.square(mean), 0.0)
    return {"mean": mean, "std": jnp.maximum(jnp.sqrt(var), 1e-6), "count": jnp.asarray(count, jnp.float32)}
