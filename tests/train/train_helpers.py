"""Shared pieces of the training tests: a tiny config, an in-memory digits-like source, the data
helper's grain pipeline over it, and ``ToyTask`` — a two-layer regressor that compiles in a moment,
records the data order it sees, and can inject NaN batches at chosen steps; and a training run of
``ToyTask`` in a subprocess (``start_training``), for signal and kill tests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.data.pipeline import make_pipeline
from starflow2_jax.data.preprocess import ImagePreprocess
from starflow2_jax.parallel import FLOW_RULES
from starflow2_jax.train import base_config
from starflow2_jax.train.task import SampleGrid, TaskBase

NUM_EXAMPLES = 48


def tiny_config(**overrides):
    """A validated-shape training config for 8×8×1 images: a 2-block STARFlow (1 layer each, width 64),
    batch 8, 6 steps, mesh data=-1. ``overrides``: dotted field → value."""
    c = base_config()
    c.model.flow.kwargs.channels = 64
    c.model.flow.kwargs.layers_per_block = [1, 1]
    c.data.batch_size = 8
    c.data.label_drop = 0.25
    c.data.caption_drop = 0.25
    c.optim.warmup_steps = 2
    c.optim.lr = 1e-2
    c.train.steps = 6
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.async_checkpoint = True
    c.sample.per_class = 2
    for path, value in overrides.items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def digits_like_source(n: int = NUM_EXAMPLES, seed: int = 0) -> list[dict]:
    """``n`` TFDS-shaped examples: uint8 (8, 8, 1) images in 0..16, label, captions, index."""
    rng = np.random.default_rng(seed)
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    return [{"image": rng.integers(0, 17, (8, 8, 1)).astype(np.uint8), "label": i % 10,
             "captions": [f"a handwritten digit {names[i % 10]}", f"the number {i % 10}"], "index": 1000 + i}
            for i in range(n)]


def pipeline(config, source=None):
    """The data helper's ``make_pipeline`` over ``source`` with the config's preprocessing."""
    d = config.data
    return make_pipeline(source if source is not None else digits_like_source(), batch_size=int(d.batch_size),
                         seed=int(config.seed), shuffle=True,
                         preprocess=ImagePreprocess(levels=int(d.levels), noise=d.noise,
                                                    label_dropout=float(d.label_drop),
                                                    caption_dropout=float(d.caption_drop)))


class ToyTask(TaskBase):
    """A ``Task``: pred = tanh(x·W1 + b1)·w2 · extra scale, loss = mean((pred − label/10)²).

    ``seen``: the batches' ``index`` arrays in the order ``prepare_batch`` got them (= step order).
    ``nan_from`` / ``nan_steps``: 1-based steps whose batch images become NaN (from that step on / at those steps).
    """

    rules = FLOW_RULES

    def __init__(self, nan_steps=(), nan_from=None, hidden: int = 16):
        self.seen: list[np.ndarray] = []
        self.nan_steps = set(nan_steps)
        self.nan_from = nan_from
        self.hidden = hidden
        self.start_step = 0

    def init(self, rng):
        k1, k2 = jax.random.split(rng)
        w1 = jax.random.normal(k1, (64, self.hidden)) / 8.0
        w2 = jax.random.normal(k2, (self.hidden,)) / 4.0
        params = {"dense": {"kernel": nn.Partitioned(w1, names=("embed", "mlp")),
                            "bias": nn.Partitioned(jnp.zeros(self.hidden), names=("mlp",))},
                  "head": {"kernel": nn.Partitioned(w2, names=("mlp",))}}
        return params, {"stats": {"scale": jnp.ones(())}}

    def prepare_batch(self, batch):
        self.seen.append(np.asarray(batch["index"]).copy())
        step = self.start_step + len(self.seen)  # 1-based step this batch is for
        image = np.asarray(batch["image"], np.float32)
        if step in self.nan_steps or (self.nan_from is not None and step >= self.nan_from):
            image = np.full_like(image, np.nan)
        return {"image": image, "label": np.asarray(batch["label"], np.int32)}

    def _pred(self, params, extra, image):
        x = image.reshape(image.shape[0], -1)
        h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
        return (h @ params["head"]["kernel"]) * extra["stats"]["scale"]

    def loss(self, params, extra, batch, rng):
        del rng
        target = jnp.maximum(batch["label"], 0).astype(jnp.float32) / 10.0
        err = self._pred(params, extra, batch["image"]) - target
        loss = jnp.mean(err ** 2)
        return loss, {"loss": loss, "abs_err": jnp.mean(jnp.abs(err))}

    def eval_step(self, params, extra, batch, rng):
        del rng
        target = jnp.maximum(batch["label"], 0).astype(jnp.float32) / 10.0
        return {"sq_err": (self._pred(params, extra, batch["image"]) - target) ** 2}

    def sample_grid(self, params, extra, rng, *, guidance):
        del guidance
        images = jnp.tanh(jax.random.normal(rng, (2, 3, 8, 8, 1))) + 0 * params["head"]["kernel"][0]
        return SampleGrid(images, ["a", "b"])


HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

TRAINING_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path[:0] = [{repo!r}, {here!r}]
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from train_helpers import ToyTask, pipeline, tiny_config
    from starflow2_jax.train import train
    config = tiny_config(**{overrides!r})
    result = train(config, {workdir!r}, task=ToyTask(), data=pipeline(config))
    print("RESULT", result.step, result.interrupted, flush=True)
""")


def start_training(workdir, overrides: dict, cwd=None) -> subprocess.Popen:
    """``train`` of ``ToyTask`` on ``tiny_config(**overrides)`` in a subprocess (8 fake CPU devices);
    its stdout ends with ``RESULT <step> <interrupted>``."""
    script = TRAINING_SCRIPT.format(repo=str(REPO), here=str(HERE), overrides=overrides, workdir=str(workdir))
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    """Polls ``condition()`` until it holds; fails with ``what`` after ``timeout`` s, or when the
    process ended first (with its output)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def metric_steps(workdir) -> list[int]:
    """The steps of ``workdir/metrics.jsonl``'s complete lines ([] when there is none)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
