"""Pretzel (STARFlow2) benchmark: generation throughput, shared caches against re-encoding, train steps.

    python -m starflow2_jax.bench pretzel [--size tiny|demo|mid] [--batch B] [--guidance G] [--text-tokens T]
        [--images 1,2,4] [--steps S] [--repeats R] [--skip-train] [--json PATH] [--list]

Sizes (``--list``):

- ``tiny``: ``pretzel.tiny()`` (VLM width 64 × 2 layers, vocab 256; 8×8×1 images as 4×4 patches, N = 4
  slots of D = 16; flows of width 32, shallow 2 × 1, deep 2 layers);
- ``demo``: the model of ``configs/starflow2.py:demo,stage3`` as the ``starflow2`` family builds it
  (``train.tasks.starflow2.pretzel_config_from``; VLM width 128 × 4 layers, vocab 256; the digits at
  32×32×1 as 4×4 patches, N = 64 slots of D = 16; flows of width 128, shallow 2 × 2, deep 4; rows of
  384 with up to 4 images); run from the repository root;
- ``mid``: a demo-like middle size, ``tiny`` with a VLM of width 256 × 4 layers (8 heads, 2 KV heads,
  vocab 4096), 32×32×3 images as 4×4 patches (an 8×8 grid: N = 64 slots of D = 48), flows of width 256
  (4 heads of 64), shallow 2 × 2, deep 6 layers, rows of 512 tokens with up to 6 images (three
  training documents of 158 tokens fill 474 of them).

Parameters: the VLM from ``vlm.init_text``; the trainable parts from ``pretzel.init`` with every leaf
perturbed by 0.02·N(0, 1) (``common.perturb``), so the zero-initialised bridges and heads do real work
and Jacobi needs a realistic number of passes. The latent space is the patches space (no weights).

Measured (compilation excluded and reported separately, see ``bench.common``; median of ``--repeats``):

- generation: one image per row for ``--batch`` rows after a prompt of 8 tokens: the N image steps of
  the deep stream (``pretzel.generate``'s image segment, both streams' caches fed) and the shallow
  inversion, from a prefilled state (prefill not timed), sequentially (one slot per pass) and with
  Jacobi (block ``min(16, N)``, threshold 1e-3, at most 32 passes per block), unguided and guided
  (``--guidance``: a batch-doubled cache). ``image_tokens_per_s`` = batch · N / time;
  ``passes`` = deep-stream passes per image; ``jacobi_speedup`` = sequential time / Jacobi time.
- interleaved: one row, a prompt of 8 tokens, then K × (``--text-tokens`` greedy text tokens,
  ``<|vision_start|>``, an image, ``<|vision_end|>``) and a final text segment, for K in ``--images``,
  guided by ``--guidance``, sequential image steps, in caches sized for the largest K (the same for
  every K and both ways, so each jitted piece compiles once). **Shared** caches (ours): every token and every
  slot is fed once into both streams' caches. **Re-encoding** (the baseline, built here, what the
  unified peers do): after each image the caches are thrown away and both streams re-run over the
  whole document so far from scratch — the shallow flows re-encode every image's latents to u, then
  one teacher-forced pass of the VLM and the deep stream over the prefix (exact prefix lengths, each
  compiled before timing) — and generation continues from there. Both start from the same seeds; one
  untimed run of each checks that they produce the same tokens and (to 1e-3) the same latents, then
  the two are timed alternately in the same loop (every run's time is in ``*_runs_ms``).
  ``reencode_over_shared`` = re-encoding time / shared time (above 1: the shared caches are faster).
  The latent space's pixel decoder and encoder are left out of both (a peer would also re-run its
  image encoder on the decoded pixels), so the ratio is a lower bound on a peer's cost.
- train (stage 3): the step is built here with the family's loss and AdamW hyper-parameters, without
  the trainer's clip / schedule / non-finite guard (``bench.train`` times that chain for flows):
  ``pretzel.loss`` (L_NF + λ·L_NTP with caption dropout) + its gradient in the trainable params
  + ``optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=1e-4)``, params and optimiser state donated, on
  one packed batch of ``--batch`` rows of ``seq_len`` tokens (documents text–image–text–image–text
  packed with segment ids; the frozen VLM passed separately, never differentiated).
  ``train_steps_per_s`` = 1 / median step time; ``train_tokens_per_s`` = the non-padding tokens of
  the batch × steps/s.

Output: one JSON line on stdout (and ``--json PATH``, written atomically); a short table and progress
on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from starflow2_jax import atomic, flow, pretzel, vlm
from starflow2_jax.bench import common
from starflow2_jax.fae.latent_space import PatchesSpace
from starflow2_jax.pretzel import layout

PARAM_NOISE = 0.02
PROMPT_TOKENS = 8
JACOBI = dict(threshold=1e-3, max_iters=32)


def train_path() -> str:
    """What the train measurement times (recorded in the JSON)."""
    return "direct: pretzel.loss + jax.grad + optax.adamw (the family's loss and AdamW; no clip, schedule or guard)"


def tiny_size() -> pretzel.PretzelConfig:
    """The ``tiny`` size: ``pretzel.tiny()``."""
    return pretzel.tiny()


def demo_size() -> pretzel.PretzelConfig:
    """The ``demo`` size: ``configs/starflow2.py:demo,stage3``'s model, as the training family builds it."""
    from starflow2_jax.config_files import load_config
    from starflow2_jax.train.tasks.starflow2 import pretzel_config_from

    return pretzel_config_from(load_config("configs/starflow2.py:demo,stage3"))


