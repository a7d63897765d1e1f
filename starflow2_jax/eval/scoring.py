"""The loop every evaluation shares: each image of a split through a task's ``eval_step``.

``score_split`` runs the training data pipeline over the split with ``pad_remainder=True`` (no
shuffling), so every image counts exactly once per pass; the jitted, sharded eval step scores each
batch, and the per-example metrics, ``valid`` flags and image indices come back gathered over
processes. The evaluations (``eval.bpd``, ``eval.fae``) only decide what to do with the numbers.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from starflow2_jax import parallel
from starflow2_jax.train import inputs
from starflow2_jax.train.restore import Restored
from starflow2_jax.train.step import make_eval_step


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} {value!r}: expected an int >= {minimum}")
    return int(value)


def split_source(restored: Restored, split: str, workdir):
    """The run's TFDS source of ``split``; ValueError naming ``--split`` when the dataset lacks it."""
    from starflow2_jax.data.check import DatasetError

    try:
        return inputs.make_source(restored.config, split, workdir)
    except DatasetError:
        raise  # a missing or damaged file: its message names it (and may mention the split)
    except (KeyError, ValueError, AssertionError) as error:
        if split not in str(error):
            raise
        raise ValueError(f"--split {split!r}: the dataset of {os.fspath(workdir)!r} has no such split "
                         f"({error})") from None


def gather(x, dtype) -> np.ndarray:
    """A host numpy copy of ``x``, concatenated over processes when there are several."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True), dtype)
    return np.asarray(x, dtype)


class ScoredBatch(NamedTuple):
    """prepared: the sharded batch the step saw; metrics: {name: (B,) float64}; valid: (B,) bool
    (False = padding); index: (B,) int64 image indices — all over every process's rows."""

    prepared: Any
    metrics: dict[str, np.ndarray]
    valid: np.ndarray
    index: np.ndarray


def score_split(restored: Restored, workdir: os.PathLike | str, *, split: str, batch_size: int | None,
                noise: str, num_epochs: int = 1, seed: int = 0) -> Iterator[ScoredBatch]:
    """Yields a ``ScoredBatch`` per batch of ``split`` (``num_epochs`` passes; ``noise``: the
    preprocessing's 'none' | 'uniform'; ``seed``: its noise and the eval rng). ``batch_size``
    (default the run's) must divide over the batch shards: ValueError naming ``--batch-size``."""
    from starflow2_jax.data.pipeline import make_pipeline
    from starflow2_jax.data.preprocess import ImagePreprocess

    config, task, mesh = restored.config, restored.task, restored.mesh
    batch_size = check_int("--batch-size", batch_size if batch_size is not None else int(config.data.batch_size), 1)
    shards = parallel.axes_size(mesh, parallel.BATCH_AXES) * jax.process_count()
    if batch_size % shards:
        raise ValueError(f"--batch-size {batch_size}: must be a multiple of the {shards} batch shards here")
    preprocess = ImagePreprocess(levels=int(config.data.levels), noise=noise, random_caption=False,
                                 image_size=int(config.data.image_size), channels=int(config.data.channels))
    data = make_pipeline(split_source(restored, split, workdir), batch_size=batch_size, seed=int(seed), shuffle=False,
                         preprocess=preprocess, num_epochs=int(num_epochs), drop_remainder=False, pad_remainder=True)
    evaluate = make_eval_step(task, mesh, restored.shardings)
    rng = jax.random.key(int(seed))
    for batch in data:
        prepared = parallel.shard_batch(task.prepare_batch(batch), mesh)
        metrics = evaluate(restored.params, restored.extra, prepared, rng)
        yield ScoredBatch(prepared, {k: gather(v, np.float64) for k, v in metrics.items()},
                          gather(batch["valid"], bool), gather(batch["index"], np.int64))


def check_finite(name: str, indices: np.ndarray, values: np.ndarray, split: str) -> None:
    """RuntimeError naming how many (and which) images of ``split`` got a non-finite ``name``."""
    bad = indices[~np.isfinite(values)]
    if bad.size:
        raise RuntimeError(f"{name} is not finite for {bad.size} of {indices.size} images of split {split!r} "
                           f"(indices {bad[:10].tolist()}{' …' if bad.size > 10 else ''})")
