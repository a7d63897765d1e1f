"""Named rematerialisation (activation checkpointing) policies for scanned layer stacks.

'none': keep every activation; 'full': recompute everything in the backward pass; 'dots': save
matmul outputs; 'dots_no_batch': save matmul outputs without batch dimensions (weights-only dots).
"""

from __future__ import annotations

import flax.linen as nn
import jax

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_layer(layer_cls: type[nn.Module], policy: str) -> type[nn.Module]:
    """``layer_cls`` wrapped in ``nn.remat`` with the named policy ('none' returns it unchanged)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r}: expected one of {tuple(REMAT_POLICIES)}")
    if policy == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=REMAT_POLICIES[policy], prevent_cse=False)
