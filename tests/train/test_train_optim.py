"""Optimiser: the weight-decay mask, masked AdamW, the LR schedule against its formula, the
non-finite guard."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import tiny_config

from starflow2_jax.train import FlowTask, decay_mask, guarded_update, learning_rate_schedule, make_optimizer


def _named_leaves(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_decay_mask_only_kernels():
    config = tiny_config(**{"model.conditioning": "caption", "model.text.vocab": ("a digit one", "two")})
    params, _ = jax.eval_shape(FlowTask.from_config(config).init, jax.random.key(0))
    mask = _named_leaves(decay_mask(nn.meta.unbox(params)))
    decayed = {k for k, v in mask.items() if v}
    assert decayed == {k for k in mask if k.endswith("['kernel']")}
    expected_on = ["['flow']['blocks_0']['proj_in']['kernel']", "['flow']['blocks_1']['layers']['mlp']['wi']['kernel']",
                   "['flow']['blocks_1']['layers']['attn']['query']['kernel']", "['flow']['blocks_1']['proj_txt']['kernel']"]
    expected_off = ["['text']['embedding']", "['flow']['blocks_1']['sos_embed']",
                    "['flow']['blocks_0']['layers']['attn_norm']['scale']",  # (layers, D): 2-D, still no decay
                    "['flow']['blocks_0']['layers']['mlp_norm']['bias']", "['flow']['blocks_0']['proj_out']['bias']",
                    "['flow']['blocks_1']['final_norm']['scale']"]
    for key in expected_on:
        assert mask[key] is True, key
    for key in expected_off:
        assert mask[key] is False, key
    tar = tiny_config(**{"model.flow.factory": "tarflow", "model.conditioning": "label", "model.flow.kwargs": dict(
        in_channels=1, img_size=8, patch_size=2, channels=64, num_blocks=2, layers_per_block=1, num_classes=10)})
    tparams, _ = jax.eval_shape(FlowTask.from_config(tar).init, jax.random.key(0))
    tmask = _named_leaves(decay_mask(nn.meta.unbox(tparams)))
    assert tmask["['flow']['blocks_0']['pos_embed']"] is False
    assert tmask["['flow']['blocks_0']['class_embed']"] is False


def test_masked_adamw_decays_only_kernels():
    config = tiny_config(**{"optim.warmup_steps": 0, "optim.lr": 0.1, "optim.weight_decay": 0.5, "optim.clip_norm": 0.0})
    optimizer, _ = make_optimizer(config.optim, 10)
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones((4, 2))},
              "pos_embed": jnp.ones((5, 2))}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)  # lr · wd · p
    for leaf in (new["dense"]["bias"], new["norm"]["scale"], new["pos_embed"]):
        np.testing.assert_array_equal(leaf, 1.0)


@pytest.mark.parametrize("warmup", [0, 4])
def test_schedule_matches_formula(warmup):
    config = tiny_config(**{"optim.lr": 2e-3, "optim.min_lr": 1e-4, "optim.warmup_steps": warmup})
    total = 20
    schedule = learning_rate_schedule(config.optim, total)

    def expected(t):
        if t < warmup:
            return 2e-3 * t / warmup
        progress = min((t - warmup) / (total - warmup), 1.0)
        return 1e-4 + (2e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress))

    for t in [0, 1, 2, 3, 4, 5, 10, 15, 19, 20, 25]:
        assert float(schedule(t)) == pytest.approx(expected(t), rel=1e-5, abs=1e-9), t
    assert float(schedule(total)) == pytest.approx(1e-4, rel=1e-6)  # the floor
    if warmup:
        assert float(schedule(0)) == 0.0 and float(schedule(warmup)) == pytest.approx(2e-3, rel=1e-6)


def test_guarded_update_rejects_nonfinite():
    optimizer = optax.adam(0.1)
    params = {"w": jnp.ones(3)}
    state = optimizer.init(params)
    new_params, new_state, ok = guarded_update(optimizer, {"w": jnp.array([1.0, jnp.nan, 0.0])}, state, params)
    assert not bool(ok)
    np.testing.assert_array_equal(new_params["w"], 1.0)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), new_state, state))
    new_params, _, ok = guarded_update(optimizer, {"w": jnp.ones(3)}, state, params, extra_finite=jnp.float32(jnp.inf) < 0)
    assert not bool(ok) and np.array_equal(new_params["w"], params["w"])  # loss flag false → rejected
    new_params, _, ok = guarded_update(optimizer, {"w": jnp.ones(3)}, state, params)
    assert bool(ok) and not np.array_equal(new_params["w"], params["w"])


def test_trainable_groups_clip_separately_and_frozen_leaves_stay_put():
    """Oracle: one plain optimiser per group, run on that group alone; the frozen leaf has no moments."""
    config = tiny_config(**{"optim.warmup_steps": 0, "optim.lr": 0.1, "optim.weight_decay": 0.1, "optim.clip_norm": 1.0})
    params = {"ae": {"kernel": jnp.ones((3, 2))}, "disc": {"kernel": jnp.ones((2, 2))}, "frozen": {"kernel": jnp.ones(4)}}
    grads = {"ae": {"kernel": jnp.full((3, 2), 0.01)}, "disc": {"kernel": jnp.full((2, 2), 100.0)},
             "frozen": {"kernel": jnp.ones(4)}}
    trainable = lambda p: {"ae": jax.tree.map(lambda _: "ae", p["ae"]),  # noqa: E731
                           "disc": jax.tree.map(lambda _: "disc", p["disc"]),
                           "frozen": jax.tree.map(lambda _: False, p["frozen"])}
    optimizer, _ = make_optimizer(config.optim, 10, trainable=trainable)
    state = optimizer.init(params)
    updates, _ = optimizer.update(grads, state, params)
    plain, _ = make_optimizer(config.optim, 10)
    for part in ("ae", "disc"):
        want, _ = plain.update(grads[part], plain.init(params[part]), params[part])
        np.testing.assert_allclose(np.asarray(updates[part]["kernel"]), np.asarray(want["kernel"]), rtol=1e-6)
    assert float(jnp.abs(updates["frozen"]["kernel"]).max()) == 0.0
    moments = [x for x in jax.tree.leaves(state) if getattr(x, "shape", None) == (4,)]
    assert not moments, "the frozen leaf got optimiser state"
    with pytest.raises(ValueError, match="pass params"):
        optimizer.update(grads, state)
