"""``FAETask``: the FAE's three training stages through the shared loop (SPEC §3).

Stages (``model.fae.stage``), run in this order, each starting from the previous one's checkpoint
(``train.init_from``), so the last checkpoint holds every part::

    ia   trains pixel_decoder, discriminator: the pixel decoder on noisy real features F + σ·rms(F)·ε
    ib   trains encoder, feature_decoder: ‖FD(z) − F‖² + β·KL(q(z|F) ‖ N(0, I)); at its last step the
         latent statistics (per-channel mean/std of the posterior means over ``model.fae.stats_batches``
         training batches) are computed and stored with the checkpoint
    ii   trains pixel_decoder, discriminator: the pixel decoder fine-tuned on reconstructed features FD(E(F))

Parameters are always the union ``{'encoder', 'feature_decoder', 'pixel_decoder', 'discriminator'}``
(so every stage restores the previous stage's tree as is); ``trainable`` tells the optimiser which
parts a stage updates — the others get no moments and no updates — and puts the discriminator in an
update group of its own, so its gradients never shrink the generator's through a shared norm clip.
The frozen DINOv2 and the latent statistics are ``extra_vars`` (``{'dinov2', 'latent_stats'}``), never optimised; DINOv2 is
sharded by the same rules as the parameters. DINOv2 is the family's frozen part (``train.frozen``):
loaded from ``model.fae.dinov2_checkpoint`` at every start and never written into step checkpoints;
the latent statistics are checkpointed.

This module also defines the 'fae' family (``FAMILY``): the ``model.fae`` config section, its
checks, resolution (a DINOv2 checkpoint's config) and frozen part.

Pixel stages: loss = pixel (L1 / L2 / both) + w_p·perceptual + w_g·hinge-GAN generator term, plus
the discriminator's hinge loss (+ w_lecam·LeCam) on detached reconstructions; generator and
discriminator update in the same step (each term only reaches its own parameters through
``stop_gradient``). Perceptual distance: unit-normalised DINOv2 patch features of the
reconstruction vs the real image's (``perceptual='dinov2'``, no extra weights) or 'none'.
LeCam anchors are the batch means of the detached logits (the step carries no EMA state).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from starflow2_jax.fae import api as fae_api
from starflow2_jax.fae import losses
from starflow2_jax.fae.config import FAEConfig
from starflow2_jax.fae.discriminator import PatchDiscriminator
from starflow2_jax.fae.dinov2 import Dinov2Config, init_dinov2_boxed
from starflow2_jax.fae.model import sample_latent
from starflow2_jax.parallel import FAE_RULES
from starflow2_jax.train import config_fields as fields
from starflow2_jax.train.family import Family
from starflow2_jax.train.frozen import FrozenPart
from starflow2_jax.train.task import SampleGrid, TaskBase

STAGES = ("ia", "ib", "ii")  # pixel decoder, encoder + feature decoder, pixel fine-tune
PERCEPTUAL = ("dinov2", "none")
TRAINS = {"ia": ("pixel_decoder", "discriminator"), "ib": ("encoder", "feature_decoder"),
          "ii": ("pixel_decoder", "discriminator")}
FAE_FIELDS = ("image_size", "encoder_image_size", "latent_dim", "encoder_heads", "feature_decoder_width",
              "feature_decoder_layers", "feature_decoder_heads", "feature_decoder_mlp_ratio", "pixel_decoder_width",
              "pixel_decoder_layers", "pixel_decoder_heads", "pixel_decoder_mlp_ratio", "dtype", "remat")


def resolve_dinov2(config) -> None:
    """Fills ``model.fae.dinov2`` in place from ``model.fae.dinov2_checkpoint``'s config.json, after
    checking that the checkpoint is the encoder ``model.fae.dinov2`` describes (its fields, the rest at
    ``Dinov2Config``'s defaults; another variant → ValueError naming each differing field). A no-op
    without a checkpoint. The stored config is then self-contained."""
    f = config.model.fae
    if not f.dinov2_checkpoint:
        return
    from starflow2_jax.convert.hf_dinov2 import check_expected, read_config

    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(f.dinov2).items()}
    if not os.path.isdir(f.dinov2_checkpoint):
        raise FileNotFoundError(f"model.fae.dinov2_checkpoint={f.dinov2_checkpoint!r} is not a directory (expected "
                                f"a Hugging Face Dinov2Model / Dinov2WithRegistersModel checkpoint, an Orbax "
                                f"checkpoint or an earlier run's workdir)")
    if not any(name.endswith(".safetensors") for name in os.listdir(f.dinov2_checkpoint)):
        return  # an Orbax checkpoint or a run: its tree is checked against model.fae.dinov2 when it is loaded
    dino = read_config(f.dinov2_checkpoint)
    try:  # unset fields take Dinov2Config's defaults: the variant (registers or not) is always checked
        expected = Dinov2Config(**fields)
    except TypeError as error:
        raise ValueError(f"model.fae.dinov2={fields}: not accepted by Dinov2Config ({error})") from error
    check_expected(dino, expected, f"model.fae.dinov2_checkpoint={f.dinov2_checkpoint!r}")
    resolved = {k: v for k, v in dataclasses.asdict(dino).items() if k not in ("dtype", "remat")}
    f.dinov2 = ml_collections.ConfigDict({k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()})


def fae_config_from(config) -> FAEConfig:
    """The ``FAEConfig`` of a training config's ``model.fae`` (``model.fae.dinov2`` holds the DINOv2
    config's fields; see ``resolve_dinov2`` for checkpoints). Raises ValueError naming the field."""
    f = config.model.fae
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(f.dinov2).items()}
    try:
        dino = Dinov2Config(**{**fields, "dtype": f.dtype, "remat": f.remat})
    except TypeError as error:
        raise ValueError(f"model.fae.dinov2={fields}: not accepted by Dinov2Config ({error}); with "
                         f"model.fae.dinov2_checkpoint set, the trainer fills it from the checkpoint") from error
    try:
        return FAEConfig(dinov2=dino, **{k: f[k] for k in FAE_FIELDS}).validate()
    except ValueError as error:
        raise ValueError(f"model.fae: {error}") from error


