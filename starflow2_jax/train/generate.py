"""Samples from a trained workdir: ``sample_from_workdir`` → a PNG grid, an ``.npz`` and a JSON summary.

A family with its own sampler (``Family.draw_samples``; STARFlow2: text → image, one row per prompt and
guidance weight, see ``train.tasks.starflow2_eval``) draws the grid instead; the files are the same.

Grid layout (image flows): one row per condition. Without a label or prompt, a label-conditioned model gets one
row per class and a caption-conditioned one a row per ``sample.prompts`` caption of its config;
``label`` / ``prompt`` give a single row. ``num`` is the samples per row (default
``sample.per_class``). An unconditional model draws ``num`` samples (default 8·``per_class``) in
rows of at most 8.

Noise: one N(0, 1) draw of all samples from ``seed``, so the same seed gives the same images for any
``batch_size`` (sequential sampling; Jacobi's stopping rule is batch-global, so there chunking can
change the last digits).

Files (``out`` = ``grid.png``; written through a temporary file and a rename each, the JSON last)::

    grid.png    the grid, nearest-neighbour upscaled to ≥ 64 pixels per image side, 1-pixel gutters
    grid.npz    images  uint8 (N, H, W, C)   round((x + 1)·127.5), as in the PNG
                pixels  uint8 (N, H, W, C)   the data's own grey levels round((x + 1)·levels/2), 0..levels
                samples float32 (N, H, W, C) the raw model output x (≈ [−1, 1])
                labels  int32 (N,)           requested class (−1: none); prompts str (N,) ('' : none)
                rows    int32 (N,)           grid row of each sample; guidance float32 () (a family drawing its
                                             own grid, e.g. STARFlow2: (rows,), each row's weight); step int64 ()
    grid.json   the summary ``sample_from_workdir`` returns
"""

from __future__ import annotations

import math
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax import atomic, flow
from starflow2_jax.train import families
from starflow2_jax.train import images as image_lib
from starflow2_jax.train.family import Drawn
from starflow2_jax.train.restore import Restored, latest_step_dir, read_step_config, restore_workdir
from starflow2_jax.train.tasks.vocab import UNK_ID, split_words

UNCONDITIONAL_COLUMNS = 8


class Samples(NamedTuple):
    """images float32 (N, H, W, C); labels int32 (N,); prompts list[str] (N); rows int32 (N,);
    row_names list[str]; grid (rows, cols); iterations: transformer passes per block (K,)."""

    images: np.ndarray
    labels: np.ndarray
    prompts: list
    rows: np.ndarray
    row_names: list
    grid: tuple
    iterations: list


def parse_jacobi(text: str | None) -> flow.JacobiOptions | None:
    """``'BLOCK,THRESHOLD,MAX_ITERS'`` (e.g. ``'16,1e-3,32'``) → ``JacobiOptions``; ``'off'`` → None
    (sequential). Raises ValueError naming ``--jacobi``."""
    if text is None or text.strip().lower() in ("off", "none", "0"):
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 3:
            raise ValueError
        options = flow.JacobiOptions(block_size=int(parts[0]), threshold=float(parts[1]), max_iters=int(parts[2]))
    except ValueError:
        raise ValueError(f"--jacobi {text!r}: expected BLOCK,THRESHOLD,MAX_ITERS such as 16,1e-3,32 "
                         f"(or 'off' for sequential sampling)") from None
    if not math.isfinite(options.threshold):
        raise ValueError(f"--jacobi {text!r}: the threshold must be finite")
    try:
        return options.validate()
    except ValueError as error:
        raise ValueError(f"--jacobi {text!r}: {error}") from None


def _check_prompt(task, prompt: str) -> None:
    if not prompt.strip():
        raise ValueError("--prompt '': expected a non-empty caption (guidance already uses the empty caption)")
    words = split_words(prompt)
    unknown = [w for w in words if task.vocab.encode(w, 1)[0] == UNK_ID]
    if unknown:
        known = ", ".join(task.vocab.words[2:40])
        raise ValueError(f"--prompt {prompt!r}: word(s) {unknown} are not in the model's caption vocabulary "
                         f"({len(task.vocab) - 2} words: {known}{', …' if len(task.vocab) > 42 else ''})")
    if len(words) > task.flow_config.text_len:
        raise ValueError(f"--prompt {prompt!r}: {len(words)} tokens, but the model reads at most "
                         f"{task.flow_config.text_len} (model.text.max_len)")


