"""Ahead-of-time fit checks: compile a training config's real train step (and sampling step) for a TPU
topology on this machine, from abstract shapes, and report memory, FLOPs and the implied step time.

    starflow2 aot --config FILE[:PRESET] --topology v5p:2x2x1 [--num-slices K] [--mfu 0.4] [--json]

How: with ``libtpu`` installed (the ``tpu`` extra), ``jax.experimental.topologies.get_topology_desc``
describes a TPU slice (``v5p:4x4x4``; ``num_slices`` > 1 for multi-slice) without any TPU present
(``topology_devices``). ``starflow2 aot`` builds the train state exactly as ``train.loop`` does
(``train.step.state_shardings`` → abstract ``ShapeDtypeStruct``s with their ``NamedSharding``s on a
``parallel.make_mesh`` mesh of the topology's devices — multi-slice: the ``data`` axis spans the
slices over DCN), takes the batch's shapes from the task's own ``prepare_batch`` on a zero batch, and
hands ``make_train_step(...).jitted`` (and the sample-grid sampler) to ``compile_stages``, which
lowers and compiles them. Nothing of the model's size is allocated.

Numbers (per device; a TPU v4 chip shows as 2 devices, v5p/v5e/v6e chips as 1):
- ``argument`` / ``output`` / ``temp`` bytes and the compiler's ``peak_memory_in_bytes`` from
  ``compiled.memory_analysis()``; the fit check compares the peak (argument + temp overstates it:
  donated and dead buffers are reused) with the device's HBM from ``CHIPS``.
- FLOPs per step: ``matmul_flops``, counted *analytically* from the traced jaxpr (2·M·N·K over every
  ``dot_general``, scan bodies × their trip count, rematerialised forward passes included, so these
  are executed FLOPs; elementwise work left out), divided evenly over the devices. XLA's
  ``cost_analysis()['flops']`` is reported beside it as ``xla_flops`` but counts a loop body once,
  so with scanned layer stacks it under-counts by about the number of layers.
- Step time at ``mfu``: ``matmul FLOPs per device / (mfu × the device's peak bf16 FLOP/s)``.

Two libtpu loads in one machine (two concurrent compiles, pytest-xdist workers) need
``ALLOW_MULTIPLE_LIBTPU_LOAD=1``; ``starflow2 aot`` sets it (and ``TPU_SKIP_MDS_QUERY=1``) when unset.
The training-config side (building the train state, batch and sampler the loop would use) lives in
``cli/aot.py``: this module depends on nothing above ``parallel``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.extend.core as jex_core
import numpy as np

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: HBM bytes and dense bf16 FLOP/s per *chip*, the JAX devices one chip shows
    as, and the ``device_kind`` libtpu reports for it."""

    hbm_bytes: int
    peak_bf16_flops: float
    devices_per_chip: int
    device_kind: str

    @property
    def device_hbm_bytes(self) -> int:
        return self.hbm_bytes // self.devices_per_chip

    @property
    def device_peak_flops(self) -> float:
        return self.peak_bf16_flops / self.devices_per_chip


# Google Cloud's published per-chip figures (cloud.google.com/tpu/docs/<generation>).
CHIPS: dict[str, Chip] = {
    "v4": Chip(32 * GIB, 275e12, 2, "TPU v4"),
    "v5e": Chip(16 * GIB, 197e12, 1, "TPU v5 lite"),
    "v5p": Chip(95 * GIB, 459e12, 1, "TPU v5"),
    "v6e": Chip(32 * GIB, 918e12, 1, "TPU v6 lite"),
}


class AotError(ValueError):
    """A topology, config or mesh the ahead-of-time compile cannot use; the message names it."""


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
    """``'v5p:2x2x1'`` → ``('v5p', (2, 2, 1))``; raises AotError for a malformed or unknown name."""
    generation, sep, dims = str(topology).partition(":")
    if not sep or generation not in CHIPS:
        raise AotError(f"--topology {topology!r}: expected GENERATION:AxBxC with GENERATION one of "
                       f"{sorted(CHIPS)} (e.g. v5p:2x2x1, v6e:4x4)")
    try:
        sizes = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        sizes = ()
    if not sizes or any(s < 1 for s in sizes):
        raise AotError(f"--topology {topology!r}: the shape {dims!r} is not AxB or AxBxC with positive integers")
    return generation, sizes


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """The TPU devices of ``num_slices`` slices of ``topology`` (``'v5p:4x4x4'``), described by libtpu
    on this machine (no TPU needed). Raises AotError when libtpu is missing or rejects the name.
    Set ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` before (``starflow2 aot`` does) when another process may
    have libtpu loaded."""
    parse_topology(topology)
    if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
        raise AotError(f"--num-slices {num_slices!r}: expected an int >= 1")
    try:
        import libtpu  # noqa: F401
    except ImportError as error:
        raise AotError("ahead-of-time TPU compiles need libtpu: pip install 'starflow2-jax[tpu]' "
                       "(jax[tpu]==0.10.2)") from error
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=num_slices)
    except Exception as error:  # libtpu raises JaxRuntimeError INVALID_ARGUMENT for unknown names
        raise AotError(f"--topology {topology!r}: libtpu does not know this topology ({error})") from error
    return list(desc.devices)


