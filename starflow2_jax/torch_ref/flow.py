"""The TarFlow / STARFlow flow in plain PyTorch, built from our ``FlowConfig``.

Parameters follow the references' state-dict names (TORCH_LAYOUTS §3: ``blocks.{k}.proj_in``,
``attn_blocks.{l}.attention.qkv``, ``mlp.main.0``, …), so ``load_state_dict`` takes the output of
``convert.export_torch_flow`` directly (``torch_flow_from_variables``). Tokens are in our token
layout (B, T, d) (raster order, the config's feature order), like ``flow.forward_tokens``.

Covers: learned (permuted) positions or interleaved 2D/3D RoPE (raster, not permuted), class
embedding (−1 → mean), text prefix, start token or output shift, exp / softplus scale, soft clip,
final RMSNorm, LayerNorm / RMSNorm / no norm, GELU / SwiGLU, q/k norm, post norms, GQA.
Sampling (``sample_tokens``) is unguided and sequential: one position per step through a
preallocated KV cache, the references' ``reverse`` loop.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from starflow2_jax.flow.config import FlowConfig
from starflow2_jax.nn.rope import starflow_rope_angles

INV_SOFTPLUS_1 = math.log(math.e - 1.0)
# Reference buffers that carry no information (TORCH_LAYOUTS §3.3 item 8): accepted and ignored.
_IGNORED_BUFFERS = ("attn_mask", "feat_rope.freqs_cos", "feat_rope.freqs_sin")


class RMSNorm(nn.Module):
    """x·rsqrt(mean(x²) + eps)·(1 + w), w zero-initialised, in float32 (STARFlow's)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())
        return y.type_as(x)


class LayerNorm(nn.LayerNorm):
    """torch LayerNorm evaluated in float32 and cast back (both references)."""

    def forward(self, x):
        return super().forward(x.float()).type_as(x)


def make_norm(config: FlowConfig, dim: int) -> nn.Module:
    if config.norm == "layernorm":
        return LayerNorm(dim, eps=config.layernorm_eps)
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.rmsnorm_eps)
    return nn.Identity()


def rope(x, cos, sin):
    """Interleaved-pair rotation of x (B, H, S, hd) by angles with cos/sin (S, hd/2)."""
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return out.type_as(x)


