"""SIGTERM: a training process saves its current step and exits 0; a restart continues from there."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from train_helpers import ToyTask, pipeline, tiny_config

from starflow2_jax.train import train

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path[:0] = [{repo!r}, {here!r}]
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from train_helpers import ToyTask, pipeline, tiny_config
    from starflow2_jax.train import train
    config = tiny_config(**{overrides!r})
    result = train(config, {workdir!r}, task=ToyTask(), data=pipeline(config))
    print("RESULT", result.step, result.interrupted, flush=True)
""")

OVERRIDES = {"train.steps": 100000, "train.checkpoint_every": 0, "train.log_every": 1, "optim.warmup_steps": 0}


def _metric_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.slow
def test_sigterm_saves_current_step_and_restart_continues(tmp_path):
    workdir = tmp_path / "run"
    script = SCRIPT.format(repo=str(REPO), here=str(HERE), overrides=OVERRIDES, workdir=str(workdir))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while len(_metric_steps(workdir)) < 3:  # it is stepping
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the training subprocess never started stepping"
            time.sleep(0.2)
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
    assert max(_metric_steps(workdir)) <= step

    config = tiny_config(**dict(OVERRIDES, **{"train.steps": step + 2}))
    task = ToyTask()
    restarted = train(config, workdir, task=task, data=pipeline(config))
    assert restarted.step == step + 2 and len(task.seen) == 2  # continued from the saved step
    assert _metric_steps(workdir)[-2:] == [step + 1, step + 2]
