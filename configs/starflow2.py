"""STARFlow2 (SPEC §5): a frozen Qwen2.5-VL and the Pretzel flows, trained in three stages, each from the
previous one's checkpoint.

    starflow2 train --config configs/starflow2.py:tiny,stage1 --workdir /tmp/sf2_s1
    starflow2 train --config configs/starflow2.py:tiny,stage2 --workdir /tmp/sf2_s2 --config.train.init_from=/tmp/sf2_s1
    starflow2 train --config configs/starflow2.py:tiny,stage3 --workdir /tmp/sf2_s3 --config.train.init_from=/tmp/sf2_s2
    starflow2 generate --workdir /tmp/sf2_s3 --mode t2i --prompt "a handwritten digit seven" --out /tmp/sf2_out

Presets (``arg`` = ``size,stage[,runlocal]``):

- ``tiny`` (default): ``pretzel.tiny`` — a random 2-layer VLM of width 64 (vocabulary: UTF-8 bytes),
  the embedded digits (8×8 grey) as 4×4 patches (N = 4 slots of D = 16), flows of width 32; rows of
  64 positions. Tests and a laptop CPU.
- ``demo``: the digits demo's stages 1–3. The frozen VLM is the 4-layer, width-128 Qwen2.5-VL that
  ``configs/lm.py:demo`` trains and ``starflow2 convert to-hf`` exports, with its tokenizer
  (``--config.model.starflow2.vlm_checkpoint=DIR``; ``tokenizer`` '' reads DIR's; for a random VLM give
  ``--config.model.starflow2.tokenizer=bytes``). Data: ``data.builder='digits_documents'`` — the demo
  corpus' templates (``data.demo_text``) with real train-split digits (8×8, dequantised per pixel over
  the 17 grey levels, like the flow-only demo), the kinds of the stage's ``pairs``: stage 1 captions →
  image, "draw the digit …", counting documents drawing each number, "Draw the next digit."; stage 2
  image → caption and "What digit is this?"; stage 3 all of them. 2×2 patches (N = 16 slots of D = 4,
  the flow-only demo's latent space), flows of width 96 (shallow 4 × 1, deep 2); rows of 160 positions
  with up to 4 images (the longest document, a 4-image counting one, is 125), batches of 16 rows;
  ``DEMO_STEPS`` per stage.
  **Measured** (tuning runs on 2 CPU cores shared with other jobs): the deep flow reads the frozen
  language model's last hidden states, which for a language model this small barely differ between
  digits except where the next word is the digit — hence the demo's chat replies name each digit twice
  before drawing it ("seven, a handwritten seven", ``data.demo_text.DRAWING``: the second naming is
  predictable from the first in every context, "Draw the next digit." included). Until stop 12 the
  stage-0 model was text-only, and stage 2 (the adapter alone) left its answers at chance (it had never
  seen an image); stage 3, where the deep stream reaches the LM head through W_D, taught it (56% after
  500 steps). Since stop 13 stage 0 pretrains the VLM with its vision tower on real digits
  (``configs/lm.py``), and the adapter learns to speak to it: "What digit is this?" right for 69 of the
  first 100 held-out digits after stage 2's 300 steps, 85.5% of the 297 after stage 3 (README). Text → image accuracy
  grows with training (28% after stage 1's 1000 steps, 42% after stage 3's 500 at guidance 2): the
  demo's budget, not the model, is what limits it. ``launch/local.sh demo`` on the idle machine with
  stop 11's presets (a text-only stage 0, 50 steps of stage 2): 710 s (stage 0 76 s, stage 1 152 s,
  stage 2 33 s, stage 3 358 s at 3.0 steps/s, scoring 89 s); text → image 84% (guidance 2, image
  temperature 0.6), held-out 2.355 bits/dim, understanding 60%, interleaved structure 100% and images
  82%, next digit 18%. With stop 13's (stage 0 with the tower, 300 steps of stage 2): 913 s (stage 0
  225 s, stage 1 144 s, stage 2 96 s, stage 3 361 s, scoring 82 s); text → image 86%, 2.359 bits/dim,
  understanding 86%, interleaved structure 100% and images 74%, next digit 57% (the right next digit
  named 78% of the time, against 21%) (README).
  Images are drawn at ``sample.image_temperature = 0.6`` (noise ε ~ N(0, 0.36·I), Glow's temperature):
  on the demo's trained stage 3 at guidance 2 (400 samples judged) accuracy was 44% at T = 1, 52% at
  0.8 and 59% at 0.6, and the within-class variety 1.31 of the real digits' at T = 1 (outside the
  0.8–1.2 target) against 0.98 at 0.6 — this small model's samples are too spread out at T = 1.
- ``7b``: the paper's sizes — Qwen2.5-VL-7B-Instruct (``model.starflow2.vlm_checkpoint``: a Hugging Face
  directory; its config must be the 7B text decoder), the DINOv2-g/14 FAE's 16×16 × 32 latents of
  256-px images (``model.starflow2.latent.fae_workdir``: the last FAE stage of ``configs/fae.py:g14_256``),
  flows of width 3072 (shallow 2 × 4, deep 24: 3.6B trainable); rows of 4096 positions with up to 8
  images; bfloat16 with full remat, FSDP over every device; interleaved JSONL documents
  (``data.source``).

Stages (SPEC §5.1): ``stage1`` trains the flows on L_NF (adapter and bridges off; pairs as caption →
image); ``stage2`` adds the adapter and trains only it on L_NTP (pairs as image → caption);
``stage3`` adds the bridges W_vlm and W_D and trains everything but the VLM and the FAE on
L_NF + λ·L_NTP (pairs in either order). Each stage declares its new parts (``train.init_new``), so
``init_from`` the previous stage initialises exactly those fresh (zero-initialised outputs: the model
starts as the previous stage's). ``runlocal`` shrinks any of them to a few steps (and the demo's flows to tiny's widths).
**[choice]** step counts, learning rates, λ = 1 (the paper reports none). On the digits demo λ trades
reading against drawing; measured (stop 12, with the text-only stage 0) from one stage 2, the demo's scoring after 1000 steps of
stage 3 (understanding / text → image / interleaved structure / interleaved images / next digit):
λ = 1: 60% / 84% / 100% / 82% / 18%; λ = 2: 66% / 81% / 100% / 76% / 17%; λ = 3: 77% / 76% / 83% /
70% / 24% (at λ = 3 the model often ends "Count from one to four, drawing each number." after three).
The demo keeps λ = 1.
"""