class KVCache:
    """Per-layer keys/values (B, Hkv, S, hd) after RoPE and the number of positions written."""

    def __init__(self, batch: int, length: int, num_kv_heads: int, head_dim: int, dtype, device=None):
        self.k = torch.zeros(batch, num_kv_heads, length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.index = 0

    def append(self, k, v):
        """Writes Q new keys/values at the index; returns all keys/values written so far."""
        end = self.index + k.shape[2]
        self.k[:, :, self.index:end] = k
        self.v[:, :, self.index:end] = v
        self.index = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: FlowConfig, width: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.h, self.hkv, self.hd = num_heads, num_kv_heads, head_dim
        self.norm = make_norm(config, width)
        self.qkv = nn.Linear(width, (num_heads + 2 * num_kv_heads) * head_dim, bias=config.use_bias)
        if config.qk_norm:
            self.query_norm = RMSNorm(head_dim, config.rmsnorm_eps)
            self.key_norm = RMSNorm(head_dim, config.rmsnorm_eps)
        self.qk_norm = config.qk_norm
        self.proj = nn.Linear(num_heads * head_dim, width, bias=config.use_bias)
        self.post_norm = RMSNorm(width, config.rmsnorm_eps) if config.post_norm else None

    def forward(self, x, rope_cs=None, cache: KVCache | None = None):
        """x (B, Q, D) → (B, Q, D); causal over x, after the cache's keys when a cache is given."""
        b, q_len, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).split([self.h * self.hd, self.hkv * self.hd, self.hkv * self.hd], -1)
        q = q.view(b, q_len, self.h, self.hd).transpose(1, 2)
        k = k.view(b, q_len, self.hkv, self.hd).transpose(1, 2)
        v = v.view(b, q_len, self.hkv, self.hd).transpose(1, 2)
        if self.qk_norm:
            q, k = self.query_norm(q), self.key_norm(k)
        if rope_cs is not None:
            q, k = rope(q, *rope_cs), rope(k, *rope_cs)
        mask, causal = None, True
        if cache is not None:
            start = cache.index
            k, v = cache.append(k, v)
            causal = False
            if q_len > 1:  # bottom-right aligned causal mask over [cache prefix, new chunk]
                mask = torch.ones(q_len, start + q_len, dtype=torch.bool, device=x.device).tril(start)
        if self.hkv != self.h:
            k = k.repeat_interleave(self.h // self.hkv, dim=1)
            v = v.repeat_interleave(self.h // self.hkv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and q_len > 1)
        o = self.proj(o.transpose(1, 2).reshape(b, q_len, self.h * self.hd))
        return self.post_norm(o) if self.post_norm is not None else o


class MLP(nn.Module):
    def __init__(self, config: FlowConfig, width: int):
        super().__init__()
        hidden = int(width * config.mlp_ratio)
        self.norm = make_norm(config, width)
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(width, hidden, bias=config.use_bias)
            self.up_proj = nn.Linear(width, hidden, bias=config.use_bias)
            self.down_proj = nn.Linear(hidden, width, bias=config.use_bias)
        else:
            self.main = nn.Sequential(nn.Linear(width, hidden, bias=config.use_bias), nn.GELU(),
                                      nn.Linear(hidden, width, bias=config.use_bias))
        self.post_norm = RMSNorm(width, config.rmsnorm_eps) if config.post_norm else None

    def forward(self, x):
        x = self.norm(x)
        if self.swiglu:
            y = self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        else:
            y = self.main(x)
        return self.post_norm(y) if self.post_norm is not None else y


class AttentionBlock(nn.Module):
    def __init__(self, config: FlowConfig, width, num_heads, num_kv_heads, head_dim):
        super().__init__()
        self.attention = Attention(config, width, num_heads, num_kv_heads, head_dim)
        self.mlp = MLP(config, width)

    def forward(self, x, rope_cs=None, cache=None):
        x = x + self.attention(x, rope_cs, cache)
        return x + self.mlp(x)


def _permute(x, permutation: str, dim: int = 1):
    return x.flip(dim) if permutation == "flip" else x


class FlowBlock(nn.Module):
    """Block k of the config: forward (data → noise) and the cached one-step pieces of ``reverse``."""

    def __init__(self, config: FlowConfig, k: int):
        super().__init__()
        self.config, self.cfg = config, config.blocks[k]
        b, d, t = self.cfg, config.token_dim, config.num_tokens
        self.prefix = config.text_len if b.text_conditioned else 0
        if config.sos:
            self.sos_embed = nn.Parameter(torch.zeros(1, 1, d))
        if config.position == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(t, b.width))
        if config.num_classes and b.class_conditioned:
            self.class_embed = nn.Parameter(torch.zeros(config.num_classes, 1, b.width))
        self.proj_in = nn.Linear(d, b.width)
        self.proj_out = nn.Linear(b.width, 2 * d if config.nvp else d)
        if b.text_conditioned:
            self.proj_txt = nn.Linear(config.text_dim, b.width)
        self.attn_blocks = nn.ModuleList(
            AttentionBlock(config, b.width, b.num_heads, b.num_kv_heads, b.head_dim) for _ in range(b.num_layers))
        if config.final_norm:
            self.final_norm = RMSNorm(b.width, config.rmsnorm_eps)
        if config.position == "rope":
            angles = torch.from_numpy(np.asarray(starflow_rope_angles(
                config.grid, b.head_dim, pt_seq_len=config.rope_pt_seq_len, text_len=self.prefix,
                three_d=config.rope_3d, theta=config.rope_theta)))
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def _rope(self, start: int, stop: int):
        if self.config.position != "rope":
            return None
        return self.rope_cos[start:stop], self.rope_sin[start:stop]

    def _class(self, labels, batch: int):
        if not hasattr(self, "class_embed"):
            return 0.0
        table = self.class_embed[:, 0]
        mean = table.mean(0)
        if labels is None:
            return mean.expand(batch, -1)[:, None]
        picked = table[labels.clamp(0, table.shape[0] - 1)]
        return torch.where((labels >= 0)[:, None], picked, mean[None])[:, None]

    def embed(self, inp, labels, start: int):
        """proj_in of (B, Q, d) inputs at image positions [start, start+Q) (+ permuted position, class)."""
        h = self.proj_in(inp)
        if hasattr(self, "pos_embed"):
            h = h + _permute(self.pos_embed, self.cfg.permutation, 0)[start:start + inp.shape[1]]
        return h + self._class(labels, inp.shape[0])

    def head(self, h):
        if hasattr(self, "final_norm"):
            h = self.final_norm(h)
        o = self.proj_out(h).float()
        c = self.config.soft_clip
        return c * torch.tanh(o / c) if c > 0 else o

    def affine(self, o):
        """(a, b, σ, log σ) from head outputs (float32)."""
        d = self.config.token_dim
        a, b = (o[..., :d], o[..., d:]) if self.config.nvp else (torch.zeros_like(o), o)
        if self.config.scale_fn == "exp":
            return a, b, torch.exp(a), a
        s = F.softplus(a + INV_SOFTPLUS_1)
        return a, b, s, torch.log(s)

    def forward(self, x, labels=None, text=None):
        """x (B, T, d) raster → (z (B, T, d), elementwise log|det| (B, T, d)), raster order."""
        u = _permute(x.float(), self.cfg.permutation)
        inp = torch.cat([self.sos_embed.expand(u.shape[0], 1, -1), u[:, :-1]], 1) if self.config.sos else u
        h = self.embed(inp, labels, 0)
        if self.prefix:
            h = torch.cat([self.proj_txt(text), h], 1)
        rope_cs = self._rope(0, h.shape[1])
        for layer in self.attn_blocks:
            h = layer(h, rope_cs)
        o = self.head(h[:, self.prefix:])
        if not self.config.sos:
            o = torch.cat([torch.zeros_like(o[:, :1]), o[:, :-1]], 1)
        a, b, sigma, log_sigma = self.affine(o)
        z = (u - b) * torch.exp(-a) if self.config.scale_fn == "exp" else (u - b) / sigma
        return _permute(z, self.cfg.permutation), _permute(-log_sigma, self.cfg.permutation)

    def new_cache(self, batch: int, length: int, dtype, device) -> list[KVCache]:
        b = self.cfg
        return [KVCache(batch, length, b.num_kv_heads, b.head_dim, dtype, device) for _ in range(b.num_layers)]

    def prefill_text(self, text, caches):
        h = self.proj_txt(text)
        rope_cs = self._rope(0, self.prefix)
        for layer, cache in zip(self.attn_blocks, caches):
            h = layer(h, rope_cs, cache)

    def step(self, inp, labels, caches):
        """(B, Q, d) inputs at the caches' index → head outputs (B, Q, 2d|d), float32."""
        index = caches[0].index
        h = self.embed(inp, labels, index - self.prefix)
        rope_cs = self._rope(index, index + inp.shape[1])
        for layer, cache in zip(self.attn_blocks, caches):
            h = layer(h, rope_cs, cache)
        return self.head(h)

    @torch.no_grad()
    def reverse(self, x, labels=None, text=None):
        """Sequential inverse: raster tokens (B, T, d) of this block's output → its input."""
        u = _permute(x.float(), self.cfg.permutation).clone()
        batch, num_tokens, _ = u.shape
        dtype = self.proj_in.weight.dtype
        caches = self.new_cache(batch, self.prefix + num_tokens, dtype, u.device)
        if self.prefix:
            self.prefill_text(text, caches)
        sos = self.config.sos
        z = u.clone()
        for t in range(num_tokens if sos else num_tokens - 1):
            inp = (self.sos_embed.expand(batch, 1, -1) if t == 0 else u[:, t - 1:t]) if sos else u[:, t:t + 1]
            _, b, sigma, _ = self.affine(self.step(inp, labels, caches))
            target = t if sos else t + 1
            u[:, target:target + 1] = z[:, target:target + 1] * sigma + b
        return _permute(u, self.cfg.permutation)


class TorchFlow(nn.Module):
    """All blocks plus the prior-variance buffer ``var`` (T, d) (TarFlow scales sampling noise by it)."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config.validate()
        self.blocks = nn.ModuleList(FlowBlock(config, k) for k in range(len(config.blocks)))
        self.register_buffer("var", torch.ones(config.num_tokens, config.token_dim))

    def forward(self, x, labels=None, text=None):
        """x (B, T, d) → (z, [K elementwise log-dets (B, T, d)], [K + 1 block inputs/outputs])."""
        outputs, logdets = [x], []
        for block in self.blocks:
            x, ld = block(x, labels, text)
            outputs.append(x)
            logdets.append(ld)
        return x, logdets, outputs

    def loss(self, x, labels=None, text=None):
        """``flow.loss``'s scalar: mean_b[0.5·mean(z²) − Σ_k Σ logdet_k / D] + λ·Σ_{j<K} mean(out_j²)."""
        z, logdets, outputs = self(x, labels, text)
        loss_z = 0.5 * z.pow(2).flatten(1).mean(1)
        loss_logdet = -sum(ld.flatten(1).sum(1) for ld in logdets) / self.config.num_dims
        reg = sum(o.pow(2).mean() for o in outputs[:-1])
        return (loss_z + loss_logdet).mean() + self.config.latent_norm_reg * reg

    @torch.no_grad()
    def sample_tokens(self, noise, labels=None, text=None):
        """Unguided sequential sampling: noise (B, T, d) → tokens (B, T, d), blocks in reverse order."""
        x = noise.float()
        if self.config.variant == "tarflow":
            x = x * self.var.sqrt()
        for block in reversed(self.blocks):
            x = block.reverse(x, labels, text if block.prefix else None)
        return x


def torch_flow_from_variables(config: FlowConfig, variables, layout: str | None = None) -> TorchFlow:
    """A ``TorchFlow`` holding ``variables`` (our Flax tree) through the reference layout's state dict
    (``convert.export_torch_flow``; layout defaults to the config's variant). Every parameter must be
    filled; the layout's informationless buffers are ignored."""
    from starflow2_jax.convert.torch_flow import export_torch_flow

    layout = layout or f"apple-{config.variant}"
    state = {k: torch.from_numpy(np.array(v)) for k, v in export_torch_flow(config, variables, layout).items()}
    model = TorchFlow(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith(_IGNORED_BUFFERS)]
    if missing or unexpected:
        raise ValueError(f"{layout} state dict does not match TorchFlow({config.variant}): missing {missing}, "
                         f"unexpected {unexpected}")
    return model.eval()
