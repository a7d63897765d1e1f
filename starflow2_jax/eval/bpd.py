"""Held-out bits/dim of a trained workdir: ``evaluate_bpd(workdir)`` (``starflow2 eval bpd``).

Every image of the split is scored ``num_samples`` times, each time with fresh uniform
dequantisation noise ``x + (u − ½)·(2/levels)``, u ~ U[0, 1) (whatever noise the run trained with):

    bpd(x) = E_u[−log₂ p(x_deq)] / D + log₂(levels / 2)        (D = H·W·C; ``flow.bits_per_dim``)

the log₂(levels/2) being the Jacobian of the scaling of pixel values v ∈ {0..levels} to x = v/(levels/2) − 1
(+3 bits for the digits' 16 levels). Conditional models are scored given the image's label, or its
first caption; the guidance drop-out is off. A family may score its runs itself (``Family.bpd_scorer``:
STARFlow2 scores each target image given its context through the coupled model, with the same
dequantisation and definition, and adds the text NLL per token). Every image counts exactly once per pass
(``eval.scoring.score_split``). Reported: the mean over images of their per-image mean, its
standard error (std over images / √n), the number of images, the split and the checkpoint's step.
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np

from starflow2_jax import atomic
from starflow2_jax.eval.scoring import check_finite, check_int, score_split
from starflow2_jax.train import families
from starflow2_jax.train.restore import Restored, latest_step_dir, read_step_config, restore_workdir


def check_bpd_config(config, workdir: os.PathLike | str) -> None:
    """Raises ValueError unless ``config``'s family offers bits/dim and the run models pixels or patches
    (a family with its own scorer, ``Family.bpd_scorer``, checks its run itself)."""
    family = families.require(config, "bpd", os.fspath(workdir))
    if family.bpd_scorer is not None:
        family.bpd_scorer.check(config, workdir)
        return
    if config.model.latent.kind == "fae":
        raise ValueError(f"bits/dim is defined for flows on pixels or pixel patches; {os.fspath(workdir)!r} is a "
                         f"model.family={config.model.family!r} run with model.latent.kind="
                         f"{config.model.latent.kind!r} (its training metrics report nll_per_dim instead)")


def bpd_per_image(restored: Restored, workdir: os.PathLike | str, *, split: str, num_samples: int = 1, seed: int = 0,
                  batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(image indices (n,), mean bits/dim of each image over the num_samples passes (n,))``."""
    check_bpd_config(restored.config, workdir)
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for scored in score_split(restored, workdir, split=split, batch_size=batch_size, noise="uniform",
                              num_epochs=num_samples, seed=seed):
        bpd = scored.metrics["bits_per_dim"]
        for i, b in zip(scored.index[scored.valid], bpd[scored.valid]):
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
                 restored: Restored | None = None, allow_frozen_change: bool = False) -> dict:
    """Bits/dim of the latest complete checkpoint of ``workdir`` on ``split`` (default the run's
    ``data.eval_split``); see the module docstring. Returns (and writes to ``out``, atomically) a dict:

        bits_per_dim, std_error, num_images, split, step, num_samples (dequantisation passes),
        ema (EMA params used), levels, batch_size, seed, checkpoint, workdir, seconds

    plus the fields a family's own scorer adds (STARFlow2: text_nll_per_token, text_tokens,
    num_documents; see ``train.tasks.starflow2_eval``).

    Raises ValueError / FileNotFoundError naming the bad argument, and RuntimeError when an image's
    bits/dim is not finite (no number is reported then).
    """
    start = time.perf_counter()
    num_samples = check_int("--num-samples", num_samples, 1)
    seed = check_int("--seed", seed, 0)
    if out is not None and not os.fspath(out).endswith(".json"):
        raise ValueError(f"--out {os.fspath(out)!r}: expected a .json file name")
    if restored is None:
        check_bpd_config(read_step_config(latest_step_dir(workdir)[1]), workdir)  # before loading any weights
        restored = restore_workdir(workdir, ema=ema, allow_frozen_change=allow_frozen_change)
    split = split or str(restored.config.data.eval_split)
    scorer = families.require(restored.config, "bpd", os.fspath(workdir)).bpd_scorer
    extra = {}
    if scorer is None:
        indices, per_image = bpd_per_image(restored, workdir, split=split, num_samples=num_samples, seed=seed,
                                           batch_size=batch_size)
    else:
        indices, per_image, extra = scorer.score(restored, workdir, split=split, num_samples=num_samples, seed=seed,
                                                 batch_size=batch_size)
    check_finite("bits/dim", indices, per_image, split)
    n = int(per_image.size)
    result = {
        "bits_per_dim": float(per_image.mean()),
        "std_error": float(per_image.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "num_images": n, "split": split, "step": restored.step, "num_samples": num_samples,
        "ema": restored.used_ema, "levels": int(restored.config.data.levels),
        "batch_size": int(batch_size or restored.config.data.batch_size), "seed": seed,
        "checkpoint": restored.step_dir, "workdir": os.fspath(workdir),
        "seconds": round(time.perf_counter() - start, 3), **extra,
    }
    if out is not None and jax.process_index() == 0:
        atomic.write_json(out, result)
    return result
