"""``FlowTask``: TarFlow / STARFlow training on images, conditioned on labels, captions or nothing.

Parameters: ``{'flow': flow params}`` plus, for caption conditioning, ``{'text': {'embedding':
(vocab, text_dim)}}`` — a learned word-embedding table whose rows for a caption's ids (padded to
``text_len``) are the flow's text prefix (B, text_len, text_dim). A dropped caption is "" → all
padding ids; its features are also the guidance ``uncond``. ``extra_vars`` is ``{'prior': …}``.

Loss: ``flow.loss`` (incl. the config's latent-norm regulariser) of the flow's forward pass on the
noise-augmented batch. Bits/dim use ``num_bins`` bins of width 2/num_bins over [−1, 1].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax import flow
from starflow2_jax.parallel import FLOW_RULES
from starflow2_jax.train.task import SampleGrid
from starflow2_jax.train.tasks.vocab import WordVocab

CONDITIONING = ("label", "caption", "none")


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


class FlowTask:
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
                 jacobi: flow.JacobiOptions | None = None):
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
                   prompts=tuple(config.sample.prompts), jacobi=jacobi)

    # ---- Task protocol ----------------------------------------------------------------------
    def init(self, rng: jax.Array) -> tuple[dict, dict]:
        k_flow, k_text = jax.random.split(rng)
        variables = flow.init_boxed(self.flow_config, k_flow)
        params = {"flow": variables["params"]}
        if self.vocab is not None:
            table = jax.random.normal(k_text, (len(self.vocab), self.flow_config.text_dim), jnp.float32)
            params["text"] = {"embedding": nn.Partitioned(table, names=("vocab", "text_embed"))}
        extra = {name: value for name, value in variables.items() if name != "params"}
        return params, extra

    def prepare_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" not in batch:
            raise ValueError(f"batch has no 'image' field (fields: {sorted(batch)})")
        out = {"image": np.asarray(batch["image"], np.float32)}
        if self.conditioning == "label":
            out["label"] = np.asarray(batch["label"], np.int32)
        elif self.conditioning == "caption":
            out["tokens"] = self.vocab.encode_batch(batch["caption"], self.flow_config.text_len)
        return out

    def text_features(self, params, tokens) -> jax.Array:
        """Caption features (B, text_len, text_dim) from token ids (B, text_len)."""
        return jnp.take(params["text"]["embedding"], tokens, axis=0)

    def _cond(self, params, batch):
        if self.conditioning == "label":
            return batch["label"]
        if self.conditioning == "caption":
            return self.text_features(params, batch["tokens"])
        return None

    def _forward(self, params, extra_vars, batch):
        variables = {"params": params["flow"], **extra_vars}
        return flow.forward_with_intermediates(self.flow_config, variables, batch["image"],
                                               self._cond(params, batch))

    def loss(self, params, extra_vars, batch, rng):
        del rng  # the flow's loss is deterministic given the (already noise-augmented) batch
        out = self._forward(params, extra_vars, batch)
        terms = flow.loss(self.flow_config, out)
        terms["bits_per_dim"] = jnp.mean(flow.bits_per_dim(self.flow_config, out, self.num_bins))
        return terms["loss"], terms

    def eval_step(self, params, extra_vars, batch, rng):
        del rng
        out = self._forward(params, extra_vars, batch)
        return {"bits_per_dim": flow.bits_per_dim(self.flow_config, out, self.num_bins)}

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
        h, w = self.flow_config.image_size
        return SampleGrid(images.reshape(len(rows), cols, h, w, self.flow_config.in_channels), rows)

    # ---- sampling ---------------------------------------------------------------------------
    @functools.partial(jax.jit, static_argnames=("self", "guidance", "rows", "cols"))
    def _sample_impl(self, params, extra_vars, rng, tokens, *, guidance: float, rows: int, cols: int):
        fc = self.flow_config
        n = rows * cols
        noise = jax.random.normal(rng, (n, fc.num_tokens, fc.token_dim), jnp.float32)
        variables = {"params": params["flow"], **extra_vars}
        cond = uncond = None
        if self.conditioning == "label":
            cond = jnp.repeat(jnp.arange(rows, dtype=jnp.int32), cols)
        elif self.conditioning == "caption":
            cond = self.text_features(params, tokens)
            uncond = jnp.broadcast_to(self.text_features(params, jnp.zeros((1, fc.text_len), jnp.int32)),
                                      cond.shape)
        return flow.sample(fc, variables, noise, cond, uncond=uncond if guidance else None, guidance=guidance,
                           jacobi=self.jacobi)