def _check_request(guidance, seed, batch_size, num) -> None:
    """The model-independent checks (done before restoring anything); guidance None: the family's default."""
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance) or guidance < 0):
        raise ValueError(f"--guidance {guidance!r}: expected a finite weight >= 0 (0 = no guidance)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"--seed {seed!r}: expected an int in [0, 2**32)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"--batch-size {batch_size!r}: expected a positive int")
    if num is not None and (isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1):
        raise ValueError(f"--num {num!r}: expected a positive number of samples")


def _conditions(restored: Restored, label, prompt, num):
    """``(row_names, labels per row, prompts per row, cols, count)`` after validating the request."""
    task, cond = restored.task, restored.task.conditioning
    if label is not None and cond != "label":
        raise ValueError(f"--label {label}: the model in {restored.step_dir} is conditioned on {cond!r}, not labels"
                         + (" (use --prompt)" if cond == "caption" else ""))
    if prompt is not None and cond != "caption":
        raise ValueError(f"--prompt {prompt!r}: the model in {restored.step_dir} is conditioned on {cond!r}, "
                         f"not captions" + (" (use --label)" if cond == "label" else ""))
    per_row = int(num) if num is not None else int(restored.config.sample.per_class)
    if cond == "label":
        classes = task.flow_config.num_classes
        if label is not None:
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < classes:
                raise ValueError(f"--label {label!r}: expected a class in 0..{classes - 1}")
            labels = [int(label)]
        else:
            labels = list(range(classes))
        return [str(c) for c in labels], labels, [""] * len(labels), per_row, per_row * len(labels)
    if cond == "caption":
        if prompt is not None:
            _check_prompt(task, prompt)
            prompts = [prompt]
        else:
            prompts = list(task.prompts)
        return list(prompts), [-1] * len(prompts), prompts, per_row, per_row * len(prompts)
    count = int(num) if num is not None else UNCONDITIONAL_COLUMNS * int(restored.config.sample.per_class)
    cols = min(count, UNCONDITIONAL_COLUMNS)
    rows = math.ceil(count / cols)
    return [str(r) for r in range(rows)], [-1] * rows, [""] * rows, cols, count


def generate(restored: Restored, *, label: int | None = None, prompt: str | None = None,
             guidance: float | None = 0.0, jacobi: flow.JacobiOptions | None | str = "config", num: int | None = None,
             seed: int = 0, batch_size: int = 256) -> Samples:
    """Draws the samples described in the module docstring from a restored model (no files written).

    ``jacobi``: ``'config'`` (the run's ``sample.jacobi``), None (sequential) or ``JacobiOptions``.
    ``guidance`` None: 0. Raises ValueError naming the bad argument (label out of range, prompt for a
    label model, …).
    """
    task, fc = restored.task, restored.task.flow_config
    _check_request(guidance, seed, batch_size, num)
    guidance = 0.0 if guidance is None else guidance
    if task.conditioning == "none" and guidance:
        raise ValueError(f"--guidance {guidance}: the model in {restored.step_dir} is unconditional "
                         f"(nothing to guide towards); use 0")
    jacobi = task.jacobi if isinstance(jacobi, str) and jacobi == "config" else jacobi
    row_names, row_labels, row_prompts, cols, count = _conditions(restored, label, prompt, num)
    rows = np.repeat(np.arange(len(row_names), dtype=np.int32), cols)[:count]
    labels = np.asarray(row_labels, np.int32)[rows]
    prompts = [row_prompts[r] for r in rows]

    noise = jax.random.normal(jax.random.key(int(seed)), (count, fc.num_tokens, fc.token_dim), jnp.float32)
    variables = task.flow_variables(restored.params, restored.extra)
    to_pixels = jax.jit(task.to_pixels)
    chunk = min(int(batch_size), count)
    outputs, iterations = [], []
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        pad = chunk - (stop - start)  # the last chunk is padded to the same shape: no recompilation
        index = np.concatenate([np.arange(start, stop), np.full(pad, stop - 1)])
        cond = uncond = None
        if task.conditioning == "label":
            cond = jnp.asarray(labels[index])
        elif task.conditioning == "caption":
            tokens = task.vocab.encode_batch([prompts[i] for i in index], fc.text_len)
            cond = task.text_features(restored.params, jnp.asarray(tokens))
            if guidance:
                empty = task.text_features(restored.params, jnp.zeros((1, fc.text_len), jnp.int32))
                uncond = jnp.broadcast_to(empty, cond.shape)
        images, info = flow.sample(fc, variables, noise[index], cond, uncond=uncond, guidance=float(guidance),
                                   jacobi=jacobi, return_info=True)
        images = to_pixels(restored.extra, images)
        outputs.append(np.asarray(jax.device_get(images))[: stop - start])
        iterations.append(np.asarray(jax.device_get(info["iterations"])))
    return Samples(images=np.concatenate(outputs).astype(np.float32), labels=labels, prompts=prompts, rows=rows,
                   row_names=row_names, grid=(len(row_names), cols), iterations=np.max(iterations, 0).tolist())


