"""VLM benchmark: Qwen2.5-VL text prefill and decode throughput, ours (JAX) beside transformers (PyTorch).

    python -m starflow2_jax.bench.vlm [--hidden 256] [--layers 4] [--heads 8] [--kv-heads 2] [--vocab 8192]
        [--batch 4] [--prompt-len 128] [--new-tokens 64] [--repeats 3] [--dtype float32|bfloat16] [--skip-torch]

Model: a random ``Qwen2_5_VLForConditionalGeneration`` (transformers, PyTorch) of the given text size
(MLP 4 × hidden, mrope sections in Qwen's 1:1.5:1.5 ratio, a 1-layer vision tower that the text-only
prompts never use), saved with ``save_pretrained`` and read back with ``convert.load_hf_qwen2_5_vl``:
both frameworks run the same weights. Prompts: ``--batch`` rows of ``--prompt-len`` random token ids
(text only, no padding); no stop token, so every row generates ``--new-tokens`` tokens.

Measured (JAX compile excluded and reported separately, see ``bench.common``; median of ``--repeats``):

- prefill: one forward of the prompts that fills the KV cache (ours: the text decoder with a cache of
  prompt + new slots; transformers: ``model(..., use_cache=True, logits_to_keep=1)``, as its
  ``generate`` prefills). ``*_prefill_tokens_per_s`` =
  batch · prompt_len / time.
- generate: greedy generation of ``--new-tokens`` tokens (ours: ``vlm.generate.decode``, prefill + one
  jitted ``while_loop``; transformers: ``model.generate(do_sample=False)`` without an eos id).
  ``*_decode_tokens_per_s`` = batch · (new_tokens − 1) / (generate time − prefill time): the first new
  token comes from the prefill.
- ``tokens_match``: fraction of generated tokens equal between the two (float32: expect 1.0).

transformers runs in a subprocess of its own (so that its thread pool never competes with XLA's), on
CUDA when torch sees a GPU, else on the CPU with torch's default thread count. A decode rate is null
when the measured generate time does not exceed the prefill time (a disturbed measurement).
Output: one JSON line on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax import convert, vlm
from starflow2_jax.bench import common
from starflow2_jax.vlm.generate import decode


def hf_config(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int):
    """A transformers ``Qwen2_5_VLConfig`` with the given text size (special ids at the top of the vocab)."""
    from transformers import Qwen2_5_VLConfig

    half = hidden // heads // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # 16:24:24 for Qwen's 64
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6, bos_token_id=vocab - 6,
                eos_token_id=vocab - 5, rope_parameters={"rope_type": "default", "mrope_section": section,
                                                         "rope_theta": 1e6})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1,
                            video_token_id=vocab - 2, vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4)


def save_random_model(args, directory: str) -> None:
    """Writes one random transformers model of the benchmark size to ``directory`` (``save_pretrained``)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(args.seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_config(args.hidden, args.layers, args.heads, args.kv_heads,
                                                         args.vocab)).eval()
    with torch.no_grad():  # larger than the 0.02 default so that generated tokens vary
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    model.save_pretrained(directory)


def bench_jax(config, params, ids: np.ndarray, new_tokens: int, repeats: int) -> dict:
    text = config.text
    batch, length = ids.shape
    ids_j, mask = jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (3, batch, length))

    @functools.partial(jax.jit, static_argnums=0)
    def prefill(slots, params, ids):
        cache = vlm.create_cache(text, batch, slots)
        logits, cache = vlm.QwenTextModel(text).apply({"params": params}, ids, position_ids=positions, cache=cache)
        return logits[:, -1], cache

    prefill_c, prefill_compile = common.compile_ahead(prefill, length + new_tokens, params["text"], ids_j)
    generate_args = (params["text"], ids_j, None, positions, mask, jnp.full((batch,), length, jnp.int32),
                     jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0), jnp.asarray([-1], jnp.int32),
                     jnp.int32(0))
    generate_c, generate_compile = common.compile_ahead(
        jax.jit(functools.partial(decode, text, new_tokens, True, False)), *generate_args)
    common.log(f"jax compiled: prefill {prefill_compile:.1f}s, generate {generate_compile:.1f}s")
    t_prefill = common.time_calls(lambda: prefill_c(params["text"], ids_j), steps=1, repeats=repeats)
    result = {}

    def run_generate():
        result["ids"], result["lengths"], _ = generate_c(*generate_args)
        return result["ids"]

    t_generate = common.time_calls(run_generate, steps=1, repeats=repeats)
    return dict(prefill_s=t_prefill.median, generate_s=t_generate.median, compile_s=prefill_compile + generate_compile,
                ids=np.asarray(result["ids"]))


def bench_torch(directory: str, ids: np.ndarray, args) -> dict:
    """Times transformers in a fresh subprocess (its thread pool never competes with XLA's) on the model
    saved in ``directory``; returns the worker's result (see ``torch_worker``)."""
    np.save(os.path.join(directory, "prompt.npy"), ids)
    cmd = [sys.executable, "-m", "starflow2_jax.bench.vlm", "--torch-worker", directory, "--new-tokens",
           str(args.new_tokens), "--repeats", str(args.repeats), "--dtype", args.dtype]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the transformers worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.splitlines()[-1])
    result["ids"] = np.asarray(result["ids"])
    return result


