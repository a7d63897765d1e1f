"""Preemption: SIGTERM on any host → every host stops after the same step, saves it, exits 0.

Protocol (``StopAgreement``): the SIGTERM handler only sets a local flag. After dispatching each
train step the loop calls ``vote()``, which (1) dispatches this step's vote — every process's flag,
one value per local device, combined by a jitted ``max`` over all devices (one tiny all-reduce,
asynchronous like the step itself) — and (2) reads the *previous* step's vote, which has finished
by then, so the host never waits on the device pipeline. Every process reads the same all-reduced
value after the same step, so all of them see "stop" at the same step, whichever host got the
signal: the loop then ends, and each process saves that step (an Orbax save is collective).
A SIGTERM therefore costs at most two more steps, plus the save.

On one process the vote is the local flag (no collective), read one step late in the same way.
"""

from __future__ import annotations

import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class StopAgreement:
    """Context manager: installs the SIGTERM handler (restored on exit) and runs the vote.

    ``received``: this process got SIGTERM; ``stop``: all processes agreed to stop (after a
    ``vote()``); ``stop_step``: the step at which ``stop`` became True (None before).
    """

    def __init__(self, mesh: Mesh):
        self.received = False
        self.stop = False
        self.stop_step: int | None = None
        self._previous = None
        self._pending = None
        devices = mesh.devices.flatten()
        self._sharding = NamedSharding(Mesh(devices, ("all",)), PartitionSpec("all"))
        self._local = len([d for d in devices if d.process_index == jax.process_index()])
        self._any = jax.jit(jnp.max, out_shardings=NamedSharding(Mesh(devices, ("all",)), PartitionSpec()))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        else:
            logging.warning("train() is not running in the main thread: no SIGTERM handler (no save on preemption)")
        return self

    def _handle(self, signum, frame):
        del frame
        logging.warning("received signal %d: all processes will stop after the same step and save it", signum)
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _dispatch(self):
        if jax.process_count() == 1:
            return self.received
        local = np.full((self._local,), int(self.received), np.int32)
        return self._any(jax.make_array_from_process_local_data(self._sharding, local))

    def vote(self, step: int) -> bool:
        """Call once after dispatching step ``step``: sends this step's vote, reads the previous
        one; returns (and sets) ``stop``. Every process must call it at every step."""
        previous, self._pending = self._pending, (step, self._dispatch())
        if previous is not None and not self.stop and bool(np.asarray(previous[1])):
            self.stop, self.stop_step = True, step
            logging.warning("all processes agreed to stop at step %d (SIGTERM %s)", step,
                            "here" if self.received else "on another process")
        return self.stop
