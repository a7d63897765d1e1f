"""Stage 0 of the digits demo: the "pretrained VLM" — a Qwen2.5-VL (text decoder and vision tower) trained
from scratch by next-token prediction on the demo corpus (``data.demo_text``) with the demo tokenizer,
its images real training digits read by the tower (``model.lm.images='digits'``), then exported as a
Hugging Face checkpoint that STARFlow2 loads as its frozen VLM.

    starflow2 train --config configs/lm.py:demo --workdir /tmp/lm
    starflow2 convert to-hf --workdir /tmp/lm --out /tmp/lm_hf
    starflow2 train --config configs/starflow2.py:demo,stage1 --workdir /tmp/sf2_s1 \\
        --config.model.starflow2.vlm_checkpoint=/tmp/lm_hf --config.model.starflow2.tokenizer=''

Presets (``arg`` = ``size[,runlocal]``):

- ``tiny``: pretzel.tiny's VLM (width 64, 2 layers), images of 2×2 slots (configs/starflow2.py:tiny's
  4×4 patches of 8×8 digits; a tower of patch 2, merge 2); tests.
- ``demo`` (default): configs/starflow2.py:demo's VLM (width 128, 4 layers), images of 4×4 slots (its
  2×2 patches of the 8×8 digits; a 2-layer tower of width 64, patch 1, merge 2), rows of 160 positions,
  batches of 8 rows, 1000 steps, more of the documents that read an image (``corpus_weights``: caption,
  question 6, next_digit 3 instead of 3, 2, 1).
- ``runlocal`` shrinks either to a few steps (checkpoints every 2).

**Why the tower** (stop 13): STARFlow2's VLM reads images through the adapter (SPEC §5), and a frozen
language model that never saw an image does not learn to read them through it (stage 2 left the answers
at chance); Qwen2.5-VL was pretrained with its tower, so the demo's stand-in is too. Measured (2 CPU
cores shared with another job; "reads": of 150 held-out digits, the share where the model scores the
right answer highest among the ten, "What digit is this?" → the digit, "Draw the next digit." → the
next one; the draw prompts' replies were right for 10 of 10 in every run):

| lr | batch | corpus weights | augmentation | reads the digit | names the next digit | time |
|---|---|---|---|---|---|---|
| 3e-3 | 4 | default | — | 16% | 15% (297 digits) | 2 min 28 s |
| 3e-3 | 4, 3000 steps | default | — | 17% | 10% (100 digits) | 6 min 34 s |
| 1e-3 | 8 | default | — | 57% | 54% | 4 min 25 s |
| 1e-3 | 8 | image kinds up | — | 53% (88% on training digits) | 60% | |
| 1e-3 | 8 | image kinds up | shift ±1, noise | 34% (34%) | 30% | 4 min 38 s |

At 3e-3 the tower and the reading never start (question-only documents: chance after 400 steps; at 1e-3,
87% of held-out digits after 500 steps). Without augmentation the model memorises its 1500 training
digits (88% against 53%); with it, it learns too slowly for this budget.

Earlier, text-only (images 'none'; idle machine): 1000 steps and the export in 85 s. The STARFlow2 demo
needs the model to copy the digit a draw prompt names into its reply ("draw the digit two" → "two, a
handwritten two"): probed on the ten "draw the digit …" prompts, the model after 600 steps wrote the
right digit for 4 of 10 (six of them "one"), after 1000 steps (or 600 at batch 8) for 10 of 10 — and the
demo's text → image accuracy follows the reply (93–97% per digit where it was right, 0% where it was
wrong). Loss 0.245 nats per trained token, next-token accuracy 0.89. An earlier run at 8×8 slots per
image (rows of 384) at step 600: every "draw the digit …" opens an image, counting sentences continue
correctly (7/7), "What number comes after …?" 5/9, sums are not learnt (7/100).

The sizes and marker ids come from ``train.tasks.lm.vlm_fields`` (the ids from the demo tokenizer), the
one place configs/starflow2.py's demo VLM is described too. **[choice]** steps, learning rate, batch,
corpus weights, the tower's sizes.
"""

import ml_collections

from starflow2_jax.config_files import parse_preset
from starflow2_jax.train.config_schema import base_config
from starflow2_jax.train.tasks.lm import DIGITS_VISION, SIZES, vlm_fields

PRESETS = SIZES + tuple(f"{size},runlocal" for size in SIZES)
GRIDS = {"tiny": [2, 2], "demo": [4, 4]}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, modifiers = parse_preset(arg, SIZES, ("runlocal",), default="demo")
    c = base_config()
    c.seed = 0
    c.model.family = "lm"
    lm = c.model.lm
    lm.vlm = ml_collections.ConfigDict({k: list(v) if isinstance(v, tuple) else v for k, v in vlm_fields(size).items()})
    lm.grid = GRIDS[size]
    # pretrained as a VLM: real train-split digits at the slots, read by a Qwen2.5-VL tower trained along
    lm.images = "digits"
    lm.vision = ml_collections.ConfigDict(DIGITS_VISION[size])
    lm.image_shift, lm.image_noise = 0, False  # measured: both slow the reading down (see the docstring)
    lm.tokenizer = "demo"
    lm.corpus_seed, lm.corpus_documents = 0, 4000
    if size == "demo":  # more of the documents that read an image (see the docstring)
        lm.corpus_weights = ml_collections.ConfigDict(dict(caption=6.0, question=6.0, next_digit=3.0))
    # demo rows hold the longest documents (4 images of 18 positions and their text: 109)
    lm.seq_len = 128 if size == "tiny" else 160
    c.data.batch_size = 8
    c.optim.lr = 1e-3
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 1e-4
    c.optim.clip_norm = 1.0
    c.optim.ema_decay = 0.0
    c.train.steps = 300 if size == "tiny" else 1000  # the demo: see the docstring (600 left replies uncopied)
    c.train.log_every = 20
    c.train.sample_every = 0
    c.train.checkpoint_every = 200
    c.mesh.data, c.mesh.fsdp = -1, 1
    if "runlocal" in modifiers:
        c.train.steps = 4
        c.optim.warmup_steps = 1
        c.train.log_every = 2
        c.train.checkpoint_every = 2
        c.data.batch_size = 8
    return c
