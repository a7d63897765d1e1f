"""The training loop: exact resume, non-finite steps, files it writes, a FlowTask run end to end."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from train_helpers import ToyTask, pipeline, tiny_config

from starflow2_jax import parallel
from starflow2_jax.train import (Checkpointer, FlowTask, NonFiniteLossError, make_eval_step, make_optimizer,
                                 resolve_config, state_shardings, train)


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _steps(workdir) -> list[int]:
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_resume_is_exact(tmp_path):
    """6 steps straight == 3 steps, stop, restore with fresh objects, 3 more: same params, optimiser
    state, EMA, rng, counters, and the same batches in the same order."""
    config = tiny_config(**{"optim.ema_decay": 0.9, "train.grad_accum": 2, "train.checkpoint_every": 2})
    straight_task = ToyTask()
    straight = train(config, tmp_path / "straight", task=straight_task, data=pipeline(config))
    assert straight.step == 6 and not straight.interrupted

    first_task = ToyTask()
    first = train(config, tmp_path / "resumed", task=first_task, data=pipeline(config), stop_after=3)
    assert first.step == 3 and _steps(tmp_path / "resumed") == [2, 3]
    second_task = ToyTask()
    second = train(resolve_config(config), tmp_path / "resumed", task=second_task, data=pipeline(config))
    assert second.step == 6 and len(second_task.seen) == 3

    np.testing.assert_array_equal(np.stack(first_task.seen + second_task.seen), np.stack(straight_task.seen))
    assert len({tuple(s) for s in straight_task.seen}) == 6  # the order really varies from batch to batch
    got, want = jax.device_get(second.state), jax.device_get(straight.state)
    for name in ("params", "opt_state", "ema_params", "rng", "step", "skipped_steps"):
        _assert_trees_equal(getattr(got, name), getattr(want, name))
    assert not np.array_equal(want.params["head"]["kernel"], jax.device_get(first.state.params["head"]["kernel"]))
    lines = _metrics(tmp_path / "resumed")
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in lines] == [m["loss"] for m in _metrics(tmp_path / "straight")]


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    config = tiny_config(**{"train.steps": 5, "train.checkpoint_every": 1, "train.keep_last": 10})
    result = train(config, tmp_path / "a", task=ToyTask(nan_steps={3}), data=pipeline(config))
    assert result.step == 5 and int(result.state.skipped_steps) == 1 and int(result.state.nonfinite_streak) == 0
    lines = {m["step"]: m for m in _metrics(tmp_path / "a")}
    assert lines[3]["loss"] == "nan" and lines[3]["update_ok"] == 0 and lines[3]["skipped_steps"] == 1
    assert lines[2]["skipped_steps"] == 0 and lines[4]["update_ok"] == 1 and lines[5]["skipped_steps"] == 1
    assert _steps(tmp_path / "a") == [1, 2, 4, 5]  # nothing written for the non-finite step

    # The skipped step leaves the params exactly as they were after step 2.
    stopped = train(config, tmp_path / "b", task=ToyTask(nan_steps={3}), data=pipeline(config), stop_after=3)
    assert stopped.step == 3 and _steps(tmp_path / "b") == [1, 2]  # no final checkpoint for a non-finite step
    task = ToyTask()
    optimizer, _ = make_optimizer(config.optim, 5)
    shardings = state_shardings(task, optimizer, parallel.make_mesh(dict(config.mesh)), ema=False)
    checkpointer = Checkpointer(tmp_path / "b" / "checkpoints")
    after_two, _ = checkpointer.restore(2, shardings.abstract_state, shardings.abstract_extra, None)
    checkpointer.close()
    _assert_trees_equal(jax.device_get(stopped.state.params), jax.device_get(after_two.params))
    _assert_trees_equal(jax.device_get(stopped.state.opt_state), jax.device_get(after_two.opt_state))


def test_persistent_nonfinite_loss_stops_without_saving(tmp_path):
    config = tiny_config(**{"train.steps": 20, "train.checkpoint_every": 1, "train.keep_last": 10,
                            "train.max_nonfinite_steps": 3})
    with pytest.raises(NonFiniteLossError, match=r"non-finite for 3 steps in a row.*max_nonfinite_steps=3") as error:
        train(config, tmp_path, task=ToyTask(nan_from=3), data=pipeline(config))
    assert isinstance(error.value, RuntimeError)
    assert "up to step 5" in str(error.value)
    assert _steps(tmp_path) == [1, 2]
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if "tmp" in p]


@pytest.mark.slow
def test_flow_training_writes_metrics_samples_and_checkpoints(tmp_path):
    """Caption-conditioned STARFlow through the whole loop: metrics, sample grids, checkpoints, eval."""
    config = tiny_config(**{"model.conditioning": "caption", "model.text.max_len": 6, "model.text.dim": 16,
                            "train.steps": 4, "train.log_every": 2, "train.sample_every": 4,
                            "train.checkpoint_every": 2, "sample.guidance": [1.5],
                            "sample.prompts": ["a handwritten digit one", "the number 7"],
                            "sample.jacobi.block_size": 4})
    result = train(config, tmp_path, data=pipeline(config))
    assert result.step == 4 and np.isfinite(result.metrics["loss"])

    lines = _metrics(tmp_path)
    assert [m["step"] for m in lines] == [2, 4]
    for key in ("loss", "loss_z", "loss_logdet", "loss_latent_norm", "bits_per_dim", "grad_norm", "lr",
                "skipped_steps", "steps_per_sec", "eta_seconds"):
        assert key in lines[-1], key
    assert lines[0]["lr"] == pytest.approx(1e-2 * 1 / 2)  # warm-up: the 2nd step runs at t = 1 of 2
    assert _steps(tmp_path) == [2, 4]

    with Image.open(tmp_path / "samples" / "step_000004.png") as image:
        # One panel per guidance value: 2 prompts × 2 samples of 8×8 with 1-pixel gutters, upscaled ×4.
        assert image.size == ((2 * 9 + 1) * 4, (2 * 9 + 1) * 4)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert "handwritten" in " ".join(stored["model"]["text"]["vocab"])  # filled from the digits templates

    resolved = resolve_config(config)
    task = FlowTask.from_config(resolved)
    optimizer, _ = make_optimizer(resolved.optim, 4)
    mesh = parallel.make_mesh(dict(resolved.mesh))
    shardings = state_shardings(task, optimizer, mesh, ema=False)
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    state, extra = checkpointer.restore(4, shardings.abstract_state, shardings.abstract_extra, None)
    assert checkpointer.read_config()["model"]["conditioning"] == "caption"
    checkpointer.close()
    _assert_trees_equal(jax.device_get(state.params), jax.device_get(result.state.params))

    batch = task.prepare_batch(next(iter(pipeline(config))))
    bpd = make_eval_step(task, mesh, shardings)(state.params, extra, parallel.shard_batch(batch, mesh),
                                                jax.random.key(0))["bits_per_dim"]
    assert bpd.shape == (8,) and np.all(np.isfinite(np.asarray(bpd)))


def test_default_data_is_the_digits_pipeline(tmp_path):
    """Without ``data``, the loop builds the config's dataset (the embedded digits) and its pipeline."""
    config = tiny_config(**{"train.steps": 2, "data.data_dir": str(tmp_path / "tfds")})
    task = ToyTask()
    result = train(config, tmp_path / "run", task=task)
    assert result.step == 2 and _steps(tmp_path / "run") == [2]
    seen = np.concatenate(task.seen)
    assert seen.shape == (16,) and len(set(seen.tolist())) == 16 and seen.min() >= 0 and seen.max() < 1797


