"""Pretzel's losses on a packed batch (SPEC §5.1, §5.3).

    L_NF  = mean over target images of (½‖z‖² − log|det J_D| − log|det J_S|) / (N·D)    (per image dimension)
    L_NTP = mean over trained positions t of −log p(token_{t+1} | ≤ t)                 (per trained token)
    L     = nf_weight · L_NF + λ · L_NTP

Caption dropout (guidance's unconditional branch): each document holding a target image is, with
probability ``config.caption_dropout``, trained with its text tokens masked out of attention in both
streams (the image sees only its ``<|vision_start|>``, its own slots and earlier images' markers and
slots); its text positions then carry no NTP loss. Optional noise augmentation x̃ = x + σ_n·ε on the
latents (``config.latent_noise``).

L_NTP never builds the (B, L, vocab) logits of a whole row: ``chunked_token_nll`` computes them
``config.lm_chunk`` positions at a time, in the forward and the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from starflow2_jax.pretzel.config import PretzelConfig
from starflow2_jax.pretzel.model import Output, apply_model, encode_images, lm_logits


def text_positions(config: PretzelConfig, tokens, slot, segment_ids) -> jax.Array:
    """(B, L) bool: the text a dropped caption hides — not a slot, not an image marker, not padding."""
    v = config.vlm
    marker = (tokens == v.vision_start_token_id) | (tokens == v.vision_end_token_id)
    return ~slot & ~marker & (segment_ids > 0)


def caption_dropout(config: PretzelConfig, batch: dict, rng, rate: float):
    """Draws which documents lose their caption. Returns ``(key_mask (B, L) bool — False at the dropped
    documents' text, dropped (B, L) bool — the tokens of dropped documents)``."""
    tokens, slot, segments = batch["tokens"], batch["slot"].astype(bool), batch["segment_ids"]
    b, length = tokens.shape
    target = jnp.take_along_axis(batch["image_target"].astype(bool), jnp.maximum(batch["image_index"], 0), axis=1)
    target = slot & target
    rows = jnp.arange(b)[:, None]
    has_target = jnp.zeros((b, length + 1), bool).at[rows, segments].max(target)  # per (row, segment id)
    drop = jax.random.bernoulli(rng, rate, (b, length + 1)) & has_target
    drop = drop.at[:, 0].set(False)  # padding
    dropped = jnp.take_along_axis(drop, segments, axis=1)
    return ~(dropped & text_positions(config, tokens, slot, segments)), dropped


def token_nll(logits, tokens, mask) -> jax.Array:
    """(B, L) −log p(tokens[t + 1]) from logits (B, L, V) at positions where ``mask``, else 0."""
    return jnp.where(mask, _picked_nll(logits, _next_tokens(tokens)), 0.0)


def _next_tokens(tokens) -> jax.Array:
    """(B, L) the token each position predicts (0 after the last)."""
    return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)


