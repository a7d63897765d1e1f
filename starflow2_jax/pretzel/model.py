"""The Pretzel model (SPEC §5): the frozen VLM stream and the deep-flow stream under one causal mask.

Per position t of an interleaved row (tokens, and at image slots the shallow-flow outputs u):

    VLM stream (frozen):   input E[token_t], + Adapter(u_t) at slots        → y_vlm,t (final normed hidden)
    deep stream:           input P_txt(y_vlm,t) at text, P_in(u_t + W_vlm·y_vlm,t) at slots → y_D,t
    Gaussian head:         (μ, σ) = head(y_D,t−1) predicts u_t at a slot (``<|vision_start|>`` predicts u_0)
    LM head:               logits_t = LMHead(y_vlm,t + W_D·y_D,t) predicts token t + 1

u = f_S(x) per image (the shallow flows, unconditional, image-only, on the latent-space grid). Slot
tokens are ``<|image_pad|>``, so with the adapter off (or zero, at init) the VLM reads its embedding
there. W_vlm, W_D and the adapter's output layer start at zero; switched off, their parameters do
not exist. Both streams take 3D positions (the deep stream through a multimodal RoPE over its head
dimension), ``segment_ids`` (packed documents never attend to each other) and ``key_mask`` (keys no
query may see: padding, or a caption dropped for guidance), or a ``Caches`` pair for incremental use.

Parameters: ``params`` (trainable: ``adapter``, ``shallow_{k}``, ``deep``, ``vlm_to_flow``,
``flow_to_lm``) and ``vlm_params`` (the frozen ``QwenTextModel`` tree) are separate arguments
everywhere, so the VLM never enters a train state's optimiser.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from starflow2_jax.flow.block import (AFBlock, compute_dtype, layer_stack, sigma_from_preact, split_affine,
                                     uses_dense_2d)
from starflow2_jax.nn import KVCache, RMSNorm, dense, multimodal_rope_angles
from starflow2_jax.pretzel.config import PretzelConfig
from starflow2_jax.vlm.text import QwenTextModel

BATCH_FIELDS = ("tokens", "positions", "slot", "image_index", "segment_ids", "image_valid")
LOSS_FIELDS = ("text_loss", "image_target")


@flax.struct.dataclass
class Caches:
    """The two streams' KV caches (each stacked over its layers; both written at the same index)."""

    vlm: KVCache
    deep: KVCache

    @property
    def index(self) -> jax.Array:
        return self.deep.index

    @property
    def length(self) -> int:
        return self.deep.length


def create_caches(config: PretzelConfig, batch: int, length: int) -> Caches:
    """Empty caches of ``length`` positions for ``batch`` rows, in the compute dtypes."""
    v, deep = config.vlm, config.deep_config()
    b = deep.blocks[0]
    return Caches(
        vlm=KVCache.create(batch, length, v.num_kv_heads, v.head_dim, num_layers=v.num_layers,
                           dtype=jnp.dtype(v.dtype)),
        deep=KVCache.create(batch, length, b.num_kv_heads, b.head_dim, num_layers=b.num_layers,
                            dtype=compute_dtype(deep)))


class Adapter(nn.Module):
    """u (…, D) → (…, VLM width): gelu MLP whose output layer (no bias) starts at zero."""

    config: PretzelConfig

    @nn.compact
    def __call__(self, u):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h = dense(cfg.adapter_width, ("latent",), ("mlp",), fan_in=cfg.latent_dim, dtype=dtype, name="wi")(
            u.astype(dtype))
        h = jax.nn.gelu(h, approximate=False)
        return dense(cfg.vlm.hidden_size, ("mlp",), ("text_embed",), fan_in=cfg.adapter_width, use_bias=False,
                     zero_init=True, dtype=dtype, name="wo")(h)


