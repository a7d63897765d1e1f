"""The multi-host runtime: ``jax.distributed`` start-up, per-host log files, the persistent
compilation cache, and work done once by process 0 while the others wait.

Every entry point (``starflow2 train / sample / eval``) calls ``initialize`` before JAX touches a
device. Where the processes come from, in order:

1. explicit values — the ``--coordinator HOST:PORT --num-processes N --process-id I`` flags, else the
   variables ``STARFLOW2_COORDINATOR``, ``STARFLOW2_NUM_PROCESSES``, ``STARFLOW2_PROCESS_ID`` (what
   ``launch/gpu/starflow2.sbatch`` exports): all three are then required;
2. auto-detection by ``jax.distributed.initialize()`` (which reads the cluster's own description:
   GCE metadata on TPU VMs, the GKE TPU variables, SLURM's variables) — when
   ``STARFLOW2_DISTRIBUTED=auto`` (the launch/tpu scripts set it on every worker: a TPU VM's
   environment need not show that it is part of a pod), on a multi-host TPU slice whose
   ``TPU_WORKER_HOSTNAMES`` lists several hosts (GKE), in a multi-slice job
   (``MEGASCALE_COORDINATOR_ADDRESS``) and under SLURM with more than one task (``SLURM_JOB_ID`` and
   ``SLURM_NTASKS`` > 1); ``STARFLOW2_DISTRIBUTED=off`` turns detection off;
3. otherwise one process: nothing to start.

A coordinator that does not answer within ``timeout_s`` (default 300 s) is a ``DistributedError``
naming it, the process id and count, and the timeout (processes other than 0 first wait for its port
to accept connections: JAX's C++ client would abort the process instead of raising). Process 0
waits up to ``timeout_s`` for the others; if they never come, JAX's runtime ends it with a
DEADLINE_EXCEEDED message.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, NamedTuple, TypeVar

import jax
import numpy as np

ENV_COORDINATOR = "STARFLOW2_COORDINATOR"
ENV_NUM_PROCESSES = "STARFLOW2_NUM_PROCESSES"
ENV_PROCESS_ID = "STARFLOW2_PROCESS_ID"
ENV_DISTRIBUTED = "STARFLOW2_DISTRIBUTED"
DEFAULT_TIMEOUT_S = 300

T = TypeVar("T")


class DistributedError(RuntimeError):
    """``jax.distributed`` could not start; the message names the settings and what to fix."""


class Runtime(NamedTuple):
    """How this process was started: ``mode`` 'single' | 'explicit' | 'auto' | 'tpu' | 'slurm';
    ``process_id`` / ``num_processes`` as JAX reports them after start-up."""

    mode: str
    process_id: int
    num_processes: int


def _env_int(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name}={text!r}: expected an integer") from None


def detect_cluster(environ: dict | None = None) -> str | None:
    """'tpu' on a multi-host TPU slice or multi-slice job, 'slurm' in a SLURM job with several tasks,
    'auto' when ``STARFLOW2_DISTRIBUTED=auto``, else None (one process; also for
    ``STARFLOW2_DISTRIBUTED=off``). Reads only environment variables."""
    env = os.environ if environ is None else environ
    forced = env.get(ENV_DISTRIBUTED, "").strip().lower()
    if forced not in ("", "auto", "off"):
        raise DistributedError(f"{ENV_DISTRIBUTED}={forced!r}: expected 'auto', 'off' or unset")
    if forced:
        return None if forced == "off" else "auto"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    try:
        tasks = int(env.get("SLURM_NTASKS", "1"))
    except ValueError:
        tasks = 1
    if env.get("SLURM_JOB_ID") and tasks > 1:
        return "slurm"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = DEFAULT_TIMEOUT_S) -> Runtime:
    """Starts ``jax.distributed`` as the module docstring describes (idempotent); returns a ``Runtime``.

    Raises DistributedError for incomplete or inconsistent explicit settings and for a coordinator
    that cannot be reached within ``timeout_s`` seconds.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if jax.distributed.is_initialized():
        return Runtime("explicit" if coordinator else detect_cluster() or "single", jax.process_index(),
                       jax.process_count())
    explicit = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(v is not None for v in explicit.values()):
        missing = [flag for flag, v in explicit.items() if v is None]
        if missing:
            env_names = {"--coordinator": ENV_COORDINATOR, "--num-processes": ENV_NUM_PROCESSES,
                         "--process-id": ENV_PROCESS_ID}
            raise DistributedError(f"a multi-process run needs {', '.join(missing)} (or "
                                   f"{', '.join(env_names[m] for m in missing)}) as well; got "
                                   f"{ {k: v for k, v in explicit.items() if v is not None} }")
        if ":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit():
            raise DistributedError(f"--coordinator {coordinator!r}: expected HOST:PORT (process 0's address)")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(f"--process-id {process_id} / --num-processes {num_processes}: expected "
                                   f"0 <= process id < number of processes")
        if num_processes == 1:
            return Runtime("single", 0, 1)
        what = f"coordinator {coordinator}, process {process_id} of {num_processes}"
        if process_id != 0:  # the C++ client aborts the process on a failed connect: check first, in Python
            _wait_for_coordinator(coordinator, timeout_s, what)
        _start(dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id),
               what, timeout_s)
        return Runtime("explicit", jax.process_index(), jax.process_count())
    mode = detect_cluster()
    if mode is None:
        return Runtime("single", 0, 1)
    _start({}, f"auto-detected {mode} cluster", timeout_s)
    return Runtime(mode, jax.process_index(), jax.process_count())


