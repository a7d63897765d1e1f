"""``AFBlock.step_unstacked`` / ``prefill_text_unstacked`` (the samplers' path for unrolled layers: one
heads-major cache per layer, params unstacked before the loop) against ``step`` / ``prefill_text``
(the stacked path: layers under ``nn.scan``, one stacked (L, B, S, Hkv, hd) cache) on the same params.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flow_switch_helpers import assert_close
from starflow2_jax import flow
from starflow2_jax.flow.block import AFBlock, unstack_layers
from starflow2_jax.nn import KVCache

CONFIGS = {
    # TarFlow: class labels, learned positions, 2 layers
    "tarflow": flow.tarflow_config(3, 8, 2, 64, 1, 2, num_classes=10),
    # STARFlow: text prefix, 3D RoPE, start token, GQA, 2 layers in the text-conditioned block
    "starflow": flow.starflow_config(4, 4, 1, 64, layers_per_block=[2], head_dim=32, num_heads=2,
                                     num_kv_heads=1, txt_size=4, txt_dim=8),
}


def _block_params(config):
    params = flow.init(config, jax.random.PRNGKey(0))["params"]["blocks_0"]
    rng = np.random.default_rng(0)  # nudge every param: proj_out starts at zero
    return jax.tree_util.tree_map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unstacked_steps_equal_stacked_steps(name):
    """A text prefill, a 3-position chunk, then a 1-position step: same head outputs, same cached keys
    and values (transposed back), same write index."""
    config = CONFIGS[name]
    block = config.blocks[0]
    module, params = AFBlock(config, 0), _block_params(config)
    batch, prefix = 2, config.text_len if block.text_conditioned else 0
    length = prefix + config.num_tokens
    rng = np.random.default_rng(1)
    inputs = jnp.asarray(rng.standard_normal((batch, 4, config.token_dim)), jnp.float32)
    labels = jnp.array([3, 7]) if config.num_classes else None
    temperature = jnp.array([1.0, 0.7], jnp.float32)  # per-row attention temperature (guided rows)
    text = jnp.asarray(rng.standard_normal((batch, config.text_len, config.text_dim)), jnp.float32) if prefix else None

    @jax.jit
    def both_paths(params, inputs, labels, text):
        """→ ([(stacked outputs, unstacked outputs) per call], stacked cache, unstacked caches)."""
        def call(method, *args):
            return module.apply({"params": params}, *args, method=method)

        stacked = KVCache.create(batch, length, block.num_kv_heads, block.head_dim, num_layers=block.num_layers)
        layers = unstack_layers(params["layers"], block.num_layers)
        unstacked = tuple(KVCache.create(batch, length, block.num_kv_heads, block.head_dim, layout="bhsd")
                          for _ in range(block.num_layers))
        if prefix:
            stacked = call(AFBlock.prefill_text, text, stacked, temperature)
            unstacked = call(AFBlock.prefill_text_unstacked, text, unstacked, layers, temperature)
        outs = []
        for chunk in (inputs[:, :3], inputs[:, 3:]):
            o_ref, stacked = call(AFBlock.step, chunk, labels, stacked, temperature)
            o, unstacked = call(AFBlock.step_unstacked, chunk, labels, unstacked, layers, temperature)
            outs.append((o_ref, o))
        return outs, stacked, unstacked

    outs, stacked, unstacked = both_paths(params, inputs, labels, text)
    for o_ref, o in outs:
        assert_close(o, o_ref)
    assert float(jnp.max(jnp.abs(outs[-1][0]))) > 1e-2  # the heads do real work
    for i, cache in enumerate(unstacked):
        assert int(cache.index) == int(stacked.index) == prefix + 4
        assert_close(cache.k.transpose(0, 2, 1, 3), stacked.k[i])
        assert_close(cache.v.transpose(0, 2, 1, 3), stacked.v[i])


def test_unstacked_errors():
    config = CONFIGS["tarflow"]
    block = config.blocks[0]
    params = _block_params(config)
    with pytest.raises(ValueError, match=r"leading sizes \[2\]: expected 3 layers"):
        unstack_layers(params["layers"], 3)
    layers = unstack_layers(params["layers"], block.num_layers)
    one = (KVCache.create(1, config.num_tokens, block.num_kv_heads, block.head_dim, layout="bhsd"),)
    with pytest.raises(ValueError, match="has 2 layers: got 1 caches and 2 layer params"):
        AFBlock(config, 0).apply({"params": params}, jnp.zeros((1, 1, config.token_dim)), jnp.array([0]), one,
                                 layers, method=AFBlock.step_unstacked)