@dataclasses.dataclass(frozen=True)
class FAELosses:
    """The stage's loss settings (``model.fae.*``)."""

    stage: str = "ib"
    kl_weight: float = 1e-4
    noise_sigma: float = 0.4
    pixel_loss: str = "l2"
    perceptual: str = "dinov2"
    perceptual_weight: float = 1.0
    gan_weight: float = 0.0
    lecam_weight: float = 0.0
    disc_channels: int = 64
    disc_layers: int = 2
    stats_batches: int = 8


class FAETask(TaskBase):
    """A ``Task`` (see ``train.task``) for one FAE stage; see the module docstring."""

    rules = FAE_RULES

    def __init__(self, fae_config: FAEConfig, settings: FAELosses, *, per_class: int = 4):
        if settings.stage not in STAGES:
            raise ValueError(f"model.fae.stage={settings.stage!r}: expected one of {STAGES}")
        self.config = fae_config.validate()
        self.settings = settings
        self.per_class = int(per_class)
        self.discriminator = PatchDiscriminator(channels=settings.disc_channels, num_layers=settings.disc_layers)

    @classmethod
    def from_config(cls, config) -> "FAETask":
        f = config.model.fae
        settings = FAELosses(**{k.name: f[k.name] for k in dataclasses.fields(FAELosses)})
        return cls(fae_config_from(config), settings, per_class=int(config.sample.per_class))

    # ---- Task protocol ----------------------------------------------------------------------
    def init(self, rng):
        k_fae, k_disc = jax.random.split(rng)
        # boxed throughout: the loop shards the frozen DINOv2 by FAE_RULES like the trainable parts
        # (FSDP over 'embed') instead of replicating 1.1 B parameters of DINOv2-g/14 on every device
        variables = fae_api.init_variables_boxed(self.config, k_fae)
        params = dict(variables["fae"])
        s = self.config.image_size
        params["discriminator"] = self.discriminator.init(k_disc, jnp.zeros((1, s, s, 3)))["params"]
        return params, {"dinov2": variables["dinov2"], "latent_stats": variables["latent_stats"]}

    def trainable(self, params):
        """A tree like ``params`` of optimiser labels: False for the parts this stage freezes, else the
        update group — the discriminator is its own group, so it never shares a gradient-norm clip
        with the auto-encoder part it plays against."""
        parts = TRAINS[self.settings.stage]

        def label(name):
            return False if name not in parts else ("discriminator" if name == "discriminator" else "autoencoder")

        return {name: jax.tree.map(lambda _, n=name: label(n), sub) for name, sub in params.items()}

    def prepare_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" not in batch:
            raise ValueError(f"batch has no 'image' field (fields: {sorted(batch)})")
        image = np.asarray(batch["image"], np.float32)
        fae_api.check_images(self.config, image)
        return {"image": image}

    def example_batch(self, batch_size: int) -> dict:
        """A zero batch in the pipeline's format: ``image`` (B, S, S, 3)."""
        s = self.config.image_size
        return {"image": np.zeros((batch_size, s, s, 3), np.float32)}

    def _pixel_terms(self, params, extra, images, feats, inputs):
        """Pixel-stage loss of decoding ``inputs``; ``feats``: DINOv2 features of ``images`` (the
        perceptual target, computed once per step)."""
        cfg, st = self.config, self.settings
        recon = fae_api.decode_pixels(cfg, params, inputs)
        terms = {"pixel": losses.pixel_reconstruction(recon, images, st.pixel_loss)}
        total = terms["pixel"]
        if st.perceptual == "dinov2" and st.perceptual_weight > 0:
            fake = fae_api.encoder_features(cfg, extra["dinov2"], recon, image_gradient=True)
            terms["perceptual"] = losses.feature_distance(fake, feats)
            total = total + st.perceptual_weight * terms["perceptual"]
        if st.gan_weight > 0:
            d = params["discriminator"]
            apply = self.discriminator.apply
            terms["gan_g"] = losses.hinge_generator(apply({"params": jax.lax.stop_gradient(d)}, recon))
            real_logits = apply({"params": d}, images)
            fake_logits = apply({"params": d}, jax.lax.stop_gradient(recon))
            terms["gan_d"] = losses.hinge_discriminator(real_logits, fake_logits)
            total = total + st.gan_weight * terms["gan_g"] + terms["gan_d"]
            if st.lecam_weight > 0:
                anchors = jax.lax.stop_gradient((jnp.mean(real_logits), jnp.mean(fake_logits)))
                terms["lecam"] = losses.lecam(real_logits, fake_logits, *anchors)
                total = total + st.lecam_weight * terms["lecam"]
        return total, terms

    def loss(self, params, extra, batch, rng):
        cfg, st = self.config, self.settings
        images = batch["image"]
        feats = fae_api.encoder_features(cfg, extra["dinov2"], images)
        if st.stage == "ib":
            mean, logvar = fae_api.encode_features(cfg, params, feats)
            recon = fae_api.decode_features(cfg, params, sample_latent(mean, logvar, rng))
            terms = {"feature": losses.feature_reconstruction(recon, feats), "kl": losses.gaussian_kl(mean, logvar)}
            total = terms["feature"] + st.kl_weight * terms["kl"]
        else:
            if st.stage == "ia":
                inputs = losses.noisy_features(feats, rng, st.noise_sigma)
            else:
                frozen = jax.lax.stop_gradient(params)
                mean, _ = fae_api.encode_features(cfg, frozen, feats)
                inputs = fae_api.decode_features(cfg, frozen, mean)
            total, terms = self._pixel_terms(params, extra, images, feats, inputs)
        metrics = {name: jnp.mean(value) for name, value in terms.items()}
        return jnp.mean(total), metrics

    def eval_step(self, params, extra, batch, rng):
        del rng
        return fae_api.reconstruction_errors(self.config, {"fae": params, "dinov2": extra["dinov2"]}, batch["image"])

    def finalize(self, params, extra, batches):
        """Stage 'ib': the latent statistics over ``stats_batches`` batches from ``batches`` (an
        iterator of ``prepare_batch`` inputs) put into ``extra['latent_stats']``; other stages: unchanged."""
        if self.settings.stage != "ib":
            return extra
        moments = None
        for _ in range(self.settings.stats_batches):
            images = self.prepare_batch(next(batches))["image"]
            m = self._moments(params, extra, images)
            moments = m if moments is None else jax.tree.map(jnp.add, moments, m)
        stats = fae_api.finish_latent_stats(moments)
        logging.info("FAE latent statistics over %d tokens: mean |μ| %.4f, mean σ %.4f", int(stats["count"]),
                     float(jnp.mean(jnp.abs(stats["mean"]))), float(jnp.mean(stats["std"])))
        placed = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), stats, extra["latent_stats"])
        return {**extra, "latent_stats": placed}

    @functools.partial(jax.jit, static_argnames=("self",))
    def _moments(self, params, extra, images):
        return fae_api.latent_moments(self.config, {"fae": params, "dinov2": extra["dinov2"]}, images)

    def sample_grid(self, params, extra, rng, *, guidance: float):
        """Decoded prior samples: z ~ N(0, I) in the normalised latent space → FD → PD (guidance unused)."""
        del guidance
        rows, cols = self.per_class, 8
        images = self._decode_prior(params, extra, rng, rows * cols)
        s = self.config.image_size
        return SampleGrid(images.reshape(rows, cols, s, s, 3), [str(r) for r in range(rows)])

    @functools.partial(jax.jit, static_argnames=("self", "n"))
    def _decode_prior(self, params, extra, rng, n):
        cfg = self.config
        z = jax.random.normal(rng, (n, cfg.num_tokens, cfg.latent_dim), jnp.float32)
        stats = extra["latent_stats"]
        feats = fae_api.decode_features(cfg, params, z * stats["std"] + stats["mean"])
        return jnp.clip(fae_api.decode_pixels(cfg, params, feats), -1.0, 1.0)