def _picked_nll(logits, targets) -> jax.Array:
    """(…) −log softmax(logits)[target] of logits (…, V) and int targets (…)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def chunked_token_nll(config: PretzelConfig, params, vlm_params, y_vlm, y_deep, tokens, mask) -> jax.Array:
    """(B, L) −log p(tokens[t + 1] | ≤ t) from LMHead(y_vlm + W_D·y_D) at positions where ``mask``, else 0
    — ``token_nll`` of the full logits, without ever holding (B, L, vocab): a ``lax.map`` over chunks of
    ``config.lm_chunk`` positions (L padded up to a multiple) builds one (B, chunk, vocab) block at a time,
    each under ``jax.checkpoint`` so the backward pass recomputes it instead of storing it. y_vlm
    (B, L, Dv), y_deep (B, L, width), tokens and mask (B, L). Call inside a jit."""
    b, length = tokens.shape
    size = min(config.lm_chunk, length)
    chunks = -(-length // size)
    pad = chunks * size - length

    def split(a):  # (B, L, …) → (chunks, B, size, …)
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((b, chunks, size) + a.shape[2:]), 1, 0)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_nll(params, vlm_params, y_vlm, y_deep, targets):
        return _picked_nll(lm_logits(config, params, vlm_params, y_vlm, y_deep), targets)

    nll = jax.lax.map(lambda xs: chunk_nll(params, vlm_params, *xs),
                      (split(y_vlm), split(y_deep), split(_next_tokens(tokens))))
    nll = jnp.moveaxis(nll, 0, 1).reshape(b, chunks * size)[:, :length]
    return jnp.where(mask, nll, 0.0)


def per_example(config: PretzelConfig, params, vlm_params, batch: dict, *, latents=None, latent_vars=None,
                rng=None, ntp_weight: float | None = None, train: bool = False) -> dict:
    """The loss terms per image and per token (call inside a jit).

    Returns ``nf (B, M)`` the per-dimension flow loss of each image (0 off target images),
    ``nf_mask (B, M)`` the target images, ``ntp (B, L)`` −log p of each trained next token,
    ``ntp_mask (B, L)``, and ``output`` (``model.Output``). With ``train``, ``rng`` drives caption
    dropout and latent noise; ``ntp_weight`` 0 (default ``config.ntp_weight``) skips the LM head.
    """
    lam = config.ntp_weight if ntp_weight is None else ntp_weight
    if latents is None:
        latents = encode_images(config, latent_vars, batch["images"])
    key_mask, dropped = None, jnp.zeros(batch["tokens"].shape, bool)
    if train and (config.caption_dropout > 0 or config.latent_noise > 0):
        if rng is None:
            raise ValueError("training with caption dropout or latent noise needs rng")
        drop_rng, noise_rng = jax.random.split(rng)
        if config.caption_dropout > 0:
            key_mask, dropped = caption_dropout(config, batch, drop_rng, config.caption_dropout)
        if config.latent_noise > 0:
            latents = latents + config.latent_noise * jax.random.normal(noise_rng, latents.shape, latents.dtype)
    out: Output = apply_model(config, params, vlm_params, batch, latents, key_mask)
    dims = config.num_slots * config.latent_dim
    nf_mask = batch["image_valid"].astype(bool) & batch["image_target"].astype(bool)
    sq = jnp.sum(jnp.square(out.z), axis=(2, 3))
    nf = jnp.where(nf_mask, (0.5 * sq - out.logdet_deep - out.logdet_shallow) / dims, 0.0)
    ntp_mask = batch["text_loss"].astype(bool) & ~dropped
    if lam > 0:
        ntp = chunked_token_nll(config, params, vlm_params, out.y_vlm, out.y_deep, batch["tokens"], ntp_mask)
    else:
        ntp = jnp.zeros(ntp_mask.shape, jnp.float32)
    return dict(nf=nf, nf_mask=nf_mask, ntp=ntp, ntp_mask=ntp_mask, output=out)


def loss(config: PretzelConfig, params, vlm_params, batch: dict, *, latents=None, latent_vars=None, rng=None,
         nf_weight: float = 1.0, ntp_weight: float | None = None, train: bool = True):
    """``(loss, metrics)`` of a packed batch: loss = nf_weight·L_NF + λ·L_NTP (float32 scalar); metrics:
    loss, loss_nf, loss_ntp, nll_per_dim (L_NF + ½ log 2π), images, text_tokens (counts). Differentiable
    in ``params``; call inside ``jax.jit`` / ``jax.grad``. ``nf_weight``/``ntp_weight`` 0 skip a term
    (stage 2 trains on L_NTP alone, stage 1 on L_NF alone)."""
    lam = config.ntp_weight if ntp_weight is None else ntp_weight
    terms = per_example(config, params, vlm_params, batch, latents=latents, latent_vars=latent_vars, rng=rng,
                        ntp_weight=lam, train=train)
    images = jnp.sum(terms["nf_mask"])
    tokens = jnp.sum(terms["ntp_mask"])
    loss_nf = jnp.sum(terms["nf"]) / jnp.maximum(images, 1)
    loss_ntp = jnp.sum(terms["ntp"]) / jnp.maximum(tokens, 1)
    total = (nf_weight * loss_nf if nf_weight else 0.0) + (lam * loss_ntp if lam else 0.0)
    metrics = dict(loss=total, loss_nf=loss_nf, loss_ntp=loss_ntp, nll_per_dim=loss_nf + 0.5 * jnp.log(2 * jnp.pi),
                   images=images, text_tokens=tokens)
    return jnp.asarray(total, jnp.float32), metrics
