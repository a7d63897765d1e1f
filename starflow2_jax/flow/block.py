"""The autoregressive affine flow (AF) block, covering every option of ml-tarflow and ml-starflow.

A block maps its input tokens x (raster order) to z: with u = π(x) (its permutation), a causal
transformer reads ũ = [s_sos, u_0..u_{T-2}] (start token) or u (then shifts its output by one) and
emits (a, b) per position; z = π⁻¹((u − b) / σ(a)) with σ = exp(a) or softplus(a + ln(e − 1)).
``__call__`` is the parallel forward; ``step`` runs Q new positions against a KV cache and
``prefill_text`` writes a text prefix into it (both used by the samplers).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax.flow.config import BlockConfig, FlowConfig
from starflow2_jax.flow.patchify import permute, unpermute
from starflow2_jax.nn import MLP, Attention, KVCache, RMSNorm, dense, make_norm, param_with_axes, remat_layer
from starflow2_jax.nn.rope import starflow_rope_angles

INV_SOFTPLUS_1 = math.log(math.e - 1.0)  # softplus(a + ln(e-1)) = 1 at a = 0



def compute_dtype(config: FlowConfig):
    return jnp.dtype(config.dtype)


def split_affine(config: FlowConfig, o):
    """Splits head outputs into (log-scale pre-activation a, shift b); a ≡ 0 for volume-preserving flows."""
    d = config.token_dim
    if config.nvp:
        return o[..., :d], o[..., d:]
    return jnp.zeros_like(o), o


def sigma_from_preact(config: FlowConfig, a):
    """(σ, log σ) in float32: exp(a), or softplus(a + ln(e − 1)) (σ = 1 at a = 0)."""
    a = a.astype(jnp.float32)
    if config.scale_fn == "exp":
        return jnp.exp(a), a
    s = jax.nn.softplus(a + INV_SOFTPLUS_1)
    return s, jnp.log(s)


class FlowLayer(nn.Module):
    """Pre-norm transformer layer: h += Attn(Norm(h)); h += MLP(Norm(h)) (optional RMSNorm post-norms)."""

    config: FlowConfig
    block: BlockConfig
    cache_layout: str = "bshd"  # of ``kv``: see ``nn.Attention``

    @nn.compact
    def __call__(self, h, kv, angles, index, temperature, segment_ids=None, key_mask=None):
        """segment_ids (B, Q) / key_mask (B, K): see ``nn.Attention`` (packed rows, padding, masked keys)."""
        cfg, b = self.config, self.block
        dtype = compute_dtype(cfg)
        flat = uses_dense_2d(cfg)
        norm_kw = dict(layernorm_eps=cfg.layernorm_eps, rmsnorm_eps=cfg.rmsnorm_eps)
        attn_norm = make_norm(cfg.norm, name="attn_norm", **norm_kw)
        y = attn_norm(h) if attn_norm is not None else h
        y, kv = Attention(num_heads=b.num_heads, num_kv_heads=b.num_kv_heads, head_dim=b.head_dim,
                          out_features=b.width, use_bias=cfg.use_bias, qk_norm=cfg.qk_norm,
                          qk_norm_eps=cfg.rmsnorm_eps, mask="causal", dtype=dtype, dense_2d=flat,
                          cache_layout=self.cache_layout, name="attn")(
            y, angles=angles, kv=kv, index=index, temperature=temperature, segment_ids=segment_ids,
            key_mask=key_mask)
        if cfg.post_norm:
            y = RMSNorm(epsilon=cfg.rmsnorm_eps, name="attn_post_norm")(y)
        h = h + y
        mlp_norm = make_norm(cfg.norm, name="mlp_norm", **norm_kw)
        y = mlp_norm(h) if mlp_norm is not None else h
        y = MLP(hidden=int(b.width * cfg.mlp_ratio), kind="gelu" if cfg.mlp == "gelu" else "gated",
                gated_activation="gelu_tanh", use_bias=cfg.use_bias, dtype=dtype, dense_2d=flat, name="mlp")(y)
        if cfg.post_norm:
            y = RMSNorm(epsilon=cfg.rmsnorm_eps, name="mlp_post_norm")(y)
        h = h + y
        h = nn.with_logical_constraint(h, ("act_batch", "act_seq", "act_embed"))
        return h, kv


def scans_layers(config: FlowConfig, backend: str | None = None) -> bool:
    """Whether layer stacks run as a rolled loop: ``config.scan_layers``, or when that is None, on every
    backend but CPU (``backend``: default ``jax.default_backend()`` when the model is traced).

    On CPU the loop costs each sequential sampling step a while loop with per-layer dynamic slices
    of the stacked params and KV cache: unrolled, sequential sampling took 19–25% less time on 2
    (loaded) cores for tarflow-32 and starflow-tiny, while train steps and Jacobi were unchanged
    within noise and compiles took up to ~1.3× longer. Accelerators keep one compiled layer body
    (compile time and code size flat in depth)."""
    return _per_backend(config.scan_layers, backend, on_cpu=False)


def uses_dense_2d(config: FlowConfig, backend: str | None = None) -> bool:
    """Whether the flow's dense layers compute as 2-D matmuls (``nn.dense2d``): ``config.dense_2d``, or
    when that is None, on CPU only (``backend``: default ``jax.default_backend()`` when the model is traced).

    On CPU, XLA runs the weight gradient of a 3-D dense layer as explicit transposes and a plain dot;
    flattened to 2-D it is one matmul (see ``nn.dense2d`` for the measurement). Accelerators keep XLA's
    own dot_general and its gradients (no reshapes across sharded batch and sequence axes)."""
    return _per_backend(config.dense_2d, backend, on_cpu=True)


def _per_backend(choice: bool | None, backend: str | None, *, on_cpu: bool) -> bool:
    """``choice`` when set; None: ``on_cpu`` on CPU, its opposite on accelerators (``backend``: default
    ``jax.default_backend()`` when the model is traced)."""
    if choice is not None:
        return choice
    return ((backend or jax.default_backend()) == "cpu") == on_cpu


def unstack_layers(layers_params, num_layers: int) -> tuple:
    """A block's stacked layer params (``params['layers']``, leading axis ``num_layers``) → one
    FlowLayer param tree per layer (for ``AFBlock.step_unstacked``)."""
    leading = {x.shape[0] for x in jax.tree_util.tree_leaves(layers_params)}
    if leading != {num_layers}:
        raise ValueError(f"stacked layer params have leading sizes {sorted(leading)}: expected {num_layers} layers")
    return tuple(jax.tree_util.tree_map(lambda x, i=i: x[i], layers_params) for i in range(num_layers))


def layer_stack(config: FlowConfig, block: BlockConfig) -> nn.Module:
    """``block.num_layers`` FlowLayers under ``nn.scan`` (params stacked on a leading 'layers' axis),
    each wrapped in ``nn.remat`` with the config's policy; fully unrolled (no loop, same params)
    unless ``scans_layers(config)``.
    Call: ``(h, kv, angles, index, τ, segment_ids, key_mask) → (h, kv)`` (the last two may be None)."""
    scanned = nn.scan(remat_layer(FlowLayer, config.remat), variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=block.num_layers, unroll=1 if scans_layers(config) else block.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(config, block)


class AFBlock(nn.Module):
    """Block ``block_index`` of ``config``; see the module docstring for the map it computes."""

    config: FlowConfig
    block_index: int

    def setup(self):
        cfg = self.config
        b = self.block
        d, width = cfg.token_dim, b.width
        dtype = compute_dtype(cfg)
        flat = uses_dense_2d(cfg)
        self.proj_in = dense(width, ("latent",), ("embed",), fan_in=d, dtype=dtype, dense_2d=flat)
        if cfg.position == "learned":
            self.pos_embed = param_with_axes(self, "pos_embed", nn.initializers.normal(0.01),
                                             (cfg.num_tokens, width), ("seq", "embed"))
        if cfg.num_classes and b.class_conditioned:
            self.class_embed = param_with_axes(self, "class_embed", nn.initializers.normal(0.01),
                                               (cfg.num_classes, width), ("classes", "embed"))
        if cfg.sos:
            self.sos_embed = param_with_axes(self, "sos_embed", nn.initializers.normal(1.0), (d,), ("latent",))
        if b.text_conditioned:
            self.proj_txt = dense(width, ("text_embed",), ("embed",), fan_in=cfg.text_dim, dtype=dtype, dense_2d=flat)
        self.layers = layer_stack(cfg, b)
        if cfg.final_norm:
            self.final_norm = RMSNorm(epsilon=cfg.rmsnorm_eps)
        self.proj_out = dense(2 * d if cfg.nvp else d, ("embed",), ("latent",), fan_in=width, zero_init=True,
                              dtype=dtype, dense_2d=flat)

    # ---- static facts ---------------------------------------------------------------------
    @property
    def block(self) -> BlockConfig:
        return self.config.blocks[self.block_index]

    @property
    def prefix_len(self) -> int:
        """Text positions in front of the image tokens (0 for unconditioned blocks)."""
        return self.config.text_len if self.block.text_conditioned else 0

    def rope_table(self, length: int | None = None) -> np.ndarray | None:
        """RoPE angles for [text prefix, image raster] zero-padded to ``length`` rows (None: no RoPE)."""
        cfg = self.config
        if cfg.position != "rope":
            return None
        table = starflow_rope_angles(cfg.grid, self.block.head_dim, pt_seq_len=cfg.rope_pt_seq_len,
                                     text_len=self.prefix_len, three_d=cfg.rope_3d, theta=cfg.rope_theta)
        if length is not None and length > table.shape[0]:
            table = np.pad(table, ((0, length - table.shape[0]), (0, 0)))
        return table

    # ---- pieces ---------------------------------------------------------------------------
    def class_vectors(self, labels, batch: int) -> jax.Array:
        """(B, D): E[y] for y ≥ 0; the mean class embedding for y < 0 (dropped) or labels=None."""
        table = self.class_embed
        mean = jnp.mean(table, axis=0)
        if labels is None:
            return jnp.broadcast_to(mean, (batch, table.shape[1]))
        labels = jnp.asarray(labels)
        picked = table[jnp.clip(labels, 0, table.shape[0] - 1)]
        return jnp.where((labels >= 0)[:, None], picked, mean[None])

    def embed(self, inp, labels, start, capacity: int):
        """proj_in of inputs at sequence positions [start, start+Q) (+ permuted position and class)."""
        cfg = self.config
        h = self.proj_in(inp.astype(compute_dtype(cfg)))
        if cfg.position == "learned":
            table = permute(self.pos_embed, self.block.permutation, axis=0)
            if capacity > table.shape[0]:
                table = jnp.pad(table, ((0, capacity - table.shape[0]), (0, 0)))
            h = h + jax.lax.dynamic_slice_in_dim(table, start, inp.shape[1], axis=0).astype(h.dtype)
        if cfg.num_classes and self.block.class_conditioned:
            h = h + self.class_vectors(labels, inp.shape[0])[:, None].astype(h.dtype)
        return h

    def head(self, h) -> jax.Array:
        """(B, Q, D) → proj_out outputs (B, Q, 2d | d) in float32, soft-clipped if configured."""
        cfg = self.config
        if cfg.final_norm:
            h = self.final_norm(h)
        o = self.proj_out(h).astype(jnp.float32)
        if cfg.soft_clip > 0:
            o = cfg.soft_clip * jnp.tanh(o / cfg.soft_clip)
        return o

    def affine(self, o):
        return split_affine(self.config, o)

    def sigma(self, a):
        return sigma_from_preact(self.config, a)

    def start_inputs(self, batch: int) -> jax.Array:
        return jnp.broadcast_to(self.sos_embed.astype(jnp.float32), (batch, 1, self.config.token_dim))

    # ---- parallel forward -----------------------------------------------------------------
    def __call__(self, x, labels=None, text=None):
        """x (B, T, d) raster tokens → (y (B, T, d), elementwise log|det| (B, T, d)), both raster order."""
        cfg = self.config
        u = permute(x.astype(jnp.float32), self.block.permutation)
        inp = jnp.concatenate([self.start_inputs(u.shape[0]), u[:, :-1]], axis=1) if cfg.sos else u
        h = self.embed(inp, labels, 0, cfg.num_tokens)
        angles = self.rope_table()
        if self.block.text_conditioned:
            if text is None:
                raise ValueError(f"block {self.block_index} is text-conditioned: pass text features "
                                 f"(B, {cfg.text_len}, {cfg.text_dim})")
            e = self.proj_txt(text.astype(h.dtype))
            h = jnp.concatenate([e, h], axis=1)
        h, _ = self.layers(h, None, angles, None, None, None, None)
        o = self.head(h[:, self.prefix_len:])
        if not cfg.sos:
            o = jnp.concatenate([jnp.zeros_like(o[:, :1]), o[:, :-1]], axis=1)
        a, b = self.affine(o)
        sigma, log_sigma = self.sigma(a)
        if cfg.scale_fn == "exp":
            z = (u - b) * jnp.exp(-a)
        else:
            z = (u - b) / sigma
        return unpermute(z, self.block.permutation), unpermute(-log_sigma, self.block.permutation)

    # ---- cached, incremental pieces (samplers) ----------------------------------------------
    def prefill_text(self, text, cache: KVCache, temperature=None) -> KVCache:
        """Runs the text prefix (B, L, txt_dim) through every layer, writing cache slots [0, L)."""
        e = self.proj_txt(text.astype(compute_dtype(self.config)))
        angles = self.rope_table()
        angles = None if angles is None else angles[: self.prefix_len]
        _, (k, v) = self.layers(e, (cache.k, cache.v), angles, cache.index, temperature, None, None)
        return KVCache(k=k, v=v, index=cache.index + self.prefix_len)

    def step(self, inp, labels, cache: KVCache, temperature=None):
        """Q new inputs (B, Q, d) at the cache's write index → (head outputs (B, Q, 2d|d), cache).

        The inputs are in the block's permuted order; the output at sequence position s parametrises
        token s (start-token blocks) or token s + 1 (shift blocks).
        """
        h, angles = self._step_inputs(inp, labels, cache.index, cache.length)
        h, (k, v) = self.layers(h, (cache.k, cache.v), angles, cache.index, temperature, None, None)
        return self.head(h), KVCache(k=k, v=v, index=cache.index + inp.shape[1])

    def step_unstacked(self, inp, labels, caches: tuple[KVCache, ...], layer_params, temperature=None):
        """``step`` with one cache per layer (any ``KVCache`` layout) and the layers' params given
        unstacked (``unstack_layers``) → (head outputs (B, Q, 2d|d), per-layer caches).

        The same computation as ``step`` through unrolled layers, for a sampling loop: with the params
        sliced once before the loop and one cache array per layer, each step writes its keys in place
        instead of slicing every weight and cache out of the stacked arrays and concatenating the
        caches back (on CPU the stacked form copied every cache about four times per token).
        """
        index = caches[0].index
        h, angles = self._step_inputs(inp, labels, index, caches[0].length)
        h, caches = self._layers_unstacked(h, caches, layer_params, angles, index, temperature)
        return self.head(h), caches

    def prefill_text_unstacked(self, text, caches: tuple[KVCache, ...], layer_params,
                               temperature=None) -> tuple[KVCache, ...]:
        """``prefill_text`` into one cache per layer (see ``step_unstacked``)."""
        e = self.proj_txt(text.astype(compute_dtype(self.config)))
        angles = self.rope_table()
        angles = None if angles is None else angles[: self.prefix_len]
        _, caches = self._layers_unstacked(e, caches, layer_params, angles, caches[0].index, temperature)
        return caches

    def _layers_unstacked(self, h, caches, layer_params, angles, index, temperature):
        """The layers one by one, layer i with ``layer_params[i]`` and ``caches[i]`` → (h, caches)."""
        if len(caches) != self.block.num_layers or len(layer_params) != self.block.num_layers:
            raise ValueError(f"block {self.block_index} has {self.block.num_layers} layers: got {len(caches)} "
                             f"caches and {len(layer_params)} layer params")
        new = []
        for params, cache in zip(layer_params, caches):
            layer = FlowLayer(self.config, self.block, cache_layout=cache.layout, parent=None)  # unbound
            h, (k, v) = layer.apply({"params": params}, h, (cache.k, cache.v), angles, index, temperature)
            new.append(cache.replace(k=k, v=v, index=index + h.shape[1]))
        return h, tuple(new)

    def _step_inputs(self, inp, labels, index, length: int):
        """Embedded inputs (B, Q, D) of Q new inputs (B, Q, d) at cache slot ``index`` of ``length``,
        and their RoPE angles (Q, hd/2) (None: no RoPE)."""
        q = inp.shape[1]
        h = self.embed(inp.astype(jnp.float32), labels, index - self.prefix_len, length - self.prefix_len)
        angles = self.rope_table(length)
        if angles is not None:
            angles = jax.lax.dynamic_slice_in_dim(jnp.asarray(angles), index, q, axis=0)
        return h, angles


class FlowModel(nn.Module):
    """All blocks of ``config`` (params ``blocks_0..K-1``) plus the prior-variance buffer
    (collection 'prior', ``var`` (T, d), ones; only TarFlow's VP mode learns it)."""

    config: FlowConfig

    def setup(self):
        self.blocks = [AFBlock(self.config, k) for k in range(len(self.config.blocks))]
        self.prior_var = self.variable("prior", "var", jnp.ones,
                                       (self.config.num_tokens, self.config.token_dim), jnp.float32)

    def __call__(self, x, labels=None, text=None):
        """x (B, T, d) → (z, [elementwise log-dets per block], [block inputs/outputs, K + 1])."""
        outputs, logdets = [x], []
        for block in self.blocks:
            x, ld = block(x, labels, text)
            outputs.append(x)
            logdets.append(ld)
        return x, logdets, outputs
