"""The STARFlow2 digits demo's scoring: ``python -m starflow2_jax.eval.starflow2_demo --workdir DIR``.

Reads the final run of ``launch/local.sh demo`` (``DIR/stage3``, restored as ``starflow2 generate`` does;
EMA parameters when the run kept them) and scores what issue 11 asks, with the package's own tools:

1. text → image: per digit, ``--samples-per-digit`` images of the chat prompt "draw the digit seven"
   (``demo_text.DRAW_PROMPT``, laid out as the training documents up to the assistant turn:
   ``eval.starflow2_prompts``) at the config's guidance (``max(sample.guidance)``) and image temperature
   (``sample.image_temperature``: every image step's noise is T·ε, here and in sections 4 and 5): the
   model writes its reply (``demo_text.drawing_text``, "seven, a handwritten seven", greedy) and opens the
   image, all rows of a digit in lockstep (``draw_reply``: one prefill, text segment and image segment),
   judged by ``DigitsJudge`` (accuracy, variety, novelty); grids of ``--grid-per-digit`` per digit at
   guidance 0 and at the config's guidance (the first of the judged ones);
2. exact likelihood: bits/dim of the 297 held-out digits (``eval.bpd.evaluate_bpd`` with the family's
   scorer: each image after its first caption in a plain document, 16 levels, uniform dequantisation —
   the flow-only demo's definition);
3. understanding: ``QUESTION`` about each of the first ``--held-out`` held-out digits, greedy
   ``pretzel.image_to_text``, the answer word parsed; accuracy and a confusion table;
4. interleaved: each of ``INTERLEAVED_PROMPTS``, ``--seeds`` seeds, ``pretzel.interleaved`` at the config's
   guidance and image temperature: the share of documents with the right structure and the judge's
   accuracy on their images;
5. editing: a held-out digit d and ``NEXT_DIGIT_PROMPT``; the model writes the assistant turn (at most one
   image, ``pretzel.interleaved``), the image judged against the digit the training documents draw after
   d, for the first ``--edit`` held-out digits;
6. the cache-equality check on one interleaved document (``pretzel.cache_difference``);
7. wall times: the stages' (``--time NAME=SECONDS``, given by the orchestration) and each section's.

Writes ``DIR/scoring/`` (``t2i_samples.npz``, ``t2i_grid_g<W>.png``, ``understanding.npz``,
``interleaved.npz``, ``interleaved_<k>.html`` and ``.png`` — the first seed's transcript of prompt k —,
``next_digit.npz``, ``next_digit.png``), then ``DIR/demo_metrics.json`` and the self-contained
``DIR/report.html`` (every file atomically), and prints one line per metric with its target. Exit
status 0 when everything was scored (a missed target is reported, not an error), 1 when ``DIR`` is not
a finished STARFlow2 digits demo (the message names the missing or malformed file; nothing is written).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, NamedTuple, Sequence

import numpy as np

from starflow2_jax import atomic
from starflow2_jax.eval.demo import DemoInputError, parse_timing, read_json

MANIFEST = "demo.json"
MANIFEST_KIND = "starflow2-digits-demo"
FINAL_STAGE = "stage3"
SUMMARY = "train_summary.json"
SCORING_SUBDIR = "scoring"
TARGETS = {"t2i_accuracy": 0.97, "variety": [0.8, 1.2], "bpd": 2.20, "understanding": 0.95,
           "interleaved_structure": 0.90, "interleaved_images": 0.90, "next_digit": 0.85, "cache_difference": 1e-4,
           "demo_seconds": 720.0}
ANSWER_TOKENS = 8  # an answer is one word and <|im_end|>
INTERLEAVED_TOKENS = 40  # four drawing texts (5 tokens each), four <|vision_start|> and <|im_end|>, with room
SEGMENT_TOKENS = 8
DIGITS_SHAPE = (8, 8, 1)


class Run(NamedTuple):
    """The restored final stage: ``restored`` (``train.restore.Restored``), ``config`` (its PretzelConfig),
    ``params`` / ``vlm`` / ``latent`` (the generation API's arguments), ``encode`` / ``decode`` (its
    tokenizer), ``guidance`` (max of ``sample.guidance``), ``jacobi`` (``sample.jacobi`` or None),
    ``image_temperature`` (``sample.image_temperature``: the images' noise is T·ε)."""

    restored: Any
    config: Any
    params: Any
    vlm: Any
    latent: Any
    encode: Any
    decode: Any
    guidance: float
    jacobi: Any
    image_temperature: float = 1.0


# ---- input checks and restoring -----------------------------------------------------------------
def check_workdir(workdir: str) -> str:
    """``DIR/stage3`` after checking that ``workdir`` is a STARFlow2 digits demo whose stage 3 finished
    (``DIR/demo.json`` of kind ``MANIFEST_KIND``, ``DIR/stage3/train_summary.json`` not interrupted, the
    run a stage-3 'starflow2' run on 8×8 grey patches). DemoInputError naming the file otherwise."""
    if not os.path.isdir(workdir):
        raise DemoInputError(f"--workdir {workdir}: no such directory (run launch/local.sh demo first)")
    manifest = read_json(os.path.join(workdir, MANIFEST))
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        kind = manifest.get("kind") if isinstance(manifest, dict) else manifest
        raise DemoInputError(f"{os.path.join(workdir, MANIFEST)}: kind {kind!r}; expected {MANIFEST_KIND!r} (a "
                             f"workdir of launch/local.sh demo)")
    stage = os.path.join(workdir, FINAL_STAGE)
    if not os.path.isdir(stage):
        raise DemoInputError(f"missing {stage} (the demo's stage 3 has not run: launch/local.sh demo resumes it)")
    summary = read_json(os.path.join(stage, SUMMARY))
    if not isinstance(summary, dict) or summary.get("interrupted") is not False:
        raise DemoInputError(f"{os.path.join(stage, SUMMARY)}: expected a finished run's summary (\"interrupted\": "
                             f"false), found {summary!r:.200}")
    config = read_json(os.path.join(stage, "config.json"))
    model = config.get("model", {}) if isinstance(config, dict) else {}
    section = model.get("starflow2", {})
    latent = section.get("latent", {})
    found = (model.get("family"), section.get("stage"), latent.get("kind"), latent.get("image_size"),
             latent.get("channels"))
    if found != ("starflow2", FINAL_STAGE, "patches", DIGITS_SHAPE[0], DIGITS_SHAPE[2]):
        raise DemoInputError(f"{os.path.join(stage, 'config.json')}: model.family, starflow2.stage, latent.kind, "
                             f"image_size, channels = {found}; expected ('starflow2', {FINAL_STAGE!r}, 'patches', "
                             f"{DIGITS_SHAPE[0]}, {DIGITS_SHAPE[2]}) (the digits demo's stage 3)")
    return stage


def load_run(stage: str) -> Run:
    """Restores ``stage`` (its latest complete checkpoint and its frozen VLM); DemoInputError naming
    what is missing or damaged."""
    from starflow2_jax.train.restore import restore_workdir
    from starflow2_jax.train.tasks.starflow2_data import make_tokenizer

    try:
        restored = restore_workdir(stage, ema=True)
        decode = make_tokenizer(restored.config).decode
        decode([0])  # reads the tokenizer file now
    except (FileNotFoundError, ValueError) as error:
        raise DemoInputError(f"{stage}: {error}") from error
    task = restored.task
    weights = [float(w) for w in restored.config.sample.guidance]
    return Run(restored=restored, config=task.config, params=restored.params, vlm=restored.extra["vlm"],
               latent=restored.extra.get("latent", {}), encode=task.encode, decode=decode,
               guidance=max(weights) if weights else 0.0, jacobi=task.jacobi,
               image_temperature=float(restored.config.sample.image_temperature))


def held_out_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pixels (297, 8, 8, 1) float32 x = v/8 − 1, labels (297,), indices into load_digits (297,))`` of
    the fixed test split, in its order."""
    from sklearn.datasets import load_digits

    from starflow2_jax.data.digits import DIGITS_LEVELS, digits_split_indices
    from starflow2_jax.data.images import scale_pixels

    digits = load_digits()
    test = digits_split_indices()["test"]
    pixels = scale_pixels(digits.images[test].astype(np.int64), DIGITS_LEVELS)[..., None]
    return pixels.astype(np.float32), digits.target[test].astype(np.int64), test


def _rng(seed: int, section: int):
    import jax

    return jax.random.fold_in(jax.random.key(int(seed)), section)


def _fold(rng, i: int):
    import jax

    return jax.random.fold_in(rng, i)


def _grid_png(path: str, grid: np.ndarray) -> None:
    """(rows, cols, 8, 8, 1) images in [−1, 1] → a PNG, 4× upscaled."""
    from starflow2_jax.train.images import save_png, tile, to_uint8

    save_png(path, tile(to_uint8(grid)), scale=4)


def _seconds_per_call(times: Sequence[float]) -> float | None:
    """The median call after the first (which compiles), None with one call."""
    return float(np.median(times[1:])) if len(times) > 1 else None


# ---- the sections -------------------------------------------------------------------------------
def draw_reply(run: Run, prompt: dict, *, rows: int, guidance: float, rng, length: int) -> tuple[str, bool, Any]:
    """The assistant's reply to a draw prompt cut at its turn, ``rows`` images in lockstep (the segment API):
    greedy text (the same in every row) until ``<|vision_start|>`` (at most ``SEGMENT_TOKENS``), then one
    image segment at ``run.image_temperature`` (noise T·ε) — after a ``<|vision_start|>`` fed in when the
    reply did not open the image itself (as ``pretzel.text_to_image`` appends it). Returns ``(the text the
    model wrote, whether it opened the image, images (rows, 8, 8, 1) float32)``."""
    import jax

    from starflow2_jax import pretzel

    cfg = run.config
    state = pretzel.prefill(cfg, run.params, run.vlm, run.latent, prompt, length=length, num_samples=rows,
                            guided=guidance != 0)
    text_rng, noise_rng = jax.random.split(rng)
    state, ids, count = pretzel.text_segment(cfg, run.params, run.vlm, state, text_rng, max_tokens=SEGMENT_TOKENS,
                                             allow_images=True)
    written = np.asarray(ids)[0, :int(count)].tolist()
    opened = bool(written) and written[-1] == cfg.vlm.vision_start_token_id
    if opened:
        written = written[:-1]
    else:
        state = pretzel.feed_token(cfg, run.params, run.vlm, state, cfg.vlm.vision_start_token_id)
    eps = run.image_temperature * jax.random.normal(noise_rng, (rows, cfg.num_slots, cfg.latent_dim), np.float32)
    state, u, _ = pretzel.image_segment(cfg, run.params, run.vlm, state, eps, guidance, jacobi=run.jacobi)
    images = cfg.latent.decode(run.latent, pretzel.invert_shallow(cfg, run.params, u))
    return run.decode(written), opened, np.asarray(images, np.float32)


def text_to_image(run: Run, judge, out: str, *, samples: int, grid: int, seed: int) -> dict:
    """Section 1 (module docstring); ``reply_names_digit`` / ``reply_opens_image``: the share of the ten
    replies whose words name the digit asked for / that opened the image themselves."""
    from starflow2_jax.data import demo_text as dt
    from starflow2_jax.eval import starflow2_prompts as sp

    prompts = [sp.draw_prompt(run.config, run.encode, d) for d in range(10)]
    # the reply (a word and <|vision_start|>), N slots, <|vision_end|>; one length for every prompt: one compile
    length = max(len(p["tokens"]) for p in prompts) + SEGMENT_TOKENS + run.config.num_slots + 2
    rng = _rng(seed, 1)
    drawn, plain, words, opened = [], [], [], []
    for d, prompt in enumerate(prompts):
        word, opens, images = draw_reply(run, prompt, rows=samples, guidance=run.guidance, rng=_fold(rng, d),
                                         length=length)
        words.append(word)
        opened.append(opens)
        drawn.append(images)
        if run.guidance and grid:
            plain.append(draw_reply(run, prompt, rows=grid, guidance=0.0, rng=_fold(rng, 100 + d), length=length)[2])
    drawn = np.stack(drawn)  # (10, S, 8, 8, 1)
    plain = np.stack(plain) if plain else drawn[:, :grid]
    labels = np.repeat(np.arange(10), samples)
    result = judge.judge(drawn.reshape((-1,) + DIGITS_SHAPE), labels)
    atomic.write_npz(os.path.join(out, "t2i_samples.npz"),
                     dict(samples=drawn.reshape((-1,) + DIGITS_SHAPE), labels=labels, guidance=run.guidance,
                          image_temperature=run.image_temperature))
    grids = []
    for weight, images in ((0.0, plain), (run.guidance, drawn[:, :grid])):
        name = f"t2i_grid_g{weight:g}.png"
        if any(g["guidance"] == weight for g in grids):
            continue
        _grid_png(os.path.join(out, name), images)
        judged = judge.judge(images.reshape((-1,) + DIGITS_SHAPE), np.repeat(np.arange(10), images.shape[1]))
        grids.append(dict(guidance=weight, png=f"{SCORING_SUBDIR}/{name}", samples_per_digit=int(images.shape[1]),
                          accuracy=judged["accuracy"]))
    named = [sp.parse_answer(w) == d for d, w in enumerate(words)]
    return dict(prompt=dt.DRAW_PROMPT, prompt_text=run.decode(prompts[7]["tokens"].tolist()), guidance=run.guidance,
                image_temperature=run.image_temperature, samples_per_digit=samples, judge=result, replies=words,
                reply_names_digit=float(np.mean(named)), reply_opens_image=float(np.mean(opened)),
                accuracy=result["accuracy"], variety=result["variety"]["mean_ratio"],
                novelty=result["novelty"]["mean_ratio"], grids=grids, npz=f"{SCORING_SUBDIR}/t2i_samples.npz")


def bits_per_dim(run: Run, stage: str) -> dict:
    """Section 2: ``eval.bpd.evaluate_bpd`` on the test split (the family's scorer), one pass."""
    from starflow2_jax import parallel
    from starflow2_jax.data.digits import CAPTION_TEMPLATES
    from starflow2_jax.eval.bpd import evaluate_bpd

    shards = parallel.axes_size(run.restored.mesh, parallel.BATCH_AXES)
    batch = shards * math.ceil(100 / shards)  # 297 digits in 3 batches (one compile)
    result = evaluate_bpd(stage, split="test", restored=run.restored, batch_size=batch)
    context = CAPTION_TEMPLATES[0].format(name="seven")
    return dict(value=result["bits_per_dim"], std_error=result["std_error"], num_images=result["num_images"],
                split="test", levels=result["levels"], dequantisation="uniform", passes=result["num_samples"],
                text_nll_per_token=result.get("text_nll_per_token"),
                context=f"a plain document: the image's first caption (e.g. {context!r}), then the image (a "
                        f"generation target given the caption)")


def understanding(run: Run, pixels: np.ndarray, labels: np.ndarray, out: str) -> dict:
    """Section 3: greedy answers to ``QUESTION`` about each image, parsed; confusion (10 × 11, the last
    column: answers naming no digit)."""
    from starflow2_jax import pretzel
    from starflow2_jax.data import demo_text as dt
    from starflow2_jax.eval import starflow2_prompts as sp

    prompts = [sp.question_prompt(run.config, run.encode, x) for x in pixels]
    length = max(len(p["tokens"]) for p in prompts) + ANSWER_TOKENS
    answers, predicted, times = [], [], []
    for prompt in prompts:
        started = time.perf_counter()
        res = pretzel.image_to_text(run.config, run.params, run.vlm, run.latent, prompt,
                                    max_new_tokens=ANSWER_TOKENS, length=length)
        answers.append(run.decode(res["ids"][0, :int(res["lengths"][0])].tolist()))
        times.append(time.perf_counter() - started)
        predicted.append(sp.parse_answer(answers[-1]))
    confusion = np.zeros((10, 11), np.int64)
    for want, got in zip(labels, predicted):
        confusion[int(want), 10 if got is None else got] += 1
    correct = np.asarray([got == int(want) for want, got in zip(labels, predicted)])
    atomic.write_npz(os.path.join(out, "understanding.npz"),
                     dict(labels=labels, predicted=np.asarray([-1 if p is None else p for p in predicted]),
                          answers=np.asarray(answers)))
    wrong = [dict(image=i, label=int(labels[i]), answer=answers[i]) for i in np.flatnonzero(~correct)[:10].tolist()]
    return dict(question=dt.QUESTION, num_images=len(prompts), accuracy=float(correct.mean()),
                unparsed=int(confusion[:, 10].sum()), confusion=confusion.tolist(), wrong_examples=wrong,
                seconds_per_question=_seconds_per_call(times), npz=f"{SCORING_SUBDIR}/understanding.npz")


def interleaved(run: Run, judge, out: str, *, seeds: int, seed: int, temperature: float) -> tuple[dict, list, tuple]:
    """Section 4. Returns ``(metrics, transcripts [(prompt, parts of its first seed)], (sequence, state) of
    the first document — for the cache check)``."""
    from starflow2_jax import pretzel
    from starflow2_jax.data import demo_text as dt
    from starflow2_jax.eval import starflow2_prompts as sp
    from starflow2_jax.eval import transcript
    from starflow2_jax.eval.transcript_image import write_png

    cfg, v = run.config, run.config.vlm
    rng = _rng(seed, 4)
    per_prompt, transcripts, first, images, image_labels, image_doc = [], [], None, [], [], []
    for k, text in enumerate(dt.INTERLEAVED_PROMPTS):
        expected = sp.counting_expectation(text)
        prompt = sp.counting_prompt(cfg, run.encode, text)
        documents = []
        for s in range(seeds):
            res = pretzel.interleaved(cfg, run.params, run.vlm, run.latent, prompt, rng=_fold(_fold(rng, k), s),
                                      length=cfg.seq_len, max_new_tokens=INTERLEAVED_TOKENS,
                                      max_images=dt.MAX_INTERLEAVED_IMAGES, guidance=run.guidance, jacobi=run.jacobi,
                                      temperature=temperature, segment_tokens=SEGMENT_TOKENS,
                                      image_temperature=run.image_temperature)
            seq = res["sequence"]
            parsed = sp.parse_interleaved(seq["tokens"][len(prompt["tokens"]):], decode=run.decode,
                                          vision_start=v.vision_start_token_id, vision_end=v.vision_end_token_id,
                                          end_tokens=v.eos_token_ids, expected=expected)
            drawn = [np.asarray(x, np.float32) for x in res["images"]]
            # each image is judged against the number the structure asks there (right structure) or the
            # number word before it (otherwise; unjudged when that names no digit)
            wanted = expected if parsed["ok"] else parsed["labels"]
            verdicts = []
            for x, want in zip(drawn, wanted):
                got = int(judge.predict(x[None])[0]) if np.all(np.isfinite(x)) else None
                verdicts.append(None if want is None else got == want)
                images.append(x)
                image_labels.append(-1 if want is None else want)
                image_doc.append((k, s))
            documents.append(dict(seed=s, ok=parsed["ok"], reason=parsed["reason"], words=parsed["words"],
                                  correct=verdicts))
            if s == 0:
                meta = [dict(seed=s, guidance=run.guidance, image_temperature=run.image_temperature, image=i)
                        for i in range(len(drawn))]
                parts = transcript.from_sequence(seq["tokens"], vision_start=v.vision_start_token_id,
                                                 vision_end=v.vision_end_token_id, image_token=v.image_token_id,
                                                 decode=run.decode, images=drawn, prompt_length=len(prompt["tokens"]),
                                                 meta=meta)
                name = f"interleaved_{k}.html"
                transcript.write_transcript(os.path.join(out, name), parts, title=f"{text} (seed {s})")
                write_png(os.path.join(out, f"interleaved_{k}.png"), parts)
                transcripts.append(dict(prompt=text, html=f"{SCORING_SUBDIR}/{name}", parts=parts))
                if first is None:
                    first = (seq, res["state"])
        right = [d for d in documents if d["ok"]]
        judged = [c for d in right for c in d["correct"]]
        per_prompt.append(dict(prompt=text, expected=[dt.NUMBER_WORDS[n] for n in expected], seeds=seeds,
                               structure=len(right) / len(documents),
                               image_accuracy=float(np.mean(judged)) if judged else None, documents=documents))
    right = [d for p in per_prompt for d in p["documents"] if d["ok"]]
    judged = [c for d in right for c in d["correct"]]
    any_judged = [c for p in per_prompt for d in p["documents"] for c in d["correct"] if c is not None]
    atomic.write_npz(os.path.join(out, "interleaved.npz"),
                     dict(images=np.asarray(images, np.float32).reshape((-1,) + DIGITS_SHAPE),
                          labels=np.asarray(image_labels, np.int64), document=np.asarray(image_doc, np.int64)
                          .reshape(-1, 2)))
    metrics = dict(prompts=per_prompt, temperature=temperature, guidance=run.guidance,
                   image_temperature=run.image_temperature,
                   structure=len(right) / sum(len(p["documents"]) for p in per_prompt),
                   image_accuracy=float(np.mean(judged)) if judged else None,
                   image_accuracy_all=float(np.mean(any_judged)) if any_judged else None,
                   images=len(images), transcripts=[t["html"] for t in transcripts],
                   npz=f"{SCORING_SUBDIR}/interleaved.npz")
    return metrics, transcripts, first


def next_digit(run: Run, judge, pixels: np.ndarray, labels: np.ndarray, out: str, *, seed: int) -> dict:
    """Section 5: after each held-out digit and ``NEXT_DIGIT_PROMPT`` the model writes the assistant turn
    (``pretzel.interleaved``, one image at most: the words it says before the image, if the training
    documents say any, are its reasoning); the image is judged against the digit the training documents
    draw after d (no image: wrong)."""
    from starflow2_jax import pretzel
    from starflow2_jax.data import demo_text as dt
    from starflow2_jax.eval import starflow2_prompts as sp

    cfg, v = run.config, run.config.vlm
    rng = _rng(seed, 5)
    prompts = [sp.next_digit_prompt(cfg, run.encode, x) for x in pixels]
    targets = np.asarray([sp.next_digit_target(int(d)) for d in labels], np.int64)
    drawn = np.full((len(prompts),) + DIGITS_SHAPE, np.nan, np.float32)
    said, times = [], []
    for i, prompt in enumerate(prompts):
        started = time.perf_counter()
        # the interleaved documents' cache length and segment size: their compiled functions serve here too
        res = pretzel.interleaved(cfg, run.params, run.vlm, run.latent, prompt, rng=_fold(rng, i), length=cfg.seq_len,
                                  max_new_tokens=SEGMENT_TOKENS, max_images=1, guidance=run.guidance, jacobi=run.jacobi,
                                  segment_tokens=SEGMENT_TOKENS, image_temperature=run.image_temperature)
        times.append(time.perf_counter() - started)
        if res["images"]:
            drawn[i] = np.asarray(res["images"][0], np.float32)
        parsed = sp.parse_interleaved(res["sequence"]["tokens"][len(prompt["tokens"]):], decode=run.decode,
                                      vision_start=v.vision_start_token_id, vision_end=v.vision_end_token_id,
                                      end_tokens=v.eos_token_ids, expected=targets[i:i + 1])
        said.append(parsed["words"][0] if parsed["words"] else None)
    has_image = np.isfinite(drawn).reshape(len(drawn), -1).all(axis=1)
    predicted = np.full(len(drawn), -1, np.int64)
    if has_image.any():
        predicted[has_image] = judge.predict(drawn[has_image])
    words = [sp.parse_answer(w) if w else None for w in said]
    atomic.write_npz(os.path.join(out, "next_digit.npz"),
                     dict(context=pixels, context_labels=labels, samples=drawn, labels=targets, predicted=predicted,
                          said=np.asarray([w or "" for w in said])))
    shown = [int(np.flatnonzero(labels == d)[0]) for d in range(10) if np.any(labels == d)]
    _grid_png(os.path.join(out, "next_digit.png"), np.stack([pixels[shown], np.nan_to_num(drawn[shown], nan=-1.0)]))
    correct = predicted == targets
    spoken = [w for w in said if w]
    named = [(w, p) for w, p, drew in zip(words, predicted, has_image) if w is not None and drew]
    return dict(prompt=dt.NEXT_DIGIT_PROMPT, num_images=len(prompts), accuracy=float(correct.mean()),
                per_class_accuracy={str(d): float(correct[targets == d].mean()) for d in np.unique(targets).tolist()},
                images_drawn=int(has_image.sum()),
                word_accuracy=float(np.mean([w == t for w, t in zip(words, targets)])) if spoken else None,
                image_matches_word=float(np.mean([w == p for w, p in named])) if named else None,
                guidance=run.guidance, image_temperature=run.image_temperature,
                seconds_per_image=_seconds_per_call(times),
                png=f"{SCORING_SUBDIR}/next_digit.png", npz=f"{SCORING_SUBDIR}/next_digit.npz")


def cache_check(run: Run, first: tuple, prompt: str) -> dict:
    """Section 6: ``pretzel.cache_difference`` on the first interleaved document."""
    from starflow2_jax import pretzel

    sequence, state = first
    diff = pretzel.cache_difference(run.config, run.params, run.vlm, sequence, state)
    return dict(max_abs_difference=diff, prompt=prompt, seed=0, positions=int(len(sequence["tokens"])),
                images=int(np.sum(sequence["tokens"] == run.config.vlm.vision_start_token_id)),
                guided=bool(state.guided))


# ---- targets, summary, main -------------------------------------------------------------------------
def _at_least(value, target) -> bool:
    return value is not None and math.isfinite(value) and value >= target


def checks(metrics: dict) -> dict:
    """``{target: True / False / None (not measured)}`` of ``TARGETS``."""
    t2i, low_high = metrics["text_to_image"], TARGETS["variety"]
    inter = metrics["interleaved"]
    bpd, diff = metrics["bits_per_dim"]["value"], metrics["cache_check"]["max_abs_difference"]
    total = metrics["timings"]["demo_seconds"]
    return {
        "t2i_accuracy": _at_least(t2i["accuracy"], TARGETS["t2i_accuracy"]),
        "variety": bool(math.isfinite(t2i["variety"]) and low_high[0] <= t2i["variety"] <= low_high[1]),
        "bpd": bool(math.isfinite(bpd) and bpd <= TARGETS["bpd"]),
        "understanding": _at_least(metrics["understanding"]["accuracy"], TARGETS["understanding"]),
        "interleaved_structure": _at_least(inter["structure"], TARGETS["interleaved_structure"]),
        "interleaved_images": _at_least(inter["image_accuracy"], TARGETS["interleaved_images"]),
        "next_digit": _at_least(metrics["next_digit"]["accuracy"], TARGETS["next_digit"]),
        "cache_difference": bool(math.isfinite(diff) and diff <= TARGETS["cache_difference"]),
        "demo_seconds": None if total is None else total <= TARGETS["demo_seconds"],
    }


def summary_lines(metrics: dict) -> list[str]:
    """One line per metric: value, target, met / MISSED (n/a: not measured)."""
    c, t = metrics["checks"], TARGETS

    def mark(ok):
        return "n/a" if ok is None else ("met" if ok else "MISSED")

    def pct(value):
        return "–" if value is None else f"{100 * value:.1f}%"

    t2i, inter, times = metrics["text_to_image"], metrics["interleaved"], metrics["timings"]
    total = "–" if times["demo_seconds"] is None else f"{times['demo_seconds']:.0f} s"
    return [
        f"text → image accuracy   {pct(t2i['accuracy']):>7}  (guidance {t2i['guidance']:g}, image temperature "
        f"{t2i['image_temperature']:g}; target >= "
        f"{100 * t['t2i_accuracy']:.0f}%: {mark(c['t2i_accuracy'])})",
        f"text → image variety    {t2i['variety']:7.2f}  (target {t['variety'][0]}-{t['variety'][1]}: "
        f"{mark(c['variety'])}); novelty {t2i['novelty']:.2f}; replies naming the digit {pct(t2i['reply_names_digit'])}",
        f"held-out bits/dim       {metrics['bits_per_dim']['value']:7.3f}  (target <= {t['bpd']}: {mark(c['bpd'])})",
        f"understanding accuracy  {pct(metrics['understanding']['accuracy']):>7}  (target >= "
        f"{100 * t['understanding']:.0f}%: {mark(c['understanding'])})",
        f"interleaved structure   {pct(inter['structure']):>7}  (target >= {100 * t['interleaved_structure']:.0f}%: "
        f"{mark(c['interleaved_structure'])})",
        f"interleaved images      {pct(inter['image_accuracy']):>7}  (target >= "
        f"{100 * t['interleaved_images']:.0f}%: {mark(c['interleaved_images'])})",
        f"next-digit accuracy     {pct(metrics['next_digit']['accuracy']):>7}  (target >= "
        f"{100 * t['next_digit']:.0f}%: {mark(c['next_digit'])})",
        f"cache difference        {metrics['cache_check']['max_abs_difference']:7.1e}  (target <= "
        f"{t['cache_difference']:g}: {mark(c['cache_difference'])})",
        f"whole demo              {total:>7}  (stages {sum(times['stages'].values()):.0f} s + scoring "
        f"{times['scoring_seconds']:.0f} s; target <= {t['demo_seconds'] / 60:.0f} min: {mark(c['demo_seconds'])})",
    ]


def check_settings(*, samples_per_digit: int, grid_per_digit: int, seeds: int, held_out: int, edit: int,
                   temperature: float) -> dict:
    """The counts as a dict; ValueError naming a bad flag."""
    counts = dict(samples_per_digit=samples_per_digit, grid_per_digit=grid_per_digit, seeds=seeds, held_out=held_out,
                  edit=edit)
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value!r}: expected an int >= 1")
    for name in ("held_out", "edit"):
        if counts[name] > 297:
            raise ValueError(f"--{name.replace('_', '-')} {counts[name]}: the test split holds 297 digits")
    if grid_per_digit > samples_per_digit:
        raise ValueError(f"--grid-per-digit {grid_per_digit}: the guided grid shows judged samples; expected <= "
                         f"--samples-per-digit {samples_per_digit}")
    if not temperature >= 0:
        raise ValueError(f"--temperature {temperature}: expected >= 0")
    return counts