def mid_size() -> pretzel.PretzelConfig:
    """The ``mid`` size (see the module docstring): a demo-like model between ``tiny`` and ``7b``."""
    base = pretzel.tiny()
    text = dataclasses.replace(base.vlm, vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=4,
                               num_heads=8, num_kv_heads=2, mrope_section=(4, 6, 6), image_token_id=4092,
                               video_token_id=4093, vision_start_token_id=4090, vision_end_token_id=4091,
                               eos_token_ids=(4095,))
    return pretzel.tiny(vlm=text, latent=PatchesSpace(32, 32, 3, 4), flow_width=256, flow_head_dim=64,
                        shallow_blocks=2, shallow_layers=2, deep_layers=6, seq_len=512, max_images=6)


SIZES = {"tiny": tiny_size, "demo": demo_size, "mid": mid_size}
DEFAULT_BATCH = {"tiny": 4, "demo": 8, "mid": 2}


def describe(config: pretzel.PretzelConfig) -> str:
    v = config.vlm
    return (f"VLM {v.hidden_size}x{v.num_layers} (vocab {v.vocab_size}), images {config.latent.image_shape} → "
            f"N={config.num_slots} slots of D={config.latent_dim}, flows width {config.flow_width}, shallow "
            f"{config.shallow_blocks}x{config.shallow_layers}, deep {config.deep_layers}, rows {config.seq_len}")


def make_params(config: pretzel.PretzelConfig, seed: int):
    """``(trainable params perturbed by PARAM_NOISE, frozen VLM params)``."""
    params = common.perturb(pretzel.init(config, jax.random.key(seed)), jax.random.key(seed + 1), PARAM_NOISE)
    return params, vlm.init_text(config.vlm, jax.random.key(seed + 2))


def prompt_ids(config: pretzel.PretzelConfig, seed: int) -> list[int]:
    """PROMPT_TOKENS ordinary token ids (below every special id)."""
    return np.random.default_rng(seed).integers(3, config.vlm.vocab_size - 16, PROMPT_TOKENS).tolist()


# ---- jitted pieces (only ``pretzel``'s public segment API) -----------------------------------------
@functools.partial(jax.jit, static_argnames=("config", "jacobi"))
def _generate_image(config, params, vlm_params, state, eps, guidance, *, jacobi):
    """The image segment from a prefilled state, then the shallow inversion → ``(latents (B, N, D), passes)``.
    jacobi: None (sequential) or a ``flow.JacobiOptions`` (hashable: static)."""
    _, u, passes = pretzel.image_segment(config, params, vlm_params, state, eps, guidance, jacobi=jacobi)
    return pretzel.invert_shallow(config, params, u), passes


