"""parallel.runtime and parallel.preemption on one process: settings errors, an unreachable
coordinator, cluster detection, the stop vote's timing, the compilation cache and host logs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from starflow2_jax import parallel
from starflow2_jax.parallel import runtime

ROOT = Path(__file__).resolve().parents[2]


def test_incomplete_or_bad_explicit_settings_name_what_is_missing(monkeypatch):
    for name in (runtime.ENV_COORDINATOR, runtime.ENV_NUM_PROCESSES, runtime.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(parallel.DistributedError, match=r"needs --coordinator \(or STARFLOW2_COORDINATOR\)"):
        parallel.initialize(num_processes=2, process_id=0)
    with pytest.raises(parallel.DistributedError, match="'localhost': expected HOST:PORT"):
        parallel.initialize("localhost", 2, 0)
    with pytest.raises(parallel.DistributedError, match="--process-id 2 / --num-processes 2"):
        parallel.initialize("localhost:1234", 2, 2)
    monkeypatch.setenv(runtime.ENV_NUM_PROCESSES, "two")
    with pytest.raises(parallel.DistributedError, match="STARFLOW2_NUM_PROCESSES='two'"):
        parallel.initialize()
    monkeypatch.delenv(runtime.ENV_NUM_PROCESSES)
    monkeypatch.delenv(runtime.ENV_DISTRIBUTED, raising=False)
    assert parallel.initialize() == parallel.Runtime("single", 0, 1)  # nothing set, no cluster here


def test_cluster_detection():
    assert runtime.detect_cluster({}) is None
    assert runtime.detect_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}) is None  # a single-host slice
    assert runtime.detect_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) == "tpu"
    assert runtime.detect_cluster({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}) == "tpu"
    assert runtime.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert runtime.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "32"}) == "slurm"
    assert runtime.detect_cluster({"STARFLOW2_DISTRIBUTED": "auto"}) == "auto"
    assert runtime.detect_cluster({"STARFLOW2_DISTRIBUTED": "off", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "32"}) is None
    with pytest.raises(parallel.DistributedError, match="STARFLOW2_DISTRIBUTED='yes'"):
        runtime.detect_cluster({"STARFLOW2_DISTRIBUTED": "yes"})


def test_unreachable_coordinator_is_a_clear_error_within_the_timeout(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "starflow2_jax.cli", "train", "--config", "configs/demo.py:runlocal",
                             "--workdir", str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{port}",
                             "--num-processes", "2", "--process-id", "1", "--distributed-timeout", "3"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"jax.distributed could not start (coordinator 127.0.0.1:{port}, process 1 of 2) within 3s" in result.stderr


def test_stop_vote_stops_every_caller_one_step_after_the_signal():
    mesh = parallel.make_mesh({"data": -1})
    with parallel.StopAgreement(mesh) as agreement:
        assert not agreement.vote(1) and not agreement.vote(2)
        os.kill(os.getpid(), signal.SIGTERM)  # only sets the flag
        assert agreement.received and not agreement.stop
        assert not agreement.vote(3)  # step 3's vote carries the flag; it is read after step 4
        assert agreement.vote(4) and agreement.stop_step == 4
    assert signal.getsignal(signal.SIGTERM) is not agreement._handle  # the handler is restored


def test_mesh_that_does_not_fit_the_devices_names_both():
    with pytest.raises(ValueError, match=r"product 3 does not match the 8 devices.*8 devices in 1 process"):
        parallel.make_mesh({"data": 3})


def test_compilation_cache_and_host_log(tmp_path):
    previous = jax.config.jax_compilation_cache_dir
    try:
        parallel.set_compilation_cache(str(tmp_path / "cache"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
    path = parallel.add_host_log(str(tmp_path))
    assert path == str(tmp_path / "logs" / "process_0.log")
    import logging
    logging.getLogger("starflow2.test").warning("hello from the host log")
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert "p0 WARNING hello from the host log" in Path(path).read_text()
    assert parallel.add_host_log("gs://bucket/run") is None
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "baseFilename", None) == path]:
        root.removeHandler(handler)
        handler.close()


def test_process_0_first_on_one_process_just_runs():
    assert parallel.process_0_first(lambda: 42, "x") == 42


PROCESS_0_FIRST = """
import os, sys, time
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {root!r})
from starflow2_jax import parallel
parallel.initialize()  # from STARFLOW2_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID
import jax
index = jax.process_index()
shared = {shared!r}

def build():  # process 0 writes the file; the others must find it written
    if index == 0:
        time.sleep(1.0)
        open(shared, "w").write("ready")
    return open(shared).read()

print("FIRST", parallel.process_0_first(build, "build"), flush=True)

def broken():
    if index == 0:
        raise OSError("disk full")
    return "never"

try:
    parallel.process_0_first(broken, "broken")
except Exception as error:
    print("SECOND", type(error).__name__, error, flush=True)
"""


@pytest.mark.slow
def test_process_0_first_on_two_processes_orders_the_work_and_propagates_a_failure(tmp_path):
    """Two real processes over loopback: the others run ``fn`` only after process 0 finished it, and a
    failure on process 0 stops the others with an error naming the step (no barrier left waiting)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = PROCESS_0_FIRST.format(root=str(ROOT), shared=str(tmp_path / "shared.txt"))
    procs = []
    for pid in range(2):
        env = dict(os.environ, STARFLOW2_COORDINATOR=f"127.0.0.1:{port}", STARFLOW2_NUM_PROCESSES="2",
                   STARFLOW2_PROCESS_ID=str(pid), XLA_FLAGS="--xla_force_host_platform_device_count=1")
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=180)
        finally:
            if p.poll() is None:
                p.kill()
        outs.append((out, err))
    for out, err in outs:
        assert "FIRST ready" in out, err[-3000:]
    assert "SECOND OSError disk full" in outs[0][0], outs[0][1][-3000:]
    assert ("SECOND RuntimeError broken: process 0 failed at this step (its error is in its own log); process 1 "
            "stops too") in outs[1][0], outs[1][1][-3000:]
