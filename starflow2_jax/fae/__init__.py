"""The FAE latent space: DINOv2 (frozen encoder), the feature auto-encoder's encoder / feature decoder /
pixel decoder and losses, and the latent spaces flows generate in (``PatchesSpace``, ``FAESpace``)."""

from starflow2_jax.fae import api, losses
from starflow2_jax.fae.config import FAEConfig, fae_config_from_dict, fae_config_to_dict
from starflow2_jax.fae.discriminator import PatchDiscriminator
from starflow2_jax.fae.dinov2 import (Dinov2, Dinov2Config, Dinov2Layer, check_images, dinov2_features,
                                      dinov2_hidden, init_dinov2, init_dinov2_boxed, normalize_images,
                                      resize_matrix, resize_position_embeddings)
from starflow2_jax.fae.latent_space import KINDS, Bound, FAESpace, LatentSpace, PatchesSpace, check_latent_stats
from starflow2_jax.fae.model import FAEEncoder, FeatureDecoder, PixelDecoder

__all__ = [
    "KINDS", "Bound", "Dinov2", "Dinov2Config", "Dinov2Layer", "FAEConfig", "FAEEncoder", "FAESpace",
    "FeatureDecoder", "LatentSpace", "PatchDiscriminator", "PatchesSpace", "PixelDecoder", "api",
    "check_images", "check_latent_stats", "dinov2_features", "dinov2_hidden", "fae_config_from_dict",
    "fae_config_to_dict", "init_dinov2", "init_dinov2_boxed", "losses", "normalize_images", "resize_matrix",
    "resize_position_embeddings",
]
