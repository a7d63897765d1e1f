"""FAE benchmark: encode / decode / round-trip throughput (images/s) of the FAE latent space, with the
'patches' latent space as a baseline.

    python -m starflow2_jax.bench.fae --config tiny [--batch B] [--steps S] [--repeats R]
        [--dtype float32|bfloat16] [--abstract] [--params-only] [--list]

Model: a freshly initialised FAE with its random DINOv2 (``fae.api.init_variables_boxed``, unboxed),
with latent statistics mean 0, std 1 and count 1 (so that they count as computed);
``FAESpace(config)`` runs it. ``--dtype`` sets the compute dtype of both the DINOv2 and the FAE config
(parameters stay float32); the default is the named config's. Inputs: ``--batch`` images uniform in
[−1, 1] of the config's image size.

Measured (compile excluded and reported separately, see ``bench.common``): ``FAESpace.encode``
(images → latents (B, N, D), including the frozen DINOv2), ``FAESpace.decode`` (latents → images:
feature decoder + pixel decoder) and the round trip (decode ∘ encode in one jitted call); each
AOT-compiled, one warm-up call, then ``--repeats`` runs of ``--steps`` calls; per stage
``seconds_per_call`` (median over runs), ``images_per_second`` = batch / seconds_per_call,
``compile_seconds``, ``matmul_flops`` per call (2·M·N·K over every ``dot_general`` of the traced
jaxpr, scanned layers × their count; elementwise work not included) and ``matmul_flops_per_second``.
The baseline: ``PatchesSpace`` of the same image with patch = image_size / grid (the same N tokens),
``patches_{encode,decode}_images_per_second`` and ``..._seconds_per_call`` (checked to round-trip exactly).
``reconstruction_mse``: mean((round trip − images)²) of the random model — only a check that the
output is finite, not a quality number.

``--abstract`` (forced for an accelerator-only config, such as 'g14_256', on a CPU): nothing is
allocated — parameter shapes come from ``jax.eval_shape``, and each stage is lowered and compiled
from abstract shapes; the record carries parameter counts and, per stage, ``compile_seconds``,
``matmul_flops`` (as above), ``xla_flops`` / ``xla_bytes_accessed`` (``compiled.cost_analysis()``;
XLA counts a loop body once, so with the scanned layer stacks these are roughly per-layer figures —
use ``matmul_flops`` for the model's FLOPs) and ``memory`` (argument, output, temp, generated-code and
alias bytes of ``compiled.memory_analysis()``); timing keys are null.
``--params-only`` (implies --abstract) skips the compiles and reports parameter counts only (stage
keys null).

Output: one JSON line on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.bench import common
from starflow2_jax.parallel import aot
from starflow2_jax.fae import api as fae_api
from starflow2_jax.fae.config import FAEConfig
from starflow2_jax.fae.dinov2 import Dinov2Config
from starflow2_jax.fae.latent_space import FAESpace, PatchesSpace

STAGES = ("encode", "decode", "roundtrip")
PARAM_PARTS = ("dinov2",) + fae_api.PARTS


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A named benchmark setting: the FAE config factory, default batch, and whether it is too large
    to run (rather than only compile abstractly) on a CPU."""

    make: Callable[[], FAEConfig]
    batch: int
    description: str
    accelerator_only: bool = False


def _tiny() -> FAEConfig:
    dino = Dinov2Config(hidden_size=32, num_layers=2, num_heads=4, mlp_ratio=4.0, patch_size=4, image_size=32)
    return FAEConfig(dinov2=dino, image_size=32, latent_dim=8, encoder_heads=2, feature_decoder_width=64,
                     feature_decoder_layers=2, feature_decoder_heads=2, pixel_decoder_width=64,
                     pixel_decoder_layers=2, pixel_decoder_heads=2)


def _small() -> FAEConfig:
    dino = Dinov2Config(hidden_size=384, num_layers=12, num_heads=6, mlp_ratio=4.0, patch_size=14, image_size=224)
    return FAEConfig(dinov2=dino, image_size=224, latent_dim=32, encoder_heads=4, feature_decoder_width=384,
                     feature_decoder_layers=6, feature_decoder_heads=6, pixel_decoder_width=384,
                     pixel_decoder_layers=6, pixel_decoder_heads=6)


def _g14_256() -> FAEConfig:
    dino = Dinov2Config(hidden_size=1536, num_layers=40, num_heads=24, mlp_ratio=4.0, patch_size=14, image_size=518,
                        use_swiglu_ffn=True)
    return FAEConfig(dinov2=dino, image_size=256, encoder_image_size=224, latent_dim=32, encoder_heads=4,
                     feature_decoder_width=1024, feature_decoder_layers=6, feature_decoder_heads=16,
                     pixel_decoder_width=1024, pixel_decoder_layers=24, pixel_decoder_heads=16, dtype="bfloat16")