# ---- generation -----------------------------------------------------------------------------------
def bench_generation(config, params, vlm_params, *, batch: int, guidance: float, repeats: int, seed: int) -> dict:
    """Sequential and Jacobi image generation, unguided and guided (see the module docstring)."""
    n, d = config.num_slots, config.latent_dim
    prompt = layout.layout_document(config, [prompt_ids(config, seed)])
    length = len(prompt["tokens"]) + 1 + n + 1  # the prompt, <|vision_start|>, the slots, <|vision_end|>
    eps = jax.random.normal(jax.random.key(seed + 3), (batch, n, d), jnp.float32)
    block = min(16, n)
    while n % block:
        block -= 1
    out = {}
    for guided_value in (0.0, guidance):
        guided = guided_value != 0
        state = pretzel.prefill(config, params, vlm_params, {}, prompt, length=length, num_samples=batch,
                                guided=guided)
        state = pretzel.feed_token(config, params, vlm_params, state, jnp.int32(config.vlm.vision_start_token_id))
        times = {}
        for mode, jacobi in (("sequential", None), ("jacobi", flow.JacobiOptions(block_size=block, **JACOBI))):
            args = (config, params, vlm_params, state, eps, jnp.float32(guided_value))
            compiled, compile_s = common.compile_ahead(_generate_image, *args, jacobi=jacobi)
            passes = []

            def call():
                x, p = compiled(*args[1:])
                passes.append(p)
                return x

            timing = common.time_calls(call, steps=1, repeats=repeats)
            key = f"{'guided' if guided else 'unguided'}_{mode}"
            times[mode] = timing.median
            out[key] = dict(image_tokens_per_s=batch * n / timing.median, images_per_s=batch / timing.median,
                            ms=timing.median * 1e3, passes=int(passes[-1]), compile_s=compile_s)
            common.log(f"generate {key}: {timing.median * 1e3:.1f} ms for {batch} images of {n} tokens, "
                       f"{int(passes[-1])} passes")
        out[f"{'guided' if guided else 'unguided'}_jacobi_speedup"] = times["sequential"] / times["jacobi"]
    out.update(batch=batch, guidance=guidance, jacobi=dict(JACOBI, block_size=block), prompt_tokens=PROMPT_TOKENS)
    return out


# ---- interleaved: shared caches against re-encoding -----------------------------------------------
def _document(config, prompt: list[int], texts: list[list[int]], images: int) -> dict:
    """The layout of prompt, then text_k and an image (placeholder pixels: only positions are read) per
    generated image, then any text after the last image."""
    items = [layout.Text(prompt)]
    blank = np.zeros(config.latent.image_shape, np.float32)
    for k, text in enumerate(texts):
        if text:
            items.append(layout.Text(text))
        if k < images:
            items.append(layout.Image(blank))
    return layout.layout_document(config, items, max_length=10 ** 9)


def document_length(config, images: int, text_tokens: int) -> int:
    """Positions of an interleaved benchmark document with ``images`` images (prompt included)."""
    return PROMPT_TOKENS + (images + 1) * text_tokens + images * (config.num_slots + 2)


def interleaved_run(config, params, vlm_params, *, images: int, text_tokens: int, guidance: float, seed: int,
                    reencode: bool, length: int | None = None) -> tuple[list[list[int]], list[np.ndarray]]:
    """One interleaved document (see the module docstring) with shared caches, or re-encoding after each
    image, in caches of ``length`` positions (default: the document's). Returns ``(text segments' token
    ids, latents (N, D) per image)``."""
    v = config.vlm
    n, d = config.num_slots, config.latent_dim
    guided = guidance != 0
    prompt = prompt_ids(config, seed)
    length = length or document_length(config, images, text_tokens)
    if length < document_length(config, images, text_tokens):
        raise ValueError(f"caches of length {length} cannot hold a document of "
                         f"{document_length(config, images, text_tokens)} positions")
    state = pretzel.prefill(config, params, vlm_params, {}, layout.layout_document(config, [prompt]), length=length,
                            guided=guided)
    texts, latents = [], []
    for k in range(images + 1):
        # greedy, no stop token: every segment is text_tokens long
        state, ids, _ = pretzel.text_segment(config, params, vlm_params, state, jax.random.key(seed),
                                             max_tokens=text_tokens, stop_tokens=())
        texts.append(ids)
        if k == images:
            break
        state = pretzel.feed_token(config, params, vlm_params, state, jnp.int32(v.vision_start_token_id))
        eps = jax.random.normal(jax.random.fold_in(jax.random.key(seed), k), (1, n, d), jnp.float32)
        state, u, _ = pretzel.image_segment(config, params, vlm_params, state, eps, jnp.float32(guidance))
        latents.append(pretzel.invert_shallow(config, params, u)[0])
        if reencode:
            # the restart: fresh caches, the shallow flows on every image's latents, one teacher-forced pass
            # of both streams over the document so far (each prefix length compiles once)
            doc = _document(config, prompt, [np.asarray(t)[0].tolist() for t in texts], k + 1)
            state = pretzel.prefill(config, params, vlm_params, {}, doc, length=length, guided=guided,
                                    latents=jnp.stack(latents))
    jax.block_until_ready((texts, latents))
    return [np.asarray(t)[0].tolist() for t in texts], [np.asarray(x) for x in latents]


