"""Timing and reporting helpers shared by every benchmark (flow, train, vlm, fae).

Conventions: compilation is timed separately (ahead-of-time ``lower().compile()``) and never
counted in a throughput; one untimed warm-up call follows it; a measurement is ``repeats`` runs of
``steps`` calls each, synchronised with ``jax.block_until_ready`` at the end of a run, and the
reported time per call is the median over runs of (run wall-clock / steps). Results go to stdout as
one JSON line; everything else goes to stderr so that stdout stays machine-readable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: ``median`` over runs, and every run's value in ``runs``."""

    median: float
    runs: tuple[float, ...]

    @property
    def per_second(self) -> float:
        """Calls per second at the median time."""
        return 1.0 / self.median


def log(*parts: Any) -> None:
    """Prints a progress line to stderr (stdout is reserved for the JSON result)."""
    print("[bench]", *parts, file=sys.stderr, flush=True)


def compile_ahead(fn: Callable, *args, **kwargs) -> tuple[Callable, float]:
    """AOT-compiles the jitted ``fn`` for ``args``; returns ``(compiled callable, seconds spent)``.

    The compiled callable takes the same (non-static) arguments and never retraces, so a later
    shape or dtype slip raises instead of silently recompiling inside a timed loop.
    """
    start = time.perf_counter()
    compiled = fn.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


def time_calls(call: Callable[[], Any], *, steps: int, repeats: int, warmup: int = 1) -> Timing:
    """Times ``call()`` (a closure that dispatches one step and returns what to wait on).

    ``warmup`` untimed calls first; then ``repeats`` runs of ``steps`` back-to-back calls, each run
    ending in ``jax.block_until_ready`` on the last result. A closure that threads state (a train
    step with donated buffers) keeps it in a nonlocal; only the last result of a run is awaited,
    which also waits for every earlier step that it depends on.
    """
    if steps < 1 or repeats < 1:
        raise ValueError(f"steps={steps} and repeats={repeats} must both be >= 1")
    for _ in range(warmup):
        jax.block_until_ready(call())
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(steps):
            out = call()
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - start) / steps)
    return Timing(median=statistics.median(runs), runs=tuple(runs))


def time_alternating(calls: dict[str, tuple[Callable[[], Any], int]], *, repeats: int, warmup: int = 1
                     ) -> dict[str, Timing]:
    """Times several ``name: (call, steps)`` side by side: after ``warmup`` untimed calls of each,
    ``repeats`` rounds, each timing one run of ``steps`` calls of every entry in turn (so machine load
    hits all of them alike). A run ends in ``jax.block_until_ready`` on the last result (eager
    runtimes such as PyTorch return None or a finished value). Returns ``{name: Timing}``."""
    if repeats < 1 or any(steps < 1 for _, steps in calls.values()):
        raise ValueError(f"repeats={repeats} and every steps must be >= 1")
    for call, _ in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(call())
    runs: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (call, steps) in calls.items():
            start = time.perf_counter()
            out = None
            for _ in range(steps):
                out = call()
            jax.block_until_ready(out)
            runs[name].append((time.perf_counter() - start) / steps)
    return {name: Timing(median=statistics.median(r), runs=tuple(r)) for name, r in runs.items()}


def passive_openmp() -> dict:
    """Asks PyTorch's OpenMP runtime (GNU libgomp) to sleep, not spin, between parallel regions.

    libgomp's threads busy-wait after every parallel region by default (OMP_WAIT_POLICY unset: a
    long spin, then sleep). Beside XLA's thread pool in one process, or on a machine with other
    work, the spinning threads take the cores that the next computation needs; measured on a loaded
    2-core machine, a PyTorch train step then took 0.6–7 s instead of a steady 0.2–0.3 s. libgomp
    reads the variable once, when it is loaded (``import torch``), so this must run before that.

    Sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already has a value (the user's wins)
    or torch is already imported (too late to matter: left alone). Returns the record keys
    ``omp_wait_policy`` (the value libgomp reads or has read; None if unset) and
    ``omp_wait_policy_source`` ('bench': set here; 'environment': the user's; 'unset': torch was
    imported before the bench could set it, libgomp's default applies).
    """
    import os

    if "OMP_WAIT_POLICY" in os.environ:
        source = "environment"
    elif "torch" in sys.modules:
        source = "unset"
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        source = "bench"
    return {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "omp_wait_policy_source": source}


def matmul_peak_flops(sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 5) -> dict:
    """This machine's float32 matmul peak (FLOP/s): the best of ``repeats`` timed n×n products for
    every n in ``sizes``, by XLA (``jnp.dot``) and by PyTorch (``torch.mm``, if installed); ``peak``
    is the larger. (Small products can beat large ones on a CPU: cache-resident operands.)"""
    import jax.numpy as jnp

    try:
        import torch
    except ImportError:  # pragma: no cover - torch is in the pinned environment
        torch = None
    dot = jax.jit(jnp.dot)
    best = {"xla": 0.0}
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(n), (n, n), jnp.float32)
        runs = {"xla": lambda: jax.block_until_ready(dot(a, a))}
        if torch is not None:
            t = torch.from_numpy(np.asarray(a))
            runs["torch"] = lambda: torch.mm(t, t)
        for name, run in runs.items():
            run()
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                best[name] = max(best.get(name, 0.0), 2.0 * n**3 / (time.perf_counter() - start))
    best["peak"] = max(best.values())
    return best


def devices_info() -> dict:
    """The devices a single-process benchmark runs on: platform, count and kind of the first."""
    devices = jax.devices()
    return {"platform": devices[0].platform, "count": len(devices), "kind": devices[0].device_kind}


def environment() -> dict:
    """Keys every benchmark record carries: jax version and devices."""
    return {"jax": jax.__version__, "devices": devices_info()}


def perturb(tree, rng: jax.Array, scale: float):
    """``tree`` with every floating leaf += scale·N(0, 1) (independent noise per leaf), so that a
    freshly initialised model (zero-initialised output heads) does non-trivial work."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(rng, len(leaves))
    out = [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype)
           if np.issubdtype(leaf.dtype, np.floating) else leaf
           for leaf, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _clean(value, where: str = "result"):
    """JSON-safe copy: numpy/JAX scalars and arrays to Python numbers/lists; NaN/inf rejected."""
    if isinstance(value, dict):
        return {str(k): _clean(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, where) for v in value]
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return _clean(np.asarray(value).tolist(), where)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"benchmark result {where}={value!r} is not finite")
    return value


def emit(record: dict, stream=None) -> str:
    """Writes ``record`` as ONE JSON line to stdout (or ``stream``) and returns the line.

    Raises ValueError for a non-finite number: a benchmark never publishes NaN as a result.
    """
    line = json.dumps(_clean(record), separators=(", ", ": "))
    stream = sys.stdout if stream is None else stream
    stream.write(line + "\n")
    stream.flush()
    return line


def round_sig(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (keeps the JSON line readable)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))
