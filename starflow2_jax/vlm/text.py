"""The Qwen2.5-VL text decoder: embedding, ``nn.scan``-stacked layers with multimodal RoPE, LM head.

Layer (transformers' ``Qwen2_5_VLDecoderLayer``): h += o(Attn(RMSNorm(h))) with biased q/k/v,
bias-free o, GQA, softmax(q·k / sqrt(head_dim)); h += down(silu(gate(x)) · up(x)) on RMSNorm(h).
Multimodal RoPE: rotated pair j (of head_dim/2, 'half' pairing (j, j + hd/2)) takes its position
from one row of the (3, B, T) position ids (temporal, height, width): the pairs are split into
consecutive chunks of ``mrope_section`` sizes and chunk i reads row i mod 3 (``nn.multimodal_rope_angles``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax.nn import (MLP, Attention, KVCache, RMSNorm, dense, multimodal_rope_angles, param_with_axes,
                              remat_layer)
from starflow2_jax.vlm.config import QwenTextConfig


def mrope_angles(config: QwenTextConfig, position_ids: jax.Array) -> jax.Array:
    """Rotation angles (B, T, head_dim/2) float32 for position ids (3, B, T) (or (B, T): text only)."""
    pos = jnp.asarray(position_ids)
    if pos.ndim == 2:
        pos = jnp.broadcast_to(pos[None], (3,) + pos.shape)
    return multimodal_rope_angles(pos, config.mrope_section, config.head_dim, config.rope_theta)


class QwenDecoderLayer(nn.Module):
    """One pre-norm decoder layer. Call: ``(h, kv, angles, index, key_mask, segment_ids) → (h, kv)``."""

    config: QwenTextConfig

    @nn.compact
    def __call__(self, h, kv, angles, index, key_mask, segment_ids=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        y = RMSNorm(epsilon=cfg.rms_norm_eps, offset=False, name="input_norm")(h)
        y, kv = Attention(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                          use_bias=True, out_bias=False, rope_style="half", mask="causal", dtype=dtype,
                          name="attn")(y, angles=angles, kv=kv, index=index, key_mask=key_mask,
                                                   segment_ids=segment_ids)
        h = h + y
        y = RMSNorm(epsilon=cfg.rms_norm_eps, offset=False, name="mlp_norm")(h)
        y = MLP(hidden=cfg.intermediate_size, kind="gated", gated_activation="silu", use_bias=False,
                dtype=dtype, name="mlp")(y)
        h = h + y
        h = nn.with_logical_constraint(h, ("act_batch", "act_seq", "act_embed"))
        return h, kv


def layer_stack(config: QwenTextConfig) -> nn.Module:
    """``config.num_layers`` decoder layers under ``nn.scan`` (params stacked on a leading 'layers'
    axis), each wrapped in ``nn.remat`` with the config's policy."""
    scanned = nn.scan(remat_layer(QwenDecoderLayer, config.remat), variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=config.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(config, name="layers")


class QwenTextModel(nn.Module):
    """Decoder + LM head. Params: ``embed_tokens`` (vocab, embed), ``layers`` (stacked),
    ``final_norm``, and ``lm_head`` (embed, vocab) unless the embeddings are tied."""

    config: QwenTextConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = param_with_axes(self, "embed_tokens", nn.initializers.normal(0.02),
                                            (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        self.layers = layer_stack(cfg)
        self.final_norm = RMSNorm(epsilon=cfg.rms_norm_eps, offset=False)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed",), ("vocab",), fan_in=cfg.hidden_size, use_bias=False,
                                 dtype=jnp.dtype(cfg.dtype))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings (B, T, D) in the compute dtype."""
        return jnp.take(self.embed_tokens, input_ids, axis=0).astype(jnp.dtype(self.config.dtype))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits (B, T, vocab) float32 from final (normed) hidden states (B, T, D)."""
        if self.config.tie_word_embeddings:
            table = self.embed_tokens.astype(hidden.dtype)
            return jnp.einsum("btd,vd->btv", hidden, table, preferred_element_type=jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, position_ids=None, attention_mask=None,
                      cache: KVCache | None = None, segment_ids=None):
        """Final normed hidden states (B, T, D) without the LM head; ``(hidden, cache)`` with a cache.

        Arguments as for ``__call__``; segment_ids (B, T) ints keep packed documents apart (tokens
        attend only within their own segment; not combinable with a cache).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(self.config.dtype))
        batch, length = h.shape[:2]
        index = None if cache is None else cache.index
        if position_ids is None:
            start = 0 if index is None else index
            position_ids = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (3, batch, length))
        angles = mrope_angles(self.config, position_ids)
        key_mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        h = nn.with_logical_constraint(h, ("act_batch", "act_seq", "act_embed"))
        kv = None if cache is None else (cache.k, cache.v)
        h, kv = self.layers(h, kv, angles, index, key_mask, segment_ids)
        h = self.final_norm(h)
        if cache is None:
            return h
        return h, KVCache(k=kv[0], v=kv[1], index=cache.index + length)

    def __call__(self, input_ids=None, *, inputs_embeds=None, position_ids=None, attention_mask=None,
                 cache: KVCache | None = None, return_hidden: bool = False):
        """Logits (B, T, vocab) float32 for token ids (B, T) or embeddings (B, T, D) (exactly one).

        position_ids: (3, B, T) multimodal positions (or (B, T) text positions); default
        ``index + arange(T)`` on every row (``index`` = the cache's write index, else 0).
        attention_mask: (B, K) 1 for tokens, 0 for padding keys; K = T without a cache and the
        cache length with one (then it covers every slot, past and new).
        cache: a ``KVCache`` stacked over layers (num_layers, B, S, Hkv, hd); the T new tokens are
        written at ``cache.index``.
        Returns ``logits``, ``(logits, cache)`` with a cache, and the final hidden states (B, T, D)
        appended when ``return_hidden``.
        """
        out = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                                 attention_mask=attention_mask, cache=cache)
        h, cache = (out, None) if cache is None else out
        logits = self.logits(h)
        out = (logits,) if cache is None else (logits, cache)
        if return_hidden:
            out = out + (h,)
        return out[0] if len(out) == 1 else out


def create_cache(config: QwenTextConfig, batch: int, length: int, dtype=None) -> KVCache:
    """An empty stacked KV cache of ``length`` slots for every layer, in the compute dtype by default."""
    return KVCache.create(batch, length, config.num_kv_heads, config.head_dim, num_layers=config.num_layers,
                          dtype=jnp.dtype(dtype or config.dtype))


def text_step(config: QwenTextConfig, params, cache: KVCache, *, input_ids=None, inputs_embeds=None,
              position_ids=None, attention_mask=None):
    """Q new tokens (ids (B, Q) or embeddings (B, Q, D)) through the decoder against ``cache`` → ``(final
    normed hidden states (B, Q, D), updated cache)``; no LM head (``QwenTextModel.logits`` adds it).
    position_ids (3, B, Q); attention_mask (B, S) over the whole cache. Call inside ``jax.jit``."""
    return QwenTextModel(config).apply({"params": params}, input_ids, inputs_embeds=inputs_embeds,
                                       position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                                       method=QwenTextModel.hidden_states)
