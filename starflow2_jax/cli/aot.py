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


def load_config(spec: str, extra: list[str]):
    """The validated config of ``spec`` with the ``--config.*`` overrides; unlike ``starflow2 train``
    its data and init paths are not checked (nothing is read: they may name another machine's disks)."""
    from starflow2_jax.cli.config_loader import ConfigError, load_config as load, split_override_args
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
    from starflow2_jax.parallel import aot

    try:
        aot.parse_topology(args.topology)
        if args.num_slices < 1:
            raise aot.AotError(f"--num-slices {args.num_slices}: expected an int >= 1")
        if not 0 < args.mfu <= 1:
            raise aot.AotError(f"--mfu {args.mfu}: expected a fraction in (0, 1]")
        config = load_config(args.config, list(getattr(args, "extra", [])))
        report = aot.aot_report(config, args.topology, num_slices=args.num_slices, mfu=args.mfu,
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
