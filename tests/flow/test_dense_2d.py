"""``FlowConfig.dense_2d``: the flow's dense layers as 2-D matmuls or XLA's 3-D dot_general compute the
same flow.

Oracle: the other form on the same params (``dense_2d=False`` is flax's ``DenseGeneral`` and autodiff
of it, unchanged). Checked: the params tree (structure, logical axes, shapes and init values) is
identical, so checkpoints and the PyTorch converters cannot tell; forward z and log-dets, the
loss gradient and (STARFlow: text prefill and KV-cache steps) sequential samples agree; the switch
really changes the program; the per-backend default and validation.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from flow_switch_helpers import assert_close, both_ways, flow_inputs
from starflow2_jax import flow
from starflow2_jax.flow.block import uses_dense_2d

CONFIGS = {
    # TarFlow: class labels, learned positions, output shift, GELU MLP
    "tarflow": flow.tarflow_config(3, 8, 2, 64, 2, 1, num_classes=10),
    # STARFlow: text prefix (proj_txt), 3D RoPE, start token, GQA, SwiGLU (gate/up), qk-norm-free
    "starflow": flow.starflow_config(4, 4, 1, 64, layers_per_block=[1, 1], head_dim=32, num_heads=2,
                                     num_kv_heads=1, txt_size=4, txt_dim=8, use_swiglu=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_params_and_flow_either_way(name):
    flat, ref = both_ways(CONFIGS[name], "dense_2d")
    boxed = [flow.init_boxed(c, jax.random.PRNGKey(0)) for c in (flat, ref)]
    assert jax.tree_util.tree_structure(boxed[0]) == jax.tree_util.tree_structure(boxed[1])
    assert nn.get_partition_spec(boxed[0]) == nn.get_partition_spec(boxed[1])
    for a, b in zip(*(jax.tree_util.tree_leaves(nn.meta.unbox(v)) for v in boxed)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)

    variables = nn.meta.unbox(boxed[1])
    rng = np.random.default_rng(0)  # nudge every param: proj_out starts at zero
    variables = dict(variables, params=jax.tree_util.tree_map(
        lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), variables["params"]))
    images, cond, noise = flow_inputs(flat)

    def loss_and_grads(config):
        def loss(p):
            out = flow.forward_with_intermediates(config, dict(variables, params=p), images, cond)
            return flow.loss(config, out)["loss"], (out.z, out.logdets)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    ((l_flat, (z_flat, ld_flat)), g_flat), ((l_ref, (z_ref, ld_ref)), g_ref) = map(loss_and_grads, (flat, ref))
    assert_close(z_flat, z_ref)
    assert_close(ld_flat, ld_ref)
    assert_close(l_flat, l_ref)
    assert jax.tree_util.tree_structure(g_flat) == jax.tree_util.tree_structure(g_ref)
    for a, b in zip(jax.tree_util.tree_leaves(g_flat), jax.tree_util.tree_leaves(g_ref)):
        assert_close(a, b)

    if name == "starflow":
        s_flat, s_ref = (flow.sample_tokens(c, variables, noise, cond)[0] for c in (flat, ref))
        assert_close(s_flat, s_ref)


def _dot_ranks(hlo: str) -> list[int]:
    """The rank of the left operand of every stablehlo.dot_general in ``hlo``."""
    found = re.findall(r"stablehlo\.dot_general[^\n]*?:\s*\(tensor<((?:\d+x)*)[a-z]", hlo)
    return [dims.count("x") for dims in found]


def test_switch_changes_the_program():
    """On: every dense layer is a 2-D dot (the attention einsums stay 5-D); off: no 2-D dot at all."""
    flat, ref = both_ways(CONFIGS["tarflow"], "dense_2d")
    variables = jax.eval_shape(lambda: flow.init(flat, jax.random.PRNGKey(0)))  # lowering needs shapes only
    images, cond, _ = flow_inputs(flat)

    def ranks(config):
        return _dot_ranks(jax.jit(lambda v, x, c: flow.forward_with_intermediates(config, v, x, c).z).lower(
            variables, images, cond).as_text())

    dense_layers = len(flat.blocks) * (2 + 6 * flat.blocks[0].num_layers)  # proj_in/out; q, k, v, out, wi, wo
    on, off = ranks(flat), ranks(ref)
    assert on.count(2) == dense_layers and max(on) > 2, on  # attention's batched dots stay
    assert 2 not in off and len(off) == len(on), off


def test_default_is_per_backend_and_bad_values_are_rejected():
    auto = CONFIGS["tarflow"]
    assert auto.dense_2d is None
    assert uses_dense_2d(auto, "cpu")
    assert not uses_dense_2d(auto, "tpu") and not uses_dense_2d(auto, "gpu")
    assert uses_dense_2d(dataclasses.replace(auto, dense_2d=True), "tpu")
    assert not uses_dense_2d(dataclasses.replace(auto, dense_2d=False), "cpu")
    with pytest.raises(ValueError, match="dense_2d='yes'"):
        dataclasses.replace(auto, dense_2d="yes").validate()
    with pytest.raises(ValueError, match="dense_2d=0"):
        dataclasses.replace(auto, dense_2d=0).validate()
    off = dataclasses.replace(auto, dense_2d=False)
    assert flow.config_from_dict(flow.config_to_dict(off)) == off
