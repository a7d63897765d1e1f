"""`starflow2 aot --config FILE[:PRESET] --topology v5p:2x2x1 [--num-slices K] [--mfu F] [--json]`:
does this config fit on that TPU slice, and how fast would a step be?

Compiles the config's real train step (and its sample-grid step) for the TPU topology on this
machine, from abstract shapes (``starflow2_jax.parallel.aot``; needs libtpu: the ``tpu`` extra), and
prints per device the argument / output / temporary memory, the compiler's peak memory against the
chip's HBM, the FLOPs per step and the step time implied at ``--mfu``. ``--config.a.b=VALUE``
overrides fields (e.g. ``--config.mesh.fsdp=-1 --config.model.flow.remat=full``). Exit status: 0
when every step fits, 1 when one does not (the numbers are still printed), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Callable, NamedTuple, Sequence

from starflow2_jax.cli.common import fail, note

NAME = "aot"
HELP = "compile a config's train step for a TPU topology ahead of time: memory per chip, FLOPs, step time"
EXTRA_ARGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("starflow2 aot --config FILE[:PRESET] --topology GEN:AxBxC [--num-slices K] [--mfu F] "
                    "[--no-sample] [--json] [--config.FIELD=VALUE ...]")
    parser.add_argument("--config", required=True, metavar="FILE[:PRESET]", help="a training config")
    parser.add_argument("--topology", required=True, metavar="GEN:AxBxC",
                        help="a TPU slice as libtpu names it: v5p:2x2x1, v5p:4x4x4, v6e:8x8, v5e:4x4, v4:2x2x2")
    parser.add_argument("--num-slices", type=int, default=1, metavar="K",
                        help="K slices (multi-slice over DCN; mesh.data must be a multiple of K)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation for the step-time estimate")
    parser.add_argument("--no-sample", action="store_true", help="compile the train step only")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line on stdout")


class Built(NamedTuple):
    """What ``build_train_step`` made: the resolved config, mesh, task, shardings, step, abstract batch."""

    config: Any
    mesh: Any
    task: Any
    shardings: Any
    step: Callable
    batch: dict


def _raw_batch(config, task, batch_size: int) -> dict:
    """A zero batch in the data pipeline's format: the task's ``example_batch`` hook (every family's
    task has one: images and labels for flows and the FAE, packed rows for starflow2)."""
    from starflow2_jax.parallel.aot import AotError

    if getattr(task, "example_batch", None) is None:
        raise AotError(f"model.family={config.model.family!r}: its task has no example_batch(batch_size) hook, so "
                       f"the batch's shapes are unknown")
    return task.example_batch(batch_size)


def abstract_batch(config, task, mesh) -> dict:
    """``ShapeDtypeStruct``s (global batch ``data.batch_size``, split over ``('data', 'fsdp')``) of
    ``task.prepare_batch`` output, from a zero batch of 1 row (only shapes and dtypes are kept)."""
    import jax
    import numpy as np

    from starflow2_jax import parallel
    from starflow2_jax.parallel.aot import AotError

    batch_size = int(config.data.batch_size)
    shards = parallel.axes_size(mesh, parallel.BATCH_AXES)
    if batch_size % shards:
        raise AotError(f"data.batch_size={batch_size} is not divisible by the {shards} batch shards "
                       f"(mesh data x fsdp of {dict(mesh.shape)})")
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
    from starflow2_jax.train.families import make_task

    config = resolve_config(config)
    mesh = parallel.make_mesh(dict(config.mesh), devices)
    task = make_task(config)
    optimizer, _ = make_optimizer(config.optim, int(config.train.steps), trainable=task.trainable)
    shardings = state_shardings(task, optimizer, mesh, ema=float(config.optim.ema_decay) > 0)
    step = make_train_step(task, optimizer, mesh, shardings, config)
    return Built(config, mesh, task, shardings, step, abstract_batch(config, task, mesh))


def stages(built: Built, sample: bool) -> list:
    """The train step and, with ``sample`` and when the task draws sample grids, the grid sampler at
    the config's largest guidance weight, as ``parallel.aot.Stage``s."""
    import jax
    import numpy as np

    from starflow2_jax.parallel.aot import Stage

    state, extra = built.shardings.abstract_state, built.shardings.abstract_extra
    out = [Stage("train_step", built.step.jitted, (state, extra, built.batch), built.task.rules)]
    if sample and hasattr(built.task, "sample_grid") and getattr(built.task, "jittable_sample_grid", True):
        guidance = max(float(g) for g in built.config.sample.guidance)
        task = built.task

        def sample_fn(params, extra_vars, key_data):
            return task.sample_grid(params, extra_vars, jax.random.wrap_key_data(key_data), guidance=guidance).images

        sampler = jax.jit(sample_fn, in_shardings=(built.shardings.state.params, built.shardings.extra, None))
        out.append(Stage("sample_step", sampler, (state.params, extra, jax.ShapeDtypeStruct((2,), np.uint32)),
                         task.rules))
    return out


