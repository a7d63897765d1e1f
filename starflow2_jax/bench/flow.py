"""Flow benchmark: training steps/s and sampling throughput (sequential vs Jacobi) of a named config.

    python -m starflow2_jax.bench.flow --config tarflow-32 [--batch B] [--steps S] [--repeats R]
        [--dtype float32|bfloat16] [--remat none|full|dots|dots_no_batch] [--skip-sampling] [--list]

Model: ``flow.init`` with every parameter (not the prior variance) perturbed by σ·N(0, 1), σ = 0.02
(``param_noise`` of the named config; 0.005 for the 64-layer ImageNet-64 stack, whose latents
overflow float32 at 0.02), so the zero-initialised heads do real work and Jacobi needs a meaningful
number of iterations.

Measured (compile excluded and reported separately, see ``bench.common``):

- train: one jitted step = forward + backward of ``flow.loss`` + ``optax.adamw(1e-4, b1=0.9,
  b2=0.95, weight_decay=1e-4)``, train state donated; ``--steps`` steps per run, median of
  ``--repeats`` runs. ``train_steps_per_s`` = 1 / median step time; ``train_step_ms`` = that time.
- sampling: ``flow.sample`` of one batch of noise, sequentially (KV-cached, one position per
  transformer pass) and with Jacobi (block_size 16, threshold 1e-3, max_iters 32); median of
  ``--repeats`` calls each. ``sample_*_images_per_s`` = batch / median call time;
  ``sample_*_tokens_per_s`` = images/s × T, T = tokens per image (each token is generated once per
  block, so transformer positions/s is a further × num_blocks). ``jacobi_iterations`` = transformer
  passes per block (sequential: T − 1 or T); ``jacobi_speedup`` = Jacobi images/s ÷ sequential.

Output: one JSON line on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from starflow2_jax import flow
from starflow2_jax.bench import common
from starflow2_jax.flow.config import REMAT_POLICIES

JACOBI = dict(block_size=16, threshold=1e-3, max_iters=32)

@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A named benchmark setting: the flow config factory, default batch, conditioning kind
    ('class' labels, 'text' features, or 'none') and the std of the parameter perturbation."""

    make: Callable[[], flow.FlowConfig]
    batch: int
    cond: str
    description: str
    param_noise: float = 0.02


CONFIGS: dict[str, BenchConfig] = {
    "tiny": BenchConfig(
        lambda: flow.tarflow_config(3, 8, 2, 64, 2, 1), 2, "none",
        "TarFlow img 8x8x3, patch 2, width 64, 2 blocks x 1 layer, unconditional (smoke test)"),
    "tarflow-32": BenchConfig(
        lambda: flow.tarflow_config(3, 32, 4, 128, 4, 2, num_classes=10), 16, "class",
        "TarFlow img 32x32x3, patch 4, width 128, 4 blocks x 2 layers, 10 classes"),
    "starflow-tiny": BenchConfig(
        lambda: flow.starflow_config(4, 8, 1, 128, layers_per_block=[2, 2, 2, 4], txt_size=8, txt_dim=32),
        16, "text",
        "STARFlow latent 8x8x4, patch 1, width 128, blocks of 2/2/2/4 layers, text prefix 8x32 (random features)"),
    "tarflow-imagenet64": BenchConfig(
        lambda: flow.tarflow_config(3, 64, 2, 768, 8, 8), 4, "none",
        "TarFlow img 64x64x3, patch 2, width 768, 8 blocks x 8 layers, unconditional (large: accelerator only)",
        param_noise=0.005),
}


def make_inputs(config: flow.FlowConfig, kind: str, batch: int, rng: jax.Array):
    """Returns ``(images (B, H, W, C) in [−1, 1], cond, noise (B, T, d))`` for conditioning ``kind``."""
    k_img, k_cond, k_noise = jax.random.split(rng, 3)
    h, w = config.image_size
    images = jax.random.uniform(k_img, (batch, h, w, config.in_channels), jnp.float32, -1.0, 1.0)
    if kind == "class":
        cond = jax.random.randint(k_cond, (batch,), 0, config.num_classes, jnp.int32)
    elif kind == "text":
        cond = jax.random.normal(k_cond, (batch, config.text_len, config.text_dim), jnp.float32)
    else:
        cond = None
    noise = jax.random.normal(k_noise, (batch, config.num_tokens, config.token_dim), jnp.float32)
    return images, cond, noise


def make_train_step(config: flow.FlowConfig, optimizer: optax.GradientTransformation):
    """Jitted ``(state=(params, opt_state), prior, images, cond) → (state, loss)``, state donated."""

    def loss_fn(params, prior, images, cond):
        out = flow.forward_with_intermediates(config, {"params": params, "prior": prior}, images, cond)
        return flow.loss(config, out)["loss"]

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, prior, images, cond):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, prior, images, cond)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return train_step


def bench_train(config: flow.FlowConfig, variables: dict, images, cond, *, steps: int, repeats: int) -> dict:
    optimizer = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=1e-4)
    params = variables["params"]
    state = (jax.tree_util.tree_map(jnp.copy, params), optimizer.init(params))  # own buffers: donated
    prior = variables["prior"]
    step, compile_s = common.compile_ahead(make_train_step(config, optimizer), state, prior, images, cond)
    common.log(f"train step compiled in {compile_s:.1f}s")
    first_loss = last_loss = None

    def call():
        nonlocal state, first_loss, last_loss
        state, last_loss = step(state, prior, images, cond)
        first_loss = last_loss if first_loss is None else first_loss
        return last_loss

    timing = common.time_calls(call, steps=steps, repeats=repeats)
    common.log(f"train: {timing.median * 1e3:.1f} ms/step (runs: {[round(t * 1e3, 1) for t in timing.runs]})")
    first, last = float(first_loss), float(last_loss)
    common.log(f"train loss: {first:.4g} at the first step, {last:.4g} after {1 + steps * repeats} steps")
    if not (np.isfinite(first) and np.isfinite(last)):
        common.log("WARNING: non-finite training loss (reported as null); the step timings still stand")
    return dict(train_steps_per_s=timing.per_second, train_step_ms=timing.median * 1e3, compile_s=compile_s,
                train_loss_first=_finite_or_none(first), train_loss=_finite_or_none(last))


