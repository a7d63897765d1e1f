"""The training config: every field the trainer reads, its default, and ``validate``.

``base_config()`` returns an ``ml_collections.ConfigDict`` with all fields below (experiment files in
``configs/`` start from it and override); ``validate(config)`` checks it once, up front, and raises
``ValueError`` naming the offending field (``model.flow.factory='x': expected one of ...``).

    seed                      int; parameter init, the train rng and the data pipeline's seed
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
    data.builder              'digits' (the embedded demo data) | 'directory' (a prepared TFDS
                              dataset directory, ``tfds.builder_from_directory(data.data_dir)``)
    data.data_dir             where the TFDS files live (built there on first use for 'digits')
    data.split / eval_split   splits for training / bits-per-dim evaluation
    data.levels               largest stored pixel value (16 for the digits, 255 for photos); also the
                              number of bins of bits/dim (bin width 2 / levels)
    data.noise, noise_std     'none' | 'uniform' (dequantisation) | 'gaussian' (σ = noise_std)
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
    mesh.data, fsdp, tensor   mesh axis sizes; one may be −1 (the rest of the devices)
    sample.guidance           list of guidance weights, one grid panel each
    sample.per_class          samples per class (label) / per prompt (caption) / rows (none)
    sample.prompts            captions for the grid (caption conditioning; empty: one per digit)
    sample.jacobi.*           block_size (0 = sequential sampling), threshold, max_iters
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections

from starflow2_jax.nn.remat import REMAT_POLICIES

FACTORIES = ("starflow", "tarflow")
CONDITIONING = ("label", "caption", "none")
BUILDERS = ("digits", "directory")
NOISE = ("none", "uniform", "gaussian")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = tuple(REMAT_POLICIES)  # the policies nn.remat_layer knows, one list for every model


def base_config() -> ml_collections.ConfigDict:
    """Every trainer field with its default (a tiny unconditional STARFlow on the digits)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.model.flow = ml_collections.ConfigDict(dict(
        factory="starflow", kwargs=ml_collections.ConfigDict(dict(
            in_channels=1, img_size=8, patch_size=2, channels=64, layers_per_block=[1, 1], head_dim=32)),
        dtype="float32", remat="none"))
    c.model.conditioning = "none"
    c.model.text = ml_collections.ConfigDict(dict(max_len=8, dim=32, vocab=()))
    c.data = ml_collections.ConfigDict(dict(
        builder="digits", data_dir="", split="train", eval_split="test", levels=16, noise="uniform",
        noise_std=0.0, label_drop=0.1, caption_drop=0.1, batch_size=64, worker_count=0))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, min_lr=1e-5, warmup_steps=100, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4,
        clip_norm=1.0, ema_decay=0.0))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, grad_accum=1, log_every=50, sample_every=0, checkpoint_every=500, keep_last=3,
        keep_every=0, max_nonfinite_steps=20, init_from="", async_checkpoint=True))
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


def to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-ready dict of ``config`` (tuples become lists)."""
    import json

    return json.loads(config.to_json())
