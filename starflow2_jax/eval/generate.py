"""Generation from a trained STARFlow2 workdir: ``generate(workdir, mode, ...)`` → text, PNG images and an
HTML transcript in one output directory (written atomically: complete or absent).

Modes (``pretzel.generate``; the caches are shared across segments, nothing is re-encoded):

    t2i          text → image: ``num`` images per prompt (Gaussian guidance on the deep stream, Jacobi, the
                 image temperature: noise T·ε, by default the run's ``sample.image_temperature``)
    i2t          image → text: the input images (context), then the prompt; greedy or sampled text
    interleaved  text and images after the prompt (and input images), one row, until a stop token (images
                 guided and at the image temperature like t2i)
    edit         the input images and the instruction as context → a new image (guided like t2i)

Output directory: ``transcript.html`` (the prompt and the outputs in order, images inline),
``image_{k}.png`` per generated image, ``text.txt`` (the generated text, one block per prompt /
sample) and ``summary.json`` (mode, prompts, seeds, settings, files, timings).
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import jax
import numpy as np

from starflow2_jax import atomic, pretzel
from starflow2_jax.eval import transcript

MODES = ("t2i", "i2t", "interleaved", "edit")


def load_image(path: str, shape: tuple) -> np.ndarray:
    """An image file → (H, W, C) float32 in [−1, 1] of the latent space's ``shape`` (central square,
    resized; grey or RGB as the space takes). FileNotFoundError / ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    from starflow2_jax.data.images import resize_and_center_crop

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path!r}: no such file")
    try:
        with Image.open(path) as img:
            img = resize_and_center_crop(img.convert("RGB"), int(shape[0]))
    except UnidentifiedImageError as error:
        raise ValueError(f"--image {path!r}: not an image file ({error})") from error
    pixels = np.asarray(img, np.float32) / 127.5 - 1.0
    if shape[2] == 1:
        pixels = pixels @ np.asarray([0.299, 0.587, 0.114], np.float32)
        pixels = pixels[..., None]
    return pixels.astype(np.float32)


def _uint8(image) -> np.ndarray:
    return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _write_transcript(path: str, parts: list, title: str) -> None:
    """The HTML transcript (``eval.transcript``). parts: ``('text', str, is_prompt)`` /
    ``('image', uint8 (H, W, C), is_prompt, metadata dict)``."""
    items = [transcript.Passage(p[1], prompt=p[2]) if p[0] == "text" else
             transcript.Picture(p[1], prompt=p[2], meta=p[3]) for p in parts]
    transcript.write_transcript(path, items, title=title)


def _prompt_document(task, prompt: str, images: Sequence[np.ndarray]) -> dict:
    items = [pretzel.Image(x, target=False) for x in images]
    if prompt:
        items.append(pretzel.Text(prompt, loss=False))
    if not items:
        return {k: v[:0] for k, v in pretzel.layout_document(task.config, [[0]]).items()}
    return pretzel.layout_document(task.config, items, encode=task.encode)


def _jacobi(jacobi: str | None):
    if not jacobi or jacobi == "off":
        return None
    try:
        block, threshold, iters = jacobi.split(",")
        return dict(block_size=int(block), threshold=float(threshold), max_iters=int(iters))
    except ValueError:
        raise ValueError(f"--jacobi {jacobi!r}: expected BLOCK,THRESHOLD,MAX_ITERS (e.g. 4,1e-3,32) or 'off'") \
            from None