# ---- the 'fae' family ---------------------------------------------------------------------------
def add_defaults(config: ml_collections.ConfigDict) -> None:
    """The ``model.fae`` section with its defaults (a tiny FAE on 32×32 images, random DINOv2)."""
    config.model.fae = ml_collections.ConfigDict(dict(
        stage="ib", dinov2=ml_collections.ConfigDict(dict(
            hidden_size=32, num_layers=2, num_heads=4, mlp_ratio=4.0, patch_size=4, image_size=32)),
        dinov2_checkpoint="", dinov2_dtype="", image_size=32, encoder_image_size=0, latent_dim=8,
        encoder_heads=2, feature_decoder_width=32, feature_decoder_layers=2, feature_decoder_heads=2,
        feature_decoder_mlp_ratio=8 / 3, pixel_decoder_width=32, pixel_decoder_layers=2, pixel_decoder_heads=2,
        pixel_decoder_mlp_ratio=4.0, dtype="float32", remat="none", kl_weight=1e-4, noise_sigma=0.4,
        pixel_loss="l2", perceptual="dinov2", perceptual_weight=1.0, gan_weight=0.0, lecam_weight=0.0,
        disc_channels=32, disc_layers=2, stats_batches=8))


def validate(config) -> None:
    """Checks ``model.fae`` (and that no flow-only setting is used); ValueError naming the field."""
    fields.choice(config, "model.fae.stage", STAGES)
    fields.dict_field(config, "model.fae.dinov2", "a dict of fae.Dinov2Config fields")
    fields.string_field(config, "model.fae.dinov2_checkpoint",
                        "a path string ('' for a random DINOv2, or that of train.init_from)")
    if fields.string_field(config, "model.fae.dinov2_dtype", "'' or a dtype") != "":
        fields.choice(config, "model.fae.dinov2_dtype", fields.DTYPES)
    for field in ("image_size", "latent_dim", "encoder_heads", "feature_decoder_width", "feature_decoder_layers",
                  "feature_decoder_heads", "pixel_decoder_width", "pixel_decoder_layers", "pixel_decoder_heads",
                  "disc_channels", "disc_layers", "stats_batches"):
        fields.int_field(config, f"model.fae.{field}", 1)
    fields.int_field(config, "model.fae.encoder_image_size", 0)
    for field in ("feature_decoder_mlp_ratio", "pixel_decoder_mlp_ratio"):
        if fields.float_field(config, f"model.fae.{field}", 0.0) <= 0:
            raise ValueError(f"model.fae.{field}: expected a positive number")
    for field in ("kl_weight", "noise_sigma", "perceptual_weight", "gan_weight", "lecam_weight"):
        fields.float_field(config, f"model.fae.{field}", 0.0)
    fields.choice(config, "model.fae.pixel_loss", losses.PIXEL_KINDS)
    fields.choice(config, "model.fae.perceptual", PERCEPTUAL)
    fields.choice(config, "model.fae.dtype", fields.DTYPES)
    fields.choice(config, "model.fae.remat", fields.REMAT)
    if fields.float_field(config, "optim.ema_decay", 0.0) > 0:
        raise ValueError(f"optim.ema_decay={config.optim.ema_decay}: must be 0 for model.family='fae' (each stage "
                         f"hands its raw params to the next, and the latent statistics are computed from them)")
    if "latent" in config.model and fields.get(config, "model.latent.kind") != "pixels":
        raise ValueError("model.latent.kind applies to flows; leave it 'pixels' for model.family='fae'")


