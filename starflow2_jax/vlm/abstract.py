"""Shapes and shardings of the Qwen2.5-VL params tree, without allocating it.

``abstract_params`` is ``jax.eval_shape`` of the boxed inits (``nn.Partitioned`` leaves holding
``ShapeDtypeStruct``s and logical axis names); ``param_shardings`` turns the names into
``NamedSharding``s through a rules table. The HF importer and the Orbax loader place parameters
with them directly, so no device ever holds an unsharded copy.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax.sharding import SingleDeviceSharding

from starflow2_jax.vlm.config import QwenVLConfig


def abstract_params(config: QwenVLConfig) -> dict:
    """``{'text': …, 'vision': …}`` of ``nn.Partitioned`` boxes around ``ShapeDtypeStruct``s (float32)."""
    from starflow2_jax.vlm.model import text_init_boxed
    from starflow2_jax.vlm.vision import init_vision_boxed

    key = jax.random.key(0)
    return {"text": jax.eval_shape(functools.partial(text_init_boxed, config.text), key)["params"],
            "vision": jax.eval_shape(functools.partial(init_vision_boxed, config.vision), key)["params"]}


def param_shardings(config: QwenVLConfig, mesh=None, rules=None) -> dict:
    """A ``Sharding`` per parameter: from the logical names and ``rules`` (default
    ``parallel.VLM_RULES``) on ``mesh``; without a mesh, every parameter on the default device."""
    boxed = abstract_params(config)
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return jax.tree_util.tree_map(lambda _: device, nn.meta.unbox(boxed))
    from starflow2_jax.parallel import VLM_RULES, logical_shardings
    return logical_shardings(boxed, mesh, VLM_RULES if rules is None else rules)
