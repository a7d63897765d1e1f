"""Tiny random transformers DINOv2 models (the oracle), built from our configs.

Every parameter is redrawn (seeded) away from transformers' init — layer scales, biases, norms, the
class / register tokens and the position embeddings included — so a dropped layer scale, a swapped
gate/up half or a mis-resized position embedding shows in the features.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import transformers

from starflow2_jax.fae import Dinov2Config

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, patch_size=4, image_size=16)
CONFIGS = {
    "plain": Dinov2Config(**TINY),
    "registers": Dinov2Config(**TINY, num_register_tokens=4),
    "swiglu": Dinov2Config(**TINY, use_swiglu_ffn=True, qkv_bias=False),  # FFN width 88
}


def hf_config(config: Dinov2Config, **overrides):
    """transformers' config object for ``config`` (``to_hf()``, plus ``overrides``)."""
    cls = (transformers.Dinov2WithRegistersConfig if config.variant == "dinov2_with_registers"
           else transformers.Dinov2Config)
    return cls(**dict(config.to_hf(), **overrides))


def model_class(config: Dinov2Config, head: bool = False):
    registers = config.variant == "dinov2_with_registers"
    if head:
        return (transformers.Dinov2WithRegistersForImageClassification if registers
                else transformers.Dinov2ForImageClassification)
    return transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraws every parameter: norms 1 + 0.1·N, biases 0.2·N, layer scales 0.5 + 0.3·N, tokens and
    position embeddings 0.5·N, weights N / sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif name.endswith("lambda1"):
                p.copy_(0.5 + 0.3 * noise)
            elif p.ndim == 3 or name.endswith("mask_token"):  # cls / register tokens, position embeddings
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))


@functools.lru_cache(maxsize=None)
def build(name: str, head: bool = False) -> torch.nn.Module:
    """The torch model (eval mode, float32) for ``CONFIGS[name]``, built once per process; callers must
    not modify it. ``head``: the ImageClassification model (3 labels) instead of the bare encoder."""
    config = CONFIGS[name]
    seed = sorted(CONFIGS).index(name) + (10 if head else 0)
    torch.manual_seed(seed)
    extra = dict(num_labels=3) if head else {}
    model = model_class(config, head)(hf_config(config, **extra)).eval()
    randomize(model, seed)
    return model


def images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Uniform float32 images in [-1, 1] of ``shape`` (B, H, W, C)."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def hf_pixels(config: Dinov2Config, images_nhwc: np.ndarray) -> torch.Tensor:
    """What transformers' processor would feed: [0, 1] images normalised by mean/std, NCHW float32."""
    x = (images_nhwc.astype(np.float64) + 1.0) / 2.0
    x = (x - np.asarray(config.image_mean)) / np.asarray(config.image_std)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))


def hf_hidden(model: torch.nn.Module, config: Dinov2Config, images_nhwc: np.ndarray) -> np.ndarray:
    """transformers' ``last_hidden_state`` (B, 1 + R + N, hidden) for our [-1, 1] NHWC images."""
    base = getattr(model, "dinov2", None) or getattr(model, "dinov2_with_registers", None) or model
    with torch.no_grad():
        return base(pixel_values=hf_pixels(config, images_nhwc)).last_hidden_state.numpy()


def hf_features(model: torch.nn.Module, config: Dinov2Config, images_nhwc: np.ndarray) -> np.ndarray:
    """transformers' patch features ``last_hidden_state[:, 1 + R:]`` (B, N, hidden)."""
    return hf_hidden(model, config, images_nhwc)[:, config.num_prefix_tokens:]