def bench_interleaved(config, params, vlm_params, *, image_counts: Sequence[int], text_tokens: int, guidance: float,
                      repeats: int, seed: int) -> dict:
    """Shared caches against re-encoding at each image count, timed alternately (see the module docstring)."""
    out = {}
    length = document_length(config, max(image_counts), text_tokens)  # one cache size: each piece compiles once
    for images in image_counts:
        run = functools.partial(interleaved_run, config, params, vlm_params, images=images, text_tokens=text_tokens,
                                guidance=guidance, seed=seed, length=length)
        start = time.perf_counter()
        shared_text, shared_x = run(reencode=False)  # also compiles
        again_text, again_x = run(reencode=True)
        warm_s = time.perf_counter() - start
        if shared_text != again_text:
            raise RuntimeError(f"interleaved with {images} image(s): re-encoding produced other tokens than the "
                               f"shared caches ({again_text} vs {shared_text}); the comparison would be unfair")
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(shared_x, again_x))
        if diff > 1e-3:
            raise RuntimeError(f"interleaved with {images} image(s): re-encoding changed the latents by {diff:.3g} "
                               f"(> 1e-3); the comparison would be unfair")
        runs = {"shared": [], "reencode": []}
        for _ in range(repeats):
            for name, flag in (("shared", False), ("reencode", True)):
                start = time.perf_counter()
                run(reencode=flag)
                runs[name].append(time.perf_counter() - start)
        shared, reenc = statistics.median(runs["shared"]), statistics.median(runs["reencode"])
        positions = document_length(config, images, text_tokens)
        out[str(images)] = dict(shared_ms=shared * 1e3, reencode_ms=reenc * 1e3, reencode_over_shared=reenc / shared,
                                generated_positions=positions - PROMPT_TOKENS,
                                shared_positions_per_s=(positions - PROMPT_TOKENS) / shared,
                                reencode_positions_per_s=(positions - PROMPT_TOKENS) / reenc,
                                max_latent_diff=diff, warmup_s=warm_s,
                                shared_runs_ms=[t * 1e3 for t in runs["shared"]],
                                reencode_runs_ms=[t * 1e3 for t in runs["reencode"]])
        common.log(f"interleaved {images} image(s): shared {shared * 1e3:.1f} ms, re-encoding {reenc * 1e3:.1f} ms, "
                   f"ratio {reenc / shared:.2f} (latents agree to {diff:.2g})")
    return dict(per_images=out, text_tokens=text_tokens, guidance=guidance, prompt_tokens=PROMPT_TOKENS,
                cache_length=length, image_steps="sequential")


