"""The FAE latent space (SPEC §3): three training stages, each run from the previous one's checkpoint.

    starflow2 train --config configs/fae.py:tiny,ia --workdir /tmp/fae_ia
    starflow2 train --config configs/fae.py:tiny,ib --workdir /tmp/fae_ib --config.train.init_from=/tmp/fae_ia
    starflow2 train --config configs/fae.py:tiny,ii --workdir /tmp/fae_ii --config.train.init_from=/tmp/fae_ib

The last workdir holds every part and the latent statistics; a flow uses it with
``--config.model.latent.kind=fae --config.model.latent.fae_workdir=/tmp/fae_ii``.

Presets (``arg`` = ``size,stage[,runlocal]``):

- ``tiny`` (default): a randomly initialised DINOv2 (32 wide, 2 layers, patch 4) on 32-px RGB tiles of
  the embedded data (scikit-image photos + digits, ``data.builder='photos'``), 8×8×8 latents. Runs
  on a laptop CPU; it exercises every code path (a random encoder's features are still a faithful
  code of the image, so the FAE learns to reconstruct them).
- ``g14_256``: the paper's sizes — DINOv2-g/14 (set ``model.fae.dinov2_checkpoint`` to a Hugging
  Face ``facebook/dinov2-giant`` directory; its config must match), 224 px into DINOv2, 16×16×32
  latents, a 6-layer 1024-wide feature decoder, a 24-layer 1024-wide (ViT-L) pixel decoder, 256 px
  out; bfloat16 compute with 'dots' remat; data from a prepared TFDS directory.

Measured (tiny, all three stages at their default steps: 2 min on 2 CPU cores; the 353 held-out
tiles of the 'test' split): feature error (MSE / mean F²) 1.18 → 0.014, pixel MSE 0.99 → 0.0065
(photo tiles only: 0.72 → 0.036, about 20.5 dB PSNR); digits dominate the split.

Stages: ``ia`` (pixel decoder on noisy real features, σ = 0.4·RMS), ``ib`` (encoder + feature
decoder, β = 1e-4; computes the latent statistics at its last step), ``ii`` (pixel decoder on
reconstructed features, with the PatchGAN). ``runlocal`` shrinks any of them to a few steps.
**[choice]** step counts, learning rates and loss weights (the paper gives none we could verify).
"""

import ml_collections

from starflow2_jax.config_files import ConfigError, parse_preset
from starflow2_jax.train.config_schema import FAE_STAGES, base_config

SIZES = ("tiny", "g14_256")
STAGES = FAE_STAGES
PRESETS = tuple(f"{size},{stage}" for size in SIZES for stage in STAGES)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size, modifiers = parse_preset(arg, SIZES, STAGES + ("runlocal",), default="tiny")
    stages = sorted(modifiers & set(STAGES))
    if len(stages) > 1:
        raise ConfigError(f"stages {stages} exclude each other: pick one of {STAGES}")
    stage = stages[0] if stages else "ia"

    c = base_config()
    c.seed = 0
    c.model.family = "fae"
    c.model.conditioning = "none"
    f = c.model.fae
    f.stage = stage
    c.optim.ema_decay = 0.0
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.sample.per_class = 2

    if size == "tiny":
        f.dinov2 = ml_collections.ConfigDict(dict(hidden_size=32, num_layers=2, num_heads=4, mlp_ratio=4.0,
                                                  patch_size=4, image_size=32))
        f.dinov2_checkpoint = ""
        f.image_size, f.encoder_image_size, f.latent_dim, f.encoder_heads = 32, 0, 8, 2
        f.feature_decoder_width, f.feature_decoder_layers, f.feature_decoder_heads = 64, 2, 2
        f.pixel_decoder_width, f.pixel_decoder_layers, f.pixel_decoder_heads = 64, 2, 2
        f.disc_channels, f.disc_layers = 32, 2
        f.stats_batches = 8
        c.data.builder = "photos"
        c.data.levels = 255
        c.data.noise = "none"
        c.data.image_size = 32
        c.data.channels = 3
        c.data.batch_size = 32
        c.optim.lr = 5e-4 if stage == "ii" else 2e-3  # ii fine-tunes the stage-ia pixel decoder
        c.optim.min_lr = 1e-4
        c.optim.warmup_steps = 20
        c.train.steps = {"ia": 300, "ib": 300, "ii": 200}[stage]
        c.train.log_every = 50
        c.train.checkpoint_every = 0
    else:
        # facebook/dinov2-giant: a checkpoint's config.json must agree with every field given here
        f.dinov2 = ml_collections.ConfigDict(dict(hidden_size=1536, num_layers=40, num_heads=24, mlp_ratio=4.0,
                                                  patch_size=14, image_size=518, use_swiglu_ffn=True,
                                                  num_register_tokens=0))
        f.dinov2_checkpoint = ""  # required: --config.model.fae.dinov2_checkpoint=/path/to/dinov2-giant
        f.image_size, f.encoder_image_size, f.latent_dim, f.encoder_heads = 256, 224, 32, 4
        f.feature_decoder_width, f.feature_decoder_layers, f.feature_decoder_heads = 1024, 6, 16
        f.pixel_decoder_width, f.pixel_decoder_layers, f.pixel_decoder_heads = 1024, 24, 16
        f.dtype, f.remat = "bfloat16", "dots"
        f.disc_channels, f.disc_layers = 64, 3
        f.stats_batches = 64
        c.data.builder = "directory"
        c.data.data_dir = ""  # required: a prepared TFDS dataset of RGB images
        c.data.levels = 255
        c.data.noise = "none"
        c.data.image_size = 256
        c.data.channels = 3
        c.data.batch_size = 256
        c.data.worker_count = 8
        c.optim.lr = 1e-4
        c.optim.min_lr = 1e-6
        c.optim.warmup_steps = 2000
        c.train.steps = {"ia": 100_000, "ib": 200_000, "ii": 50_000}[stage]
        c.train.log_every = 100
        c.train.checkpoint_every = 5000
        c.mesh.fsdp = -1
        c.mesh.data = 1

    # the PatchGAN trades pixel MSE for sharpness; at the tiny size a small weight keeps MSE close
    f.gan_weight = (0.1 if size == "g14_256" else 0.02) if stage == "ii" else 0.0
    f.lecam_weight = 0.001 if stage == "ii" else 0.0
    f.perceptual = "dinov2"
    f.perceptual_weight = 1.0 if stage != "ib" else 0.0

    if "runlocal" in modifiers:
        c.train.steps = 4
        c.optim.warmup_steps = 1
        c.train.log_every = 2
        c.train.checkpoint_every = 2
        c.data.batch_size = 8
        f.stats_batches = 2
    return c
