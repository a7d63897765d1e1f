"""Acceptance (issue 12): a real 2-process × 4-device run over loopback ``jax.distributed`` trains the
demo config, gets SIGTERM on one process only, saves the same step on both, and resumes as 1 process
× 8 devices (this pytest process) with the saved parameters bit for bit and the same next-step loss
as an uninterrupted run (the oracle: the same config trained here without interruption)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from starflow2_jax.config_files import load_config
from starflow2_jax.train import train

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ["--config.train.steps=100000", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
             "--config.optim.ema_decay=0.0"]

WORKER = textwrap.dedent("""
    import hashlib, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {root!r})
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import jax, numpy as np
    from starflow2_jax import parallel
    runtime = parallel.initialize()  # from STARFLOW2_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID
    assert (runtime.mode, jax.process_count(), jax.device_count()) == ("explicit", 2, 8), runtime
    from starflow2_jax.config_files import load_config, split_override_args
    from starflow2_jax.train import train
    overrides, _ = split_override_args({overrides!r})
    result = train(load_config("configs/demo.py:runlocal", overrides), {workdir!r})
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(result.state.params)]
    print("RESULT", result.step, result.interrupted, hashlib.sha256(b"".join(x.tobytes() for x in leaves)).hexdigest(),
          flush=True)
""")


def _free_port() -> int:
    try:
        import portpicker
        return portpicker.pick_unused_port()
    except ImportError:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _digest(params) -> str:
    leaves = [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(params)]
    return hashlib.sha256(b"".join(x.tobytes() for x in leaves)).hexdigest()


def _losses(workdir: Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines) if "loss" in record}


def _config(data_dir: Path):
    return load_config("configs/demo.py:runlocal", [o[len("--config."):] for o in OVERRIDES]
                       + [f"data.data_dir={data_dir}"])


@pytest.mark.slow
def test_two_processes_agree_on_the_sigterm_step_and_resume_on_one(tmp_path):
    workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
    overrides = OVERRIDES + [f"--config.data.data_dir={data_dir}"]
    script = WORKER.format(root=str(ROOT), overrides=overrides, workdir=str(workdir))
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, STARFLOW2_COORDINATOR=f"127.0.0.1:{port}", STARFLOW2_NUM_PROCESSES="2",
                   STARFLOW2_PROCESS_ID=str(pid))
        env.pop("XLA_FLAGS", None)
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        deadline = time.monotonic() + 300
        while not (workdir / "metrics.jsonl").exists() or len(_losses(workdir)) < 3:  # both are stepping
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the two processes never started stepping"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)  # one process only
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
        results.append(next(line.split()[1:] for line in out.splitlines() if line.startswith("RESULT")))
    (step0, interrupted0, digest0), (step1, interrupted1, digest1) = results
    step = int(step0)
    assert step1 == step0 and interrupted0 == interrupted1 == "True" and digest0 == digest1
    assert "all processes agreed to stop" in outputs[0][1] and "on another process" in outputs[0][1]
    assert (workdir / "checkpoints" / str(step)).is_dir()

    # resume here, as 1 process x 8 devices: the saved parameters exactly, then one more step
    assert jax.process_count() == 1 and jax.device_count() == 8
    config = _config(data_dir)
    restored = train(config, workdir, stop_after=step)
    assert restored.step == step and _digest(restored.state.params) == digest0
    resumed = train(config, workdir, stop_after=step + 1)
    assert resumed.step == step + 1

    # the oracle: the same config trained here from scratch without interruption (same global
    # batches; the 2-process rows sit on other devices, so sums differ in rounding only)
    reference_dir = tmp_path / "reference"
    reference = train(config, reference_dir, stop_after=step + 1)
    assert _losses(workdir)[step + 1] == pytest.approx(_losses(reference_dir)[step + 1], rel=1e-5)
    for a, b in zip(jax.tree.leaves(reference.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
