"""Held-out reconstruction errors of a trained FAE workdir: ``evaluate_fae(workdir)`` (``starflow2 eval fae``).

Every image x of the split (pixels scaled to [−1, 1], no noise) goes once through the deterministic
auto-encoder path of ``fae.api.reconstruction_errors`` — the task's ``eval_step``: frozen DINOv2
features F, posterior mean μ = E(F), reconstructed features FD(μ), pixels PD(FD(μ)) — giving

    feature_mse      ‖FD(μ) − F‖² / ‖F‖²   (per image; 1 = as bad as predicting 0)
    pixel_mse        mean((PD(FD(μ)) − x)²)       the full auto-encoder
    pixel_mse_real   mean((PD(F) − x)²)           the pixel decoder on the real features
    psnr             10·log₁₀(4 / pixel_mse)      dB; peak-to-peak 2 on [−1, 1] (pixel_mse floored at 1e-12)

each averaged over the images; every image counts exactly once (``eval.scoring.score_split``). Raw parameters are used (FAE runs keep no EMA). Any stage's
workdir works (a stage-ia one has an untrained encoder and feature decoder, so its ``pixel_mse``
is poor while ``pixel_mse_real`` is meaningful).

``grid``: a PNG of the first ``num_grid`` images of the split (in split order), three rows —
originals / full reconstructions PD(FD(μ)) / pixel decoder on the real features PD(F) — with
1-pixel white gutters: ``(3·(S+1)+1) × (num_grid·(S+1)+1)`` pixels for S-pixel images. The
posterior mean goes straight to the feature decoder (the latent statistics' normalisation of
``FAESpace`` cancels in encode → decode), so the grid needs no latent statistics.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from starflow2_jax import atomic, parallel
from starflow2_jax.eval.scoring import check_finite, check_int, gather, score_split
from starflow2_jax.fae import api as fae_api
from starflow2_jax.train import families
from starflow2_jax.train import images as image_lib
from starflow2_jax.train.restore import Restored, latest_step_dir, read_step_config, restore_workdir

METRICS = ("feature_mse", "pixel_mse", "pixel_mse_real")
MSE_FLOOR = 1e-12  # psnr of a perfect reconstruction: 10·log10(4e12) ≈ 126 dB instead of inf


def psnr(mse) -> np.ndarray:
    """``10·log10(4 / mse)`` (dB) for MSEs of images in [−1, 1] (peak-to-peak 2), mse floored at 1e-12."""
    return 10.0 * np.log10(4.0 / np.maximum(np.asarray(mse, np.float64), MSE_FLOOR))


def _grid_rows(config, params, extra, images):
    """``(B, S, S, 3)`` images → ``(full reconstruction, pixel decoder on real features)``, clipped to [−1, 1]."""
    r = fae_api.reconstruct(config, {"fae": params, "dinov2": extra["dinov2"]}, images)
    return jnp.clip(r["pixels"], -1.0, 1.0), jnp.clip(r["pixels_real"], -1.0, 1.0)


def _make_grid_step(restored: Restored):
    task, mesh, shardings = restored.task, restored.mesh, restored.shardings
    batch_sharding = NamedSharding(mesh, PartitionSpec(parallel.BATCH_AXES))
    jitted = jax.jit(functools.partial(_grid_rows, task.config),
                     in_shardings=(shardings.params, shardings.extra, batch_sharding),
                     out_shardings=(batch_sharding, batch_sharding))

    def rows(params, extra, images):
        with parallel.activation_rules(mesh, task.rules):
            return jitted(params, extra, images)

    return rows


def check_fae_config(config, workdir: os.PathLike | str) -> None:
    """Raises ValueError naming the family unless ``config``'s family offers FAE reconstruction errors."""
    try:
        families.require(config, "fae", os.fspath(workdir))
    except ValueError as error:
        raise ValueError(f"FAE reconstruction errors need an FAE workdir (configs/fae.py): {error}") from None