def _finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None


def bench_sample(config: flow.FlowConfig, variables: dict, noise, cond, *, jacobi, repeats: int):
    """Returns ``(images/s, compile seconds, iterations per block, all samples finite)`` of ``flow.sample``."""
    sampler = jax.jit(lambda v, n, c: flow.sample(config, v, n, c, jacobi=jacobi, return_info=True))
    compiled, compile_s = common.compile_ahead(sampler, variables, noise, cond)
    name = "jacobi" if jacobi else "sequential"
    common.log(f"{name} sampler compiled in {compile_s:.1f}s")
    info = {}

    def call():
        info["images"], info["info"] = compiled(variables, noise, cond)
        return info["images"]

    timing = common.time_calls(call, steps=1, repeats=repeats)
    iterations = np.asarray(info["info"]["iterations"]).tolist()
    finite = bool(jnp.all(jnp.isfinite(info["images"])))
    common.log(f"{name}: {timing.median * 1e3:.1f} ms/batch, iterations per block {iterations}")
    if not finite:
        common.log(f"WARNING: {name} samples are not finite (iteration counts are then not meaningful)")
    return noise.shape[0] / timing.median, compile_s, iterations, finite


def run(name: str, *, batch: int | None = None, steps: int = 10, repeats: int = 3, dtype: str | None = None,
        remat: str = "none", skip_sampling: bool = False, seed: int = 0) -> dict:
    """Runs the benchmark for ``CONFIGS[name]``; returns the JSON record (see the module docstring)."""
    bench = CONFIGS[name]
    config = bench.make()
    config = dataclasses.replace(config, dtype=dtype or config.dtype, remat=remat).validate()
    batch = batch or bench.batch
    k_init, k_perturb, k_data = jax.random.split(jax.random.PRNGKey(seed), 3)
    variables = flow.init(config, k_init)
    variables = dict(variables, params=common.perturb(variables["params"], k_perturb, bench.param_noise))
    images, cond, noise = make_inputs(config, bench.cond, batch, k_data)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
    common.log(f"{name}: {bench.description}; batch {batch}, dtype {config.dtype}, remat {config.remat}, "
               f"{num_params / 1e6:.2f}M params, T={config.num_tokens}, devices {common.devices_info()}")

    record = dict(benchmark="flow", config=name, batch=batch, dtype=config.dtype, remat=config.remat,
                  **common.environment(), tokens_per_image=config.num_tokens, num_blocks=len(config.blocks),
                  num_params=num_params, param_noise=bench.param_noise, steps=steps, repeats=repeats)
    record.update(bench_train(config, variables, images, cond, steps=steps, repeats=repeats))
    sample_keys = ("sample_seq_images_per_s", "sample_seq_tokens_per_s", "sample_jacobi_images_per_s",
                   "sample_jacobi_tokens_per_s", "jacobi_iterations", "jacobi_speedup",
                   "sample_seq_compile_s", "sample_jacobi_compile_s", "sample_finite")
    if skip_sampling:
        record.update(dict.fromkeys(sample_keys))
    else:
        seq, seq_compile, _, seq_finite = bench_sample(config, variables, noise, cond, jacobi=None, repeats=repeats)
        jac, jac_compile, iterations, jac_finite = bench_sample(config, variables, noise, cond, jacobi=JACOBI,
                                                                repeats=repeats)
        t = config.num_tokens
        record.update(sample_seq_images_per_s=seq, sample_seq_tokens_per_s=seq * t, sample_jacobi_images_per_s=jac,
                      sample_jacobi_tokens_per_s=jac * t, jacobi_iterations=iterations, jacobi_speedup=jac / seq,
                      sample_seq_compile_s=seq_compile, sample_jacobi_compile_s=jac_compile,
                      sample_finite=seq_finite and jac_finite)
    return {k: common.round_sig(v) if isinstance(v, float) else v for k, v in record.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m starflow2_jax.bench.flow",
                                     description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default="tarflow-32", choices=sorted(CONFIGS), help="named config (--list)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    parser.add_argument("--steps", type=int, default=10, help="train steps per timed run (default 10)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs; the median is reported (default 3); sampling times one batch per run")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: the config's, float32)")
    parser.add_argument("--remat", choices=REMAT_POLICIES, default="none", help="rematerialisation policy")
    parser.add_argument("--skip-sampling", action="store_true", help="time training only (sampling keys null)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of params, perturbation and inputs")
    parser.add_argument("--list", action="store_true", help="list the named configs and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name, bench in CONFIGS.items():
            print(f"{name:20s} batch {bench.batch:3d}  cond {bench.cond:5s}  {bench.description}")
        return 0
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch={args.batch}: expected a positive batch size")
    if args.steps < 1 or args.repeats < 1:
        raise SystemExit(f"--steps={args.steps} and --repeats={args.repeats} must both be >= 1")
    record = run(args.config, batch=args.batch, steps=args.steps, repeats=args.repeats, dtype=args.dtype,
                 remat=args.remat, skip_sampling=args.skip_sampling, seed=args.seed)
    common.emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