def grid_image(samples: Samples) -> np.ndarray:
    """The uint8 PNG grid (one row per condition; empty cells white) of ``samples``."""
    rows, cols = samples.grid
    pixels = image_lib.to_uint8(samples.images)
    grid = np.full((rows * cols, *pixels.shape[1:]), 255, np.uint8)
    grid[: len(pixels)] = pixels
    return image_lib.tile(grid.reshape(rows, cols, *pixels.shape[1:]))


def _output_paths(out: os.PathLike | str) -> dict[str, str]:
    out = os.fspath(out)
    if not out.lower().endswith(".png"):
        raise ValueError(f"--out {out!r}: expected a .png file name (the .npz and .json go beside it)")
    stem = out[:-4]
    return {"png": out, "npz": stem + ".npz", "json": stem + ".json"}


def write_samples(samples: Samples, out: os.PathLike | str, summary: dict, levels: int) -> dict[str, str]:
    """Writes the PNG, ``.npz`` and JSON (``summary`` plus the file names) for ``out``; returns the paths."""
    paths = _output_paths(out)
    x = samples.images
    arrays = dict(images=image_lib.to_uint8(x), samples=x, labels=samples.labels,
                  prompts=np.asarray(samples.prompts, dtype=str), rows=samples.rows,
                  guidance=np.float32(summary["guidance"]), step=np.int64(summary["step"]))
    if levels <= 255:
        clean = np.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0)
        arrays["pixels"] = np.clip(np.rint((clean + 1.0) * (levels / 2.0)), 0, levels).astype(np.uint8)
    atomic.write_npz(paths["npz"], arrays)
    side = max(samples.images.shape[1:3])
    image_lib.save_png(paths["png"], grid_image(samples), scale=max(1, math.ceil(64 / side)))
    atomic.write_json(paths["json"], dict(summary, files=paths))
    return paths


def _from_drawn(drawn: Drawn) -> Samples:
    """A family's ``Drawn`` grid (``Family.draw_samples``) as ``Samples`` (row-major, no labels)."""
    images = np.asarray(drawn.images, np.float32)
    rows, cols = images.shape[:2]
    row_of = np.repeat(np.arange(rows, dtype=np.int32), cols)
    return Samples(images=images.reshape((rows * cols,) + images.shape[2:]), labels=np.full(rows * cols, -1, np.int32),
                   prompts=[drawn.row_prompts[r] for r in row_of], rows=row_of, row_names=list(drawn.row_names),
                   grid=(rows, cols), iterations=[])