def generate(workdir: str, out_dir: str, *, mode: str, prompts: Sequence[str] = ("",), images: Sequence[str] = (),
             num: int = 1, guidance: float = 0.0, jacobi: str | None = None, seed: int = 0,
             max_new_tokens: int = 32, temperature: float = 0.0, length: int = 0, ema: bool = True,
             allow_frozen_change: bool = False, image_temperature: float | None = None) -> dict:
    """Runs ``mode`` on a trained starflow2 ``workdir`` and writes ``out_dir`` (see the module docstring);
    returns the summary. temperature: the text's (0: greedy); image_temperature: T > 0 of the images'
    noise T·ε (t2i, interleaved, edit; None: the run's ``sample.image_temperature``). Raises ValueError /
    FileNotFoundError naming the bad value before anything is written (and ``out_dir`` stays absent on
    any error)."""
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: expected one of {MODES}")
    if num < 1 or max_new_tokens < 1 or temperature < 0:
        raise ValueError(f"--num {num} and --max-new-tokens {max_new_tokens} must be >= 1, --temperature "
                         f"{temperature} >= 0")
    if mode == "edit" and not images:
        raise ValueError("--mode edit needs at least one --image (the image to edit)")
    if image_temperature is not None:
        try:
            image_temperature = pretzel.check_image_temperature(image_temperature)
        except ValueError:
            raise ValueError(f"--image-temperature {image_temperature!r}: expected a finite number > 0 (the images' "
                             f"noise is T·ε; 1: the model's distribution)") from None
    atomic.check_output_directory(out_dir)
    from starflow2_jax.train import checkpoint as ckpt_lib
    from starflow2_jax.train.restore import latest_step_dir

    _, step_dir = latest_step_dir(workdir)
    family = ckpt_lib.read_config_json(step_dir).get("model", {}).get("family")
    if family != "starflow2":
        raise ValueError(f"--workdir {workdir!r} holds a model.family={family!r} run; `starflow2 generate` reads "
                         f"starflow2 runs (`starflow2 sample` draws from flows)")
    from starflow2_jax.train.restore import restore_workdir
    from starflow2_jax.train.tasks.starflow2_data import make_tokenizer

    restored = restore_workdir(workdir, ema=ema, allow_frozen_change=allow_frozen_change)
    task, cfg = restored.task, restored.task.config
    decode = make_tokenizer(restored.config).decode
    params, vlm_params, latent_vars = restored.params, restored.extra["vlm"], restored.extra.get("latent", {})
    shape = tuple(cfg.latent.image_shape)
    pixels = [load_image(p, shape) for p in images]
    docs = [_prompt_document(task, p, pixels) for p in prompts]  # every bad prompt found before generating
    jac = _jacobi(jacobi)
    if image_temperature is None:
        image_temperature = float(restored.config.sample.image_temperature)  # validated with the stored config
    rng = jax.random.key(seed)
    parts, texts, outputs, started = [], [], [], time.perf_counter()
    for i, (prompt, doc) in enumerate(zip(prompts, docs)):
        key = jax.random.fold_in(rng, i)
        parts += [("image", _uint8(x), True, {"input": p}) for x, p in zip(pixels, images)]
        if prompt:
            parts.append(("text", prompt, True))
        if mode in ("t2i", "edit"):
            out = pretzel.text_to_image(cfg, params, vlm_params, latent_vars, doc, rng=key, num_samples=num,
                                        guidance=guidance, jacobi=jac, length=length or None,
                                        image_temperature=image_temperature)
            for j, image in enumerate(np.asarray(out["images"])):
                outputs.append(_uint8(image))
                parts.append(("image", outputs[-1], False, {"prompt": i, "sample": j, "seed": seed,
                                                            "guidance": guidance,
                                                            "image_temperature": image_temperature}))
        elif mode == "i2t":
            out = pretzel.image_to_text(cfg, params, vlm_params, latent_vars, doc, rng=key, num_samples=num,
                                        max_new_tokens=max_new_tokens, temperature=temperature,
                                        length=length or None)
            for j, (ids, n) in enumerate(zip(np.asarray(out["ids"]), out["lengths"])):
                texts.append(decode(ids[:int(n)].tolist()))
                parts.append(("text", texts[-1], False))
        else:
            budget = length or len(doc["tokens"]) + max_new_tokens + 4 * (cfg.num_slots + 2)
            out = pretzel.interleaved(cfg, params, vlm_params, latent_vars, doc, rng=key, length=budget,
                                      max_new_tokens=max_new_tokens, guidance=guidance, jacobi=jac,
                                      temperature=temperature, image_temperature=image_temperature)
            seq, start, k = out["sequence"], len(doc["tokens"]), 0
            text: list[int] = []
            for t, is_slot in zip(seq["tokens"][start:].tolist(), seq["slot"][start:].tolist()):
                if t == cfg.vlm.vision_start_token_id:
                    if text:
                        texts.append(decode(text))
                        parts.append(("text", texts[-1], False))
                    text = []
                    outputs.append(_uint8(out["images"][k]))
                    parts.append(("image", outputs[-1], False, {"prompt": i, "image": k, "seed": seed,
                                                                "guidance": guidance,
                                                                "image_temperature": image_temperature}))
                    k += 1
                elif not is_slot and t != cfg.vlm.vision_end_token_id:
                    text.append(t)
            if text:
                texts.append(decode(text))
                parts.append(("text", texts[-1], False))
    seconds = time.perf_counter() - started
    files = [f"image_{k}.png" for k in range(len(outputs))]
    summary = dict(mode=mode, workdir=os.fspath(workdir), step=restored.step, prompts=list(prompts),
                   images=list(images), num=num, guidance=guidance, jacobi=jac, seed=seed,
                   max_new_tokens=max_new_tokens, temperature=temperature,
                   image_temperature=image_temperature if mode != "i2t" else None, generated_images=len(outputs),
                   generated_texts=texts, files=files + ["text.txt", "transcript.html", "summary.json"],
                   seconds=round(seconds, 3))
    with atomic.output_directory(out_dir) as tmp:
        for name, image in zip(files, outputs):
            atomic.write_png(tmp / name, image)
        atomic.write_text(tmp / "text.txt", "\n\n".join(texts) + ("\n" if texts else ""))
        _write_transcript(os.fspath(tmp / "transcript.html"), parts, f"starflow2 generate --mode {mode}")
        atomic.write_json(tmp / "summary.json", summary)
    return summary