def aot_report(config, topology: str, *, num_slices: int = 1, mfu: float = 0.4, sample: bool = True,
               log: Callable[[str], None] = lambda _: None) -> dict:
    """Compiles ``config``'s train step (and sample-grid step) for ``num_slices`` x ``topology``;
    returns the JSON-able report (``parallel.aot`` describes the numbers; ``'fits'`` False when a
    step's peak memory exceeds a device's HBM)."""
    import jax

    from starflow2_jax.parallel import aot

    devices = aot.topology_devices(topology, num_slices)
    chip = aot.topology_chip(topology, devices)
    built = build_train_step(config, devices)
    guidance = max(float(g) for g in built.config.sample.guidance)
    report = dict(topology=topology, num_slices=num_slices, devices=len(devices),
                  chips=len(devices) // chip.devices_per_chip, device_kind=chip.device_kind,
                  device_hbm_bytes=chip.device_hbm_bytes, device_peak_bf16_flops=chip.device_peak_flops, mfu=mfu,
                  mesh=dict(built.mesh.shape), batch_size=int(built.config.data.batch_size),
                  params=sum(math.prod(x.shape) for x in jax.tree.leaves(built.shardings.abstract_state.params)),
                  remat=_remat(built.config), sample_guidance=guidance, sample_step=None,
                  flops_method="analytic: 2*M*N*K per dot_general of the jaxpr, scan bodies x trip count")
    report.update(aot.compile_stages(stages(built, sample), built.mesh, chip, mfu=mfu, log=log))
    return report


def _remat(config) -> str:
    """The remat policy of the family's section (``model.<family>.remat``)."""
    section = config.model.get(config.model.family)
    return str(section.get("remat", "none")) if section is not None else "none"


def load_config(spec: str, extra: list[str]):
    """The validated config of ``spec`` with the ``--config.*`` overrides; unlike ``starflow2 train``
    its data and init paths are not checked (nothing is read: they may name another machine's disks)."""
    from starflow2_jax.config_files import ConfigError, load_config as load, split_override_args
    from starflow2_jax.train.config_schema import validate

    overrides, rest = split_override_args(extra)
    if rest:
        raise ConfigError(f"unrecognized arguments {rest} (overrides look like --config.FIELD=VALUE)")
    config = load(spec, overrides)
    try:
        validate(config)
    except ValueError as error:
        raise ConfigError(f"invalid config {spec}: {error}") from error
    return config


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # before libtpu loads: concurrent compiles
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server here: don't wait for one
    from starflow2_jax.parallel import aot

    try:
        aot.parse_topology(args.topology)
        if args.num_slices < 1:
            raise aot.AotError(f"--num-slices {args.num_slices}: expected an int >= 1")
        if not 0 < args.mfu <= 1:
            raise aot.AotError(f"--mfu {args.mfu}: expected a fraction in (0, 1]")
        config = load_config(args.config, list(getattr(args, "extra", [])))
        report = aot_report(config, args.topology, num_slices=args.num_slices, mfu=args.mfu,
                                sample=not args.no_sample, log=note)
    except ValueError as error:  # ConfigError, AotError and mesh errors are ValueErrors naming the value
        return fail(NAME, error)
    report["config"] = args.config
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        print(aot.format_report(report), flush=True)
    if not report["fits"]:
        note(f"starflow2 aot: {args.config} does not fit on {args.num_slices} x {args.topology} "
             f"(peak memory above HBM)")
        return 1
    return 0
