"""The training config: every field the trainer reads, its default, and ``validate``.

``base_config()`` returns an ``ml_collections.ConfigDict`` with all fields below (experiment files in
``configs/`` start from it and override); ``validate(config)`` checks it once, up front, and raises
``ValueError`` naming the offending field (``model.flow.factory='x': expected one of ...``).

    seed                      int; parameter init, the train rng and the data pipeline's seed
    model.family              'flow' (TarFlow / STARFlow, model.flow.*) | 'fae' (an FAE stage, model.fae.*)
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
    model.latent.fae_workdir  'fae': the workdir of the FAE's last stage (its latest checkpoint is used)
    model.latent.fae          'fae': the FAE's config (fae.fae_config_to_dict), filled by the trainer from
                              fae_workdir, so a stored run describes its latent space without it
    model.latent.noise_std    Gaussian noise added to the latents in training (0: none)
    model.fae.stage           'ia' | 'ib' | 'ii' (see train.tasks.fae); run in that order with init_from
    model.fae.dinov2          dict of fae.Dinov2Config fields of the frozen encoder (with
                              dinov2_checkpoint: the fields it must have, the rest filled from it)
    model.fae.dinov2_checkpoint  '' (random DINOv2: tests, tiny runs) | a Hugging Face Dinov2Model /
                              Dinov2WithRegistersModel directory
    model.fae.<size fields>   image_size, encoder_image_size, latent_dim, encoder_heads,
                              feature_decoder_{width,layers,heads,mlp_ratio},
                              pixel_decoder_{width,layers,heads,mlp_ratio} (see fae.FAEConfig)
    model.fae.dtype, remat    compute dtype and remat policy of the FAE and DINOv2
    model.fae.<loss fields>   kl_weight (β), noise_sigma (stage ia), pixel_loss 'l1'|'l2'|'l1+l2',
                              perceptual 'dinov2'|'none', perceptual_weight, gan_weight (0: no GAN),
                              lecam_weight, disc_channels, disc_layers, stats_batches
    data.builder              'digits' (the embedded demo data) | 'photos' (scikit-image photo tiles +
                              digits, RGB 64×64) | 'directory' (a prepared TFDS
                              dataset directory, ``tfds.builder_from_directory(data.data_dir)``)
    data.data_dir             where the TFDS files live (built there on first use for 'digits')
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
    train.async_checkpoint    write checkpoints in the background
    train.compilation_cache_dir  '' (off) | a directory (local or gs://) for JAX's persistent
                              compilation cache: restarts and later runs reuse compiled steps
    mesh.data, fsdp, tensor   mesh axis sizes; one may be −1 (the rest of the devices)
    sample.guidance           list of guidance weights, one grid panel each
    sample.per_class          samples per class (label) / per prompt (caption) / rows (none)
    sample.prompts            captions for the grid (caption conditioning; empty: one per digit)
    sample.jacobi.*           block_size (0 = sequential sampling), threshold, max_iters
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections

from starflow2_jax.fae.losses import PIXEL_KINDS as PIXEL_LOSSES
from starflow2_jax.nn.remat import REMAT_POLICIES

FAMILIES = ("flow", "fae")
FACTORIES = ("starflow", "tarflow")
LATENTS = ("pixels", "patches", "fae")
FAE_STAGES = ("ia", "ib", "ii")  # train.tasks.fae: pixel decoder, encoder + feature decoder, pixel fine-tune
PERCEPTUAL = ("dinov2", "none")
CONDITIONING = ("label", "caption", "none")
BUILDERS = ("digits", "photos", "directory")
NOISE = ("none", "uniform", "gaussian")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = tuple(REMAT_POLICIES)  # the policies nn.remat_layer knows, one list for every model


def base_config() -> ml_collections.ConfigDict:
    """Every trainer field with its default (a tiny unconditional STARFlow on the digits)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.model.family = "flow"
    c.model.flow = ml_collections.ConfigDict(dict(
        factory="starflow", kwargs=ml_collections.ConfigDict(dict(
            in_channels=1, img_size=8, patch_size=2, channels=64, layers_per_block=[1, 1], head_dim=32)),
        dtype="float32", remat="none"))
    c.model.conditioning = "none"
    c.model.text = ml_collections.ConfigDict(dict(max_len=8, dim=32, vocab=()))
    c.model.latent = ml_collections.ConfigDict(dict(kind="pixels", patch=0, image_size=0, channels=0,
                                                    fae_workdir="", fae=ml_collections.ConfigDict(),
                                                    noise_std=0.0))
    c.model.fae = ml_collections.ConfigDict(dict(
        stage="ib", dinov2=ml_collections.ConfigDict(dict(
            hidden_size=32, num_layers=2, num_heads=4, mlp_ratio=4.0, patch_size=4, image_size=32)),
        dinov2_checkpoint="", image_size=32, encoder_image_size=0, latent_dim=8, encoder_heads=2,
        feature_decoder_width=32, feature_decoder_layers=2, feature_decoder_heads=2, feature_decoder_mlp_ratio=8 / 3,
        pixel_decoder_width=32, pixel_decoder_layers=2, pixel_decoder_heads=2, pixel_decoder_mlp_ratio=4.0,
        dtype="float32", remat="none", kl_weight=1e-4, noise_sigma=0.4, pixel_loss="l2", perceptual="dinov2",
        perceptual_weight=1.0, gan_weight=0.0, lecam_weight=0.0, disc_channels=32, disc_layers=2, stats_batches=8))
    c.data = ml_collections.ConfigDict(dict(
        builder="digits", data_dir="", split="train", eval_split="test", levels=16, noise="uniform",
        noise_std=0.0, label_drop=0.1, caption_drop=0.1, batch_size=64, worker_count=0, image_size=0,
        channels=0))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, min_lr=1e-5, warmup_steps=100, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4,
        clip_norm=1.0, ema_decay=0.0))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, grad_accum=1, log_every=50, sample_every=0, checkpoint_every=500, keep_last=3,
        keep_every=0, max_nonfinite_steps=20, init_from="", async_checkpoint=True, compilation_cache_dir=""))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sample = ml_collections.ConfigDict(dict(
        guidance=[0.0], per_class=4, prompts=(),
        jacobi=ml_collections.ConfigDict(dict(block_size=0, threshold=1e-3, max_iters=32))))
    return c


