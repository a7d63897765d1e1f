"""Ahead-of-time fit checks: compile a training config's real train step (and sampling step) for a TPU
topology on this machine, from abstract shapes, and report memory, FLOPs and the implied step time.

    starflow2 aot --config FILE[:PRESET] --topology v5p:2x2x1 [--num-slices K] [--mfu 0.4] [--json]

How: with ``libtpu`` installed (the ``tpu`` extra), ``jax.experimental.topologies.get_topology_desc``
describes a TPU slice (``v5p:4x4x4``; ``num_slices`` > 1 for multi-slice) without any TPU present.
The train state is built exactly as ``train.loop`` builds it (``train.step.state_shardings`` →
abstract ``ShapeDtypeStruct``s with their ``NamedSharding``s on a ``parallel.make_mesh`` mesh of the
topology's devices — multi-slice: the ``data`` axis spans the slices over DCN), the batch's shapes
come from the task's own ``prepare_batch`` on a zero batch, and ``make_train_step(...).jitted`` is
lowered and compiled. Nothing of the model's size is allocated.

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
``ALLOW_MULTIPLE_LIBTPU_LOAD=1``; ``topology_devices`` sets it when unset.
"""

from __future__ import annotations

import dataclasses
import math
import os
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
    on this machine (no TPU needed). Raises AotError when libtpu is missing or rejects the name."""
    parse_topology(topology)
    if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
        raise AotError(f"--num-slices {num_slices!r}: expected an int >= 1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server here: don't wait for it
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

class Built(NamedTuple):
    """What ``build_train_step`` made: the resolved config, mesh, task, shardings, step, abstract batch."""

    config: Any
    mesh: Any
    task: Any
    shardings: Any
    step: Callable
    batch: dict


def _raw_batch(config, task, batch_size: int) -> dict:
    """A zero batch in the data pipeline's format (``image`` (B, H, W, C), ``label``, ``caption``)."""
    if getattr(task, "latent_space", None) is not None:
        shape = tuple(task.latent_space.image_shape)
    elif config.model.family == "fae":
        size = int(config.model.fae.image_size)
        shape = (size, size, 3)
    else:
        fc = task.flow_config
        shape = (*tuple(fc.image_size), fc.in_channels) if hasattr(fc, "image_size") else None
        if shape is None:
            raise AotError(f"cannot tell the image shape of model.family={config.model.family!r}")
    return {"image": np.zeros((batch_size, *shape), np.float32), "label": np.zeros((batch_size,), np.int32),
            "caption": np.asarray([""] * batch_size, dtype=object)}


def abstract_batch(config, task, mesh) -> dict:
    """``ShapeDtypeStruct``s (global batch ``data.batch_size``, split over ``('data', 'fsdp')``) of
    ``task.prepare_batch`` output, from a zero batch of 1 row (only shapes and dtypes are kept)."""
    from starflow2_jax import parallel

    batch_size = int(config.data.batch_size)
    shards = parallel.axes_size(mesh, parallel.BATCH_AXES)
    if batch_size % shards:
        raise AotError(f"data.batch_size={batch_size} is not divisible by the {shards} batch shards "
                       f"(mesh data × fsdp = {dict(mesh.shape)})")
    one = task.prepare_batch(_raw_batch(config, task, 1))
    return {name: jax.ShapeDtypeStruct((batch_size, *np.shape(x)[1:]), np.asarray(x).dtype,
                                       sharding=parallel.batch_sharding(mesh, np.ndim(x)))
            for name, x in one.items()}


def build_train_step(config, devices: Sequence) -> Built:
    """The train step ``train.loop`` would run for ``config`` on ``devices`` (any devices, e.g. a TPU
    topology's), with the abstract state and batch to lower it with."""
    from starflow2_jax import parallel
    from starflow2_jax.train.loop import resolve_config
    from starflow2_jax.train.optim import make_optimizer
    from starflow2_jax.train.step import make_train_step, state_shardings
    from starflow2_jax.train.tasks import task_from_config

    config = resolve_config(config)
    mesh = parallel.make_mesh(dict(config.mesh), devices)
    task = task_from_config(config)
    optimizer, _ = make_optimizer(config.optim, int(config.train.steps), trainable=getattr(task, "trainable", None))
    shardings = state_shardings(task, optimizer, mesh, ema=float(config.optim.ema_decay) > 0)
    step = make_train_step(task, optimizer, mesh, shardings, config)
    return Built(config, mesh, task, shardings, step, abstract_batch(config, task, mesh))


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


