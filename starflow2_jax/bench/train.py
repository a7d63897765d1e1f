"""Train-step benchmark: steps/s of the trainer's jitted step (``train.step.make_train_step(...).jitted``).

    python -m starflow2_jax.bench.train --config demo [--batch B] [--steps S] [--repeats R] [--list]

``--config``: a named setting (``--list``) or a config file ``FILE.py[:PRESET]``. Named settings:

- ``demo`` / ``demo-caption``: ``configs/demo.py`` / ``configs/demo.py:caption`` as they train
  (the digits model, batch 64);
- ``tarflow-32``: the flow benchmark's ``tarflow-32`` model (``bench.flow``: TarFlow, img 32×32×3,
  patch 4, width 128, 4 blocks × 2 layers, 10 classes, batch 16) with the demo's optimiser.

What is timed is exactly what ``starflow2 train`` runs per step: forward + backward of the task's
loss, global-norm clip → AdamW with masked weight decay and the warm-up/cosine schedule, the
non-finite guard, the EMA update and the step counters, state donated, on a mesh over every device
(``mesh`` of the config). Inputs: one fixed batch of uniform images in [−1, 1] with random labels
(or the config's prompts), prepared by the task and sharded as the trainer does. Compilation is
ahead of time and reported separately (``bench.common``). ``train_steps_per_s`` = 1 / median step
time; ``images_per_s`` = batch × that.

Output: one JSON line on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import numpy as np

from starflow2_jax.bench import common

NAMED = {
    "demo": "configs/demo.py:label",
    "demo-caption": "configs/demo.py:caption",
    "tarflow-32": None,
}


def tarflow32_config():
    """A training config whose flow is ``bench.flow``'s ``tarflow-32``, trained with the demo's optimiser."""
    from starflow2_jax.config_files import load_config

    c = load_config(NAMED["demo"])
    c.model.flow.factory = "tarflow"
    c.model.flow.kwargs = dict(in_channels=3, img_size=32, patch_size=4, channels=128, num_blocks=4,
                               layers_per_block=2, num_classes=10)
    c.model.conditioning = "label"
    c.data.levels = 255  # (the data itself is never read: the benchmark feeds one synthetic batch)
    c.data.batch_size = 16
    c.sample.per_class = 1
    return c


def load(name: str):
    """The training config of a named setting or a ``FILE.py[:PRESET]`` spec."""
    from starflow2_jax.config_files import load_config

    if name == "tarflow-32":
        return tarflow32_config()
    return load_config(NAMED.get(name, name))


def make_batch(task, config, batch: int, rng: np.random.Generator) -> dict:
    """A host batch like the data pipeline's (image, label, caption) for ``task.prepare_batch``."""
    fc = task.flow_config
    h, w = fc.image_size
    images = rng.uniform(-1.0, 1.0, (batch, h, w, fc.in_channels)).astype(np.float32)
    labels = rng.integers(0, max(fc.num_classes, 1), (batch,)).astype(np.int32)
    prompts = task.prompts or [""]
    captions = np.asarray([prompts[i % len(prompts)] for i in range(batch)])
    return task.prepare_batch({"image": images, "label": labels, "caption": captions})


def run(name: str, *, batch: int | None = None, steps: int = 20, repeats: int = 3, seed: int = 0) -> dict:
    """Times the train step of ``name``; returns the JSON record (see the module docstring)."""
    from starflow2_jax import parallel
    from starflow2_jax.train import create_state, families, make_optimizer, make_train_step, state_shardings
    from starflow2_jax.train.loop import resolve_config

    config = load(name)
    if batch is not None:
        config.data.batch_size = int(batch)
    config = resolve_config(config)
    batch = int(config.data.batch_size)
    mesh = parallel.make_mesh(dict(config.mesh))
    task = families.make_task(config)
    optimizer, _ = make_optimizer(config.optim, int(config.train.steps), trainable=task.trainable)
    ema = float(config.optim.ema_decay) > 0
    shardings = state_shardings(task, optimizer, mesh, ema=ema)
    state, extra = create_state(task, optimizer, shardings, jax.random.key(seed), ema=ema)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    step = make_train_step(task, optimizer, mesh, shardings, config)
    data = parallel.shard_batch(make_batch(task, config, batch, np.random.default_rng(seed)), mesh)
    fc = task.flow_config
    common.log(f"{name}: {fc.variant} img {fc.image_size}x{fc.in_channels}, patch {fc.patch_size}, "
               f"{len(fc.blocks)} blocks, {num_params / 1e6:.3f}M params, batch {batch}, "
               f"conditioning {task.conditioning}, mesh {dict(mesh.shape)}, devices {common.devices_info()}")
    with parallel.activation_rules(mesh, task.rules):
        compiled, compile_s = common.compile_ahead(step.jitted, state, extra, data)
    common.log(f"train step compiled in {compile_s:.1f}s")
    losses = []

    def call():
        nonlocal state
        state, metrics = compiled(state, extra, data)
        losses.append(metrics["loss"])
        return metrics["loss"]

    timing = common.time_calls(call, steps=steps, repeats=repeats)
    first, last = float(losses[0]), float(losses[-1])
    common.log(f"train: {timing.median * 1e3:.2f} ms/step (runs: {[round(t * 1e3, 2) for t in timing.runs]}); "
               f"loss {first:.4g} → {last:.4g} over {len(losses)} steps")
    o = config.optim
    record = dict(
        benchmark="train", config=name, batch=batch, dtype=fc.dtype, remat=fc.remat, conditioning=task.conditioning,
        **common.environment(), mesh=dict(mesh.shape), num_params=num_params, steps=steps, repeats=repeats,
        optimizer=(f"clip {o.clip_norm:g} -> adamw(b=({o.b1:g}, {o.b2:g}), wd {o.weight_decay:g} on kernels) "
                   f"warmup-cosine, ema {o.ema_decay:g}, non-finite guard"),
        train_steps_per_s=timing.per_second, train_step_ms=timing.median * 1e3,
        images_per_s=batch * timing.per_second, compile_s=compile_s,
        train_loss_first=first if np.isfinite(first) else None, train_loss=last if np.isfinite(last) else None)
    return {k: common.round_sig(v) if isinstance(v, float) else v for k, v in record.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m starflow2_jax.bench.train", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default="demo", help="a named setting (--list) or FILE.py[:PRESET]")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the config's data.batch_size)")
    parser.add_argument("--steps", type=int, default=20, help="train steps per timed run (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the params and the batch")
    parser.add_argument("--list", action="store_true", help="list the named settings and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name, spec in NAMED.items():
            spec = spec or "bench.flow tarflow-32 (TarFlow 32x32x3, p4, w128, 4x2, 10 classes, batch 16)"
            print(f"{name:14s} {spec}")
        return 0
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch={args.batch}: expected a positive batch size")
    if args.steps < 1 or args.repeats < 1:
        raise SystemExit(f"--steps={args.steps} and --repeats={args.repeats} must both be >= 1")
    from starflow2_jax.config_files import ConfigError

    try:
        record = run(args.config, batch=args.batch, steps=args.steps, repeats=args.repeats, seed=args.seed)
    except ConfigError as error:
        raise SystemExit(f"--config {args.config!r}: {error}") from None
    common.emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
