"""TarFlow / STARFlow autoregressive normalizing flows: config, blocks, likelihood, sampling, denoising."""

from starflow2_jax.flow.api import (FlowOutput, bits_per_dim, denoise, forward, forward_tokens,
                                    forward_with_intermediates, init, init_boxed, loss, nll_per_dim)
from starflow2_jax.flow.block import AFBlock, FlowModel
from starflow2_jax.flow.config import (BlockConfig, FlowConfig, config_from_dict, config_to_dict, starflow_config,
                                      tarflow_config)
from starflow2_jax.flow.patchify import patchify, permute, unpatchify
from starflow2_jax.flow.sampling import JacobiOptions, sample, sample_tokens

__all__ = [
    "AFBlock", "BlockConfig", "FlowConfig", "FlowModel", "FlowOutput", "JacobiOptions", "bits_per_dim",
    "config_from_dict", "config_to_dict", "denoise", "forward", "forward_tokens", "forward_with_intermediates",
    "init", "init_boxed", "loss", "nll_per_dim", "patchify", "permute", "sample", "sample_tokens",
    "starflow_config", "tarflow_config", "unpatchify",
]
