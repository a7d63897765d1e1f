"""The jitted train step: a (2 data × 2 fsdp × 2 tensor) mesh computes what one device computes;
gradient accumulation equals the full-batch step; the state is created sharded."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from train_helpers import ToyTask, pipeline, tiny_config

from starflow2_jax import parallel
from starflow2_jax.train import FlowTask, create_state, make_optimizer, make_train_step, state_shardings

ATOL = 1e-5


def _mesh_and_single():
    return (parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
            parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))


def _host_state(task, config, perturb: float):
    """A step-0 state on the host (params perturbed so zero-initialised heads do real work)."""
    optimizer, _ = make_optimizer(config.optim, int(config.train.steps))
    _, single = _mesh_and_single()
    shardings = state_shardings(task, optimizer, single, ema=config.optim.ema_decay > 0)
    state, extra = jax.device_get(create_state(task, optimizer, shardings, jax.random.key(0),
                                               ema=config.optim.ema_decay > 0))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: (p + perturb * rng.standard_normal(p.shape)).astype(np.float32), state.params)
    return state.replace(params=params, ema_params=None if state.ema_params is None else params), extra


def _run(task, config, mesh, host_state, host_extra, batches):
    optimizer, _ = make_optimizer(config.optim, int(config.train.steps))
    shardings = state_shardings(task, optimizer, mesh, ema=config.optim.ema_decay > 0)
    state = jax.device_put(host_state, shardings.state)
    extra = jax.device_put(host_extra, shardings.extra)
    step = make_train_step(task, optimizer, mesh, shardings, config)
    losses = []
    for batch in batches:
        state, metrics = step(state, extra, parallel.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
        assert bool(metrics["update_ok"])
    return state, losses


def _batches(task, config, n):
    it = iter(pipeline(config))
    return [task.prepare_batch(next(it)) for _ in range(n)]


@pytest.mark.slow
def test_mesh_step_matches_single_device():
    config = tiny_config(**{"model.conditioning": "label", "model.flow.kwargs.num_classes": 10,
                            "optim.warmup_steps": 0, "optim.ema_decay": 0.9, "optim.lr": 1e-3})
    # lr 1e-3: Adam moves a parameter whose gradient is ~0 by up to ±lr whatever the gradient's
    # last bits are, so at lr 1e-2 float32 reduction-order noise alone can reach 1e-5 on such leaves.
    task = FlowTask.from_config(config)
    host_state, host_extra = _host_state(task, config, perturb=0.02)
    batches = _batches(task, config, 2)
    mesh, single = _mesh_and_single()
    sharded, sharded_losses = _run(task, config, mesh, host_state, host_extra, batches)
    kernel = sharded.params["flow"]["blocks_0"]["layers"]["mlp"]["wi"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")  # really sharded
    mu = sharded.opt_state[1][0].mu["flow"]["blocks_0"]["layers"]["mlp"]["wi"]["kernel"]  # Adam moment: same layout
    assert mu.sharding.spec == P(None, "fsdp", "tensor")
    reference, reference_losses = _run(task, config, single, host_state, host_extra, batches)
    np.testing.assert_allclose(sharded_losses, reference_losses, rtol=0, atol=ATOL)
    got, want = jax.device_get(sharded), jax.device_get(reference)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), want.params, host_state.params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the steps changed the params
    for name in ("params", "opt_state", "ema_params"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=ATOL), getattr(got, name),
                     getattr(want, name))
    assert int(got.step) == int(want.step) == 2


def test_grad_accumulation_matches_full_batch():
    config = tiny_config(**{"optim.warmup_steps": 0})
    task = ToyTask()
    host_state, host_extra = _host_state(task, config, perturb=0.0)
    batches = _batches(task, config, 2)
    mesh, _ = _mesh_and_single()
    full, full_losses = _run(task, config, mesh, host_state, host_extra, batches)
    config.train.grad_accum = 2
    accumulated, acc_losses = _run(task, config, mesh, host_state, host_extra, batches)
    np.testing.assert_allclose(acc_losses, full_losses, rtol=0, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 jax.device_get(accumulated.params), jax.device_get(full.params))


def test_state_is_created_sharded():
    config = tiny_config()
    task = ToyTask(hidden=16)
    optimizer, _ = make_optimizer(config.optim, 6)
    mesh, _ = _mesh_and_single()
    shardings = state_shardings(task, optimizer, mesh, ema=True)
    state, extra = create_state(task, optimizer, shardings, jax.random.key(0), ema=True)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings.state)):
        assert got.sharding == want
    assert state.params["dense"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert state.ema_params["dense"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert state.step.sharding.is_fully_replicated and extra["stats"]["scale"].sharding.is_fully_replicated
