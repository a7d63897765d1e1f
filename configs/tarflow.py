"""The TarFlow paper's image runs (Zhai et al. 2024, ``apple/ml-tarflow`` README recipes) on your data.

    starflow2 train --config configs/tarflow.py:imagenet64 --workdir gs://bucket/tarflow64 \\
        --config.data.data_dir=/data/tfds/starflow2_image_text/imagenet64/1.0.0

``data.data_dir`` is a prepared TFDS dataset directory (``data.builder='directory'``), e.g. one
written by ``starflow2_jax.data.image_text.build_image_text(source, data_dir, image_size, name)``
from a folder of class subfolders at the preset's resolution. It is empty here: set it on the
command line (``validate`` names it otherwise).

Presets (``arg``), sizes and hyper-parameters as in the ml-tarflow README commands:

    preset              image  patch  width  blocks×layers  classes  σ_noise  batch  epochs  params
    imagenet64          64     2      768    8×8            1000     0.05     256    200     466.3 M
    imagenet64_uncond   64     2      768    8×8            —        0.05     256    200     460.1 M
    imagenet128         128    4      1024   8×8            1000     0.15     768    320     823.9 M
    afhq256             256    8      768    8×8            3        0.07     256    4000    463.5 M

Shared: AdamW lr 1e-4, β = (0.9, 0.95), weight decay 1e-4, no clipping, no EMA; warm-up of one
epoch from 0, cosine to 1e-6 at the end; label dropout 0.1 for the class-conditional runs;
Gaussian noise augmentation σ_noise on x ∈ [−1, 1]; bfloat16 compute (the reference autocasts the
Gaussian-noise runs to bf16), ``dots`` remat, pure data parallelism (``mesh.data=-1``). Steps =
epochs × ⌊train images / batch⌋ with 1,281,167 ImageNet and 14,630 AFHQ training images. Add
``,runlocal`` (``configs/tarflow.py:imagenet64,runlocal``) for a tiny model and 10 steps on the
same data, to check a data directory and the setup before a long run.

Differences from the reference: weight decay applies to kernels only (``train.optim``), where the
reference decays every tensor; no random horizontal flips (the pipeline has none); the reference's
batch for AFHQ is taken as 256 (the README's distributed launch) — override it if yours differs.
"""

import ml_collections

from starflow2_jax.config_files import parse_preset
from starflow2_jax.train.config_schema import base_config

IMAGENET_TRAIN_IMAGES = 1_281_167
AFHQ_TRAIN_IMAGES = 14_630

# preset: (image size, patch, width, classes, noise σ, batch, epochs, training images)
RUNS = {
    "imagenet64": (64, 2, 768, 1000, 0.05, 256, 200, IMAGENET_TRAIN_IMAGES),
    "imagenet64_uncond": (64, 2, 768, 0, 0.05, 256, 200, IMAGENET_TRAIN_IMAGES),
    "imagenet128": (128, 4, 1024, 1000, 0.15, 768, 320, IMAGENET_TRAIN_IMAGES),
    "afhq256": (256, 8, 768, 3, 0.07, 256, 4000, AFHQ_TRAIN_IMAGES),
}
PRESETS = (*RUNS, *(f"{name},runlocal" for name in RUNS))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name, modifiers = parse_preset(arg, tuple(RUNS), ("runlocal",))
    image_size, patch, width, classes, sigma, batch, epochs, images = RUNS[name]
    steps_per_epoch = images // batch
    c = base_config()

    c.model.flow.factory = "tarflow"
    c.model.flow.kwargs = ml_collections.ConfigDict(dict(
        in_channels=3, img_size=image_size, patch_size=patch, channels=width, num_blocks=8, layers_per_block=8))
    if classes:
        c.model.flow.kwargs.num_classes = classes
    c.model.conditioning = "label" if classes else "none"
    c.model.flow.dtype = "bfloat16"
    c.model.flow.remat = "dots"

    c.data.builder = "directory"
    c.data.data_dir = ""  # set it: --config.data.data_dir=/path/to/tfds/<name>/<version>
    c.data.levels = 255
    c.data.noise = "gaussian"
    c.data.noise_std = sigma
    c.data.label_drop = 0.1 if classes else 0.0
    c.data.caption_drop = 0.0
    c.data.batch_size = batch
    c.data.worker_count = 8

    c.optim.lr = 1e-4
    c.optim.min_lr = 1e-6
    c.optim.warmup_steps = steps_per_epoch
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 1e-4
    c.optim.clip_norm = 0.0
    c.optim.ema_decay = 0.0

    c.train.steps = epochs * steps_per_epoch
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.train.keep_last = 3
    c.train.keep_every = 100_000
    c.train.sample_every = 5 * steps_per_epoch
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    c.sample.guidance = [0.0, 2.3] if classes else [0.0]  # 2.3: the README's FID guidance
    c.sample.per_class = 1 if classes else 8  # a grid row per class: 1000 rows on ImageNet

    if "runlocal" in modifiers:
        c.model.flow.kwargs.channels = 64
        c.model.flow.kwargs.num_blocks = 2
        c.model.flow.kwargs.layers_per_block = 1
        c.model.flow.dtype = "float32"
        c.model.flow.remat = "none"
        c.data.batch_size = 8
        c.data.worker_count = 0
        c.optim.warmup_steps = 2
        c.train.steps = 10
        c.train.log_every = 1
        c.train.checkpoint_every = 5
        c.train.keep_every = 0
        c.train.sample_every = 0
    return c
