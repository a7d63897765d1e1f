"""Flow benchmark: training steps/s and sampling throughput (sequential vs Jacobi) of a named config.

    python -m starflow2_jax.bench.flow --config tarflow-32 [--batch B] [--steps S] [--repeats R]
        [--dtype float32|bfloat16] [--remat none|full|dots|dots_no_batch] [--scan-layers auto|scan|unroll]
        [--dense-2d auto|on|off] [--skip-sampling] [--list] [--no-torch] [--threads N]

Model: ``flow.init`` with every parameter (not the prior variance) perturbed by σ·N(0, 1), σ = 0.02
(``param_noise`` of the named config; 0.005 for the 64-layer ImageNet-64 stack, whose latents
overflow float32 at 0.02), so the zero-initialised heads do real work and Jacobi needs a meaningful
number of iterations.

Layers run as the config's ``scan_layers`` says (``--scan-layers``; default auto: a rolled loop on
accelerators, unrolled on CPU, ``flow.block.scans_layers``); the record's ``scan_layers`` is what ran.
Dense layers likewise run as the config's ``dense_2d`` says (``--dense-2d``; default auto: 2-D matmuls
on CPU, XLA's 3-D dot_general on accelerators, ``flow.block.uses_dense_2d``); the record's ``dense_2d``
is what ran.

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

Side by side (unless ``--no-torch``): the same model in PyTorch (``torch_ref.TorchFlow``, loaded
with the same weights through the reference state-dict layout and checked equal to ours on the same
inputs: forward z and sequential samples within 1e-4 relative) is timed in the same run, alternating
with ours (``common.time_alternating``: every round times one run of each), same batch, same
config, torch threads = ``--threads`` (default ``os.cpu_count()``, the size of XLA's CPU pool). PyTorch's
OpenMP threads sleep between calls: the bench sets ``OMP_WAIT_POLICY=PASSIVE`` before it imports
torch unless the environment sets it (``common.passive_openmp``; the record's ``omp_wait_policy`` and
``omp_wait_policy_source`` say which value applied). With libgomp's default (spin after every
parallel region) torch's idle threads take the cores from XLA's pool and, on a machine with other
load, from each other: a tarflow-32 PyTorch train step measured 0.6–7 s per run instead of a steady
0.2–0.3 s. Ratios ours / PyTorch (> 1: ours faster): ``train_vs_torch``
(steps/s, PyTorch step = forward + backward + ``torch.optim.AdamW`` with the same hyper-parameters),
``sample_seq_vs_torch`` (sequential images/s), ``sample_best_vs_torch`` (the faster of our
sequential and Jacobi samplers against PyTorch's sequential one; ``jacobi_max_abs_diff_vs_seq`` is
how far Jacobi's samples are from the sequential ones).

Fractions of peak: ``matmul_peak_gflops`` is measured in the same run (``common.matmul_peak_flops``);
``*_peak_fraction`` = analytic FLOPs (``flow_flops``; train = 3 × forward, sampling = 1 × forward,
useful work only) ÷ time ÷ peak.

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
from starflow2_jax.flow.block import scans_layers, uses_dense_2d
from starflow2_jax.flow.config import REMAT_POLICIES

JACOBI = dict(block_size=16, threshold=1e-3, max_iters=32)
SCAN_LAYERS = {"auto": None, "scan": True, "unroll": False}  # --scan-layers → FlowConfig.scan_layers
DENSE_2D = {"auto": None, "on": True, "off": False}  # --dense-2d → FlowConfig.dense_2d

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


def flow_flops(config: flow.FlowConfig, batch: int) -> float:
    """Analytic FLOPs of one forward pass over ``batch`` images: 2 × matmul parameters × positions
    (text prefix included) + causal attention 2·S²·H·hd per layer (QKᵀ and PV, half the square each).
    A train step is 3× this (forward + backward); sampling does this useful work once, however
    many passes it takes (so sampling fractions of peak count useful FLOPs only)."""
    total = 0.0
    d = config.token_dim
    for b in config.blocks:
        seq = config.num_tokens + (config.text_len if b.text_conditioned else 0)
        hidden = int(b.width * config.mlp_ratio)
        per_layer = (b.width * (b.num_heads + 2 * b.num_kv_heads) * b.head_dim + b.num_heads * b.head_dim * b.width
                     + (3 if config.mlp == "swiglu" else 2) * b.width * hidden)
        head = d * b.width + b.width * (2 * d if config.nvp else d)
        txt = config.text_dim * b.width * config.text_len if b.text_conditioned else 0
        total += 2.0 * batch * (seq * per_layer * b.num_layers + config.num_tokens * head + txt)
        total += 2.0 * batch * b.num_layers * seq * seq * b.num_heads * b.head_dim
    return total


def prepare_train(config: flow.FlowConfig, variables: dict, images, cond):
    """Compiles our train step; returns ``(call, compile seconds, losses)`` (``losses``: first and
    last loss seen, filled as ``call`` runs)."""
    optimizer = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=1e-4)
    params = variables["params"]
    state = (jax.tree_util.tree_map(jnp.copy, params), optimizer.init(params))  # own buffers: donated
    prior = variables["prior"]
    step, compile_s = common.compile_ahead(make_train_step(config, optimizer), state, prior, images, cond)
    common.log(f"train step compiled in {compile_s:.1f}s")
    losses = {}

    def call():
        nonlocal state
        state, loss = step(state, prior, images, cond)
        losses.setdefault("first", loss)
        losses["last"] = loss
        return loss

    return call, compile_s, losses


def _finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None


def prepare_sample(config: flow.FlowConfig, variables: dict, noise, cond, *, jacobi):
    """Compiles ``flow.sample``; returns ``(call, compile seconds, info)``; ``info`` holds the last
    call's images and iteration counts."""
    sampler = jax.jit(lambda v, n, c: flow.sample(config, v, n, c, jacobi=jacobi, return_info=True))
    compiled, compile_s = common.compile_ahead(sampler, variables, noise, cond)
    common.log(f"{'jacobi' if jacobi else 'sequential'} sampler compiled in {compile_s:.1f}s")
    info = {}

    def call():
        info["images"], info["info"] = compiled(variables, noise, cond)
        return info["images"]

    return call, compile_s, info


