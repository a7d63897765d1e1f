"""Incremental steps with explicit caches: Q new positions of one document through both streams.

A step reads the ``Caches`` pair (``model.create_caches``), writes the new positions' keys and values
at the caches' index and returns them updated, so text and image segments share one cache per
stream and a generated image enters the context without re-encoding. Teacher forcing is the same
call with every position at once (a prefill); feeding a document token by token, segment by segment
or at once gives the same outputs and caches.

Inputs per new position: the token (``<|image_pad|>`` at slots), u (the shallow-flow output, read at
slots only), the slot flag and the 3D position; ``key_mask`` (B, S) over the whole cache marks keys
no query may attend (the unconditional half of a guided batch hides its text).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from starflow2_jax.pretzel.config import PretzelConfig
from starflow2_jax.pretzel.model import Caches, DeepStream, Pretzel, _variables


class StepOutput(NamedTuple):
    """y_vlm (B, Q, Dv) and y_deep (B, Q, width): the streams' outputs; head (B, Q, 2D) float32: the
    Gaussian head's (a, b) for the position AFTER each new one; caches: updated."""

    y_vlm: jax.Array
    y_deep: jax.Array
    head: jax.Array
    caches: Caches


def _positions(positions) -> jax.Array:
    positions = jnp.asarray(positions)
    return jnp.moveaxis(positions, -1, 0) if positions.shape[-1] == 3 and positions.ndim == 3 else positions


def step(config: PretzelConfig, params, vlm_params, caches: Caches, tokens, u, slot, positions,
         key_mask=None) -> StepOutput:
    """Q new positions through both streams (call inside ``jax.jit``).

    tokens (B, Q) int, u (B, Q, D) (read at slots), slot (B, Q) bool, positions (B, Q, 3) (the layout's
    order) or (3, B, Q), key_mask (B, S) bool or None. Returns ``StepOutput``.
    """
    model = Pretzel(config)
    variables = _variables(params, vlm_params)
    y_vlm, y_d, caches = model.apply(variables, tokens, u, slot.astype(bool), _positions(positions), caches=caches,
                                     key_mask=key_mask, method=Pretzel.streams)
    head = model.apply(variables, y_d, method=Pretzel.flow_head)
    return StepOutput(y_vlm=y_vlm, y_deep=y_d, head=head, caches=caches)


def deep_step(config: PretzelConfig, deep_params, cache, y_vlm, slot_inputs, slot, positions, key_mask=None):
    """The deep stream alone on Q new positions: y_vlm (B, Q, Dv), slot_inputs (B, Q, D) = u + W_vlm·y_vlm,
    slot (B, Q), positions (B, Q, 3) or (3, B, Q), cache: its ``KVCache`` → ``(y_D (B, Q, width),
    head (B, Q, 2D) float32, cache)``."""
    module = DeepStream(config)
    variables = {"params": deep_params}
    y_d, (k, v) = module.apply(variables, y_vlm, slot_inputs, slot.astype(bool), _positions(positions),
                               kv=(cache.k, cache.v), index=cache.index, key_mask=key_mask)
    head = module.apply(variables, y_d, method=DeepStream.head)
    return y_d, head, cache.replace(k=k, v=v, index=cache.index + y_vlm.shape[1])