CONFIGS: dict[str, BenchConfig] = {
    "tiny": BenchConfig(_tiny, 32, "the tiny FAE of configs/fae.py: DINOv2 32 wide x 2 layers, patch 4, 32 px, "
                                   "latent 8x8x8, decoders 64 x 2 (smoke test)"),
    "small": BenchConfig(_small, 4, "DINOv2-S/14-like (384 x 12, 6 heads) at 224 px, latent 16x16x32, "
                                    "feature decoder 384 x 6, pixel decoder 384 x 6"),
    "g14_256": BenchConfig(_g14_256, 32, "the paper's sizes: DINOv2-g/14 (SwiGLU) at 224 px, 256 px out, latent "
                                         "16x16x32, feature decoder 1024 x 6, pixel decoder 1024 x 24, bfloat16 "
                                         "(accelerator only; abstract on a CPU)", accelerator_only=True),
}


def make_config(name: str, dtype: str | None = None) -> FAEConfig:
    """``CONFIGS[name]`` with ``dtype`` (default: the config's) in both the FAE and the DINOv2 config."""
    if name not in CONFIGS:
        raise ValueError(f"unknown FAE benchmark config {name!r}; expected one of {sorted(CONFIGS)}")
    config = CONFIGS[name].make()
    dtype = dtype or config.dtype
    return dataclasses.replace(config, dtype=dtype, dinov2=dataclasses.replace(config.dinov2, dtype=dtype)).validate()


def patches_space(config: FAEConfig) -> PatchesSpace:
    """The pixel-patch baseline with the FAE's image size and token grid (patch = image_size / grid)."""
    s = config.image_size
    return PatchesSpace(s, s, 3, config.output_patch)


def _init_fn(config: FAEConfig):
    """``key → {'dinov2', 'fae', 'latent_stats'}`` (plain arrays; stats count 1)."""

    def init(key):
        variables = nn.meta.unbox(fae_api.init_variables_boxed(config, key))
        return dict(variables, latent_stats=dict(variables["latent_stats"], count=jnp.ones((), jnp.float32)))

    return init


def init_variables(config: FAEConfig, key: jax.Array) -> dict:
    """Random FAE variables for ``FAESpace(config)`` (statistics marked computed), jitted."""
    return jax.jit(_init_fn(config))(key)


def param_counts(variables) -> dict:
    """``{dinov2, encoder, feature_decoder, pixel_decoder, total}`` parameter counts (arrays or shapes)."""
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    counts = {"dinov2": count(variables["dinov2"])}
    counts.update({part: count(variables["fae"][part]) for part in fae_api.PARTS})
    counts["total"] = sum(counts.values())
    return counts


def stage_functions(space) -> dict[str, Callable]:
    """Jitted ``(variables, x) → y`` per stage: encode (images), decode (latents), roundtrip (images)."""
    return {"encode": jax.jit(space.encode), "decode": jax.jit(space.decode),
            "roundtrip": jax.jit(lambda v, x: space.decode(v, space.encode(v, x)))}


def _time_stage(name: str, fn, variables, x, *, batch: int, steps: int, repeats: int) -> tuple[dict, jax.Array]:
    compiled, compile_s = common.compile_ahead(fn, variables, x)
    out = {}

    def call():
        out["y"] = compiled(variables, x)
        return out["y"]

    timing = common.time_calls(call, steps=steps, repeats=repeats)
    flops = matmul_flops(fn, variables, x)
    common.log(f"{name}: compiled in {compile_s:.2f}s; {timing.median * 1e3:.2f} ms/call, "
               f"{batch / timing.median:.1f} images/s, {flops / timing.median / 1e9:.1f} matmul GFLOP/s "
               f"(runs: {[round(t * 1e3, 2) for t in timing.runs]} ms)")
    return dict(seconds_per_call=timing.median, images_per_second=batch / timing.median, compile_seconds=compile_s,
                matmul_flops=flops, matmul_flops_per_second=flops / timing.median), out["y"]


# The FLOP counter and the compiler-analysis reader live in parallel.aot (``starflow2 aot`` uses them).
matmul_flops = aot.matmul_flops
_cost = aot.compiled_costs


def run_abstract(config: FAEConfig, batch: int, *, compile_stages: bool = True, seed: int = 0) -> dict:
    """Parameter counts and (``compile_stages``) per-stage compile seconds, FLOPs and memory, from
    abstract shapes only: nothing of the model's size is allocated."""
    variables = jax.eval_shape(_init_fn(config), jax.random.PRNGKey(seed))
    record = {"params": param_counts(variables)}
    common.log(f"abstract: params {record['params']}")
    if not compile_stages:
        return dict(record, **dict.fromkeys(STAGES))
    s = config.image_size
    images = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
    latents = jax.ShapeDtypeStruct((batch, config.num_tokens, config.latent_dim), jnp.float32)
    inputs = {"encode": images, "decode": latents, "roundtrip": images}
    for stage, fn in stage_functions(FAESpace(config)).items():
        start = time.perf_counter()
        compiled = fn.lower(variables, inputs[stage]).compile()
        record[stage] = dict(seconds_per_call=None, images_per_second=None,
                             compile_seconds=time.perf_counter() - start,
                             matmul_flops=matmul_flops(fn, variables, inputs[stage]), **_cost(compiled))
        common.log(f"{stage}: compiled in {record[stage]['compile_seconds']:.1f}s, matmul flops "
                   f"{record[stage]['matmul_flops']:.4g} (XLA cost analysis: {record[stage]['xla_flops']}), "
                   f"memory {record[stage]['memory']}")
    return record


