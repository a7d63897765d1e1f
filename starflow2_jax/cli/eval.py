"""Evaluations of a trained workdir, each printed as one JSON object on stdout and written to
``--out`` when given:

- `starflow2 eval bpd --workdir DIR [--split test] [--num-samples K] [--out FILE.json]`: a flow's or a
  STARFlow2 run's bits/dim on a held-out split (STARFlow2: also the text NLL per token; see
  ``starflow2_jax.eval.bpd``);
- `starflow2 eval fae --workdir DIR [--split test] [--batch-size B] [--out FILE.json] [--grid FILE.png]`:
  an FAE's reconstruction errors (feature / pixel MSE, PSNR) on a held-out split, and optionally a PNG
  of originals / reconstructions (see ``starflow2_jax.eval.fae``)."""

from __future__ import annotations

import argparse
import json

from starflow2_jax.cli.common import add_distributed_arguments, fail, note, start_runtime

NAME = "eval"
HELP = ("evaluate a trained workdir (bpd: held-out bits/dim, STARFlow2 also text NLL; fae: FAE reconstruction "
        "errors; as JSON)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="evaluation", metavar="<evaluation>", title="evaluations", required=True)
    bpd = kinds.add_parser("bpd", help="bits/dim on a held-out split, as JSON",
                           description="bits/dim of the latest checkpoint on a split (uniform dequantisation)",
                           usage="starflow2 eval bpd --workdir DIR [--split SPLIT] [--num-samples K] "
                                 "[--out FILE.json] [--batch-size B] [--seed S] [--ema | --no-ema]")
    bpd.add_argument("--workdir", required=True, metavar="DIR", help="a training workdir (its latest checkpoint)")
    bpd.add_argument("--split", default=None, help="split to score (default: the run's data.eval_split, 'test')")
    bpd.add_argument("--num-samples", type=int, default=1, metavar="K",
                     help="dequantisation draws per image, averaged (default 1)")
    bpd.add_argument("--out", default=None, metavar="FILE.json", help="also write the JSON here (atomically)")
    bpd.add_argument("--batch-size", type=int, default=None, metavar="B", help="default: the run's data.batch_size")
    bpd.add_argument("--seed", type=int, default=0, metavar="S", help="dequantisation noise seed (default 0)")
    bpd.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                     help="use the EMA parameters when the run kept them (default: yes)")
    bpd.add_argument("--allow-frozen-change", action="store_true",
                     help="evaluate although a frozen part differs from the one the run recorded")
    bpd.add_argument("--no-verify", dest="verify", action="store_false",
                     help="skip checking the checkpoint against its checksum manifest (huge checkpoints)")
    bpd.add_argument("--verbose", action="store_true", help="keep the INFO logs of Orbax, grain and TFDS")
    add_distributed_arguments(bpd)

    fae = kinds.add_parser("fae", help="FAE reconstruction errors on a held-out split, as JSON",
                           description="feature / pixel reconstruction errors and PSNR of an FAE workdir's latest "
                                       "checkpoint on a split (every image once, raw parameters)",
                           usage="starflow2 eval fae --workdir DIR [--split SPLIT] [--batch-size B] "
                                 "[--out FILE.json] [--grid FILE.png] [--num-grid N]")
    fae.add_argument("--workdir", required=True, metavar="DIR", help="an FAE training workdir (any stage)")
    fae.add_argument("--split", default=None, help="split to score (default: the run's data.eval_split, 'test')")
    fae.add_argument("--batch-size", type=int, default=None, metavar="B", help="default: the run's data.batch_size")
    fae.add_argument("--out", default=None, metavar="FILE.json", help="also write the JSON here (atomically)")
    fae.add_argument("--grid", default=None, metavar="FILE.png",
                     help="write originals / reconstructions / pixel decoder on real features of the split's "
                          "first images here (atomically)")
    fae.add_argument("--num-grid", type=int, default=8, metavar="N", help="images in --grid (default 8)")
    fae.add_argument("--allow-frozen-change", action="store_true",
                     help="evaluate although the frozen DINOv2 differs from the one the run recorded")
    fae.add_argument("--no-verify", dest="verify", action="store_false",
                     help="skip checking the checkpoint against its checksum manifest (huge checkpoints)")
    fae.add_argument("--verbose", action="store_true", help="keep the INFO logs of Orbax, grain and TFDS")
    add_distributed_arguments(fae)


def run(args: argparse.Namespace) -> int:
    from starflow2_jax.cli.common import setup_logging

    setup_logging(args.verbose)
    import contextlib

    from starflow2_jax.parallel import DistributedError
    from starflow2_jax.train.restore import skip_verification

    try:
        start_runtime(args)
    except DistributedError as error:
        return fail(f"{NAME} {args.evaluation}", error)
    with skip_verification() if not args.verify else contextlib.nullcontext():
        return _run_fae(args) if args.evaluation == "fae" else _run_bpd(args)


def _run_bpd(args: argparse.Namespace) -> int:
    from starflow2_jax.eval.bpd import evaluate_bpd

    try:
        result = evaluate_bpd(args.workdir, split=args.split, num_samples=args.num_samples, seed=args.seed,
                              ema=args.ema, batch_size=args.batch_size, out=args.out,
                              allow_frozen_change=args.allow_frozen_change)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        return fail(f"{NAME} {args.evaluation}", error)
    print(json.dumps(result), flush=True)
    text = (f", text {result['text_nll_per_token']:.4f} nats/token over {result['text_tokens']} tokens"
            if result.get("text_nll_per_token") is not None else "")
    note(f"{result['bits_per_dim']:.4f} ± {result['std_error']:.4f} bits/dim on {result['num_images']} "
         f"{result['split']} images{text} (step {result['step']}, {'EMA' if result['ema'] else 'raw'} params)"
         + (f" → {args.out}" if args.out else ""))
    return 0


def _run_fae(args: argparse.Namespace) -> int:
    from starflow2_jax.eval.fae import evaluate_fae

    try:
        result = evaluate_fae(args.workdir, split=args.split, batch_size=args.batch_size, out=args.out,
                              grid=args.grid, num_grid=args.num_grid,
                              allow_frozen_change=args.allow_frozen_change)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        return fail(f"{NAME} {args.evaluation}", error)
    print(json.dumps(result), flush=True)
    written = [path for path in (args.out, args.grid) if path]
    note(f"FAE stage {result['stage']} on {result['num_images']} {result['split']} images (step {result['step']}): "
         f"pixel MSE {result['pixel_mse']:.5f} (PSNR {result['psnr']:.2f} dB), on real features "
         f"{result['pixel_mse_real']:.5f}, feature error {result['feature_mse']:.4f}"
         + (f" → {', '.join(written)}" if written else ""))
    return 0