def aot_report(config, topology: str, *, num_slices: int = 1, mfu: float = 0.4, sample: bool = True,
               log: Callable[[str], None] = lambda _: None) -> dict:
    """Compiles ``config``'s train step (and, with ``sample``, its sample-grid step when the task has
    one) for ``num_slices`` × ``topology``; returns the JSON-able report (see the module docstring).

    ``report['fits']`` is False when any compiled step's peak memory exceeds a device's HBM.
    """
    if not 0 < mfu <= 1:
        raise AotError(f"--mfu {mfu}: expected a fraction in (0, 1]")
    from starflow2_jax import parallel

    generation, dims = parse_topology(topology)
    chip = CHIPS[generation]
    devices = topology_devices(topology, num_slices)
    kinds = {d.device_kind for d in devices}
    if kinds != {chip.device_kind}:
        raise AotError(f"--topology {topology!r}: libtpu describes {sorted(kinds)} devices, the chip table expects "
                       f"{chip.device_kind!r}")
    built = build_train_step(config, devices)
    mesh = built.mesh
    report = dict(topology=topology, num_slices=num_slices, devices=len(devices),
                  chips=len(devices) // chip.devices_per_chip, device_kind=chip.device_kind,
                  device_hbm_bytes=chip.device_hbm_bytes, device_peak_bf16_flops=chip.device_peak_flops, mfu=mfu,
                  mesh=dict(mesh.shape), batch_size=int(built.config.data.batch_size),
                  params=sum(math.prod(x.shape) for x in jax.tree.leaves(built.shardings.abstract_state.params)),
                  flops_method="analytic: 2*M*N*K per dot_general of the jaxpr, scan bodies x trip count")
    state, extra = built.shardings.abstract_state, built.shardings.abstract_extra
    log(f"compiling the train step for {num_slices} x {topology} ({len(devices)} devices, mesh {dict(mesh.shape)})")
    args = (state, extra, built.batch)
    with parallel.activation_rules(mesh, built.task.rules):
        flops = matmul_flops(built.step.jitted, *args)
        report["train_step"] = _compile_stage(built.step.jitted, args, flops, len(devices), chip, mfu)
    report["sample_step"] = None
    if sample and hasattr(built.task, "sample_grid"):
        guidance = max(float(g) for g in built.config.sample.guidance)
        task = built.task

        def sample_fn(params, extra_vars, key_data):
            return task.sample_grid(params, extra_vars, jax.random.wrap_key_data(key_data), guidance=guidance).images

        sampler = jax.jit(sample_fn, in_shardings=(built.shardings.state.params, built.shardings.extra, None))
        key = jax.ShapeDtypeStruct((2,), np.uint32)
        log(f"compiling the sample-grid step (guidance {guidance:g})")
        args = (state.params, extra, key)
        with parallel.activation_rules(mesh, task.rules):
            flops = matmul_flops(sampler, *args)
            report["sample_step"] = dict(_compile_stage(sampler, args, flops, len(devices), chip, mfu),
                                         guidance=guidance)
    report["fits"] = all(r["fits"] is not False for r in (report["train_step"], report["sample_step"]) if r)
    return report


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
             f"global batch {report['batch_size']}, {report['params'] / 1e6:.2f}M trainable params"]
    for name in ("train_step", "sample_step"):
        r = report.get(name)
        if not r:
            continue
        m = r["memory"]
        verdict = {True: "fits", False: "DOES NOT FIT", None: "unknown"}[r["fits"]]
        lines += [f"{name} (compiled in {r['compile_seconds']:.1f}s), per device:"]
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
