"""`starflow2 sample --workdir DIR --out FILE.png [...]`: a sample grid from a trained workdir (a flow, or
STARFlow2: text → image for the config's prompts at each of its guidance weights).

Writes FILE.png (the grid), FILE.npz (the samples as uint8 images and float arrays with their
labels / prompts and the guidance) and FILE.json (a summary, also printed on stdout); see
``starflow2_jax.train.generate``. Uses the EMA parameters of the latest complete checkpoint when
the run kept them.
"""

from __future__ import annotations

import argparse
import json

from starflow2_jax.cli.common import add_distributed_arguments, fail, note, start_runtime

NAME = "sample"
HELP = "draw a sample grid (PNG + .npz + JSON) from a trained workdir"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("starflow2 sample --workdir DIR --out FILE.png [--label N | --prompt TEXT] [--guidance W] "
                    "[--jacobi BLOCK,THRESHOLD,MAX_ITERS] [--num N] [--seed S] [--batch-size B] [--ema | --no-ema]")
    parser.add_argument("--workdir", required=True, metavar="DIR", help="a training workdir (its latest checkpoint)")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="the grid; .npz and .json go beside it")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--label", type=int, default=None, metavar="N",
                       help="one row of class N (label-conditioned models; default: a row per class)")
    which.add_argument("--prompt", default=None, metavar="TEXT",
                       help="one row for this caption (caption-conditioned flows, STARFlow2; default: the config's "
                            "prompts)")
    parser.add_argument("--guidance", type=float, default=None, metavar="W",
                        help="guidance weight (default: 0 for flows; each of the run's sample.guidance for STARFlow2)")
    parser.add_argument("--jacobi", default=None, metavar="BLOCK,THRESHOLD,MAX_ITERS",
                        help="Jacobi sampling, e.g. 16,1e-3,32, or 'off' (default: the run's sample.jacobi)")
    parser.add_argument("--num", type=int, default=None, metavar="N",
                        help="samples per row (default sample.per_class; unconditional: the total)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=256, metavar="B", help="samples per sampler call")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="use the EMA parameters when the run kept them (default: yes)")
    parser.add_argument("--allow-frozen-change", action="store_true",
                        help="sample although a frozen part (e.g. the FAE) differs from the one the run recorded")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking the checkpoint against its checksum manifest (huge checkpoints)")
    parser.add_argument("--verbose", action="store_true", help="keep the INFO logs of Orbax and JAX")
    add_distributed_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from starflow2_jax.cli.common import setup_logging

    setup_logging(args.verbose)
    from starflow2_jax.parallel import DistributedError

    try:
        start_runtime(args)
    except DistributedError as error:
        return fail(NAME, error)
    from starflow2_jax.train.generate import sample_from_workdir, summary_line

    import contextlib

    from starflow2_jax.train.restore import skip_verification

    jacobi = "config" if args.jacobi is None else args.jacobi
    try:
        with skip_verification() if not args.verify else contextlib.nullcontext():
            summary = sample_from_workdir(args.workdir, args.out, label=args.label, prompt=args.prompt,
                                          guidance=args.guidance, jacobi=jacobi, num=args.num, seed=args.seed,
                                          ema=args.ema, batch_size=args.batch_size,
                                          allow_frozen_change=args.allow_frozen_change)
    except (ValueError, FileNotFoundError) as error:
        return fail(NAME, error)
    print(json.dumps(summary), flush=True)
    note(summary_line(summary))
    if summary["nonfinite_samples"]:
        note(f"warning: {summary['nonfinite_samples']} samples are not finite (shown black in the grid)")
    return 0