def sample_from_workdir(workdir: os.PathLike | str, out: os.PathLike | str, *, label: int | None = None,
                        prompt: str | None = None, guidance: float | None = None,
                        jacobi: flow.JacobiOptions | None | str = "config", num: int | None = None, seed: int = 0,
                        ema: bool = True, batch_size: int = 256, restored: Restored | None = None,
                        allow_frozen_change: bool = False) -> dict:
    """Samples from the latest complete checkpoint of ``workdir`` and writes ``out`` (a ``.png``) with
    its ``.npz`` and ``.json`` beside it (see the module docstring). Returns the JSON summary.

    ``jacobi``: ``'config'`` (the run's ``sample.jacobi``), None / ``'off'`` (sequential), a
    ``JacobiOptions`` or ``'BLOCK,THRESHOLD,MAX_ITERS'``. ``guidance`` None: the family's default (0 for
    flows; every weight of ``sample.guidance`` for STARFlow2, one grid row per prompt and weight). A
    family with its own sampler (``Family.draw_samples``) draws the grid; its summary fields are added
    and ``guidance`` becomes the list of row weights. ``ema``: use the EMA parameters when the run
    kept them. ``restored``: a ``restore_workdir`` result to reuse (then ``workdir``/``ema`` are not
    read again). ``allow_frozen_change``: sample although a frozen part no longer matches the
    fingerprint the run recorded. Raises ValueError / FileNotFoundError naming the offending argument;
    nothing is written then.
    """
    start = time.perf_counter()
    paths = _output_paths(out)
    if isinstance(jacobi, str) and jacobi != "config":
        jacobi = parse_jacobi(jacobi)
    _check_request(guidance, seed, batch_size, num)
    if restored is None and "://" not in os.fspath(workdir):
        workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    if restored is None:
        families.require(read_step_config(latest_step_dir(workdir)[1]), "sample", workdir)  # before any weights
        restored = restore_workdir(workdir, ema=ema, allow_frozen_change=allow_frozen_change)
    family = families.require(restored.config, "sample", workdir)
    if family.draw_samples is not None:
        drawn = family.draw_samples(restored, label=label, prompt=prompt, guidance=guidance, jacobi=jacobi, num=num,
                                    seed=seed, batch_size=batch_size)
        samples = _from_drawn(drawn)
        specific = dict(drawn.summary, guidance=[float(w) for w in drawn.row_guidance])
    else:
        samples = generate(restored, label=label, prompt=prompt, guidance=guidance, jacobi=jacobi, num=num,
                           seed=seed, batch_size=batch_size)
        used_jacobi = restored.task.jacobi if isinstance(jacobi, str) else jacobi
        specific = {
            "conditioning": restored.task.conditioning, "guidance": float(guidance or 0.0),
            "jacobi": None if used_jacobi is None else dict(block_size=used_jacobi.block_size,
                                                            threshold=used_jacobi.threshold,
                                                            max_iters=used_jacobi.max_iters),
            "iterations_per_block": samples.iterations}
    finite = np.isfinite(samples.images).reshape(len(samples.images), -1).all(axis=1)
    summary = {
        "workdir": os.fspath(workdir), "checkpoint": restored.step_dir, "step": restored.step,
        "ema": restored.used_ema, **specific, "seed": int(seed), "num_samples": len(samples.images),
        "grid": list(samples.grid), "rows": samples.row_names, "image_shape": list(samples.images.shape[1:]),
        "nonfinite_samples": int(np.sum(~finite)),
    }
    summary["seconds"] = round(time.perf_counter() - start, 3)
    write_samples(samples, paths["png"], summary, int(restored.config.data.levels))
    return dict(summary, files=paths)


def summary_line(summary: dict) -> str:
    """A one-line human description of a ``sample_from_workdir`` summary."""
    rows, cols = summary["grid"]
    weights = summary["guidance"]
    guidance = ", ".join(f"{w:g}" for w in sorted(set(weights))) if isinstance(weights, list) else f"{weights:g}"
    return (f"{summary['num_samples']} samples ({rows} rows × {cols}) at guidance {guidance} from step "
            f"{summary['step']} ({'EMA' if summary['ema'] else 'raw'} params) → {summary['files']['png']}")