def torch_worker(directory: str, new_tokens: int, repeats: int, dtype: str) -> dict:
    """transformers' prefill and generate times for ``directory/prompt.npy`` on the model in ``directory``."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=getattr(torch, dtype)).to(device)
    model.eval().generation_config.eos_token_id = None  # like ours without stop tokens: exactly new_tokens
    ids = np.load(os.path.join(directory, "prompt.npy"))
    input_ids = torch.from_numpy(ids.astype(np.int64)).to(device)
    kwargs = dict(attention_mask=torch.ones_like(input_ids), mm_token_type_ids=torch.zeros_like(input_ids))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn):
        fn()  # warm-up
        sync()
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            sync()
            runs.append(time.perf_counter() - start)
        return statistics.median(runs), out

    with torch.no_grad():
        prefill_s, _ = timed(lambda: model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs).logits)
        generate_s, out = timed(lambda: model.generate(
            input_ids=input_ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0, **kwargs))
    import transformers
    return dict(prefill_s=prefill_s, generate_s=generate_s, ids=out[:, ids.shape[1]:].cpu().numpy().tolist(),
                device=device, threads=torch.get_num_threads(), version=torch.__version__,
                transformers=transformers.__version__)


def throughput(prefill_s: float, generate_s: float, batch: int, length: int, new_tokens: int) -> dict:
    """Rates from the median times; decode is null (with a warning) if generate was not slower than prefill."""
    decode_s = generate_s - prefill_s
    if decode_s <= 0:
        common.log(f"WARNING: generate ({generate_s * 1e3:.1f} ms) not slower than prefill ({prefill_s * 1e3:.1f} ms):"
                   f" timings disturbed, decode rate reported as null")
    return dict(prefill_ms=prefill_s * 1e3, generate_ms=generate_s * 1e3,
                prefill_tokens_per_s=batch * length / prefill_s,
                decode_tokens_per_s=batch * (new_tokens - 1) / decode_s if decode_s > 0 else None)


def run(args) -> dict:
    """Runs the benchmark for parsed ``args``; returns the JSON record (see the module docstring)."""
    ids = np.random.default_rng(args.seed).integers(0, args.vocab - 8, (args.batch, args.prompt_len))
    record = dict(benchmark="vlm", hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                  vocab=args.vocab, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  dtype=args.dtype, repeats=args.repeats, **common.environment())
    torch_keys = ("torch_prefill_ms", "torch_generate_ms", "torch_prefill_tokens_per_s", "torch_decode_tokens_per_s",
                  "torch_device", "torch_threads", "torch_version", "transformers", "tokens_match")
    with tempfile.TemporaryDirectory() as directory:
        save_random_model(args, directory)
        theirs = None if args.skip_torch else bench_torch(directory, ids, args)
        config, params = convert.load_hf_qwen2_5_vl(directory, args.dtype)  # the same weights, through files
    record["num_text_params"] = sum(int(x.size) for x in jax.tree_util.tree_leaves(params["text"]))
    common.log(f"vlm: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, vocab "
               f"{args.vocab} ({record['num_text_params'] / 1e6:.2f}M text params); batch {args.batch}, prompt "
               f"{args.prompt_len}, {args.new_tokens} new tokens, {args.dtype}; devices {common.devices_info()}")
    ours = bench_jax(config, params, ids, args.new_tokens, args.repeats)
    for name, times in (("jax", ours), ("torch", theirs)):
        if times is None:
            record.update(dict.fromkeys(torch_keys))
            continue
        record.update({f"{name}_{k}": v for k, v in throughput(times["prefill_s"], times["generate_s"], args.batch,
                                                                 args.prompt_len, args.new_tokens).items()})
        common.log(f"{name}: prefill {record[f'{name}_prefill_tokens_per_s']:.0f} tok/s, decode "
                   f"{record[f'{name}_decode_tokens_per_s'] or float('nan'):.0f} tok/s")
    record["jax_compile_s"] = ours["compile_s"]
    if theirs is not None:
        record.update(torch_device=theirs["device"], torch_threads=theirs["threads"], torch_version=theirs["version"],
                      transformers=theirs["transformers"], tokens_match=float(np.mean(theirs["ids"] == ours["ids"])))
        common.log(f"transformers on {theirs['device']} ({theirs['threads']} threads); generated tokens equal: "
                   f"{record['tokens_match']:.3f}")
    return {k: common.round_sig(v) if isinstance(v, float) else v for k, v in record.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m starflow2_jax.bench.vlm", description=__doc__.split("\n", 1)[0])
    for name, default, what in (("hidden", 256, "text width"), ("layers", 4, "text layers"),
                                ("heads", 8, "query heads"), ("kv-heads", 2, "key/value heads"),
                                ("vocab", 8192, "vocabulary size"), ("batch", 4, "prompts per batch"),
                                ("prompt-len", 128, "prompt tokens"), ("new-tokens", 64, "tokens to generate"),
                                ("repeats", 3, "timed runs (median reported)"), ("seed", 0, "weights and prompts")):
        parser.add_argument(f"--{name}", type=int, default=default, help=f"{what} (default {default})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameter and compute dtype of both models (default float32)")
    parser.add_argument("--skip-torch", action="store_true", help="time ours only (torch keys null)")
    parser.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)  # internal: the subprocess
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.torch_worker:
        result = torch_worker(args.torch_worker, args.new_tokens, args.repeats, args.dtype)
        print(json.dumps(result))
        return 0
    for name in ("hidden", "layers", "heads", "kv_heads", "vocab", "batch", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive number")
    if args.new_tokens < 2:
        raise SystemExit(f"--new-tokens={args.new_tokens}: expected >= 2 (decode time excludes the first token)")
    if args.hidden % args.heads or (args.hidden // args.heads) % 4 or args.heads % args.kv_heads:
        raise SystemExit(f"--hidden={args.hidden} / --heads={args.heads} / --kv-heads={args.kv_heads}: need "
                         f"hidden divisible by heads, head_dim divisible by 4, heads divisible by kv-heads")
    common.emit(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