def _wait_for_coordinator(address: str, timeout_s: float, what: str) -> None:
    """Returns once ``address`` (HOST:PORT) accepts a TCP connection; DistributedError after ``timeout_s``."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise DistributedError(f"jax.distributed could not start ({what}) within {timeout_s}s: nothing "
                                       f"answers at {address} ({error}). Start process 0 there (with the same "
                                       f"--coordinator and --num-processes), or fix the address") from None
            time.sleep(0.5)


def _start(kwargs: dict, what: str, timeout_s: int) -> None:
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=int(timeout_s))
    except Exception as error:  # XlaRuntimeError DEADLINE_EXCEEDED / UNAVAILABLE, ValueError from detection
        raise DistributedError(f"jax.distributed could not start ({what}) within {timeout_s}s: {error}. Check that "
                               f"every process was started with the same coordinator and process count, that "
                               f"process 0 runs, and that its port is reachable") from error


def host_log_path(workdir: str) -> str | None:
    """``<workdir>/logs/process_<i>.log`` for this process, or None for a remote (``gs://``) workdir."""
    if "://" in workdir:
        return None
    return os.path.join(workdir, "logs", f"process_{jax.process_index()}.log")


def add_host_log(workdir: str) -> str | None:
    """Also writes this process's log records (absl's and Python's, INFO and up) to
    ``host_log_path(workdir)``; returns the path (None for a remote workdir). Idempotent per path."""
    path = host_log_path(workdir)
    if path is None:
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path) for h in root.handlers):
        return path
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s p{jax.process_index()} %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return path


def remove_host_log(workdir: str) -> None:
    """Stops writing to ``host_log_path(workdir)`` (closes the handler ``add_host_log`` added, if any)."""
    path = host_log_path(workdir)
    if path is None:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == os.path.abspath(path):
            root.removeHandler(handler)
            handler.close()


def set_compilation_cache(directory: str) -> None:
    """Uses ``directory`` as JAX's persistent compilation cache ('' leaves it off): every executable
    that took over a second to compile is stored there and reused by later runs (and restarts)."""
    if not directory:
        return
    if "://" not in directory:
        directory = os.path.abspath(os.path.expanduser(directory))
        os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def process_0_first(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on process 0 first, then (after a barrier named ``name``) on the others: for work
    that creates shared files (e.g. a dataset builder writing TFDS files), which the other processes
    then find ready. On one process just ``fn()``. When ``fn`` raises on process 0, process 0
    re-raises it and every other process raises a RuntimeError naming ``name`` (instead of waiting
    at the barrier for a process that will never come)."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    def process_0_succeeded(ok: bool) -> bool:  # the barrier, carrying process 0's outcome
        return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))

    if jax.process_index() == 0:
        try:
            result = fn()
        except BaseException:
            process_0_succeeded(False)
            raise
        process_0_succeeded(True)
        return result
    if not process_0_succeeded(True):
        raise RuntimeError(f"{name}: process 0 failed at this step (its error is in its own log); process "
                           f"{jax.process_index()} stops too")
    return fn()
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        result = fn()
        multihost_utils.sync_global_devices(name)
        return result
    multihost_utils.sync_global_devices(name)
    return fn()