# ---- FLOPs and compiler analyses -----------------------------------------------------------------

def _subjaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _subjaxprs(item)


def _jaxpr_matmul_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in contract]))
            continue
        inner = [_jaxpr_matmul_flops(sub) for value in eqn.params.values() for sub in _subjaxprs(value)]
        if eqn.primitive.name == "cond":
            total += max(inner, default=0)  # one branch runs
        else:  # scan: the body runs `length` times (a while loop's trip count is unknown: counted once)
            total += int(eqn.params.get("length", 1)) * sum(inner) if eqn.primitive.name == "scan" else sum(inner)
    return total


def matmul_flops(fn: Callable, *args, **kwargs) -> int:
    """2·M·N·K summed over every ``dot_general`` of ``fn(*args, **kwargs)``'s jaxpr, scan bodies ×
    their length (arrays or ``ShapeDtypeStruct``s; nothing runs). Global (whole-batch) FLOPs."""
    return _jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "alias_size_in_bytes", "peak_memory_in_bytes")


def compiled_costs(compiled) -> dict:
    """``{'xla_flops', 'xla_bytes_accessed', 'memory': {MEMORY_FIELDS...}}`` of a compiled
    executable (``cost_analysis`` / ``memory_analysis``; None where the backend reports nothing)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    cost = cost or {}
    result = {"xla_flops": cost.get("flops"), "xla_bytes_accessed": cost.get("bytes accessed")}
    memory = compiled.memory_analysis()
    result["memory"] = None if memory is None else {f: getattr(memory, f, None) for f in MEMORY_FIELDS}
    return result


def compile_from_shapes(jitted, *args, **kwargs) -> tuple[Any, float]:
    """``(jitted.lower(*args, **kwargs).compile(), seconds)``: args may be ``ShapeDtypeStruct``s."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


# ---- the train and sampling steps of a training config ---------------------------------------------

def argument_bytes_per_device(*args) -> int:
    """Bytes one device holds of ``args`` (``ShapeDtypeStruct``s with shardings; unsharded leaves
    count whole): the sum of every leaf's shard."""
    total = 0
    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _compile_stage(jitted, args: tuple, flops: int, num_devices: int, chip: Chip, mfu: float) -> dict:
    """Compiles ``jitted(*args)``; the stage record. When the TPU compiler itself refuses the program
    (RESOURCE_EXHAUSTED: it does not fit), the record keeps the compiler's message and the arguments'
    bytes per device (from the shardings) instead of the memory analysis, with ``fits`` False."""
    per_device = flops / num_devices
    record = dict(matmul_flops=flops, matmul_flops_per_device=per_device, hbm_bytes=chip.device_hbm_bytes,
                  step_seconds_at_mfu=per_device / (mfu * chip.device_peak_flops))
    start = time.perf_counter()
    try:
        compiled, seconds = compile_from_shapes(jitted, *args)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return dict(record, compile_seconds=time.perf_counter() - start, xla_flops=None, fits=False,
                    compiler_error=str(error).strip().splitlines()[0],
                    memory={"argument_size_in_bytes": argument_bytes_per_device(*args)})
    costs = compiled_costs(compiled)
    memory = costs["memory"] or {}
    peak = memory.get("peak_memory_in_bytes")
    return dict(record, compile_seconds=seconds, xla_flops=costs["xla_flops"], memory=memory,
                fits=None if peak is None else bool(peak <= chip.device_hbm_bytes))


class Stage(NamedTuple):
    """One program to compile: ``name`` (a report key), the ``jax.jit`` object, its abstract
    arguments, and the Flax rules table its activation constraints need (traced with the mesh)."""

    name: str
    jitted: Any
    args: tuple
    rules: tuple