def test_init_from_another_run(tmp_path, monkeypatch):
    """An empty workdir with ``train.init_from`` starts from that run's params (fresh optimiser, step 0);
    a path relative to the working directory works too (Orbax itself needs absolute ones)."""
    config = tiny_config(**{"train.steps": 2})
    source = train(config, tmp_path / "source", task=ToyTask(), data=pipeline(config))
    frozen = tiny_config(**{"train.steps": 2, "optim.lr": 0.0, "optim.min_lr": 0.0,
                            "train.init_from": str(tmp_path / "source")})
    started = train(frozen, tmp_path / "fine", task=ToyTask(), data=pipeline(frozen))
    assert started.step == 2  # counted from 0, not from the source's step
    _assert_trees_equal(jax.device_get(started.state.params), jax.device_get(source.state.params))
    monkeypatch.chdir(tmp_path)
    relative = tiny_config(**{"train.steps": 2, "optim.lr": 0.0, "optim.min_lr": 0.0, "train.init_from": "source"})
    started = train(relative, tmp_path / "fine_rel", task=ToyTask(), data=pipeline(relative))
    _assert_trees_equal(jax.device_get(started.state.params), jax.device_get(source.state.params))
    with pytest.raises(FileNotFoundError, match="init_from"):
        train(tiny_config(**{"train.init_from": str(tmp_path / "missing")}), tmp_path / "x", task=ToyTask(),
              data=pipeline(config))