def score(workdir: str, *, timings: dict[str, float] | None = None, samples_per_digit: int = 100,
          grid_per_digit: int = 10, seeds: int = 50, held_out: int = 297, edit: int = 297, seed: int = 0,
          temperature: float = 0.0) -> tuple[dict, list]:
    """Scores ``workdir`` (module docstring), writing ``DIR/scoring/``; returns ``(metrics — the
    demo_metrics.json dict —, the interleaved transcripts [dict(prompt, html, parts)])``. DemoInputError
    before anything is written when the workdir is not a finished demo; ValueError for a bad argument."""
    counts = check_settings(samples_per_digit=samples_per_digit, grid_per_digit=grid_per_digit, seeds=seeds,
                            held_out=held_out, edit=edit, temperature=temperature)
    started = time.perf_counter()
    stage = check_workdir(workdir)
    seconds: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds[name] = round(time.perf_counter() - t, 2)
        return value

    from starflow2_jax.data import demo_text as dt
    from starflow2_jax.eval.digits import DigitsJudge

    run = timed("restore", load_run, stage)
    judge = timed("judge", DigitsJudge)
    pixels, labels, indices = held_out_digits()
    out = os.path.join(workdir, SCORING_SUBDIR)
    os.makedirs(out, exist_ok=True)
    metrics: dict[str, Any] = dict(kind="starflow2-digits-demo-metrics", workdir=os.fspath(workdir),
                                   run=dict(workdir=stage, step=int(run.restored.step), ema=run.restored.used_ema,
                                            guidance=run.guidance, jacobi=run.jacobi,
                                            image_temperature=run.image_temperature),
                                   settings=dict(counts, seed=seed, temperature=temperature))
    metrics["text_to_image"] = timed("text_to_image", text_to_image, run, judge, out, samples=samples_per_digit,
                                     grid=grid_per_digit, seed=seed)
    metrics["bits_per_dim"] = timed("bits_per_dim", bits_per_dim, run, stage)
    metrics["understanding"] = timed("understanding", understanding, run, pixels[:held_out], labels[:held_out], out)
    inter, transcripts, first = timed("interleaved", interleaved, run, judge, out, seeds=seeds, seed=seed,
                                      temperature=temperature)
    metrics["interleaved"] = inter
    metrics["next_digit"] = timed("next_digit", next_digit, run, judge, pixels[:edit], labels[:edit], out, seed=seed)
    metrics["cache_check"] = timed("cache_check", cache_check, run, first, dt.INTERLEAVED_PROMPTS[0])
    metrics["classifier_test_accuracy"] = judge.test_accuracy
    metrics["held_out_indices"] = indices[:max(held_out, edit)].tolist()
    stages = dict(timings or {})
    scoring = round(time.perf_counter() - started, 2)
    metrics["timings"] = dict(stages=stages, scoring=seconds, scoring_seconds=scoring,
                              demo_seconds=sum(stages.values()) + scoring if stages else None)
    metrics["targets"] = TARGETS
    metrics["checks"] = checks(metrics)
    return metrics, transcripts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m starflow2_jax.eval.starflow2_demo",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="the demo's workdir (launch/local.sh demo --workdir)")
    parser.add_argument("--time", action="append", type=parse_timing, default=[], metavar="NAME=SECONDS",
                        help="a stage's wall time (the scoring's own is measured here), shown in the report and "
                             "summed with the scoring's for the 12-minute target (repeatable)")
    parser.add_argument("--samples-per-digit", type=int, default=100, help="judged text → image samples per digit")
    parser.add_argument("--grid-per-digit", type=int, default=10, help="samples per digit in each grid")
    parser.add_argument("--seeds", type=int, default=50, help="seeds per interleaved prompt")
    parser.add_argument("--held-out", type=int, default=297, help="held-out digits asked 'What digit is this?'")
    parser.add_argument("--edit", type=int, default=297, help="held-out digits given 'Draw the next digit.'")
    parser.add_argument("--seed", type=int, default=0, help="the generation noise's seed")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="text sampling temperature of the interleaved documents (0: greedy)")
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    settings = dict(samples_per_digit=args.samples_per_digit, grid_per_digit=args.grid_per_digit, seeds=args.seeds,
                    held_out=args.held_out, edit=args.edit, temperature=args.temperature)
    try:
        check_settings(**settings)
    except ValueError as error:
        parser.error(str(error))
    try:
        metrics, transcripts = score(workdir, timings=dict(args.time), samples_per_digit=args.samples_per_digit,
                                     grid_per_digit=args.grid_per_digit, seeds=args.seeds, held_out=args.held_out,
                                     edit=args.edit, seed=args.seed, temperature=args.temperature)
    except DemoInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from starflow2_jax.eval.starflow2_report import write_report

    # NaN allowed: a diverged metric is reported (exit 0 means "scored", see the module docstring)
    atomic.write_json(os.path.join(workdir, "demo_metrics.json"), metrics, allow_nan=True)
    write_report(workdir, metrics, transcripts)
    print("\n".join(summary_lines(metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
