"""``nn.axes.dense(..., dense_2d=True)``: a dense layer computed as one 2-D matmul (``nn.dense2d``).

Oracle: the same layer without the switch, i.e. flax's ``DenseGeneral`` on XLA's 3-D ``dot_general``
and autodiff of it. For every shape the flow uses (single and multi-axis kernels, attention's q/k/v
and output projections, 2-D to 4-D inputs, with and without bias, float32 and bfloat16 compute):
same params tree and values, same outputs, and gradients with respect to params and inputs equal to
``jax.grad`` of the reference to float32 rounding; forward-mode autodiff works; the gradient program
really changes (its dots become 2-D); contractions the 2-D form cannot express are rejected.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax.nn.axes import dense
from starflow2_jax.nn.dense2d import dot_general_2d

# name: (input shape, dense kwargs)
CASES = {
    "mlp_in": ((2, 5, 8), dict(features=12, in_axes_names=("embed",), out_axes_names=("mlp",), fan_in=8)),
    "no_bias": ((2, 5, 8), dict(features=6, in_axes_names=("embed",), out_axes_names=("mlp",), fan_in=8,
                                use_bias=False)),
    "qkv": ((2, 5, 8), dict(features=(3, 4), in_axes_names=("embed",), out_axes_names=("heads", "head_dim"),
                            fan_in=8)),
    "attn_out": ((2, 5, 3, 4), dict(features=8, in_axes_names=("heads", "head_dim"), out_axes_names=("embed",),
                                    axis=(-2, -1), fan_in=12)),
    "multi_in_multi_out": ((2, 5, 3, 4), dict(features=(2, 5), in_axes_names=("heads", "head_dim"),
                                              out_axes_names=("a", "b"), axis=(-2, -1), fan_in=12)),
    "rank2_input": ((7, 8), dict(features=3, in_axes_names=("embed",), out_axes_names=("mlp",), fan_in=8)),
    "rank4_input": ((2, 3, 5, 8), dict(features=6, in_axes_names=("embed",), out_axes_names=("mlp",), fan_in=8)),
    "bfloat16": ((2, 5, 8), dict(features=12, in_axes_names=("embed",), out_axes_names=("mlp",), fan_in=8,
                                 dtype=jnp.bfloat16)),
}


def _layers(case):
    shape, kwargs = CASES[case]
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    return dense(**kwargs, dense_2d=False), dense(**kwargs, dense_2d=True), x


def _nudged(variables):
    """Every param moved off its init (so a bias or zero kernel cannot hide an error)."""
    rng = np.random.default_rng(2)
    return jax.tree_util.tree_map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32),
                                  nn.meta.unbox(variables))


def _close(a, b, dtype):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_params_outputs_and_gradients(case):
    ref, flat, x = _layers(case)
    dtype = CASES[case][1].get("dtype", jnp.float32)
    v_ref = ref.init(jax.random.PRNGKey(0), x)
    v_flat = flat.init(jax.random.PRNGKey(0), x)
    # same tree, logical names, shapes, dtypes and values (the switch must not touch checkpoints)
    assert jax.tree_util.tree_structure(v_flat) == jax.tree_util.tree_structure(v_ref)
    assert nn.get_partition_spec(v_flat) == nn.get_partition_spec(v_ref)
    for a, b in zip(jax.tree_util.tree_leaves(nn.meta.unbox(v_flat)), jax.tree_util.tree_leaves(nn.meta.unbox(v_ref))):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)

    variables = _nudged(v_ref)
    y_ref, y_flat = ref.apply(variables, x), flat.apply(variables, x)
    assert y_flat.shape == y_ref.shape and y_flat.dtype == y_ref.dtype
    _close(y_flat, y_ref, dtype)

    cot = jnp.asarray(np.random.default_rng(3).standard_normal(y_ref.shape), jnp.float32)

    def loss(layer):
        return lambda v, x: jnp.sum(layer.apply(v, x).astype(jnp.float32) * cot)

    g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(variables, x)
    g_flat = jax.jit(jax.grad(loss(flat), argnums=(0, 1)))(variables, x)
    assert jax.tree_util.tree_structure(g_flat) == jax.tree_util.tree_structure(g_ref)
    for a, b in zip(jax.tree_util.tree_leaves(g_flat), jax.tree_util.tree_leaves(g_ref)):
        assert a.shape == b.shape and a.dtype == b.dtype
        _close(a, b, dtype)


def test_forward_mode_autodiff_works():
    """jax.jacfwd through the layer (the flows' exact-likelihood tests take Jacobians this way)."""
    ref, flat, x = _layers("attn_out")
    variables = _nudged(ref.init(jax.random.PRNGKey(0), x))
    j_ref = jax.jacfwd(lambda x: ref.apply(variables, x))(x)
    j_flat = jax.jacfwd(lambda x: flat.apply(variables, x))(x)
    _close(j_flat, j_ref, jnp.float32)


def _dot_ranks(hlo: str) -> list[int]:
    """The rank of the left operand of every stablehlo.dot_general in ``hlo``."""
    ranks = []
    for line in hlo.splitlines():
        if "stablehlo.dot_general" in line:
            lhs = re.search(r":\s*\(tensor<((?:\d+x)*)[a-z]", line)  # e.g. ": (tensor<2x5x8xf32>, ..."
            ranks.append(lhs.group(1).count("x") if lhs else -1)
    return ranks


def test_gradient_program_uses_2d_dots():
    for case in ("mlp_in", "attn_out"):
        ref, flat, x = _layers(case)
        variables = ref.init(jax.random.PRNGKey(0), x)

        def hlo(layer):
            loss = lambda v, x: jnp.sum(layer.apply(v, x) ** 2)  # noqa: E731
            return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x).as_text()

        flat_ranks, ref_ranks = _dot_ranks(hlo(flat)), _dot_ranks(hlo(ref))
        assert len(flat_ranks) == 3, flat_ranks  # forward, d/dx, d/dW
        assert flat_ranks == [2, 2, 2], flat_ranks
        assert max(ref_ranks) > 2, ref_ranks


def test_rejects_contractions_it_cannot_flatten():
    x = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match="expected the trailing lhs axes"):
        dense(5, ("a",), ("b",), fan_in=3, axis=1, dense_2d=True).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="expected the trailing lhs axes"):
        dot_general_2d(x, jnp.ones((2, 4, 5)), (((2,), (1,)), ((0,), (0,))))
    with pytest.raises(ValueError, match=r"contracted lhs axes \(4,\) do not match"):
        dot_general_2d(x, jnp.ones((3, 5)), (((2,), (0,)), ((), ())))
