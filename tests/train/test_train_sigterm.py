"""SIGTERM: a training process saves its current step and exits 0; a restart continues from there."""

import os
import signal

import pytest
from train_helpers import ToyTask, metric_steps, pipeline, start_training, tiny_config, wait_for

from starflow2_jax.train import train

OVERRIDES = {"train.steps": 100000, "train.checkpoint_every": 0, "train.log_every": 1, "optim.warmup_steps": 0}


@pytest.mark.slow
def test_sigterm_saves_current_step_and_restart_continues(tmp_path):
    workdir = tmp_path / "run"
    process = start_training(workdir, OVERRIDES, cwd=tmp_path)
    try:  # until it is stepping
        wait_for(lambda: len(metric_steps(workdir)) >= 3, process, "the training subprocess never started stepping")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    result_line = [line for line in stdout.splitlines() if line.startswith("RESULT")]
    assert result_line, stderr[-3000:]
    _, step, interrupted = result_line[0].split()
    step = int(step)
    assert interrupted == "True" and 3 <= step < OVERRIDES["train.steps"]
    assert "received signal" in stderr and "checkpoint written" in stderr
    saved = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
    assert saved == [step]  # checkpoint_every=0: the only checkpoint is the one SIGTERM wrote
    assert max(metric_steps(workdir)) <= step

    config = tiny_config(**dict(OVERRIDES, **{"train.steps": step + 2}))
    task = ToyTask()
    restarted = train(config, workdir, task=task, data=pipeline(config))
    assert restarted.step == step + 2 and len(task.seen) == 2  # continued from the saved step
    assert metric_steps(workdir)[-2:] == [step + 1, step + 2]
