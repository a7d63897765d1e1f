"""Feature autoencoder (FAE) parts; for now the DINOv2 encoder whose features it reconstructs."""

from starflow2_jax.fae.dinov2 import (Dinov2, Dinov2Config, Dinov2Layer, check_images, dinov2_features,
                                      dinov2_hidden, init_dinov2, init_dinov2_boxed, normalize_images,
                                      resize_matrix, resize_position_embeddings)

__all__ = [
    "Dinov2",
    "Dinov2Config",
    "Dinov2Layer",
    "check_images",
    "dinov2_features",
    "dinov2_hidden",
    "init_dinov2",
    "init_dinov2_boxed",
    "normalize_images",
    "resize_matrix",
    "resize_position_embeddings",
]
