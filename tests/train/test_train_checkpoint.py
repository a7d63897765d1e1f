"""Checkpoints: incomplete step directories are ignored with a warning naming them, retention keeps
the last N plus multiples of K, a non-finite state is never written, restores land on the target mesh."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from train_helpers import ToyTask, pipeline, tiny_config

from starflow2_jax import parallel
from starflow2_jax.train import Checkpointer, create_state, find_incomplete, make_optimizer, state_shardings


@pytest.fixture(scope="module")
def toy():
    """(task, optimizer, shardings on the 2×2×2 mesh, a step-0 state, extra vars)."""
    task = ToyTask()
    optimizer, _ = make_optimizer(tiny_config().optim, 6)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = state_shardings(task, optimizer, mesh, ema=False)
    state, extra = create_state(task, optimizer, shardings, jax.random.key(0), ema=False)
    return task, optimizer, shardings, jax.device_get(state), jax.device_get(extra)


def _at_step(toy, step: int):
    """The toy state marked as step ``step`` with params shifted by ``step`` (so steps differ)."""
    _, _, shardings, state, _ = toy
    state = state.replace(step=np.int32(step), params=jax.tree.map(lambda p: p + step, state.params))
    return jax.device_put(state, shardings.state)


def _save(ckpt, toy, step, data_iter=None):
    _, _, shardings, _, extra = toy
    assert ckpt.save(step, _at_step(toy, step), jax.device_put(extra, shardings.extra), data_iter, {"step": step})


def test_incomplete_directories_are_ignored_with_a_warning(tmp_path, toy, caplog):
    task, _, shardings, _, _ = toy
    root = tmp_path / "checkpoints"
    config = tiny_config()
    data_iter = iter(pipeline(config))
    ckpt = Checkpointer(root, keep_last=5, async_save=True)
    _save(ckpt, toy, 2, data_iter)
    next(data_iter)
    _save(ckpt, toy, 4, data_iter)
    expected_next = next(data_iter)["index"]  # what a restore of step 4 must yield next
    ckpt.close()
    # A save killed before its rename (a tmp dir) and one killed on a non-atomic filesystem (no markers).
    shutil.copytree(root / "4", root / "6.orbax-checkpoint-tmp")
    shutil.rmtree(root / "6.orbax-checkpoint-tmp" / "state")
    shutil.copytree(root / "4", root / "8")
    for marker in ("commit_success.txt", "_CHECKPOINT_METADATA"):
        os.remove(root / "8" / marker)
    assert {p.name for p in find_incomplete(root)} == {"6.orbax-checkpoint-tmp", "8"}

    with caplog.at_level(logging.WARNING):
        ckpt = Checkpointer(root, keep_last=5, async_save=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ("6.orbax-checkpoint-tmp", "8"):
        assert any(str(root / name) in w and "incomplete" in w for w in warnings), (name, warnings)
    assert ckpt.latest_step() == 4
    assert ckpt.all_steps() == [2, 4]
    assert not (root / "6.orbax-checkpoint-tmp").exists()  # a partial write: deleted
    assert (root / "8.incomplete").is_dir() and not (root / "8").exists()  # set aside, not deleted

    restore_iter = iter(pipeline(config))
    state, _ = ckpt.restore(4, shardings.abstract_state, shardings.abstract_extra, restore_iter)
    assert int(state.step) == 4
    np.testing.assert_array_equal(np.asarray(state.params["dense"]["bias"]), 4.0)
    assert state.params["dense"]["kernel"].sharding == shardings.state.params["dense"]["kernel"]
    np.testing.assert_array_equal(next(restore_iter)["index"], expected_next)
    assert ckpt.read_config(4) == {"step": 4}
    ckpt.close()


def test_retention_keeps_last_n_and_every_k(tmp_path, toy):
    ckpt = Checkpointer(tmp_path, keep_last=2, keep_every=3, async_save=False)
    for step in range(1, 8):
        _save(ckpt, toy, step)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 6, 7]
    assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [3, 6, 7]
    ckpt.close()


def test_nonfinite_state_is_never_written(tmp_path, toy):
    _, _, shardings, _, extra = toy
    ckpt = Checkpointer(tmp_path, keep_last=2)
    bad = _at_step(toy, 5)
    bad = bad.replace(params=jax.tree.map(lambda p: p.at[0].set(jnp.nan), bad.params))
    assert not ckpt.save(5, bad, jax.device_put(extra, shardings.extra), None, {})
    ckpt.wait()
    assert ckpt.all_steps() == [] and not any(p.startswith("5") for p in os.listdir(tmp_path))
    ckpt.close()


def test_restore_onto_another_mesh(tmp_path, toy):
    task, optimizer, _, _, _ = toy
    ckpt = Checkpointer(tmp_path, keep_last=2, async_save=False)
    _save(ckpt, toy, 3)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    other = state_shardings(task, optimizer, mesh, ema=False)
    state, extra = ckpt.restore(3, other.abstract_state, other.abstract_extra, None)
    kernel = state.params["dense"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh.shape and kernel.sharding.spec == P("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(jax.device_get(_at_step(toy, 3).params["dense"]["kernel"])))
    ckpt.close()
