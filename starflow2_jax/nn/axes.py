"""Logical-axis helpers: every parameter is created with named axes so one rules table can shard it.

Logical names used across the package: ``embed``, ``mlp``, ``heads``, ``kv_heads``, ``head_dim``,
``vocab``, ``latent`` (flow token features), ``classes``, ``seq``, ``text_embed`` and ``layers``
(added by ``nn.scan``). ``parallel/rules.py`` maps them to mesh axes.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax.nn.dense2d import dot_general_2d

Initializer = Callable[..., jax.Array]


def torch_linear_init(fan_in: int) -> Initializer:
    """PyTorch's default ``nn.Linear`` init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases.

    Kept so that a model initialised here starts from the same distribution as the reference code.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def param_with_axes(
    module: nn.Module, name: str, init: Initializer, shape: Sequence[int], axes: Sequence[str | None]
) -> jax.Array:
    """Creates a float32 parameter whose axes carry logical names; returns the unboxed value."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name!r}: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.float32)


def dense(
    features: int | Sequence[int],
    in_axes_names: Sequence[str | None],
    out_axes_names: Sequence[str | None],
    *,
    fan_in: int,
    use_bias: bool = True,
    axis: int | Sequence[int] = -1,
    dtype=jnp.float32,
    zero_init: bool = False,
    dense_2d: bool = False,
    name: str | None = None,
) -> nn.DenseGeneral:
    """A ``DenseGeneral`` with logical axis names and PyTorch-default (or zero) initialisation.

    The kernel has shape ``in_shape + features`` and axis names ``in_axes_names + out_axes_names``.
    ``dense_2d``: compute as one 2-D matmul (``nn.dense2d.dot_general_2d``; faster weight gradients on
    CPU) — same params, init and outputs; ``axis`` must then be the trailing axes of the input.
    """
    init = nn.initializers.zeros if zero_init else torch_linear_init(fan_in)
    bias_init = torch_linear_init(fan_in)
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        # rules=(): DenseGeneral creates multi-axis kernels flat and reshapes them afterwards; unboxing the
        # flat value applies the full-rank logical names as a sharding constraint whenever a mesh is
        # active (also in apply, inside flax's shape check), which fails. Parameter shardings come
        # from the abstract init and the rules table (parallel/sharding.py), not from init-time constraints.
        kernel_init=nn.with_logical_partitioning(init, tuple(in_axes_names) + tuple(out_axes_names), rules=()),
        bias_init=nn.with_logical_partitioning(bias_init, tuple(out_axes_names), rules=()),
        dot_general=dot_general_2d if dense_2d else None,
        name=name,
    )
