"""Held-out bits/dim of a trained workdir: ``evaluate_bpd(workdir)`` (``starflow2 eval bpd``).

Every image of the split is scored ``num_samples`` times, each time with fresh uniform
dequantisation noise ``x + (u − ½)·(2/levels)``, u ~ U[0, 1) (whatever noise the run trained with):

    bpd(x) = E_u[−log₂ p(x_deq)] / D + log₂(levels / 2)        (D = H·W·C; ``flow.bits_per_dim``)

the log₂(levels/2) being the Jacobian of the scaling of pixel values v ∈ {0..levels} to x = v/(levels/2) − 1
(+3 bits for the digits' 16 levels). Conditional models are scored given the image's label, or its
first caption; the guidance drop-out is off. The split goes through the training data pipeline with
``pad_remainder=True`` (no shuffling), so every image counts exactly once per pass and the padding
rows (``valid=False``) are discarded. Reported: the mean over images of their per-image mean, its
standard error (std over images / √n), the number of images, the split and the checkpoint's step.
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from starflow2_jax import parallel
from starflow2_jax.train import files
from starflow2_jax.train import inputs
from starflow2_jax.train.restore import Restored, restore_workdir
from starflow2_jax.train.step import make_eval_step


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} {value!r}: expected an int >= {minimum}")
    return int(value)


def _source(restored: Restored, split: str, workdir):
    try:
        return inputs.make_source(restored.config, split, workdir)
    except (KeyError, ValueError, AssertionError) as error:
        if split not in str(error):
            raise
        raise ValueError(f"--split {split!r}: the dataset of {os.fspath(workdir)!r} has no such split "
                         f"({error})") from None


def bpd_per_image(restored: Restored, workdir: os.PathLike | str, *, split: str, num_samples: int = 1, seed: int = 0,
                  batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(image indices (n,), mean bits/dim of each image over the num_samples passes (n,))``."""
    from starflow2_jax.data.pipeline import make_pipeline
    from starflow2_jax.data.preprocess import ImagePreprocess

    config, task, mesh = restored.config, restored.task, restored.mesh
    if config.model.family != "flow" or config.model.latent.kind == "fae":
        raise ValueError(f"bits/dim is defined for flows on pixels or pixel patches; {os.fspath(workdir)!r} is a "
                         f"model.family={config.model.family!r} run with model.latent.kind="
                         f"{config.model.latent.kind!r} (its training metrics report nll_per_dim instead)")
    batch_size = _check_int("--batch-size", batch_size if batch_size is not None else int(config.data.batch_size), 1)
    shards = parallel.axes_size(mesh, parallel.BATCH_AXES) * jax.process_count()
    if batch_size % shards:
        raise ValueError(f"--batch-size {batch_size}: must be a multiple of the {shards} batch shards here")
    preprocess = ImagePreprocess(levels=int(config.data.levels), noise="uniform", random_caption=False,
                                 image_size=int(config.data.image_size), channels=int(config.data.channels))
    data = make_pipeline(_source(restored, split, workdir), batch_size=batch_size, seed=int(seed), shuffle=False,
                         preprocess=preprocess, num_epochs=int(num_samples), drop_remainder=False, pad_remainder=True)
    evaluate = make_eval_step(task, mesh, restored.shardings)
    rng = jax.random.key(int(seed))
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for batch in data:
        valid = np.asarray(batch["valid"], bool)
        index = np.asarray(batch["index"], np.int64)
        bpd = evaluate(restored.params, restored.extra, parallel.shard_batch(task.prepare_batch(batch), mesh), rng)
        bpd = np.asarray(multihost_utils.process_allgather(bpd["bits_per_dim"], tiled=True), np.float64)
        if jax.process_count() > 1:
            valid = np.asarray(multihost_utils.process_allgather(valid, tiled=True), bool)
            index = np.asarray(multihost_utils.process_allgather(index, tiled=True), np.int64)
        for i, b in zip(index[valid], bpd[valid]):
            sums[int(i)] = sums.get(int(i), 0.0) + float(b)
            counts[int(i)] = counts.get(int(i), 0) + 1
    if not sums:
        raise ValueError(f"--split {split!r} is empty")
    if set(counts.values()) != {int(num_samples)}:
        raise RuntimeError(f"images were scored {sorted(set(counts.values()))} times, expected {num_samples} each "
                           f"(duplicate 'index' values in the split?)")
    order = np.asarray(sorted(sums), np.int64)
    return order, np.asarray([sums[i] / counts[i] for i in order.tolist()], np.float64)


def evaluate_bpd(workdir: os.PathLike | str, *, split: str | None = None, num_samples: int = 1, seed: int = 0,
                 ema: bool = True, batch_size: int | None = None, out: os.PathLike | str | None = None,
                 restored: Restored | None = None) -> dict:
    """Bits/dim of the latest complete checkpoint of ``workdir`` on ``split`` (default the run's
    ``data.eval_split``); see the module docstring. Returns (and writes to ``out``, atomically) a dict:

        bits_per_dim, std_error, num_images, split, step, num_samples (dequantisation passes),
        ema (EMA params used), levels, batch_size, seed, checkpoint, workdir, seconds

    Raises ValueError / FileNotFoundError naming the bad argument, and RuntimeError when an image's
    bits/dim is not finite (no number is reported then).
    """
    start = time.perf_counter()
    num_samples = _check_int("--num-samples", num_samples, 1)
    seed = _check_int("--seed", seed, 0)
    if out is not None and not os.fspath(out).endswith(".json"):
        raise ValueError(f"--out {os.fspath(out)!r}: expected a .json file name")
    restored = restored if restored is not None else restore_workdir(workdir, ema=ema)
    split = split or str(restored.config.data.eval_split)
    indices, per_image = bpd_per_image(restored, workdir, split=split, num_samples=num_samples, seed=seed,
                                       batch_size=batch_size)
    bad = indices[~np.isfinite(per_image)]
    if bad.size:
        raise RuntimeError(f"bits/dim is not finite for {bad.size} of {indices.size} images of split {split!r} "
                           f"(indices {bad[:10].tolist()}{' …' if bad.size > 10 else ''})")
    n = int(per_image.size)
    result = {
        "bits_per_dim": float(per_image.mean()),
        "std_error": float(per_image.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "num_images": n, "split": split, "step": restored.step, "num_samples": num_samples,
        "ema": restored.used_ema, "levels": int(restored.config.data.levels),
        "batch_size": int(batch_size or restored.config.data.batch_size), "seed": seed,
        "checkpoint": restored.step_dir, "workdir": os.fspath(workdir),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if out is not None and jax.process_index() == 0:
        files.write_json(out, result)
    return result
