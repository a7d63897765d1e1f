"""`starflow2 convert`: checkpoint conversion.

    starflow2 convert from-hf --model-dir Qwen2.5-VL-7B-Instruct --out ckpt/qwen [--dtype bfloat16]
        [--mesh fsdp=-1]
    starflow2 convert to-hf --workdir RUN --out DIR

``to-hf`` exports an 'lm' run (configs/lm.py: the digits demo's "pretrained VLM") as a Hugging Face
Qwen2.5-VL directory with its tokenizer (``train.lm_export``), which
``model.starflow2.vlm_checkpoint`` may name; the output appears only when complete.

``from-hf`` reads a Hugging Face Qwen2.5-VL directory (``convert.load_hf_qwen2_5_vl``) and writes an
Orbax checkpoint of the params with the config beside them (``vlm.save_checkpoint``; read back with
``vlm.load_checkpoint``). The output appears only when complete (Orbax's finalising rename); an
existing non-empty ``--out`` is refused. Prints a JSON summary on stdout. A bad argument or input (a
missing directory, another architecture, a damaged safetensors file) is one line on stderr naming
it, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from starflow2_jax.cli.common import fail

NAME = "convert"
HELP = ("convert checkpoints (from-hf: Hugging Face Qwen2.5-VL directory -> Orbax checkpoint; to-hf: an 'lm' run "
        "-> Hugging Face Qwen2.5-VL directory)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="convert_command", metavar="<conversion>", required=True)
    hf = sub.add_parser("from-hf", help="Hugging Face Qwen2.5-VL (config.json + safetensors) -> Orbax checkpoint",
                        description="Hugging Face Qwen2.5-VL (config.json + safetensors) -> Orbax checkpoint")
    hf.add_argument("--model-dir", required=True, help="directory with config.json and *.safetensors")
    hf.add_argument("--out", required=True, help="checkpoint directory to create (must not exist or be empty)")
    hf.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="stored parameter dtype and compute dtype (default float32)")
    hf.add_argument("--mesh", default=None,
                    help="place parameters sharded while converting, e.g. 'fsdp=-1' or 'data=1,fsdp=4,tensor=2' "
                         "(default: one device)")
    to_hf = sub.add_parser("to-hf", help="an 'lm' run (configs/lm.py) -> Hugging Face Qwen2.5-VL directory + tokenizer",
                           description="an 'lm' run (configs/lm.py) -> Hugging Face Qwen2.5-VL directory + tokenizer")
    to_hf.add_argument("--workdir", required=True, help="the 'lm' run (its latest complete step is exported)")
    to_hf.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=-1,tensor=2' → {'fsdp': -1, 'tensor': 2}; ValueError naming a malformed entry."""
    shape = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, size = entry.partition("=")
        try:
            shape[name.strip()] = int(size)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--mesh entry {entry!r}: expected AXIS=SIZE, e.g. fsdp=-1")
    return shape


def _from_hf(args: argparse.Namespace) -> int:
    where = "convert from-hf"
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return fail(where, f"--out {str(out)!r} exists and is not an empty directory; expected a new or empty one")
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        return fail(where, f"--model-dir {args.model_dir!r}: no such directory (expected a Hugging Face "
                           f"Qwen2.5-VL directory with config.json and *.safetensors)")
    from starflow2_jax import convert, parallel, vlm

    try:
        mesh = parallel.make_mesh(parse_mesh(args.mesh)) if args.mesh else None
        config, params = convert.load_hf_qwen2_5_vl(args.model_dir, args.dtype, mesh=mesh)
    except (ValueError, KeyError, FileNotFoundError) as error:
        text = error.args[0] if isinstance(error, KeyError) and error.args else error
        return fail(where, f"--model-dir {args.model_dir!r}: {text}")
    path = vlm.save_checkpoint(out, config, params)
    import jax
    leaves = jax.tree_util.tree_leaves(params)
    summary = dict(out=str(path), model_dir=str(args.model_dir), dtype=args.dtype,
                   parameters=sum(int(x.size) for x in leaves), bytes=sum(int(x.nbytes) for x in leaves),
                   text_layers=config.text.num_layers, vision_layers=config.vision.depth)
    print(json.dumps(summary))
    return 0


def _to_hf(args: argparse.Namespace) -> int:
    where = "convert to-hf"
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return fail(where, f"--out {str(out)!r} exists and is not an empty directory; expected a new or empty one")
    from starflow2_jax.train.lm_export import export_lm_run

    try:
        summary = export_lm_run(args.workdir, out)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        return fail(where, error)
    print(json.dumps(summary))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.convert_command == "from-hf":
        return _from_hf(args)
    if args.convert_command == "to-hf":
        return _to_hf(args)
    raise ValueError(f"unknown conversion {args.convert_command!r}")
