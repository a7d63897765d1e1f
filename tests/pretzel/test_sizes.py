"""The 7b preset from abstract shapes (nothing allocated): parameter counts against the paper's and
Qwen2.5-VL-7B's published sizes, and logical axis names on every parameter."""

import functools

import flax.linen as nn
import jax
import numpy as np

from starflow2_jax import parallel, vlm
from starflow2_jax.pretzel import config as pconfig
from starflow2_jax.pretzel import model as pmodel


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(tree)))


def test_7b_trainable_and_frozen_sizes():
    cfg = pconfig.preset("7b")
    boxed = jax.eval_shape(functools.partial(pmodel.init_boxed, cfg), jax.random.key(0))
    assert "vlm" not in boxed  # the frozen VLM comes from its checkpoint, never from this init
    assert abs(_count(boxed) / 1e9 - 3.6) <= 0.1  # SPEC §5: 3.6B trainable
    frozen = vlm.abstract_params(vlm.QwenVLConfig(text=cfg.vlm))
    assert round(_count(frozen["text"]) / 1e9, 2) == 7.62
    assert round((_count(frozen["text"]) + _count(frozen["vision"])) / 1e9, 2) == 8.29


def test_every_parameter_has_logical_axes():
    cfg = pconfig.tiny()
    boxed = jax.eval_shape(functools.partial(pmodel.init_boxed, cfg), jax.random.key(0))
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == len(x.value.shape) for x in leaves)
    names = {n for x in leaves for n in x.names}
    known = {name for name, _ in parallel.PRETZEL_RULES}
    assert names <= known, names - known