import ml_collections

from starflow2_jax.config_files import ConfigError, parse_preset
from starflow2_jax.train.config_schema import base_config
from starflow2_jax.train.tasks.lm import vlm_fields

SIZES = ("tiny", "demo", "7b")
STAGES = ("stage1", "stage2", "stage3")
PRESETS = tuple(f"{size},{stage}" for size in SIZES for stage in STAGES)
SWITCHES = {"stage1": (False, False, False), "stage2": (True, False, False), "stage3": (True, True, True)}
NEW_PARTS = {"stage1": (), "stage2": ("adapter/*",), "stage3": ("vlm_to_flow/*", "flow_to_lm/*")}
PAIRS = {"stage1": "t2i", "stage2": "i2t", "stage3": "mixed"}
# the digits demo's budget (issue 11: the whole demo in about 12 minutes on 2 CPU cores); stage 2 trains
# only the adapter, into the stage-0 model that learnt to read digits through its tower (see the docstring)
DEMO_STEPS = {"stage1": 600, "stage2": 300, "stage3": 1000}


def _vlm(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, modifiers = parse_preset(arg, SIZES, STAGES + ("runlocal",), default="tiny")
    stages = sorted(modifiers & set(STAGES))
    if len(stages) > 1:
        raise ConfigError(f"stages {stages} exclude each other: pick one of {STAGES}")
    stage = stages[0] if stages else "stage1"

    c = base_config()
    c.seed = 0
    c.model.family = "starflow2"
    c.model.conditioning = "none"
    s = c.model.starflow2
    s.stage = stage
    s.adapter, s.vlm_to_flow, s.flow_to_lm = SWITCHES[stage]
    s.pairs = PAIRS[stage]
    c.train.init_new = NEW_PARTS[stage]
    c.optim.ema_decay = 0.0
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 1e-4
    c.optim.clip_norm = 1.0
    c.sample.guidance = [0.0, 2.0]
    c.sample.per_class = 4

    if size in ("tiny", "demo"):
        digits = ["a handwritten digit zero", "a handwritten digit three", "a handwritten digit seven"]
        c.sample.prompts = digits
        c.data.builder = "digits"
        c.data.levels = 16
        c.data.noise = "uniform"
        s.tokenizer = "bytes"
        s.vlm_checkpoint = ""
        if size == "tiny":
            pass  # add_defaults holds pretzel.tiny's sizes
        else:
            # the VLM configs/lm.py:demo trains (stage 0 of the digits demo); ids: the demo tokenizer's
            s.vlm = _vlm(**vlm_fields("demo"))
            s.latent.image_size, s.latent.channels, s.latent.patch = 8, 1, 2
            s.flow_width, s.flow_head_dim = 96, 32
            s.shallow_blocks, s.shallow_layers, s.deep_layers = 4, 1, 2
            s.seq_len, s.max_images = 160, 4
            s.tokenizer = ""  # the stage-0 export's (vlm_checkpoint), required
            c.data.builder = "digits_documents"
            c.data.image_size = 8
            c.sample.image_temperature = 0.6  # measured: see the docstring (tiny and 7b draw at 1.0)
        c.data.batch_size = 8 if size == "tiny" else 16
        c.optim.lr = 1e-3
        c.optim.min_lr = 1e-5
        c.optim.warmup_steps = 20
        c.train.steps = 300 if size == "tiny" else DEMO_STEPS[stage]
        c.train.log_every = 50
        c.train.checkpoint_every = 0
        c.mesh.data, c.mesh.fsdp = -1, 1
    else:
        from starflow2_jax.fae.config import fae_config_to_dict
        from starflow2_jax.pretzel.config import sevenb

        seven = sevenb()
        s.vlm = ml_collections.ConfigDict()  # Qwen2.5-VL-7B's text decoder (QwenTextConfig's defaults)
        s.vlm_checkpoint = ""  # required: --config.model.starflow2.vlm_checkpoint=/path/to/Qwen2.5-VL-7B-Instruct
        s.vlm_dtype = "bfloat16"
        s.tokenizer = ""  # the checkpoint's tokenizer.json
        s.latent.kind = "fae"
        s.latent.image_size, s.latent.channels, s.latent.patch = 256, 3, 0
        s.latent.fae_workdir = ""  # required: the workdir of configs/fae.py:g14_256,ii
        s.latent.fae = ml_collections.ConfigDict(fae_config_to_dict(seven.latent.config))
        for name in ("flow_width", "flow_head_dim", "flow_mlp_ratio", "shallow_blocks", "shallow_layers",
                     "deep_layers", "seq_len", "max_images"):
            s[name] = getattr(seven, name)
        s.dtype, s.remat = "bfloat16", "full"
        c.data.builder = "interleaved"
        c.data.source = ""  # required: a JSONL file of documents (data.interleaved)
        c.data.levels = 255
        c.data.noise = "none"
        c.data.batch_size = 256
        c.data.worker_count = 8
        c.optim.lr = 1e-4
        c.optim.min_lr = 1e-6
        c.optim.warmup_steps = 2000
        c.train.steps = {"stage1": 200_000, "stage2": 50_000, "stage3": 100_000}[stage]
        c.train.log_every = 100
        c.train.checkpoint_every = 2000
        c.mesh.data, c.mesh.fsdp = 1, -1

    if "runlocal" in modifiers:
        c.train.steps = 4
        c.optim.warmup_steps = 1
        c.train.log_every = 2
        c.train.checkpoint_every = 2
        c.data.batch_size = 4
        c.sample.per_class = 2
        c.sample.guidance = [0.0]
        if size == "demo":  # seconds per stage: the demo's data and VLM, flows as small as tiny's
            s.flow_width, s.flow_head_dim = 32, 16
            s.shallow_blocks, s.shallow_layers, s.deep_layers = 2, 1, 1
    return c