# ---- train (stage 3) ------------------------------------------------------------------------------
def packed_batch(config, rows: int, seed: int) -> dict:
    """``rows`` rows of ``config.seq_len`` tokens, each packed with documents text–image–text–image–text
    (random ids, uniform images, both images targets) while they fit; segment ids 1..k, 0 = padding."""
    rng = np.random.default_rng(seed)
    top = config.vlm.vocab_size - 16
    length, m = config.seq_len, config.max_images
    out = []
    for _ in range(rows):
        docs, used, images = [], 0, 0
        while True:
            items = [rng.integers(3, top, 12).tolist(), rng.uniform(-1, 1, config.latent.image_shape),
                     rng.integers(3, top, 8).tolist(), rng.uniform(-1, 1, config.latent.image_shape),
                     rng.integers(3, top, 6).tolist()]
            doc = layout.layout_document(config, [layout.Text(i) if isinstance(i, list) else
                                                  layout.Image(i.astype(np.float32)) for i in items])
            if used + len(doc["tokens"]) > length or images + 2 > m:
                break
            docs.append(doc)
            used += len(doc["tokens"])
            images += 2
        if not docs:
            raise ValueError(f"seq_len={length}, max_images={m}: not even one benchmark document fits a row")
        pad = length - used
        row = dict(tokens=np.concatenate([d["tokens"] for d in docs] + [np.zeros(pad, np.int32)]),
                   slot=np.concatenate([d["slot"] for d in docs] + [np.zeros(pad, bool)]),
                   text_loss=np.concatenate([d["text_loss"] for d in docs] + [np.zeros(pad, bool)]),
                   positions=np.concatenate([d["positions"] for d in docs] + [np.zeros((pad, 3), np.int32)]),
                   segment_ids=np.concatenate([np.full(len(d["tokens"]), i + 1, np.int32) for i, d in enumerate(docs)]
                                              + [np.zeros(pad, np.int32)]))
        offsets = np.cumsum([0] + [len(d["images"]) for d in docs])
        row["image_index"] = np.concatenate([np.where(d["image_index"] >= 0, d["image_index"] + offsets[i], -1)
                                             for i, d in enumerate(docs)] + [np.full(pad, -1, np.int32)])
        blank = np.zeros((m - images,) + tuple(config.latent.image_shape), np.float32)
        row["images"] = np.concatenate([d["images"] for d in docs] + [blank]).astype(np.float32)
        row["image_target"] = np.concatenate([d["image_target"] for d in docs] + [np.zeros(m - images, bool)])
        row["image_valid"] = np.arange(m) < images
        out.append(row)
    return {k: np.stack([r[k] for r in out]) for k in out[0]}


def bench_train(config, params, vlm_params, *, batch: int, steps: int, repeats: int, seed: int) -> dict:
    """Stage-3 train steps/s and tokens/s (see the module docstring)."""
    data = packed_batch(config, batch, seed)
    pretzel.check_batch(config, data, loss=True)
    data = {k: jnp.asarray(v) for k, v in data.items()}
    optimizer = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=1e-4)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, vlm_params, batch, rng):
        def loss_fn(p):
            return pretzel.loss(config, p, vlm_params, batch, latent_vars={}, rng=rng, train=True)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    params = jax.tree.map(jnp.copy, params)
    opt_state = optimizer.init(params)
    rng = jax.random.key(seed + 5)
    compiled, compile_s = common.compile_ahead(train_step, params, opt_state, vlm_params, data, rng)
    losses = []

    def call():
        nonlocal params, opt_state
        params, opt_state, metrics = compiled(params, opt_state, vlm_params, data, rng)
        losses.append(metrics["loss"])
        return metrics["loss"]

    timing = common.time_calls(call, steps=steps, repeats=repeats)
    tokens = int(np.sum(np.asarray(data["segment_ids"]) > 0))
    first, last = float(losses[0]), float(losses[-1])
    common.log(f"train: {timing.median * 1e3:.1f} ms/step, {tokens} tokens per batch, loss {first:.4g} → {last:.4g}")
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return dict(path=train_path(), batch=batch, seq_len=config.seq_len, tokens_per_batch=tokens,
                images_per_batch=int(np.sum(np.asarray(data["image_valid"]))), trainable_params=num_params,
                train_steps_per_s=timing.per_second, train_step_ms=timing.median * 1e3,
                train_tokens_per_s=tokens * timing.per_second, compile_s=compile_s, loss_first=first, loss=last,
                optimizer="adamw(1e-4, b=(0.9, 0.95), wd 1e-4)", steps=steps)


# ---- driver ---------------------------------------------------------------------------------------
def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return common.round_sig(value) if isinstance(value, float) else value