def torch_side(config: flow.FlowConfig, variables: dict, images, cond, noise, kind: str):
    """The same model in PyTorch (``torch_ref``), checked equal to ours on these weights and inputs.

    Returns ``(train call, sequential-sampling call, max |Δ| of forward z, of sequential samples)``;
    raises ValueError when the two models disagree (timings would compare different computations).
    """
    import copy

    import torch

    from starflow2_jax.torch_ref import torch_flow_from_variables

    model = torch_flow_from_variables(config, variables)
    tokens = torch.from_numpy(np.asarray(flow.patchify(config, images)))
    labels = torch.from_numpy(np.asarray(cond)) if kind == "class" else None
    text = torch.from_numpy(np.asarray(cond)) if kind == "text" else None
    noise_t = torch.from_numpy(np.asarray(noise))
    with torch.no_grad():
        z_torch = model(tokens, labels, text)[0].numpy()
    z_ours = np.asarray(flow.forward_with_intermediates(config, variables, images, cond).z)
    samples_torch = model.sample_tokens(noise_t, labels, text).numpy()
    samples_ours = np.asarray(flow.sample_tokens(config, variables, noise, cond)[0])
    dz, ds = float(np.max(np.abs(z_torch - z_ours))), float(np.max(np.abs(samples_torch - samples_ours)))
    for what, diff, ref in (("forward z", dz, z_ours), ("sequential samples", ds, samples_ours)):
        if not diff <= 1e-4 * max(1.0, float(np.max(np.abs(ref)))):
            raise ValueError(f"PyTorch and JAX {what} differ by {diff:.3g} (expected <= 1e-4 relative): "
                             f"not the same model")
    common.log(f"torch side equal to ours: max |dz| {dz:.2g}, max |d samples| {ds:.2g}")

    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)

    def train_call():
        optimizer.zero_grad(set_to_none=True)
        loss = trained.loss(tokens, labels, text)
        loss.backward()
        optimizer.step()

    def sample_call():
        model.sample_tokens(noise_t, labels, text)

    return train_call, sample_call, dz, ds