def topology_chip(topology: str, devices: Sequence) -> Chip:
    """``CHIPS`` entry of ``topology``'s generation, checked against the ``device_kind`` libtpu gave."""
    chip = CHIPS[parse_topology(topology)[0]]
    kinds = {d.device_kind for d in devices}
    if kinds != {chip.device_kind}:
        raise AotError(f"--topology {topology!r}: libtpu describes {sorted(kinds)} devices, the chip table expects "
                       f"{chip.device_kind!r}")
    return chip


def compile_stages(stages: Sequence[Stage], mesh, chip: Chip, *, mfu: float = 0.4,
                   log: Callable[[str], None] = lambda _: None) -> dict:
    """``{stage.name: record}`` for every stage compiled on ``mesh`` (see ``_compile_stage``) plus
    ``'fits'``: False when any stage's peak memory (or the compiler) says it does not fit."""
    if not 0 < mfu <= 1:
        raise AotError(f"--mfu {mfu}: expected a fraction in (0, 1]")
    from starflow2_jax.parallel.sharding import activation_rules

    out = {}
    for stage in stages:
        log(f"compiling {stage.name} for {mesh.devices.size} devices, mesh {dict(mesh.shape)}")
        with activation_rules(mesh, stage.rules):
            flops = matmul_flops(stage.jitted, *stage.args)
            out[stage.name] = _compile_stage(stage.jitted, stage.args, flops, mesh.devices.size, chip, mfu)
    out["fits"] = all(record["fits"] is not False for record in out.values())
    return out


def _gib(n) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (``'1.50 GiB'``, ``'12.0 KiB'``)."""
    if n is None:
        return "n/a"
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _seconds(s: float) -> str:
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} µs"


def format_report(report: dict) -> str:
    """The human-readable table ``starflow2 aot`` prints."""
    lines = [f"{report['num_slices']} x {report['topology']}: {report['devices']} devices "
             f"({report['device_kind']}, {_gib(report['device_hbm_bytes'])} HBM and "
             f"{report['device_peak_bf16_flops'] / 1e12:.1f} bf16 TFLOP/s each), mesh {report['mesh']}, "
             f"global batch {report['batch_size']}, {report['params'] / 1e6:.2f}M trainable params"
             + (f", remat {report['remat']!r}" if report.get("remat") else "")]
    for name in ("train_step", "sample_step"):
        r = report.get(name)
        if not r:
            continue
        m = r["memory"]
        verdict = {True: "fits", False: "DOES NOT FIT", None: "unknown"}[r["fits"]]
        sampling = name == "sample_step" and "sample_guidance" in report
        what = f" at guidance {report['sample_guidance']:g}" if sampling else ""
        lines += [f"{name}{what} (compiled in {r['compile_seconds']:.1f}s), per device:"]
        if r.get("compiler_error"):
            lines += [f"  the TPU compiler refused it: {r['compiler_error']}",
                      f"  arguments {_gib(m.get('argument_size_in_bytes'))} of {_gib(r['hbm_bytes'])} HBM: {verdict}"]
        else:
            lines += [
                f"  argument {_gib(m.get('argument_size_in_bytes'))}, output {_gib(m.get('output_size_in_bytes'))}, "
                f"temp {_gib(m.get('temp_size_in_bytes'))}, alias {_gib(m.get('alias_size_in_bytes'))}",
                f"  peak {_gib(m.get('peak_memory_in_bytes'))} of {_gib(r['hbm_bytes'])} HBM: {verdict}"]
        lines += [f"  matmul FLOPs {r['matmul_flops_per_device']:.4g} per device ({r['matmul_flops']:.4g} in all; "
                  f"XLA cost analysis, loop bodies once: {r['xla_flops']})",
                  f"  step time at {report['mfu']:.0%} MFU: {_seconds(r['step_seconds_at_mfu'])}"]
    lines.append(f"FLOPs: {report['flops_method']}")
    return "\n".join(lines)


def chip_table() -> str:
    """The known chips as a Markdown table (per chip)."""
    rows = ["| chip | device_kind | HBM per chip | peak bf16 TFLOP/s per chip | JAX devices per chip |",
            "|---|---|---|---|---|"]
    rows += [f"| {name} | {c.device_kind} | {c.hbm_bytes // GIB} GiB | {c.peak_bf16_flops / 1e12:g} | "
             f"{c.devices_per_chip} |" for name, c in CHIPS.items()]
    return "\n".join(rows)
