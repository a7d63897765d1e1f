"""PatchGAN discriminator (pix2pix / taming-transformers style) for the pixel decoder's GAN loss.

Layout (``num_layers`` = n, base width c):

    conv 4×4 /2, c            + leaky ReLU 0.2              (no norm on the first layer)
    conv 4×4 /2, c·min(2^i, 8) + GroupNorm + leaky ReLU 0.2  for i = 1 … n−1
    conv 4×4 /1, 1                                          → logits (B, ceil(H/2^n), ceil(W/2^n))

Choices: 'SAME' padding (so 32×32 images work; taming pads by 1 with 'VALID' geometry, which gives
maps one pixel smaller), GroupNorm instead of taming's BatchNorm (no batch statistics to track or
shard; the loss stays per-example) with ``gcd(32, channels)`` groups (= min(32, channels) for the
power-of-two widths used here, and always a divisor), no conv bias in front of a norm (the norm's
bias replaces it), and taming's N(0, 0.02) conv initialisation.

Parameter logical axes: conv kernels (None, None, 'conv_in', 'conv_out'), biases and norm
scales/biases ('conv_out',). The rules tables must map ``conv_in`` and ``conv_out`` to None.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_CONV_INIT = nn.initializers.normal(stddev=0.02)
_MAX_WIDTH_FACTOR = 8


def _conv(features: int, stride: int, use_bias: bool, dtype, name: str) -> nn.Conv:
    return nn.Conv(
        features=features,
        kernel_size=(4, 4),
        strides=(stride, stride),
        padding="SAME",
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(_CONV_INIT, (None, None, "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


class PatchDiscriminator(nn.Module):
    """PatchGAN: images (B, H, W, C) in [−1, 1] -> float32 logits (B, ceil(H/2^n), ceil(W/2^n)).

    ``channels``: width of the first conv; ``num_layers``: number of stride-2 convs (n ≥ 1), widths
    doubling up to 8× ``channels``; ``dtype``: compute dtype (parameters are float32, GroupNorm
    statistics and the output logits float32). H and W must be at least 2^n.
    """

    channels: int = 64
    num_layers: int = 3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if self.num_layers < 1 or self.channels < 1:
            raise ValueError(
                f"PatchDiscriminator: expected num_layers >= 1 and channels >= 1, got "
                f"num_layers={self.num_layers}, channels={self.channels}"
            )
        if images.ndim != 4:
            raise ValueError(f"PatchDiscriminator: expected images (B, H, W, C), got shape {tuple(images.shape)}")
        min_size = 2**self.num_layers
        _, height, width, _ = images.shape
        if height < min_size or width < min_size:
            raise ValueError(
                f"PatchDiscriminator: images {height}×{width} are smaller than 2**num_layers = {min_size} "
                f"(num_layers={self.num_layers}); expected H, W >= {min_size}"
            )

        x = images.astype(self.dtype)
        x = _conv(self.channels, 2, True, self.dtype, "conv_0")(x)
        x = nn.leaky_relu(x, 0.2)
        for i in range(1, self.num_layers):
            width_i = self.channels * min(2**i, _MAX_WIDTH_FACTOR)
            x = _conv(width_i, 2, False, self.dtype, f"conv_{i}")(x)
            x = nn.GroupNorm(
                num_groups=math.gcd(32, width_i),
                epsilon=1e-5,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                name=f"norm_{i}",
            )(x)
            x = nn.leaky_relu(x, 0.2)
        logits = _conv(1, 1, True, self.dtype, "conv_out")(x)  # (B, h', w', 1)
        return logits[..., 0].astype(jnp.float32)