def run(name: str, *, batch: int | None = None, steps: int = 10, repeats: int = 3, dtype: str | None = None,
        remat: str = "none", skip_sampling: bool = False, seed: int = 0, torch_side_by_side: bool = True,
        threads: int | None = None, scan_layers: bool | None = None, dense_2d: bool | None = None) -> dict:
    """Runs the benchmark for ``CONFIGS[name]``; returns the JSON record (see the module docstring).
    ``scan_layers``, ``dense_2d``: the FlowConfig fields (None: per backend)."""
    import os

    openmp = common.passive_openmp()  # before anything here imports torch (libgomp reads it on load)
    bench = CONFIGS[name]
    config = bench.make()
    config = dataclasses.replace(config, dtype=dtype or config.dtype, remat=remat, scan_layers=scan_layers,
                                 dense_2d=dense_2d).validate()
    batch = batch or bench.batch
    if torch_side_by_side and config.dtype != "float32":
        raise ValueError(f"--dtype {config.dtype}: the PyTorch side-by-side runs float32 only (use --no-torch)")
    k_init, k_perturb, k_data = jax.random.split(jax.random.PRNGKey(seed), 3)
    variables = flow.init(config, k_init)
    variables = dict(variables, params=common.perturb(variables["params"], k_perturb, bench.param_noise))
    images, cond, noise = make_inputs(config, bench.cond, batch, k_data)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
    layers = "scanned" if scans_layers(config) else "unrolled"
    common.log(f"{name}: {bench.description}; batch {batch}, dtype {config.dtype}, remat {config.remat}, "
               f"{num_params / 1e6:.2f}M params, T={config.num_tokens}, layers {layers}, "
               f"dense {'2-D' if uses_dense_2d(config) else '3-D'}, "
               f"devices {common.devices_info()}")

    record = dict(benchmark="flow", config=name, batch=batch, dtype=config.dtype, remat=config.remat,
                  scan_layers=scans_layers(config), dense_2d=uses_dense_2d(config),
                  **common.environment(), tokens_per_image=config.num_tokens, num_blocks=len(config.blocks),
                  num_params=num_params, param_noise=bench.param_noise, steps=steps, repeats=repeats,
                  load_avg_1min=os.getloadavg()[0], **openmp)
    calls = {}
    train_call, compile_s, losses = prepare_train(config, variables, images, cond)
    calls["train"] = (train_call, steps)
    record["compile_s"] = compile_s
    if not skip_sampling:
        seq_call, seq_compile, seq_info = prepare_sample(config, variables, noise, cond, jacobi=None)
        jac_call, jac_compile, jac_info = prepare_sample(config, variables, noise, cond, jacobi=JACOBI)
        calls["seq"], calls["jacobi"] = (seq_call, 1), (jac_call, 1)
        record.update(sample_seq_compile_s=seq_compile, sample_jacobi_compile_s=jac_compile)
    if torch_side_by_side:
        import torch

        torch.set_num_threads(threads or os.cpu_count() or 1)
        record["torch"] = torch.__version__
        record["torch_threads"] = torch.get_num_threads()
        t_train, t_seq, dz, ds = torch_side(config, variables, images, cond, noise, bench.cond)
        record.update(torch_max_abs_diff_z=dz, torch_max_abs_diff_samples=ds)
        calls["torch_train"] = (t_train, steps)
        if not skip_sampling:
            calls["torch_seq"] = (t_seq, 1)
    peak = common.matmul_peak_flops()
    common.log(f"matmul peak (float32, best of 512^2..2048^2): {peak['peak'] / 1e9:.1f} GFLOP/s ({ {k: round(v / 1e9, 1) for k, v in peak.items()} })")
    record.update(matmul_peak_gflops=peak["peak"] / 1e9, matmul_xla_gflops=peak["xla"] / 1e9,
                  matmul_torch_gflops=peak["torch"] / 1e9 if "torch" in peak else None)

    timings = common.time_alternating(calls, repeats=repeats)
    for key, timing in timings.items():
        common.log(f"{key}: {timing.median * 1e3:.1f} ms per call (runs {[round(t * 1e3, 1) for t in timing.runs]})")
    fwd = flow_flops(config, batch)
    frac = lambda flops, timing: flops / timing.median / peak["peak"]  # noqa: E731
    t = timings["train"]
    first, last = float(losses["first"]), float(losses["last"])
    if not (np.isfinite(first) and np.isfinite(last)):
        common.log("WARNING: non-finite training loss (reported as null); the step timings still stand")
    record.update(train_steps_per_s=t.per_second, train_step_ms=t.median * 1e3, train_peak_fraction=frac(3 * fwd, t),
                  train_loss_first=_finite_or_none(first), train_loss=_finite_or_none(last),
                  forward_gflops=fwd / 1e9)
    sample_keys = ("sample_seq_images_per_s", "sample_seq_tokens_per_s", "sample_jacobi_images_per_s",
                   "sample_jacobi_tokens_per_s", "jacobi_iterations", "jacobi_speedup",
                   "sample_seq_compile_s", "sample_jacobi_compile_s", "sample_finite")
    if skip_sampling:
        record.update(dict.fromkeys(sample_keys))
    else:
        seq, jac = batch / timings["seq"].median, batch / timings["jacobi"].median
        iterations = np.asarray(jac_info["info"]["iterations"]).tolist()
        finite = bool(jnp.all(jnp.isfinite(seq_info["images"])) & jnp.all(jnp.isfinite(jac_info["images"])))
        tokens = config.num_tokens
        record.update(sample_seq_images_per_s=seq, sample_seq_tokens_per_s=seq * tokens,
                      sample_jacobi_images_per_s=jac, sample_jacobi_tokens_per_s=jac * tokens,
                      jacobi_iterations=iterations, jacobi_speedup=jac / seq, sample_finite=finite,
                      jacobi_max_abs_diff_vs_seq=float(jnp.max(jnp.abs(jac_info["images"] - seq_info["images"]))),
                      sample_seq_peak_fraction=frac(fwd, timings["seq"]),
                      sample_jacobi_peak_fraction=frac(fwd, timings["jacobi"]))
    if torch_side_by_side:
        tt = timings["torch_train"]
        record.update(torch_train_steps_per_s=tt.per_second, torch_train_peak_fraction=frac(3 * fwd, tt),
                      train_vs_torch=tt.median / t.median)
        if not skip_sampling:
            ts = timings["torch_seq"]
            record.update(torch_sample_seq_images_per_s=batch / ts.median, torch_sample_seq_peak_fraction=frac(fwd, ts),
                          sample_seq_vs_torch=ts.median / timings["seq"].median,
                          sample_best_vs_torch=ts.median / min(timings["seq"].median, timings["jacobi"].median))
        common.log("ours / PyTorch: " + ", ".join(f"{k} {record[k]:.2f}x" for k in
                                                  ("train_vs_torch", "sample_seq_vs_torch", "sample_best_vs_torch")
                                                  if k in record))
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
    parser.add_argument("--scan-layers", choices=tuple(SCAN_LAYERS), default="auto",
                        help="each block's layers as a rolled loop (scan) or straight-line code (unroll); "
                             "auto: scan on accelerators, unroll on CPU")
    parser.add_argument("--dense-2d", choices=tuple(DENSE_2D), default="auto",
                        help="dense layers as 2-D matmuls over flattened rows (on) or XLA's 3-D dot_general (off); "
                             "auto: on on CPU, off on accelerators")
    parser.add_argument("--skip-sampling", action="store_true", help="time training only (sampling keys null)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of params, perturbation and inputs")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip the PyTorch side-by-side (torch_ref) timings and ratios")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: os.cpu_count(), the size of XLA's CPU thread pool)")
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
                 remat=args.remat, skip_sampling=args.skip_sampling, seed=args.seed,
                 torch_side_by_side=not args.no_torch, threads=args.threads,
                 scan_layers=SCAN_LAYERS[args.scan_layers], dense_2d=DENSE_2D[args.dense_2d])
    common.emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
