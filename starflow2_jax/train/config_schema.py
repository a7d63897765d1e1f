"""The training config: every field the trainer reads, its default, and ``validate``.

``base_config()`` returns an ``ml_collections.ConfigDict`` with all fields below (experiment files in
``configs/`` start from it and override); ``validate(config)`` checks it once, up front, and raises
``ValueError`` naming the offending field (``model.flow.factory='x': expected one of ...``).

The ``model.*`` fields besides ``model.family`` belong to the model families (``train.families``):
each family adds its section's defaults and checks it (the 'flow' and 'fae' sections are listed here
for reference; their definitions live in ``train.tasks.flow`` / ``train.tasks.fae``).

    seed                      int; parameter init, the train rng and the data pipeline's seed
    model.family              a registered family: 'flow' (TarFlow / STARFlow, model.flow.*) | 'fae' (an FAE
                              stage, model.fae.*) | 'starflow2' (a Pretzel stage, model.starflow2.*: see
                              train.tasks.starflow2) | 'lm' (a Qwen2.5-VL text decoder trained by next-token
                              prediction on the demo corpus, model.lm.*: see train.tasks.lm) (see train.families)
    model.flow.factory        'starflow' | 'tarflow': ``flow.starflow_config`` / ``flow.tarflow_config``
    model.flow.kwargs         dict of keyword arguments for the factory (for conditioning 'caption'
                              the trainer adds txt_size / txt_dim from model.text)
    model.flow.dtype          compute dtype: 'float32' | 'bfloat16' | 'float16' (params stay float32)
    model.flow.remat          remat policy of the flow layers: 'none' | 'full' | 'dots' | 'dots_no_batch'
    model.conditioning        'label' (class labels; needs kwargs.num_classes > 0) | 'caption'
                              (captions → learned word embeddings, STARFlow factory only) | 'none'
    model.text.max_len        caption length in tokens (padded / truncated)
    model.text.dim            width of the learned caption embedding (the flow's text_dim)
    model.text.vocab          texts the word-level vocabulary is built from (captions or words);
                              empty: filled from the dataset's caption templates (data.builder='digits')
    model.latent.kind         what the flow models: 'pixels' (its own patchify) | 'patches' (p×p pixel
                              patches, fae.PatchesSpace) | 'fae' (a trained FAE's normalised latents).
                              Not 'pixels': the trainer sets kwargs img_size / in_channels / patch_size
                              to the latent grid, D and 1, after moving the pixel view to model.latent.*
    model.latent.patch        'patches': p (0: take kwargs.patch_size)
    model.latent.image_size   'patches': pixel size (0: kwargs.img_size); 'fae': filled from the FAE
    model.latent.channels     'patches': pixel channels (0: kwargs.in_channels); 'fae': 3
    model.latent.fae_workdir  'fae': the workdir of the FAE's last stage (its latest checkpoint is used):
                              the frozen part 'latent' (train.frozen), loaded at every start
    model.latent.fae_dtype    'fae': dtype the frozen FAE is loaded in ('': the FAE's own compute dtype)
    model.latent.fae          'fae': the FAE's config (fae.fae_config_to_dict), filled by the trainer from
                              fae_workdir, so a stored run describes its latent space without it
    model.latent.noise_std    Gaussian noise added to the latents in training (0: none)
    model.fae.stage           'ia' | 'ib' | 'ii' (see train.tasks.fae); run in that order with init_from
    model.fae.dinov2          dict of fae.Dinov2Config fields of the frozen encoder (with
                              dinov2_checkpoint: the fields it must have, the rest filled from it)
    model.fae.dinov2_checkpoint  the frozen DINOv2's source (train.frozen): '' (random from the seed:
                              tests, tiny runs; with train.init_from: that run's DINOv2) | a Hugging
                              Face Dinov2Model / Dinov2WithRegistersModel directory | an Orbax
                              checkpoint with a 'params' item | an earlier run's workdir
    model.fae.dinov2_dtype    dtype the frozen DINOv2 is loaded in ('': model.fae.dtype)
    model.fae.<size fields>   image_size, encoder_image_size, latent_dim, encoder_heads,
                              feature_decoder_{width,layers,heads,mlp_ratio},
                              pixel_decoder_{width,layers,heads,mlp_ratio} (see fae.FAEConfig)
    model.fae.dtype, remat    compute dtype and remat policy of the FAE and DINOv2
    model.fae.<loss fields>   kl_weight (β), noise_sigma (stage ia), pixel_loss 'l1'|'l2'|'l1+l2',
                              perceptual 'dinov2'|'none', perceptual_weight, gan_weight (0: no GAN),
                              lecam_weight, disc_channels, disc_layers, stats_batches
    data.builder              'digits' (the embedded demo data) | 'photos' (scikit-image photo tiles +
                              digits, RGB 64×64) | 'directory' (a prepared TFDS
                              dataset directory, ``tfds.builder_from_directory(data.data_dir)``) |
                              'interleaved' (JSONL documents, data.interleaved) | 'image_text' (JSONL pairs or
                              class folders, data.image_text) | 'digits_documents' (the digits demo's
                              documents: demo_text's templates with real digits of the train split,
                              data.digits_documents): these three for model.family='starflow2' only
    data.kinds                'digits_documents': the document kinds to draw (data.digits_documents.KINDS; a
                              subset of those model.starflow2.pairs reads); empty: all of those
    data.data_dir             where the TFDS files live (built there on first use for 'digits')
    data.source               'interleaved' / 'image_text': the JSONL file (or class-folder root) the TFDS
                              files are built from, once, into data.data_dir
    data.split / eval_split   splits for training / bits-per-dim evaluation
    data.levels               largest stored pixel value (16 for the digits, 255 for photos); also the
                              number of bins of bits/dim (bin width 2 / levels)
    data.noise, noise_std     'none' | 'uniform' (dequantisation) | 'gaussian' (σ = noise_std)
    data.image_size           resize to this square size (0: as stored; integer factors only)
    data.channels             0: as stored; 3: grey → RGB; 1: RGB → grey
    data.label_drop           probability of dropping the label (→ −1) for guidance
    data.caption_drop         probability of dropping the caption (→ "") for guidance
    data.batch_size           global batch size (split over processes, then over data × fsdp)
    data.worker_count         grain worker processes (0: read in the main process)
    optim.lr, min_lr          peak learning rate and the floor the cosine decays to
    optim.warmup_steps        linear warm-up from 0 to lr
    optim.b1, b2, eps         AdamW moments (β = (0.9, 0.95) by default)
    optim.weight_decay        decoupled weight decay, applied only to ≥ 2-D kernels (see optim.py)
    optim.clip_norm           global-norm gradient clip (0: off)
    optim.ema_decay           EMA of the parameters (0: no EMA tree)
    train.steps               total optimiser steps (skipped non-finite steps included)
    train.grad_accum          micro-batches per step (data.batch_size must divide by it)
    train.log_every           metrics every N steps (console, metrics.jsonl, TensorBoard)
    train.sample_every        sample grid every N steps (0: never)
    train.checkpoint_every    checkpoint every N steps (0: only at the end)
    train.keep_last           keep the N most recent checkpoints
    train.keep_every          also keep every checkpoint whose step is a multiple of K (0: off)
    train.max_nonfinite_steps stop with NonFiniteLossError after K non-finite steps in a row
    train.init_from           '' or an Orbax checkpoint (a workdir, its checkpoints/ dir or a step dir)
                              whose params start a fresh run (used only when this workdir has none)
    train.init_new            patterns (fnmatch, over '/'-joined parameter paths such as 'flow/bridge/*') of
                              the parameters that are new in this stage: with init_from they are
                              initialised fresh (and logged); every other difference between the two
                              parameter trees is an error listing all of them
    train.allow_frozen_change resume although a frozen part's source or content changed (default False:
                              an error naming the part)
    train.frozen_copy         write each frozen part once to <workdir>/frozen/<name> (a self-contained run;
                              later stages and restores may point at it)
    train.async_checkpoint    write checkpoints in the background
    train.compilation_cache_dir  '' (off) | a directory (local or gs://) for JAX's persistent
                              compilation cache: restarts and later runs reuse compiled steps
    mesh.data, fsdp, tensor   mesh axis sizes; one may be −1 (the rest of the devices)
    sample.guidance           list of guidance weights, one grid panel each
    sample.per_class          samples per class (label) / per prompt (caption) / rows (none)
    sample.prompts            captions for the grid (caption conditioning; empty: one per digit)
    sample.jacobi.*           block_size (0 = sequential sampling), threshold, max_iters
    sample.image_temperature  T > 0: images are drawn with noise ε ~ N(0, T²·I) (Glow's temperature; 1: the
                              model's distribution, < 1: nearer its mode, less varied). model.family
                              'starflow2' only (its sample grids, ``starflow2 generate``'s default, the digits
                              demo's scoring); every other family needs 1.0
    frozen.<part>             filled by the trainer: each frozen part's resolved source and fingerprint
                              (train.frozen.load_parts); compared at resume
"""

