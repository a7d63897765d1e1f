"""`starflow2 generate --workdir DIR --mode t2i|i2t|interleaved|edit --out DIR [...]`: STARFlow2 generation.

Reads a trained starflow2 workdir (its latest checkpoint; ``starflow2 sample`` stays the command for
flows) and writes ``--out`` (a new or empty directory, written atomically): ``transcript.html`` (prompt
and outputs in order, images inline), ``image_{k}.png``, ``text.txt`` and ``summary.json`` (also
printed on stdout). See ``starflow2_jax.eval.generate``.
"""

from __future__ import annotations

import argparse
import json

from starflow2_jax.cli.common import fail, note

NAME = "generate"
HELP = "STARFlow2 generation from a trained workdir: text→image, image→text, interleaved, editing (HTML + PNG)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("starflow2 generate --workdir DIR --mode t2i|i2t|interleaved|edit --out DIR [--prompt TEXT ...] "
                    "[--image FILE ...] [--num N] [--guidance W] [--jacobi BLOCK,THRESHOLD,MAX_ITERS] [--seed S] "
                    "[--max-new-tokens T] [--temperature X] [--image-temperature T]")
    parser.add_argument("--workdir", required=True, metavar="DIR", help="a starflow2 training workdir")
    parser.add_argument("--mode", required=True, choices=("t2i", "i2t", "interleaved", "edit"))
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (absent or empty)")
    parser.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                        help="a prompt (repeat for several; default: the empty prompt)")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="an input image in the context (i2t, interleaved, edit; repeatable)")
    parser.add_argument("--num", type=int, default=1, metavar="N", help="samples per prompt (default 1)")
    parser.add_argument("--guidance", type=float, default=0.0, metavar="W", help="Gaussian guidance weight (0: off)")
    parser.add_argument("--jacobi", default=None, metavar="BLOCK,THRESHOLD,MAX_ITERS",
                        help="Jacobi iteration on the deep stream, e.g. 4,1e-3,32 (default: sequential)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="noise / sampling seed (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="T", help="text budget (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="X",
                        help="text sampling temperature; 0: greedy (default)")
    parser.add_argument("--image-temperature", type=float, default=None, metavar="T",
                        help="image noise scale T > 0 (each image step's noise is T·ε; t2i, interleaved, edit; "
                             "default: the run's sample.image_temperature)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="use the EMA parameters when the run kept them (default: yes)")
    parser.add_argument("--allow-frozen-change", action="store_true",
                        help="generate although a frozen part differs from the one the run recorded")
    parser.add_argument("--verbose", action="store_true", help="keep the INFO logs of Orbax and JAX")


def run(args: argparse.Namespace) -> int:
    from starflow2_jax.cli.common import setup_logging

    setup_logging(args.verbose)
    from starflow2_jax.eval.generate import generate

    try:
        summary = generate(args.workdir, args.out, mode=args.mode, prompts=args.prompt or [""], images=args.image,
                           num=args.num, guidance=args.guidance, jacobi=args.jacobi, seed=args.seed,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, ema=args.ema,
                           allow_frozen_change=args.allow_frozen_change, image_temperature=args.image_temperature)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        return fail(NAME, error)
    print(json.dumps(summary), flush=True)
    note(f"starflow2 generate: {summary['generated_images']} image(s), {len(summary['generated_texts'])} text(s) "
         f"in {summary['seconds']:.1f}s → {args.out}/transcript.html")
    return 0
