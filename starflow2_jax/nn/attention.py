"""Multi-head / grouped-query attention with an explicit fixed-size KV cache.

The cache is a pytree of fixed-size arrays plus a write index; a call with ``Q`` new tokens writes
their keys/values at ``[index, index + Q)`` with ``lax.dynamic_update_slice`` and attends to every
written position its mask allows, so a whole sampling loop compiles once. Keys are cached after
RoPE (each slot's position is fixed), which is equivalent to the references' pre-RoPE cache.

Cache arrays are (B, S, Hkv, hd) by default; ``cache_layout='bhsd'`` keeps them (B, Hkv, S, hd), the
layout the attention products read (heads as a batch axis, positions × head dim a contiguous matrix):
XLA:CPU otherwise transposes the whole cache into that layout at every step of a sampling loop.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from starflow2_jax.nn.axes import dense
from starflow2_jax.nn.norms import RMSNorm
from starflow2_jax.nn.rope import apply_rope

MASK_KINDS = ("causal", "prefix", "bidirectional")
CACHE_LAYOUTS = ("bshd", "bhsd")  # cache arrays (B, S, Hkv, hd) or (B, Hkv, S, hd)


@flax.struct.dataclass
class KVCache:
    """Keys and values ``(B, S, Hkv, hd)`` per layer (``layout='bhsd'``: ``(B, Hkv, S, hd)``; a leading
    layer axis when stacked) and the number of positions written so far (``index``, int32 scalar)."""

    k: jax.Array
    v: jax.Array
    index: jax.Array
    layout: str = flax.struct.field(pytree_node=False, default="bshd")

    @classmethod
    def create(cls, batch: int, length: int, num_kv_heads: int, head_dim: int, *,
               num_layers: int | None = None, dtype=jnp.float32, layout: str = "bshd") -> "KVCache":
        """An empty cache of ``length`` slots (``num_layers`` stacked copies if given) in ``layout``
        (one of ``CACHE_LAYOUTS``)."""
        if layout not in CACHE_LAYOUTS:
            raise ValueError(f"cache layout={layout!r}: expected one of {CACHE_LAYOUTS}")
        shape = (batch, length, num_kv_heads, head_dim) if layout == "bshd" else (batch, num_kv_heads, length, head_dim)
        if num_layers is not None:
            shape = (num_layers,) + shape
        zeros = jnp.zeros(shape, dtype)
        return cls(k=zeros, v=zeros, index=jnp.zeros((), jnp.int32), layout=layout)

    @property
    def length(self) -> int:
        return self.k.shape[-3 if self.layout == "bshd" else -2]

    def rewind(self, n) -> "KVCache":
        """Moves the write index back by ``n`` so the next call overwrites the last ``n`` slots."""
        return self.replace(index=self.index - n)

    def advance(self, n) -> "KVCache":
        return self.replace(index=self.index + n)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, kind: str = "causal", prefix_len: int = 0) -> jax.Array:
    """Boolean ``(Q, K)`` mask, True where query at position q_pos may attend key at k_pos.

    'causal': k <= q. 'prefix': causal, plus every query sees the first ``prefix_len`` keys
    (bidirectional prefix). 'bidirectional': every key.
    """
    q = q_pos[:, None]
    k = k_pos[None, :]
    if kind == "causal":
        return k <= q
    if kind == "prefix":
        return (k <= q) | (k < prefix_len)
    if kind == "bidirectional":
        return jnp.ones((q_pos.shape[0], k_pos.shape[0]), bool)
    raise ValueError(f"mask kind {kind!r}: expected one of {MASK_KINDS}")


class Attention(nn.Module):
    """Attention over ``x`` (B, Q, D) → (B, Q, out_features or D).

    Options: GQA (``num_kv_heads`` divides ``num_heads``; query head h uses kv head h // group),
    q/k RMSNorm over the head dim, interleaved or half-split RoPE, a per-row attention temperature
    (softmax(q·k / sqrt(hd) / τ)), and causal / prefix / bidirectional masks.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    out_features: int | None = None
    use_bias: bool = True
    out_bias: bool | None = None  # bias of the output projection (default: use_bias; Qwen: q/k/v only)
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    rope_style: str = "interleaved"
    mask: str = "causal"
    prefix_len: int = 0
    dtype: jnp.dtype = jnp.float32
    dense_2d: bool = False  # projections as 2-D matmuls (``nn.axes.dense``; faster gradients on CPU)
    cache_layout: str = "bshd"  # KV cache arrays (B, S, Hkv, hd) or 'bhsd' (B, Hkv, S, hd); see the module docstring

    @nn.compact
    def __call__(self, x: jax.Array, *, angles: jax.Array | None = None, kv=None, index=None,
                 temperature: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 key_mask: jax.Array | None = None):
        """Returns ``(y, kv)``; ``kv`` is the updated ``(k_cache, v_cache)`` pair or None.

        angles: (Q, hd/2) or (B, Q, hd/2) RoPE angles of the new tokens (None: no RoPE).
        kv/index: cache arrays (B, S, Hkv, hd) ((B, Hkv, S, hd) with ``cache_layout='bhsd'``) and the slot
        of the first new token.
        temperature: scalar or (B,) attention temperature τ (None: 1).
        segment_ids: (B, Q) ints; tokens attend only within their own segment (packed sequences,
        windowed attention). Not combinable with a cache.
        key_mask: (B, K) bools, False for keys no query may attend (padding); K is Q without a cache
        and the cache length with one.
        """
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.cache_layout not in CACHE_LAYOUTS:
            raise ValueError(f"cache_layout={self.cache_layout!r}: expected one of {CACHE_LAYOUTS}")
        batch, q_len, dim = x.shape
        hd, h, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        common = dict(use_bias=self.use_bias, dtype=self.dtype, fan_in=dim, dense_2d=self.dense_2d)
        q = dense((h, hd), ("embed",), ("heads", "head_dim"), name="query", **common)(x)
        k = dense((hkv, hd), ("embed",), ("kv_heads", "head_dim"), name="key", **common)(x)
        v = dense((hkv, hd), ("embed",), ("kv_heads", "head_dim"), name="value", **common)(x)
        if self.qk_norm:
            q = RMSNorm(epsilon=self.qk_norm_eps, axis_name="head_dim", name="query_norm")(q)
            k = RMSNorm(epsilon=self.qk_norm_eps, axis_name="head_dim", name="key_norm")(k)
        if angles is not None:
            q = apply_rope(q, angles, self.rope_style)
            k = apply_rope(k, angles, self.rope_style)

        heads_major = kv is not None and self.cache_layout == "bhsd"  # keys/values (B, Hkv, S, hd)
        if kv is None:
            q_pos = jnp.arange(q_len)
            k_all, v_all, k_pos = k, v, q_pos
            valid = None
        else:
            k_cache, v_cache = kv
            start = jnp.asarray(index, jnp.int32)
            if heads_major:
                k, v, at = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), (0, 0, start, 0)
            else:
                at = (0, start, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), at)
            v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), at)
            kv = (k_all, v_all)
            q_pos = start + jnp.arange(q_len)
            k_pos = jnp.arange(k_all.shape[2 if heads_major else 1])
            valid = k_pos < start + q_len
        mask = attention_mask(q_pos, k_pos, self.mask, self.prefix_len)[None]  # (1|B, Q, K)
        if valid is not None:
            mask = mask & valid[None, None, :]
        if segment_ids is not None:
            if kv is not None:
                raise ValueError("segment_ids cannot be combined with a KV cache")
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        if key_mask is not None:
            if key_mask.shape != (batch, k_pos.shape[0]):
                raise ValueError(f"key_mask has shape {key_mask.shape}: expected (batch, keys) = "
                                 f"{(batch, k_pos.shape[0])}")
            mask = mask & key_mask.astype(bool)[:, None, :]

        scale = jnp.full((batch,), hd ** -0.5, jnp.float32)
        if temperature is not None:
            scale = scale / jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))
        group = h // hkv
        qg = q.reshape(batch, q_len, hkv, group, hd)
        keys = "bksd" if heads_major else "bskd"
        logits = jnp.einsum(f"bqkgd,{keys}->bkgqs", qg, k_all.astype(q.dtype), preferred_element_type=jnp.float32)
        logits = logits * scale[:, None, None, None, None]
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum(f"bkgqs,{keys}->bqkgd", probs, v_all.astype(self.dtype)).reshape(batch, q_len, h, hd)
        out = nn.with_logical_constraint(out, ("act_batch", "act_seq", "act_heads", None))
        out_bias = self.use_bias if self.out_bias is None else self.out_bias
        y = dense(self.out_features or dim, ("heads", "head_dim"), ("embed",), axis=(-2, -1),
                  use_bias=out_bias, dtype=self.dtype, fan_in=h * hd, dense_2d=self.dense_2d, name="out")(out)
        return y, kv