class DeepStream(nn.Module):
    """The deep flow over the whole row: P_txt / P_in inputs, ``flow.block.layer_stack`` layers, and the
    Gaussian head (final RMSNorm, zero-initialised output projection, soft clip)."""

    config: PretzelConfig

    def setup(self):
        cfg = self.config
        flow_cfg = cfg.deep_config()
        dtype = compute_dtype(flow_cfg)
        width = cfg.flow_width
        flat = uses_dense_2d(flow_cfg)
        self.proj_txt = dense(width, ("text_embed",), ("embed",), fan_in=cfg.vlm.hidden_size, dtype=dtype,
                              dense_2d=flat)
        self.proj_in = dense(width, ("latent",), ("embed",), fan_in=cfg.latent_dim, dtype=dtype, dense_2d=flat)
        self.layers = layer_stack(flow_cfg, flow_cfg.blocks[0])
        self.final_norm = RMSNorm(epsilon=flow_cfg.rmsnorm_eps)
        self.proj_out = dense(2 * cfg.latent_dim, ("embed",), ("latent",), fan_in=width, zero_init=True, dtype=dtype,
                              dense_2d=flat)

    def __call__(self, y_vlm, slot_inputs, slot, positions, *, kv=None, index=None, segment_ids=None,
                 key_mask=None):
        """y_vlm (B, T, Dv), slot_inputs (B, T, D) = u + W_vlm·y_vlm, slot (B, T), positions (3, B, T)
        → (y_D (B, T, width), kv)."""
        cfg = self.config
        dtype = compute_dtype(cfg.deep_config())
        h = jnp.where(slot[..., None], self.proj_in(slot_inputs.astype(dtype)), self.proj_txt(y_vlm.astype(dtype)))
        h = nn.with_logical_constraint(h, ("act_batch", "act_seq", "act_embed"))
        angles = multimodal_rope_angles(positions, cfg.mrope_section, cfg.flow_head_dim, cfg.flow_rope_theta)
        return self.layers(h, kv, angles, index, None, segment_ids, key_mask)

    def head(self, y_d) -> jax.Array:
        """(B, T, width) → (B, T, 2D) float32 head outputs (a, b) of the NEXT position, soft-clipped."""
        c = self.config.soft_clip
        o = self.proj_out(self.final_norm(y_d)).astype(jnp.float32)
        return c * jnp.tanh(o / c) if c > 0 else o


class Pretzel(nn.Module):
    """Submodules: ``vlm`` (frozen), ``shallow_{k}`` (AF blocks), ``deep``, ``adapter``, ``vlm_to_flow``,
    ``flow_to_lm`` (the last three only when switched on)."""

    config: PretzelConfig

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.vlm = QwenTextModel(cfg.vlm)
        shallow = cfg.shallow_config()
        self.shallow = [AFBlock(shallow, k) for k in range(cfg.shallow_blocks)]
        self.deep = DeepStream(cfg)
        if cfg.adapter:
            self.adapter = Adapter(cfg)
        if cfg.vlm_to_flow:
            self.vlm_to_flow = dense(cfg.latent_dim, ("text_embed",), ("latent",), fan_in=cfg.vlm.hidden_size,
                                     use_bias=False, zero_init=True, dtype=dtype)
        if cfg.flow_to_lm:
            self.flow_to_lm = dense(cfg.vlm.hidden_size, ("embed",), ("text_embed",), fan_in=cfg.flow_width,
                                    use_bias=False, zero_init=True, dtype=dtype)

    # ---- pieces ---------------------------------------------------------------------------
    def shallow_forward(self, x):
        """x (B, N, D) raster latents → (u (B, N, D), log|det ∂u/∂x| (B,)) through every shallow block."""
        logdet = jnp.zeros(x.shape[:1], jnp.float32)
        for block in self.shallow:
            x, ld = block(x)
            logdet = logdet + jnp.sum(ld, axis=(1, 2))
        return x, logdet

    def streams(self, tokens, u, slot, positions, *, caches: Caches | None = None, segment_ids=None, key_mask=None):
        """Both streams on T positions: tokens (B, T), u (B, T, D) (read at slots), slot (B, T),
        positions (3, B, T) → (y_vlm (B, T, Dv), y_D (B, T, width), caches or None)."""
        cfg = self.config
        embeds = self.vlm.embed(tokens)
        if cfg.adapter:
            embeds = embeds + jnp.where(slot[..., None], self.adapter(u), 0).astype(embeds.dtype)
        if caches is None:
            y_vlm = self.vlm.hidden_states(inputs_embeds=embeds, position_ids=positions, attention_mask=key_mask,
                                           segment_ids=segment_ids)
            vlm_cache, kv, index = None, None, None
        else:
            y_vlm, vlm_cache = self.vlm.hidden_states(inputs_embeds=embeds, position_ids=positions,
                                                      attention_mask=key_mask, cache=caches.vlm)
            kv, index = (caches.deep.k, caches.deep.v), caches.deep.index
        slot_inputs = u.astype(jnp.float32)
        if cfg.vlm_to_flow:
            slot_inputs = slot_inputs + self.vlm_to_flow(y_vlm).astype(jnp.float32)
        y_d, kv = self.deep(y_vlm, slot_inputs, slot, positions, kv=kv, index=index, segment_ids=segment_ids,
                            key_mask=key_mask)
        if caches is None:
            return y_vlm, y_d, None
        deep_cache = KVCache(k=kv[0], v=kv[1], index=caches.deep.index + tokens.shape[1])
        return y_vlm, y_d, Caches(vlm=vlm_cache, deep=deep_cache)

    def flow_head(self, y_d):
        return self.deep.head(y_d)

    def lm_logits(self, y_vlm, y_d):
        """(B, T, vocab) float32 logits of LMHead(y_vlm + W_D·y_D)."""
        h = y_vlm
        if self.config.flow_to_lm:
            h = h + self.flow_to_lm(y_d).astype(h.dtype)
        return self.vlm.logits(h)

    def init_trainable(self):
        """Touches every trainable part once (for ``init``; the VLM is not created)."""
        cfg = self.config
        n, d = cfg.num_slots, cfg.latent_dim
        u, _ = self.shallow_forward(jnp.zeros((1, n, d), jnp.float32))
        y_vlm = jnp.zeros((1, 2, cfg.vlm.hidden_size), jnp.float32)
        slot = jnp.array([[False, True]])
        if cfg.adapter:
            self.adapter(u[:, :2])
        slot_inputs = u[:, :2]
        if cfg.vlm_to_flow:
            slot_inputs = slot_inputs + self.vlm_to_flow(y_vlm)
        y_d, _ = self.deep(y_vlm, slot_inputs, slot, jnp.zeros((3, 1, 2), jnp.int32))
        if cfg.flow_to_lm:
            self.flow_to_lm(y_d)
        return self.flow_head(y_d)