def run_concrete(config: FAEConfig, batch: int, *, steps: int, repeats: int, seed: int = 0) -> dict:
    k_init, k_data = jax.random.split(jax.random.PRNGKey(seed))
    variables = init_variables(config, k_init)
    record = {"params": param_counts(variables)}
    common.log(f"params {record['params']}")
    s = config.image_size
    images = jax.random.uniform(k_data, (batch, s, s, 3), jnp.float32, -1.0, 1.0)
    fns = stage_functions(FAESpace(config))
    timed = functools.partial(_time_stage, batch=batch, steps=steps, repeats=repeats)
    record["encode"], latents = timed("fae encode", fns["encode"], variables, images)
    latents = jax.block_until_ready(latents.astype(jnp.float32))
    record["decode"], _ = timed("fae decode", fns["decode"], variables, latents)
    record["roundtrip"], recon = timed("fae roundtrip", fns["roundtrip"], variables, images)
    record["reconstruction_mse"] = float(jnp.mean(jnp.square(recon.astype(jnp.float32) - images)))

    patches = patches_space(config)
    pfns = stage_functions(patches)
    p_enc, p_latents = timed("patches encode", pfns["encode"], {}, images)
    p_dec, p_images = timed("patches decode", pfns["decode"], {}, p_latents)
    if not bool(jnp.array_equal(p_images, images)):
        raise AssertionError("the patches latent space round trip is not exact")
    record.update(patches_encode_images_per_second=p_enc["images_per_second"],
                  patches_decode_images_per_second=p_dec["images_per_second"],
                  patches_encode_seconds_per_call=p_enc["seconds_per_call"],
                  patches_decode_seconds_per_call=p_dec["seconds_per_call"],
                  patches_latent_dim=patches.latent_dim)
    return record


def _round(value):
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return common.round_sig(value) if isinstance(value, float) else value


def run(name: str, *, batch: int | None = None, steps: int = 10, repeats: int = 3, dtype: str | None = None,
        abstract: bool = False, params_only: bool = False, seed: int = 0) -> dict:
    """Runs the benchmark for ``CONFIGS[name]``; returns the JSON record (see the module docstring)."""
    config = make_config(name, dtype)
    bench = CONFIGS[name]
    batch = bench.batch if batch is None else batch
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r}: expected a positive batch size")
    if steps < 1 or repeats < 1:
        raise ValueError(f"steps={steps} and repeats={repeats} must both be >= 1")
    device = jax.devices()[0]
    abstract = abstract or params_only
    if bench.accelerator_only and device.platform == "cpu" and not abstract:
        common.log(f"{name} is accelerator-only: on a CPU it runs abstractly (no allocation, no timing)")
        abstract = True
    common.log(f"{name}: {bench.description}; batch {batch}, dtype {config.dtype}, "
               f"{'abstract' if abstract else 'timed'}, devices {common.devices_info()}")
    record = dict(benchmark="fae", config=name, batch=batch, dtype=config.dtype, device=device.device_kind,
                  **common.environment(), abstract=abstract, steps=None if abstract else steps,
                  repeats=None if abstract else repeats, image_size=config.image_size,
                  encoder_image_size=config.input_size, tokens=config.num_tokens, latent_dim=config.latent_dim)
    if abstract:
        record.update(run_abstract(config, batch, compile_stages=not params_only, seed=seed))
        record.update(dict.fromkeys(("reconstruction_mse", "patches_encode_images_per_second",
                                     "patches_decode_images_per_second")))
    else:
        record.update(run_concrete(config, batch, steps=steps, repeats=repeats, seed=seed))
    return _round(record)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m starflow2_jax.bench.fae", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS), help="named config (--list)")
    parser.add_argument("--batch", type=int, default=None, help="images per call (default: the config's)")
    parser.add_argument("--steps", type=int, default=10, help="calls per timed run (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype of DINOv2 and the FAE (default: the config's)")
    parser.add_argument("--abstract", action="store_true",
                        help="no allocation: parameter counts and compiled FLOPs/memory from abstract shapes")
    parser.add_argument("--params-only", action="store_true", help="abstract parameter counts only (no compile)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of params and images")
    parser.add_argument("--list", action="store_true", help="list the named configs and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for name, bench in CONFIGS.items():
            print(f"{name:10s} batch {bench.batch:3d}  {bench.description}")
        return 0
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch={args.batch}: expected a positive batch size")
    if args.steps < 1 or args.repeats < 1:
        parser.error(f"--steps={args.steps} and --repeats={args.repeats} must both be >= 1")
    record = run(args.config, batch=args.batch, steps=args.steps, repeats=args.repeats, dtype=args.dtype,
                 abstract=args.abstract, params_only=args.params_only, seed=args.seed)
    common.emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