from __future__ import annotations

from typing import Any

import ml_collections

from starflow2_jax.train import families
from starflow2_jax.train.config_fields import DTYPES, REMAT  # noqa: F401  (re-exported: one list everywhere)
from starflow2_jax.train.config_fields import choice as _choice
from starflow2_jax.train.config_fields import float_field as _float
from starflow2_jax.train.config_fields import get as _get
from starflow2_jax.train.config_fields import int_field as _int
from starflow2_jax.train.tasks.fae import STAGES as FAE_STAGES  # noqa: F401  (configs/fae.py reads it here)

BUILDERS = ("digits", "photos", "directory", "interleaved", "image_text", "digits_documents")
DOCUMENT_BUILDERS = ("interleaved", "image_text", "digits_documents")  # read by model.family='starflow2' only
NOISE = ("none", "uniform", "gaussian")
TEMPERATURE_FAMILIES = ("starflow2",)  # the families whose samplers read sample.image_temperature


def base_config() -> ml_collections.ConfigDict:
    """Every trainer field with its default (a tiny unconditional STARFlow on the digits), the
    sections of every registered family included."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.model.family = "flow"
    c.data = ml_collections.ConfigDict(dict(
        builder="digits", data_dir="", source="", split="train", eval_split="test", levels=16, noise="uniform",
        noise_std=0.0, label_drop=0.1, caption_drop=0.1, batch_size=64, worker_count=0, image_size=0,
        channels=0, kinds=()))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, min_lr=1e-5, warmup_steps=100, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4,
        clip_norm=1.0, ema_decay=0.0))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, grad_accum=1, log_every=50, sample_every=0, checkpoint_every=500, keep_last=3,
        keep_every=0, max_nonfinite_steps=20, init_from="", init_new=(), allow_frozen_change=False,
        frozen_copy=False, async_checkpoint=True, compilation_cache_dir=""))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sample = ml_collections.ConfigDict(dict(
        guidance=[0.0], per_class=4, prompts=(), image_temperature=1.0,
        jacobi=ml_collections.ConfigDict(dict(block_size=0, threshold=1e-3, max_iters=32))))
    c.frozen = ml_collections.ConfigDict()
    for family in families.all_families():
        family.add_defaults(c)
    return c


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every trainer field (types, ranges, cross-field rules); returns ``config``.

    Raises ValueError whose message starts with the dotted name of the first bad field. A NaN or
    ±inf anywhere in the config (model kwargs and lists included) is rejected first.
    """
    _reject_non_finite(config)
    _int(config, "seed", 0)
    family = _choice(config, "model.family", families.names())
    families.get(family).validate(config)

    _choice(config, "data.builder", BUILDERS)
    if _get(config, "data.builder") == "directory" and not _get(config, "data.data_dir"):
        raise ValueError("data.data_dir is empty: data.builder='directory' reads a prepared TFDS dataset there")
    if _get(config, "data.builder") in DOCUMENT_BUILDERS:
        if family != "starflow2":
            raise ValueError(f"data.builder={config.data.builder!r}: documents are read by model.family='starflow2' "
                             f"(got {family!r})")
    kinds = _get(config, "data.kinds")
    if isinstance(kinds, str) or not isinstance(kinds, (list, tuple)):
        raise ValueError(f"data.kinds={kinds!r}: expected a list of document kinds (data.builder='digits_documents')")
    if kinds and _get(config, "data.builder") != "digits_documents":
        raise ValueError(f"data.kinds={list(kinds)}: only data.builder='digits_documents' draws document kinds "
                         f"(data.builder is {config.data.builder!r}); expected []")
    if not isinstance(_get(config, "data.source"), str):
        raise ValueError(f"data.source={config.data.source!r}: expected a path string (the JSONL file that "
                         f"data.builder 'interleaved' / 'image_text' builds its dataset from)")
    _int(config, "data.levels", 1)
    noise = _choice(config, "data.noise", NOISE)
    std = _float(config, "data.noise_std", 0.0)
    if (noise == "gaussian") != (std > 0):
        raise ValueError(f"data.noise_std={std}: must be > 0 exactly when data.noise='gaussian' (noise={noise!r})")
    _float(config, "data.label_drop", 0.0, 1.0)
    _float(config, "data.caption_drop", 0.0, 1.0)
    batch = _int(config, "data.batch_size", 1)
    _int(config, "data.worker_count", 0)
    _int(config, "data.image_size", 0)
    channels = _int(config, "data.channels", 0)
    if channels not in (0, 1, 3):
        raise ValueError(f"data.channels={channels}: expected 0 (as stored), 1 (grey) or 3 (RGB)")

    lr = _float(config, "optim.lr", 0.0)
    min_lr = _float(config, "optim.min_lr", 0.0)
    if min_lr > lr:
        raise ValueError(f"optim.min_lr={min_lr} is above optim.lr={lr}")
    _int(config, "optim.warmup_steps", 0)
    _float(config, "optim.b1", 0.0, 1.0)
    _float(config, "optim.b2", 0.0, 1.0)
    _float(config, "optim.eps", 0.0)
    _float(config, "optim.weight_decay", 0.0)
    _float(config, "optim.clip_norm", 0.0)
    ema = _float(config, "optim.ema_decay", 0.0)
    if ema >= 1.0:
        raise ValueError(f"optim.ema_decay={ema}: expected 0 (off) or a decay in (0, 1)")

    steps = _int(config, "train.steps", 1)
    accum = _int(config, "train.grad_accum", 1)
    if batch % accum:
        raise ValueError(f"train.grad_accum={accum} does not divide data.batch_size={batch}")
    if config.optim.warmup_steps > steps:
        raise ValueError(f"optim.warmup_steps={config.optim.warmup_steps} exceeds train.steps={steps}")
    _int(config, "train.log_every", 1)
    _int(config, "train.sample_every", 0)
    _int(config, "train.checkpoint_every", 0)
    _int(config, "train.keep_last", 1)
    _int(config, "train.keep_every", 0)
    _int(config, "train.max_nonfinite_steps", 1)
    if not isinstance(_get(config, "train.init_from"), str):
        raise ValueError(f"train.init_from={config.train.init_from!r}: expected a path string ('' for none)")
    patterns = _get(config, "train.init_new")
    if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"train.init_new={patterns!r}: expected a list of non-empty patterns such as 'flow/bridge/*'")
    for field in ("allow_frozen_change", "frozen_copy", "async_checkpoint"):
        if not isinstance(_get(config, f"train.{field}"), bool):
            raise ValueError(f"train.{field}={config.train[field]!r}: expected a bool")
    if not hasattr(_get(config, "frozen"), "keys"):
        raise ValueError(f"frozen={config.frozen!r}: expected a dict (the trainer fills it)")
    if not isinstance(_get(config, "train.compilation_cache_dir"), str):
        raise ValueError(f"train.compilation_cache_dir={config.train.compilation_cache_dir!r}: expected a directory "
                         f"string ('' for none)")

    minus_one = [axis for axis in ("data", "fsdp", "tensor") if _int(config, f"mesh.{axis}", 1, allow=(-1,)) == -1]
    if len(minus_one) > 1:
        raise ValueError(f"mesh.{minus_one[1]}=-1: at most one mesh axis may be -1 (also mesh.{minus_one[0]})")

    guidance = _get(config, "sample.guidance")
    if isinstance(guidance, (str, bytes)) or not all(isinstance(g, (int, float)) for g in guidance) or not guidance:
        raise ValueError(f"sample.guidance={guidance!r}: expected a non-empty list of numbers")
    _int(config, "sample.per_class", 1)
    prompts = _get(config, "sample.prompts")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"sample.prompts={prompts!r}: expected a list of strings")
    _int(config, "sample.jacobi.block_size", 0)
    _float(config, "sample.jacobi.threshold", 0.0)
    _int(config, "sample.jacobi.max_iters", 1)
    temperature = _float(config, "sample.image_temperature")
    if temperature <= 0:
        raise ValueError(f"sample.image_temperature={temperature!r}: expected a number > 0 (the image noise is "
                         f"ε ~ N(0, T²·I); 1: the model's distribution)")
    if temperature != 1.0 and family not in TEMPERATURE_FAMILIES:
        raise ValueError(f"sample.image_temperature={temperature!r}: only model.family in {TEMPERATURE_FAMILIES} "
                         f"samples at an image temperature (model.family is {family!r}, whose sampler draws "
                         f"ε ~ N(0, I)); expected 1.0")
    return config


def _reject_non_finite(node, prefix: str = "") -> None:
    """ValueError naming the first field (``a.b`` or ``a.b[2]``) holding a NaN or ±inf float."""
    import math

    items = node.items() if hasattr(node, "items") else enumerate(node)
    for key, value in items:
        path = f"{prefix}[{key}]" if isinstance(key, int) else (f"{prefix}.{key}" if prefix else str(key))
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{path}={value!r}: expected a finite number")
        if hasattr(value, "items") or isinstance(value, (list, tuple)):
            _reject_non_finite(value, path)


def to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-ready dict of ``config`` (tuples become lists)."""
    import json

    return json.loads(config.to_json())