def fae_per_image(restored: Restored, workdir: os.PathLike | str, *, split: str, batch_size: int | None = None,
                  num_grid: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """``(image indices (n,), {metric: per-image values (n,)}, grid (3, num_grid, S, S, 3) or None)``,
    sorted by image index; the grid holds the first ``num_grid`` images in split order."""
    check_fae_config(restored.config, workdir)
    grid_step = _make_grid_step(restored) if num_grid else None
    values: dict[int, tuple[float, ...]] = {}
    grid: list[list[np.ndarray]] = [[], [], []]
    for scored in score_split(restored, workdir, split=split, batch_size=batch_size, noise="none"):
        valid, index = scored.valid, scored.index
        if grid_step is not None and len(grid[0]) < num_grid:
            images = scored.prepared["image"]
            full, real = grid_step(restored.params, restored.extra, images)
            originals = gather(images, np.float32)[valid]
            full, real = gather(full, np.float32)[valid], gather(real, np.float32)[valid]
            take = num_grid - len(grid[0])
            for row, part in zip(grid, (originals, full, real)):
                row.extend(part[:take])
        for position in np.flatnonzero(valid):
            i = int(index[position])
            if i in values:
                raise RuntimeError(f"image index {i} of split {split!r} was scored twice (duplicate 'index' values?)")
            values[i] = tuple(float(scored.metrics[k][position]) for k in METRICS)
    if not values:
        raise ValueError(f"--split {split!r} is empty")
    order = np.asarray(sorted(values), np.int64)
    table = np.asarray([values[i] for i in order.tolist()], np.float64)
    per_image = {k: table[:, j] for j, k in enumerate(METRICS)}
    tiles = np.stack([np.stack(row) for row in grid]) if num_grid else None
    return order, per_image, tiles


def evaluate_fae(workdir: os.PathLike | str, *, split: str | None = None, batch_size: int | None = None,
                 out: os.PathLike | str | None = None, grid: os.PathLike | str | None = None, num_grid: int = 8,
                 restored: Restored | None = None, allow_frozen_change: bool = False) -> dict:
    """Reconstruction errors of the FAE in the latest complete checkpoint of ``workdir`` on ``split``
    (default the run's ``data.eval_split``); see the module docstring. Returns (and writes to ``out``,
    atomically) a dict:

        feature_mse, pixel_mse, pixel_mse_real, psnr (means over images), num_images, split, step,
        stage, batch_size, checkpoint, workdir, seconds (and grid, the PNG's path, when written)

    ``grid``: also write the originals / reconstructions PNG there (atomically). Both files are
    written only once every number is computed and finite. Raises ValueError / FileNotFoundError
    naming the bad argument, and RuntimeError when an image's error is not finite.
    """
    start = time.perf_counter()
    if out is not None and not os.fspath(out).endswith(".json"):
        raise ValueError(f"--out {os.fspath(out)!r}: expected a .json file name")
    if grid is not None:
        if not os.fspath(grid).endswith(".png"):
            raise ValueError(f"--grid {os.fspath(grid)!r}: expected a .png file name")
        num_grid = check_int("--num-grid", num_grid, 1)
    if restored is None:
        check_fae_config(read_step_config(latest_step_dir(workdir)[1]), workdir)  # before loading any weights
        restored = restore_workdir(workdir, ema=False, allow_frozen_change=allow_frozen_change)
    split = split or str(restored.config.data.eval_split)
    indices, per_image, tiles = fae_per_image(restored, workdir, split=split, batch_size=batch_size,
                                              num_grid=num_grid if grid is not None else 0)
    for name, value in per_image.items():
        check_finite(name, indices, value, split)
    result = {name: float(value.mean()) for name, value in per_image.items()}
    result.update({
        "psnr": float(psnr(per_image["pixel_mse"]).mean()),
        "num_images": int(indices.size), "split": split, "step": restored.step,
        "stage": str(restored.config.model.fae.stage),
        "batch_size": int(batch_size or restored.config.data.batch_size),
        "checkpoint": restored.step_dir, "workdir": os.fspath(workdir),
    })
    if grid is not None:
        result["grid"] = os.fspath(grid)
    result["seconds"] = round(time.perf_counter() - start, 3)
    if jax.process_index() == 0:
        if grid is not None:
            image_lib.save_png(grid, image_lib.tile(image_lib.to_uint8(tiles)))
        if out is not None:
            atomic.write_json(out, result)
    return result
