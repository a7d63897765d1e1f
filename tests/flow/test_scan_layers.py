"""``FlowConfig.scan_layers``: layers as a rolled ``lax.scan`` loop or unrolled compute the same flow.

Oracle: the other form of the same stack on the same params (the rolled loop slices stacked params
and caches dynamically inside a while loop; the unrolled form is straight-line code with static
slices). Checked on the forward (z, log-dets), the loss gradient, and both samplers (KV-cache steps,
text prefill), plus that the switch really changes the compiled program and keeps the params layout.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from flow_switch_helpers import assert_close, both_ways, flow_inputs
from starflow2_jax import flow
from starflow2_jax.flow.block import scans_layers

CONFIGS = {
    # TarFlow: class labels, learned positions, output shift, 2 layers per block
    "tarflow": flow.tarflow_config(3, 8, 2, 64, 2, 2, num_classes=10),
    # STARFlow: text prefix, 3D RoPE, start token, GQA, layers 1/2 (a one-layer scan too)
    "starflow": flow.starflow_config(4, 4, 1, 64, layers_per_block=[1, 2], head_dim=32, num_heads=2,
                                     num_kv_heads=1, txt_size=4, txt_dim=8),
}


def _variables(config):
    variables = flow.init(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)  # nudge every param: proj_out starts at zero
    params = jax.tree_util.tree_map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                                    variables["params"])
    return dict(variables, params=params)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_flow_either_way(name):
    """Same params layout; same z, log-dets and samples (sequential; Jacobi with a fixed pass count on
    the text-conditioned flow); same loss gradient on TarFlow (the train step's path)."""
    scanned, unrolled = both_ways(CONFIGS[name], "scan_layers")
    variables = _variables(scanned)
    shapes = jax.eval_shape(lambda: flow.init(unrolled, jax.random.PRNGKey(0)))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
    assert [x.shape for x in jax.tree_util.tree_leaves(shapes)] == [x.shape for x in jax.tree_util.tree_leaves(variables)]
    qkv = variables["params"]["blocks_0"]["layers"]["attn"]["query"]["kernel"]
    assert qkv.shape[0] == scanned.blocks[0].num_layers  # stacked on the leading 'layers' axis either way

    images, cond, noise = flow_inputs(scanned)
    outs = [flow.forward_with_intermediates(c, variables, images, cond) for c in (scanned, unrolled)]
    assert_close(outs[1].z, outs[0].z)
    assert_close(outs[1].logdets, outs[0].logdets)

    samplers = [None] + ([flow.JacobiOptions(block_size=4, threshold=0.0, max_iters=4)] if name == "starflow" else [])
    for options in samplers:
        s, u = (flow.sample_tokens(c, variables, noise, cond, jacobi=options)[0] for c in (scanned, unrolled))
        assert_close(u, s)

    if name == "tarflow":
        def grads(config):
            loss = lambda p: flow.loss(config, flow.forward_with_intermediates(  # noqa: E731
                config, dict(variables, params=p), images, cond))["loss"]
            return jax.grad(loss)(variables["params"])

        for g_u, g_s in zip(jax.tree_util.tree_leaves(grads(unrolled)), jax.tree_util.tree_leaves(grads(scanned))):
            assert_close(g_u, g_s)


def test_switch_changes_the_program():
    scanned, unrolled = both_ways(CONFIGS["tarflow"], "scan_layers")
    variables = jax.eval_shape(lambda: flow.init(scanned, jax.random.PRNGKey(0)))  # lowering needs shapes only
    images, cond, _ = flow_inputs(scanned)

    def hlo(config):
        return jax.jit(lambda v, x, c: flow.forward_with_intermediates(config, v, x, c).z).lower(
            variables, images, cond).as_text()

    assert "stablehlo.while" in hlo(scanned)
    assert "stablehlo.while" not in hlo(unrolled)


def test_default_is_per_backend_and_bad_values_are_rejected():
    auto = CONFIGS["tarflow"]
    assert auto.scan_layers is None
    assert not scans_layers(auto, "cpu")
    assert scans_layers(auto, "tpu") and scans_layers(auto, "gpu")
    assert scans_layers(dataclasses.replace(auto, scan_layers=True), "cpu")
    assert not scans_layers(dataclasses.replace(auto, scan_layers=False), "tpu")
    with pytest.raises(ValueError, match="scan_layers='yes'"):
        dataclasses.replace(auto, scan_layers="yes").validate()
    with pytest.raises(ValueError, match="scan_layers=1"):
        dataclasses.replace(auto, scan_layers=1).validate()
    unrolled = dataclasses.replace(auto, scan_layers=False)
    assert flow.config_from_dict(flow.config_to_dict(unrolled)) == unrolled
