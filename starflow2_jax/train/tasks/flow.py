"""``FlowTask``: TarFlow / STARFlow training on images, conditioned on labels, captions or nothing.

Parameters: ``{'flow': flow params}`` plus, for caption conditioning, ``{'text': {'embedding':
(vocab, text_dim)}}`` — a learned word-embedding table whose rows for a caption's ids (padded to
``text_len``) are the flow's text prefix (B, text_len, text_dim). A dropped caption is "" → all
padding ids; its features are also the guidance ``uncond``. ``extra_vars`` is ``{'prior': …}``.

Loss: ``flow.loss`` (incl. the config's latent-norm regulariser) of the flow's forward pass on the
noise-augmented batch. Bits/dim use ``num_bins`` bins of width 2/num_bins over [−1, 1].

Latent spaces (``latent_space``, see ``fae.latent_space``): the flow models ``encode(images)`` on the
latent grid (its config has patch size 1, ``in_channels`` = D), plus ``latent_noise_std``·ε in
training; grids are decoded back to pixels. The space's variables are ``extra_vars['latent']`` —
frozen, never optimised; for an FAE they are the family's frozen part 'latent' (``train.frozen``),
loaded from ``model.latent.fae_workdir`` at every start and never written into the flow's step
checkpoints. Bits/dim are reported for pixels and patches (the same dimensions); an FAE's latents get
``nll_per_dim`` (nats) instead.

This module also defines the 'flow' family (``FAMILY``): the ``model.flow`` / ``model.conditioning``
/ ``model.text`` / ``model.latent`` config sections, their checks and resolution.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from starflow2_jax import flow
from starflow2_jax.parallel import FAE_RULES, FLOW_RULES
from starflow2_jax.train import config_fields as fields
from starflow2_jax.train import inputs
from starflow2_jax.train.tasks import latents as latents_lib
from starflow2_jax.train.family import Family
from starflow2_jax.train.task import SampleGrid, TaskBase
from starflow2_jax.train.tasks.vocab import WordVocab

CONDITIONING = ("label", "caption", "none")
FACTORIES = ("starflow", "tarflow")
LATENTS = ("pixels", "patches", "fae")


def flow_config_from(config) -> flow.FlowConfig:
    """The ``FlowConfig`` of a training config: ``model.flow.factory(**kwargs)`` + dtype/remat, and
    the text prefix (``model.text.max_len``, ``dim``) for caption conditioning."""
    model = config.model
    factories = {"starflow": flow.starflow_config, "tarflow": flow.tarflow_config}
    if model.flow.factory not in factories:
        raise ValueError(f"model.flow.factory={model.flow.factory!r}: expected one of {tuple(factories)}")
    kwargs = dict(model.flow.kwargs)
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    if model.conditioning == "caption":
        kwargs.update(txt_size=int(model.text.max_len), txt_dim=int(model.text.dim))
    try:
        fc = factories[model.flow.factory](**kwargs)
    except TypeError as error:
        raise ValueError(f"model.flow.kwargs={kwargs}: not accepted by flow.{model.flow.factory}_config: "
                         f"{error}") from error
    return dataclasses.replace(fc, dtype=model.flow.dtype, remat=model.flow.remat).validate()


class FlowTask(TaskBase):
    """A ``Task`` (see ``train.task``) for one flow.

    Args:
      flow_config: the flow.
      conditioning: 'label' (needs ``flow_config.num_classes``), 'caption' (needs a text prefix and
        ``vocab``) or 'none'.
      vocab: texts for the caption vocabulary (``WordVocab``); only for 'caption'.
      num_bins: bits/dim bins (the data's ``levels``).
      per_class: samples per row of a sample grid; prompts: the grid's captions ('caption').
      jacobi: ``flow.JacobiOptions`` for the grids, or None (sequential).
    """

    rules = FLOW_RULES

    def __init__(self, flow_config: flow.FlowConfig, conditioning: str = "none", *, vocab: Sequence[str] = (),
                 num_bins: int = 256, per_class: int = 4, prompts: Sequence[str] = (),
                 jacobi: flow.JacobiOptions | None = None, latent_space=None, latent_noise_std: float = 0.0):
        if conditioning not in CONDITIONING:
            raise ValueError(f"conditioning={conditioning!r}: expected one of {CONDITIONING}")
        fc = flow_config.validate()
        has_text = any(b.text_conditioned for b in fc.blocks)
        if (conditioning == "label") != bool(fc.num_classes):
            raise ValueError(f"conditioning={conditioning!r} but the flow has num_classes={fc.num_classes}")
        if (conditioning == "caption") != has_text:
            raise ValueError(f"conditioning={conditioning!r} but the flow "
                             f"{'has' if has_text else 'has no'} text-conditioned block")
        self.flow_config = fc
        self.conditioning = conditioning
        self.num_bins = int(num_bins)
        self.per_class = int(per_class)
        self.jacobi = jacobi
        self.latent_space = latent_space
        if latent_space is not None and latent_space.kind == "fae":
            self.rules = FLOW_RULES + tuple(r for r in FAE_RULES if r[0] not in dict(FLOW_RULES))  # + its names
        self.latent_noise_std = float(latent_noise_std)
        if latent_space is not None:
            grid, d = latent_space.grid, latent_space.latent_dim
            if (tuple(fc.image_size), fc.patch_size, fc.in_channels) != (tuple(grid), 1, d):
                raise ValueError(f"the flow sees images {tuple(fc.image_size)} × {fc.in_channels} with patch "
                                 f"{fc.patch_size}; the {latent_space.kind} latent space gives a {grid} grid of "
                                 f"{d} features (expected patch size 1)")
        self.vocab = WordVocab(vocab) if conditioning == "caption" else None
        if self.vocab is not None and len(self.vocab) <= 2:
            raise ValueError("caption conditioning needs a vocabulary: vocab texts are empty")
        if conditioning == "caption":
            distinct = list(dict.fromkeys(prompts or vocab))
            self.prompts = distinct[:10] if not prompts else list(prompts)
        else:
            self.prompts = []

    @classmethod
    def from_config(cls, config) -> "FlowTask":
        """The task a training config describes (see ``train.config_schema``)."""
        jac = config.sample.jacobi
        jacobi = (flow.JacobiOptions(block_size=int(jac.block_size), threshold=float(jac.threshold),
                                     max_iters=int(jac.max_iters)) if jac.block_size > 0 else None)
        return cls(flow_config_from(config), config.model.conditioning, vocab=tuple(config.model.text.vocab),
                   num_bins=int(config.data.levels), per_class=int(config.sample.per_class),
                   prompts=tuple(config.sample.prompts), jacobi=jacobi,
                   latent_space=latents_lib.latent_space_from(config),
                   latent_noise_std=float(config.model.latent.noise_std))

    # ---- Task protocol ----------------------------------------------------------------------
    def init(self, rng: jax.Array) -> tuple[dict, dict]:
        k_flow, k_text = jax.random.split(rng)
        variables = flow.init_boxed(self.flow_config, k_flow)
        params = {"flow": variables["params"]}
        if self.vocab is not None:
            table = jax.random.normal(k_text, (len(self.vocab), self.flow_config.text_dim), jnp.float32)
            params["text"] = {"embedding": nn.Partitioned(table, names=("vocab", "text_embed"))}
        extra = {name: value for name, value in variables.items() if name != "params"}
        if self.latent_space is not None:
            latent = self.latent_space.init_variables(jax.random.fold_in(rng, 7))  # boxed: sharded by the rules
            if latent:  # 'patches' has none
                extra["latent"] = latent
        return params, extra

    def prepare_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" not in batch:
            raise ValueError(f"batch has no 'image' field (fields: {sorted(batch)})")
        out = {"image": np.asarray(batch["image"], np.float32)}
        if self.latent_space is not None and out["image"].shape[1:] != tuple(self.latent_space.image_shape):
            raise ValueError(f"batch images are {out['image'].shape[1:]} (H, W, C); the {self.latent_space.kind} "
                             f"latent space takes {tuple(self.latent_space.image_shape)} (data.image_size / "
                             f"data.channels resize or convert them)")
        if self.conditioning == "label":
            out["label"] = np.asarray(batch["label"], np.int32)
        elif self.conditioning == "caption":
            out["tokens"] = self.vocab.encode_batch(batch["caption"], self.flow_config.text_len)
        return out

    def example_batch(self, batch_size: int) -> dict:
        """A zero batch in the pipeline's format: ``image`` (B, H, W, C), ``label``, ``caption``."""
        if self.latent_space is not None:
            shape = tuple(self.latent_space.image_shape)
        else:
            shape = (*tuple(self.flow_config.image_size), self.flow_config.in_channels)
        return {"image": np.zeros((batch_size, *shape), np.float32), "label": np.zeros((batch_size,), np.int32),
                "caption": np.asarray([""] * batch_size, dtype=object)}

    def text_features(self, params, tokens) -> jax.Array:
        """Caption features (B, text_len, text_dim) from token ids (B, text_len)."""
        return jnp.take(params["text"]["embedding"], tokens, axis=0)

    def _cond(self, params, batch):
        if self.conditioning == "label":
            return batch["label"]
        if self.conditioning == "caption":
            return self.text_features(params, batch["tokens"])
        return None

    def _model_inputs(self, extra_vars, images, rng=None):
        """The flow's inputs: the images, or their latents (B, gh, gw, D) (+ training noise with ``rng``)."""
        if self.latent_space is None:
            return images
        latents = jax.lax.stop_gradient(self.latent_space.encode(extra_vars.get("latent", {}), images))
        if rng is not None and self.latent_noise_std > 0:
            latents = latents + self.latent_noise_std * jax.random.normal(rng, latents.shape, latents.dtype)
        gh, gw = self.latent_space.grid
        return latents.reshape(latents.shape[0], gh, gw, latents.shape[-1])

    def _forward(self, params, extra_vars, batch, rng=None):
        variables = self.flow_variables(params, extra_vars)
        inputs = self._model_inputs(extra_vars, batch["image"], rng)
        return flow.forward_with_intermediates(self.flow_config, variables, inputs, self._cond(params, batch))

    def _likelihood(self, out) -> dict:
        """Per-example 'bits_per_dim' (pixels, patches) or 'nll_per_dim' (an FAE's latents)."""
        if self.latent_space is not None and self.latent_space.kind == "fae":
            return {"nll_per_dim": flow.nll_per_dim(self.flow_config, out)}
        return {"bits_per_dim": flow.bits_per_dim(self.flow_config, out, self.num_bins)}

    def loss(self, params, extra_vars, batch, rng):
        out = self._forward(params, extra_vars, batch, rng)  # rng: only for latent noise
        terms = flow.loss(self.flow_config, out)
        terms.update({k: jnp.mean(v) for k, v in self._likelihood(out).items()})
        return terms["loss"], terms

    def eval_step(self, params, extra_vars, batch, rng):
        del rng
        return self._likelihood(self._forward(params, extra_vars, batch))

    def grid_rows(self) -> list[str]:
        """Row names of ``sample_grid``: class ids, prompts, or sample-row numbers."""
        if self.conditioning == "label":
            return [str(c) for c in range(self.flow_config.num_classes)]
        if self.conditioning == "caption":
            return list(self.prompts)
        return [str(r) for r in range(self.per_class)]

    def sample_grid(self, params, extra_vars, rng, *, guidance: float) -> SampleGrid:
        rows = self.grid_rows()
        cols = self.per_class if self.conditioning != "none" else 8
        if self.conditioning == "none":
            guidance = 0.0  # nothing to guide towards
        tokens = None
        if self.conditioning == "caption":
            tokens = self.vocab.encode_batch(np.repeat(np.asarray(rows), cols), self.flow_config.text_len)
        images = self._sample_impl(params, extra_vars, rng, tokens, guidance=float(guidance), rows=len(rows), cols=cols)
        return SampleGrid(images.reshape(len(rows), cols, *images.shape[1:]), rows)

    # ---- sampling ---------------------------------------------------------------------------
    @functools.partial(jax.jit, static_argnames=("self", "guidance", "rows", "cols"))
    def _sample_impl(self, params, extra_vars, rng, tokens, *, guidance: float, rows: int, cols: int):
        fc = self.flow_config
        n = rows * cols
        noise = jax.random.normal(rng, (n, fc.num_tokens, fc.token_dim), jnp.float32)
        variables = self.flow_variables(params, extra_vars)
        cond = uncond = None
        if self.conditioning == "label":
            cond = jnp.repeat(jnp.arange(rows, dtype=jnp.int32), cols)
        elif self.conditioning == "caption":
            cond = self.text_features(params, tokens)
            uncond = jnp.broadcast_to(self.text_features(params, jnp.zeros((1, fc.text_len), jnp.int32)),
                                      cond.shape)
        images = flow.sample(fc, variables, noise, cond, uncond=uncond if guidance else None, guidance=guidance,
                             jacobi=self.jacobi)
        return self.to_pixels(extra_vars, images)

    def to_pixels(self, extra_vars, samples: jax.Array) -> jax.Array:
        """Flow samples (B, H, W, C) on the flow's grid → images: the latent space's decoding, clipped
        to [−1, 1] (unchanged without a latent space)."""
        if self.latent_space is None:
            return samples
        latents = samples.reshape(samples.shape[0], -1, samples.shape[-1])  # (B, gh, gw, D) → (B, N, D), raster
        return jnp.clip(self.latent_space.decode(extra_vars.get("latent", {}), latents), -1.0, 1.0)

    def flow_variables(self, params, extra_vars) -> dict:
        """The flow's own variables (``{'params', 'prior'}``), without the latent space's."""
        return {"params": params["flow"], **{k: v for k, v in extra_vars.items() if k != "latent"}}



# ---- the 'flow' family --------------------------------------------------------------------------
def add_defaults(config: ml_collections.ConfigDict) -> None:
    """The flow's sections with their defaults (a tiny unconditional STARFlow on 8×8 digits)."""
    m = config.model
    m.flow = ml_collections.ConfigDict(dict(
        factory="starflow", kwargs=ml_collections.ConfigDict(dict(
            in_channels=1, img_size=8, patch_size=2, channels=64, layers_per_block=[1, 1], head_dim=32)),
        dtype="float32", remat="none"))
    m.conditioning = "none"
    m.text = ml_collections.ConfigDict(dict(max_len=8, dim=32, vocab=()))
    m.latent = ml_collections.ConfigDict(dict(kind="pixels", patch=0, image_size=0, channels=0, fae_workdir="",
                                              fae_dtype="", fae=ml_collections.ConfigDict(), noise_std=0.0))


def validate(config) -> None:
    """Checks the flow's sections; ValueError naming the field."""
    factory = fields.choice(config, "model.flow.factory", FACTORIES)
    kwargs = fields.dict_field(config, "model.flow.kwargs", "a dict of factory arguments")
    fields.choice(config, "model.flow.dtype", fields.DTYPES)
    fields.choice(config, "model.flow.remat", fields.REMAT)
    cond = fields.choice(config, "model.conditioning", CONDITIONING)
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
        fields.int_field(config, "model.text.max_len", 1)
        fields.int_field(config, "model.text.dim", 1)
        vocab = fields.get(config, "model.text.vocab")
        if isinstance(vocab, str) or not all(isinstance(t, str) for t in vocab):
            raise ValueError(f"model.text.vocab={vocab!r}: expected a list of strings")
        if not vocab and fields.get(config, "data.builder") != "digits":
            raise ValueError("model.text.vocab is empty: list the captions (or words) of your data "
                             "(only data.builder='digits' fills it automatically)")
    kind = fields.choice(config, "model.latent.kind", LATENTS)
    for field in ("patch", "image_size", "channels"):
        fields.int_field(config, f"model.latent.{field}", 0)
    fields.float_field(config, "model.latent.noise_std", 0.0)
    fields.dict_field(config, "model.latent.fae", "a dict (the trainer fills it)")
    if fields.string_field(config, "model.latent.fae_dtype", "'' or a dtype") != "":
        fields.choice(config, "model.latent.fae_dtype", fields.DTYPES)
    if kind == "fae" and not fields.get(config, "model.latent.fae_workdir"):
        raise ValueError("model.latent.fae_workdir is empty: model.latent.kind='fae' needs the workdir of a "
                         "trained FAE (its last stage)")


def resolve(config) -> None:
    """The latent view (``latents.resolve_latent``) and, for captions, the vocabulary and grid prompts."""
    latents_lib.resolve_latent(config)
    validate(config)
    if config.model.conditioning == "caption":
        vocab, prompts = inputs.default_captions(config)
        config.model.text.vocab = tuple(vocab)
        config.sample.prompts = tuple(prompts)


def _next_steps(config, workdir: str) -> str:
    import os

    return (f"  starflow2 sample --workdir {workdir} --out {os.path.join(workdir, 'grid.png')}\n"
            f"  starflow2 eval bpd --workdir {workdir}")


FAMILY = Family(name="flow", add_defaults=add_defaults, validate=validate, make_task=FlowTask.from_config,
                resolve=resolve, frozen_parts=latents_lib.frozen_parts, samples=True, evaluations=("bpd",),
                next_steps=_next_steps)