def run(size: str, *, batch: int | None = None, guidance: float = 3.0, text_tokens: int = 8,
        image_counts: Sequence[int] = (1, 2, 4), steps: int = 5, repeats: int = 3, seed: int = 0,
        train: bool = True) -> dict:
    """Every measurement of ``size``; returns the JSON record (see the module docstring)."""
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: expected one of {tuple(SIZES)}")
    config = SIZES[size]()
    batch = DEFAULT_BATCH[size] if batch is None else batch
    params, vlm_params = make_params(config, seed)
    common.log(f"pretzel {size}: {describe(config)}; devices {common.devices_info()}")
    record = dict(benchmark="pretzel", size=size, model=describe(config), **common.environment(), dtype=config.dtype,
                  repeats=repeats, seed=seed, param_noise=PARAM_NOISE)
    record["generate"] = bench_generation(config, params, vlm_params, batch=batch, guidance=guidance,
                                          repeats=repeats, seed=seed)
    record["interleaved"] = bench_interleaved(config, params, vlm_params, image_counts=image_counts,
                                              text_tokens=text_tokens, guidance=guidance, repeats=repeats, seed=seed)
    if train:
        record["train"] = bench_train(config, params, vlm_params, batch=batch, steps=steps, repeats=repeats,
                                      seed=seed)
    return _rounded(record)


def table(record: dict) -> str:
    """A short human-readable summary of a record."""
    g = record["generate"]
    lines = [f"pretzel {record['size']} on {record['devices']['count']} x {record['devices']['kind']}",
             f"{'generation (image-latent tokens/s)':40s} {'sequential':>12s} {'jacobi':>12s} {'speedup':>8s}"]
    for kind in ("unguided", "guided"):
        seq, jac = g[f"{kind}_sequential"], g[f"{kind}_jacobi"]
        lines.append(f"  {kind:38s} {seq['image_tokens_per_s']:12.4g} {jac['image_tokens_per_s']:12.4g} "
                     f"{g[f'{kind}_jacobi_speedup']:8.3g}")
    lines.append(f"{'interleaved (ms per document)':40s} {'shared':>12s} {'re-encode':>12s} {'ratio':>8s}")
    for images, r in record["interleaved"]["per_images"].items():
        lines.append(f"  {images + ' image(s)':38s} {r['shared_ms']:12.4g} {r['reencode_ms']:12.4g} "
                     f"{r['reencode_over_shared']:8.3g}")
    if "train" in record:
        t = record["train"]
        lines.append(f"train stage 3: {t['train_steps_per_s']:.4g} steps/s, {t['train_tokens_per_s']:.4g} tokens/s "
                     f"(batch {t['batch']} x {t['seq_len']}; {t['path']})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m starflow2_jax.bench pretzel",
                                     description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default="tiny", help=f"model size: {', '.join(SIZES)} (default tiny)")
    parser.add_argument("--batch", type=int, default=None,
                        help="rows for generation and training (default: tiny 4, mid 2)")
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance weight of the guided runs (default 3)")
    parser.add_argument("--text-tokens", type=int, default=8, help="tokens per interleaved text segment (default 8)")
    parser.add_argument("--images", default="1,2,4", help="images per interleaved document, comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="train steps per timed run (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the params, prompts and noise")
    parser.add_argument("--skip-train", action="store_true", help="skip the train-step measurement")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the record to PATH (atomically)")
    parser.add_argument("--list", action="store_true", help="list the sizes and exit")
    return parser


def _image_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        counts = ()
    if not counts or any(c < 1 for c in counts):
        raise SystemExit(f"--images={text!r}: expected comma-separated positive image counts, e.g. 1,2,4")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name, make in SIZES.items():
            print(f"{name:6s} {describe(make())}")
        return 0
    if args.size not in SIZES:
        raise SystemExit(f"--size={args.size!r}: expected one of {tuple(SIZES)}")
    for name in ("steps", "repeats", "text_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)}: expected an int >= 1")
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch={args.batch}: expected a positive batch size")
    if args.guidance == 0:
        raise SystemExit("--guidance=0: expected a nonzero weight (the unguided runs are always measured)")
    counts = _image_counts(args.images)
    config = SIZES[args.size]()
    if max(counts) > config.max_images:
        raise SystemExit(f"--images={args.images}: the {args.size} size holds at most {config.max_images} images")
    record = run(args.size, batch=args.batch, guidance=args.guidance, text_tokens=args.text_tokens,
                 image_counts=counts, steps=args.steps, repeats=args.repeats, seed=args.seed,
                 train=not args.skip_train)
    line = common.emit(record)
    if args.json:
        atomic.write_text(args.json, line + "\n")
    print(table(record), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