# ---- functional API ---------------------------------------------------------------------------
def init_boxed(config: PretzelConfig, rng: jax.Array) -> dict:
    """Fresh trainable params (``nn.Partitioned`` boxes with logical axis names; no VLM params).
    ``jax.eval_shape(functools.partial(init_boxed, config), rng)`` gives the abstract tree."""
    return Pretzel(config.validate()).init(rng, method=Pretzel.init_trainable)["params"]


@functools.partial(jax.jit, static_argnums=0)
def init(config: PretzelConfig, rng: jax.Array) -> dict:
    """Fresh trainable params (plain arrays)."""
    return nn.meta.unbox(init_boxed(config, rng))


def _variables(params, vlm_params) -> dict:
    return {"params": dict(params, vlm=vlm_params)}


class Output(NamedTuple):
    """One packed batch through the model.

    x, u, z: (B, M, N, D) image latents, shallow outputs and deep-flow noise (zeros for padding
    images); logdet_shallow, logdet_deep: (B, M) log|det| of f_S and of the deep stream per image;
    y_vlm (B, L, Dv), y_deep (B, L, width): the streams' outputs (LM logits need both).
    """

    x: jax.Array
    u: jax.Array
    z: jax.Array
    logdet_shallow: jax.Array
    logdet_deep: jax.Array
    y_vlm: jax.Array
    y_deep: jax.Array


def check_batch(config: PretzelConfig, batch: dict, latents=None, *, loss: bool = False) -> None:
    """Raises ValueError naming the first missing or mis-shaped field of a packed batch (with ``loss``,
    also the loss masks ``text_loss`` and ``image_target``). Host side; call before jitted steps."""
    fields = BATCH_FIELDS + (LOSS_FIELDS if loss else ()) + (("images",) if latents is None else ())
    missing = [f for f in fields if f not in batch]
    if missing:
        raise ValueError(f"the batch lacks {missing}; expected the packed fields {fields}")
    b, length = batch["tokens"].shape
    m = batch["image_valid"].shape[-1]
    expected = dict(positions=(b, length, 3), slot=(b, length), image_index=(b, length), segment_ids=(b, length),
                    image_valid=(b, m))
    if loss:
        expected.update(text_loss=(b, length), image_target=(b, m))
    if latents is None:
        expected["images"] = (b, m) + tuple(config.latent.image_shape)
    else:
        expected_latents = (b, m, config.num_slots, config.latent_dim)
        if tuple(latents.shape) != expected_latents:
            raise ValueError(f"latents have shape {tuple(latents.shape)}: expected {expected_latents}")
    for name, shape in expected.items():
        if tuple(batch[name].shape) != shape:
            raise ValueError(f"batch[{name!r}] has shape {tuple(batch[name].shape)}: expected {shape}")


def slot_latent_index(config: PretzelConfig, slot, image_index, m: int) -> jax.Array:
    """(B, L) index into the row's flattened (M·N) image latents of each slot (M·N off slots)."""
    n = config.num_slots
    rank = (jnp.cumsum(slot.astype(jnp.int32), axis=1) - 1) % n  # slots of an image are N consecutive positions
    return jnp.where(slot, image_index * n + rank, m * n)