def section_config(stored: dict) -> ml_collections.ConfigDict:
    """A config holding ``model.fae`` (defaults + the stored section of a run's config JSON ``stored``)
    and its ``seed``: enough for ``fae_config_from`` and ``dinov2_part`` without the whole schema."""
    config = ml_collections.ConfigDict({"model": {}, "seed": int(stored.get("seed", 0))})
    add_defaults(config)
    section = config.model.fae.to_dict()
    section.update({k: v for k, v in dict(stored.get("model", {}).get("fae", {})).items()})
    config.model.fae = ml_collections.ConfigDict(section)
    return config


def random_dinov2(dino: Dinov2Config, seed: int):
    """The random DINOv2 a run with ``seed`` starts from: the key ``FAETask.init`` gives it under the
    train state's init (``train.step``: key(seed) → model key → FAE key → DINOv2 key)."""
    k_model, _ = jax.random.split(jax.random.key(seed))
    k_fae, _ = jax.random.split(k_model)
    _, k_dino = jax.random.split(k_fae)
    return nn.meta.unbox(init_dinov2_boxed(dino, k_dino))


def dinov2_part(config) -> FrozenPart:
    """The frozen DINOv2 of an FAE config (source ``model.fae.dinov2_checkpoint``)."""
    f = config.model.fae
    dino = fae_config_from(config).dinov2

    def from_hf(directory: str, target):
        from starflow2_jax.convert.hf_dinov2 import load_hf_dinov2

        leaf = jax.tree.leaves(target)[0]
        mesh = getattr(leaf.sharding, "mesh", None)
        dtype = "bfloat16" if leaf.dtype == jnp.bfloat16 else "float32"
        _, params = load_hf_dinov2(directory, dtype=dtype, expect=dino, mesh=mesh, rules=FAE_RULES)
        return params

    return FrozenPart(name="dinov2", field="model.fae.dinov2_checkpoint", source=str(f.dinov2_checkpoint),
                      dtype=str(f.dinov2_dtype or f.dtype), init=functools.partial(random_dinov2, dino),
                      from_hf=from_hf)


def _next_steps(config, workdir: str) -> str:
    following = {"ia": "ib", "ib": "ii"}.get(config.model.fae.stage)
    if following:
        return f"  the next stage: --config configs/fae.py:...,{following} --config.train.init_from={workdir}"
    return f"  a flow on this latent space: --config.model.latent.kind=fae --config.model.latent.fae_workdir={workdir}"


FAMILY = Family(name="fae", add_defaults=add_defaults, validate=validate, make_task=FAETask.from_config,
                resolve=resolve_dinov2, frozen_parts=lambda config: (dinov2_part(config),), samples=False,
                evaluations=("fae",), next_steps=_next_steps)