def _get(config, path: str):
    node = config
    for part in path.split("."):
        if part not in node:
            raise ValueError(f"config field {path!r} is missing (see starflow2_jax.train.config_schema)")
        node = node[part]
    return node


def _int(config, path: str, minimum: int | None = None, allow: Sequence[int] = ()) -> int:
    value = _get(config, path)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{path}={value!r}: expected an int")
    if value in allow:
        return value
    if minimum is not None and value < minimum:
        raise ValueError(f"{path}={value!r}: expected an int >= {minimum}")
    return value


def _float(config, path: str, low: float | None = None, high: float | None = None) -> float:
    value = _get(config, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}={value!r}: expected a number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{path}={value!r}: expected a number in [{low}, {high}]")
    return float(value)


def _choice(config, path: str, allowed: Sequence[str]) -> str:
    value = _get(config, path)
    if value not in allowed:
        raise ValueError(f"{path}={value!r}: expected one of {tuple(allowed)}")
    return value


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every trainer field (types, ranges, cross-field rules); returns ``config``.

    Raises ValueError whose message starts with the dotted name of the first bad field.
    """
    _int(config, "seed", 0)
    family = _choice(config, "model.family", FAMILIES)
    if family == "fae":
        _validate_fae(config)
    factory = _choice(config, "model.flow.factory", FACTORIES)
    kwargs = _get(config, "model.flow.kwargs")
    if not hasattr(kwargs, "keys"):
        raise ValueError(f"model.flow.kwargs={kwargs!r}: expected a dict of factory arguments")
    _choice(config, "model.flow.dtype", DTYPES)
    _choice(config, "model.flow.remat", REMAT)
    cond = _choice(config, "model.conditioning", CONDITIONING)
    num_classes = kwargs.get("num_classes", 0)
    if cond == "label" and not num_classes:
        raise ValueError("model.flow.kwargs.num_classes must be > 0 for model.conditioning='label'")
    if cond != "label" and num_classes:
        raise ValueError(f"model.flow.kwargs.num_classes={num_classes} needs model.conditioning='label' "
                         f"(got {cond!r})")
    for key in ("txt_size", "txt_dim"):
        if key in kwargs:
            raise ValueError(f"model.flow.kwargs.{key}: set model.text.max_len / model.text.dim instead "
                             f"(the trainer passes them to the factory for caption conditioning)")
    if cond == "caption":
        if factory != "starflow":
            raise ValueError(f"model.flow.factory={factory!r}: caption conditioning needs 'starflow' "
                             f"(TarFlow has no text prefix)")
        _int(config, "model.text.max_len", 1)
        _int(config, "model.text.dim", 1)
        vocab = _get(config, "model.text.vocab")
        if isinstance(vocab, str) or not all(isinstance(t, str) for t in vocab):
            raise ValueError(f"model.text.vocab={vocab!r}: expected a list of strings")
        if not vocab and _get(config, "data.builder") != "digits":
            raise ValueError("model.text.vocab is empty: list the captions (or words) of your data "
                             "(only data.builder='digits' fills it automatically)")

    kind = _choice(config, "model.latent.kind", LATENTS)
    for field in ("patch", "image_size", "channels"):
        _int(config, f"model.latent.{field}", 0)
    _float(config, "model.latent.noise_std", 0.0)
    if not hasattr(_get(config, "model.latent.fae"), "keys"):
        raise ValueError(f"model.latent.fae={config.model.latent.fae!r}: expected a dict (the trainer fills it)")
    if family == "flow" and kind == "fae" and not _get(config, "model.latent.fae_workdir"):
        raise ValueError("model.latent.fae_workdir is empty: model.latent.kind='fae' needs the workdir of a "
                         "trained FAE (its last stage)")

    _choice(config, "data.builder", BUILDERS)
    if _get(config, "data.builder") == "directory" and not _get(config, "data.data_dir"):
        raise ValueError("data.data_dir is empty: data.builder='directory' reads a prepared TFDS dataset there")
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
    if not isinstance(_get(config, "train.async_checkpoint"), bool):
        raise ValueError(f"train.async_checkpoint={config.train.async_checkpoint!r}: expected a bool")
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
    return config


def _validate_fae(config) -> None:
    _choice(config, "model.fae.stage", FAE_STAGES)
    dino = _get(config, "model.fae.dinov2")
    if not hasattr(dino, "keys"):
        raise ValueError(f"model.fae.dinov2={dino!r}: expected a dict of fae.Dinov2Config fields")
    if not isinstance(_get(config, "model.fae.dinov2_checkpoint"), str):
        raise ValueError("model.fae.dinov2_checkpoint: expected a path string ('' for a random DINOv2)")
    for field in ("image_size", "latent_dim", "encoder_heads", "feature_decoder_width", "feature_decoder_layers",
                  "feature_decoder_heads", "pixel_decoder_width", "pixel_decoder_layers", "pixel_decoder_heads",
                  "disc_channels", "disc_layers", "stats_batches"):
        _int(config, f"model.fae.{field}", 1)
    _int(config, "model.fae.encoder_image_size", 0)
    for field in ("feature_decoder_mlp_ratio", "pixel_decoder_mlp_ratio"):
        if _float(config, f"model.fae.{field}", 0.0) <= 0:
            raise ValueError(f"model.fae.{field}: expected a positive number")
    for field in ("kl_weight", "noise_sigma", "perceptual_weight", "gan_weight", "lecam_weight"):
        _float(config, f"model.fae.{field}", 0.0)
    _choice(config, "model.fae.pixel_loss", PIXEL_LOSSES)
    _choice(config, "model.fae.perceptual", PERCEPTUAL)
    _choice(config, "model.fae.dtype", DTYPES)
    _choice(config, "model.fae.remat", REMAT)
    if _float(config, "optim.ema_decay", 0.0) > 0:
        raise ValueError(f"optim.ema_decay={config.optim.ema_decay}: must be 0 for model.family='fae' (each stage "
                         f"hands its raw params to the next, and the latent statistics are computed from them)")
    if _get(config, "model.latent.kind") != "pixels":
        raise ValueError("model.latent.kind applies to flows; leave it 'pixels' for model.family='fae'")


def to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-ready dict of ``config`` (tuples become lists)."""
    import json

    return json.loads(config.to_json())