def apply_model(config: PretzelConfig, params, vlm_params, batch: dict, latents, key_mask=None) -> Output:
    """The coupled forward of a packed batch given its image latents x (B, M, N, D) (not jitted; see
    ``forward``). key_mask (B, L): False for keys no query may attend (a dropped caption)."""
    model = Pretzel(config)
    variables = _variables(params, vlm_params)
    b, m, n, d = latents.shape
    x = latents.astype(jnp.float32)
    u, ld_shallow = model.apply(variables, x.reshape(b * m, n, d), method=Pretzel.shallow_forward)
    u = u.reshape(b, m, n, d)
    ld_shallow = ld_shallow.reshape(b, m) * batch["image_valid"]
    slot = batch["slot"].astype(bool)
    index = slot_latent_index(config, slot, batch["image_index"], m)
    flat_u = jnp.concatenate([u.reshape(b, m * n, d), jnp.zeros((b, 1, d), u.dtype)], axis=1)
    u_tok = jnp.take_along_axis(flat_u, index[..., None], axis=1)  # (B, L, D)
    positions = jnp.moveaxis(batch["positions"], -1, 0)  # (3, B, L)
    segments = batch["segment_ids"]
    y_vlm, y_d, _ = model.apply(variables, batch["tokens"], u_tok, slot, positions, segment_ids=segments,
                                key_mask=key_mask, method=Pretzel.streams)
    o = model.apply(variables, y_d, method=Pretzel.flow_head)  # (B, L, 2D): parameters of position t + 1
    o = jnp.concatenate([jnp.zeros_like(o[:, :1]), o[:, :-1]], axis=1)  # now of position t
    a, shift = split_affine(config.deep_config(), o)
    sigma, log_sigma = sigma_from_preact(config.deep_config(), a)
    z_tok = jnp.where(slot[..., None], (u_tok - shift) / sigma, 0.0)
    ld_tok = jnp.where(slot, -jnp.sum(log_sigma, axis=-1), 0.0)
    z = jnp.zeros((b, m * n + 1, d), jnp.float32).at[jnp.arange(b)[:, None], index].set(z_tok)
    z = z[:, :-1].reshape(b, m, n, d)
    image = jnp.where(slot, batch["image_index"], m)
    ld_deep = jnp.zeros((b, m + 1), jnp.float32).at[jnp.arange(b)[:, None], image].add(ld_tok)[:, :m]
    return Output(x=x, u=u, z=z, logdet_shallow=ld_shallow, logdet_deep=ld_deep, y_vlm=y_vlm, y_deep=y_d)


def encode_images(config: PretzelConfig, latent_vars, images) -> jax.Array:
    """(B, M, H, W, C) images → (B, M, N, D) latents through the (frozen) latent space."""
    b, m = images.shape[:2]
    x = config.latent.encode(latent_vars, images.reshape((b * m,) + images.shape[2:]))
    return x.reshape(b, m, config.num_slots, config.latent_dim).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, vlm_params, latent_vars, batch, latents, key_mask):
    if latents is None:
        latents = encode_images(config, latent_vars, batch["images"])
    return apply_model(config, params, vlm_params, batch, latents, key_mask)


def forward(config: PretzelConfig, params, vlm_params, batch: dict, *, latent_vars=None, latents=None,
            key_mask=None) -> Output:
    """A packed batch (the layout fields with a leading batch axis, ``segment_ids``, ``image_valid``)
    through the model (jitted). Images are encoded with ``config.latent`` and ``latent_vars`` unless
    ``latents`` (B, M, N, D) are given. Returns ``Output``."""
    check_batch(config, batch, latents)
    batch = {k: jnp.asarray(batch[k]) for k in BATCH_FIELDS + (("images",) if latents is None else ())}
    return _forward(config, params, vlm_params, latent_vars, batch, latents, key_mask)


def lm_logits(config: PretzelConfig, params, vlm_params, y_vlm, y_deep) -> jax.Array:
    """(B, T, vocab) float32 logits LMHead(y_vlm + W_D·y_D) (not jitted; call inside a jit)."""
    return Pretzel(config).apply(_variables(params, vlm_params), y_vlm, y_deep, method=Pretzel.lm_logits)


def image_nll(config: PretzelConfig, out: Output) -> jax.Array:
    """(B, M) −log p(x) in nats of every image given its context: ½‖z‖² + ½·N·D·log 2π − log|det J_D| −
    log|det J_S| (meaningless for padding images)."""
    dims = config.num_slots * config.latent_dim
    sq = jnp.sum(jnp.square(out.z), axis=(2, 3))
    return 0.5 * sq + 0.5 * dims * jnp.log(2 * jnp.pi) - out.logdet_deep - out.logdet_shallow
