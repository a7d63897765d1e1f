"""Flow configuration: one frozen, hashable dataclass (usable as a static ``jit`` argument).

``tarflow_config`` and ``starflow_config`` take the reference constructors' arguments and return
the equivalent ``FlowConfig``; every option of either reference is a field here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from starflow2_jax.nn.remat import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One autoregressive affine-flow block."""

    width: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 64
    permutation: str = "identity"  # 'identity' | 'flip' (applied to the raster token order)
    text_conditioned: bool = False  # text prefix through proj_txt (STARFlow)
    class_conditioned: bool = True  # class embedding added (when the flow has num_classes > 0)


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """A stack of AF blocks over patchified images ``(H, W, C)`` → tokens ``(T, d)``.

    Field groups: data layout (image_size, in_channels, patch_size, feature_order), blocks,
    conditioning (num_classes: TarFlow class embedding; text_dim/text_len: STARFlow text prefix),
    the block head (sos, position, nvp, scale_fn, soft_clip, final_norm), the transformer (norm,
    mlp, mlp_ratio, use_bias, qk_norm, post_norm), sampling semantics (guidance rule) and
    execution (dtype, remat, scan_layers, dense_2d).
    """

    image_size: tuple[int, int]
    in_channels: int
    patch_size: int
    blocks: tuple[BlockConfig, ...]
    variant: str = "tarflow"  # 'tarflow' | 'starflow': guidance / attention-temperature / noise semantics
    feature_order: str = "cij"  # 'cij' (TarFlow, torch unfold) | 'ijc' (STARFlow, einops)
    num_classes: int = 0
    text_dim: int = 0
    text_len: int = 0
    sos: bool = False  # learned start token instead of the output shift
    position: str = "learned"  # 'learned' (permuted with the tokens) | 'rope' (raster, not permuted)
    pt_seq_len: float | None = None  # RoPE position normaliser (default: tokens per side)
    rope_theta: float = 10000.0
    nvp: bool = True  # False: volume preserving, a ≡ 0
    scale_fn: str = "exp"  # 'exp': σ = exp(a) | 'softplus': σ = softplus(a + ln(e − 1))
    soft_clip: float = 0.0  # > 0: proj_out outputs ← c·tanh(o / c)
    final_norm: bool = False  # RMSNorm before proj_out
    norm: str = "layernorm"  # 'layernorm' | 'rmsnorm' | 'none'
    layernorm_eps: float = 1e-5
    rmsnorm_eps: float = 1e-6
    mlp: str = "gelu"  # 'gelu' (exact erf) | 'swiglu' (gated, tanh-GELU as in STARFlow)
    mlp_ratio: float = 4.0
    use_bias: bool = True
    qk_norm: bool = False
    post_norm: bool = False
    guide_deep_only: bool = False  # guidance (and the text-free branch) only in the last block
    latent_norm_reg: float = 0.0  # λ of Σ_j mean(outputs_j²) over the input and the shallow outputs
    dtype: str = "float32"  # compute dtype of matmuls; σ, log-dets and z stay float32
    remat: str = "none"  # one of REMAT_POLICIES
    # Each block's layers as one rolled loop (True: lax.scan, one compiled layer body) or unrolled
    # (False: straight-line code, no loop); None: rolled on accelerators, unrolled on CPU, where the
    # loop's per-iteration cost shows in sequential sampling. Params are stacked on 'layers' either way.
    scan_layers: bool | None = None
    # Dense layers (attention projections, MLP, proj_in/txt/out) as 2-D matmuls over flattened (batch·seq)
    # rows (True; ``nn.dense2d``: 2-D weight-gradient matmuls, faster on XLA:CPU) or as XLA's 3-D
    # dot_general (False); None: 2-D on CPU, 3-D on accelerators. Same params and outputs either way.
    dense_2d: bool | None = None

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def num_dims(self) -> int:
        return self.num_tokens * self.token_dim

    @property
    def rope_3d(self) -> bool:
        return self.text_len > 0

    @property
    def rope_pt_seq_len(self) -> float:
        return float(self.pt_seq_len) if self.pt_seq_len else float(self.image_size[0] // self.patch_size)

    def guided_blocks(self) -> tuple[int, ...]:
        k = len(self.blocks)
        return (k - 1,) if self.guide_deep_only else tuple(range(k))

    def validate(self) -> "FlowConfig":
        """Raises ValueError naming the first inconsistent field; returns self."""
        h, w = self.image_size
        p = self.patch_size
        if p < 1 or h % p or w % p:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={p}")
        _one_of("variant", self.variant, ("tarflow", "starflow"))
        _one_of("feature_order", self.feature_order, ("cij", "ijc"))
        _one_of("position", self.position, ("learned", "rope"))
        _one_of("scale_fn", self.scale_fn, ("exp", "softplus"))
        _one_of("norm", self.norm, ("layernorm", "rmsnorm", "none"))
        _one_of("mlp", self.mlp, ("gelu", "swiglu"))
        _one_of("remat", self.remat, REMAT_POLICIES)
        _one_of("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        for name in ("scan_layers", "dense_2d"):  # the execution switches: None picks per backend
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name}={value!r}: expected True, False or None (per backend)")
        if not self.blocks:
            raise ValueError("blocks is empty: a flow needs at least one block")
        if self.in_channels < 1:
            raise ValueError(f"in_channels={self.in_channels} must be positive")
        for k, b in enumerate(self.blocks):
            _one_of(f"blocks[{k}].permutation", b.permutation, ("identity", "flip"))
            if b.num_heads * b.head_dim <= 0 or b.num_heads % b.num_kv_heads:
                raise ValueError(f"blocks[{k}]: num_heads={b.num_heads} must be a positive multiple of "
                                 f"num_kv_heads={b.num_kv_heads}")
            if b.text_conditioned and not (self.text_dim and self.text_len):
                raise ValueError(f"blocks[{k}] is text_conditioned but text_dim={self.text_dim}, "
                                 f"text_len={self.text_len}")
            if self.position == "rope" and (b.head_dim // 2) % 2:
                raise ValueError(f"blocks[{k}].head_dim={b.head_dim}: RoPE needs a multiple of 4")
        if self.position == "rope" and self.rope_3d and any(b.head_dim // 2 <= 8 for b in self.blocks):
            raise ValueError("3D RoPE (text_len > 0) needs head_dim > 16 in every block")
        return self


def _one_of(field: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r}: expected one of {tuple(allowed)}")


def _square(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def tarflow_config(in_channels: int, img_size, patch_size: int, channels: int, num_blocks: int,
                   layers_per_block: int, nvp: bool = True, num_classes: int = 0, **overrides) -> FlowConfig:
    """``ml-tarflow`` ``Model(...)``: uniform blocks, head dim 64, alternating identity/flip."""
    if channels % 64:
        raise ValueError(f"channels={channels}: TarFlow's head dim is fixed at 64, so channels must be a multiple of 64")
    blocks = tuple(
        BlockConfig(width=channels, num_layers=layers_per_block, num_heads=channels // 64,
                    num_kv_heads=channels // 64, head_dim=64, permutation=("identity", "flip")[k % 2])
        for k in range(num_blocks))
    cfg = FlowConfig(image_size=_square(img_size), in_channels=in_channels, patch_size=patch_size, blocks=blocks,
                     variant="tarflow", feature_order="cij", num_classes=num_classes, nvp=nvp)
    return dataclasses.replace(cfg, **overrides).validate()


def starflow_config(in_channels: int, img_size, patch_size: int, channels: int, num_blocks: int = 0,
                    layers_per_block: Sequence[int] | int = 2, *, head_dim: int = 64,
                    num_heads: int | None = None, num_kv_heads: int | None = None,
                    top_block_channels: int | None = None, txt_size: int = 0, txt_dim: int = 0,
                    cond_top_only: bool = True, guide_top: bool = False, sos: bool = True,
                    use_softplus: bool = True, use_final_norm: bool = True, soft_clip: float = 4.0,
                    seq_order: str = "L2R", norm_type: str = "layer_norm", use_swiglu: bool = False,
                    use_qk_norm: bool = False, use_post_norm: bool = False, use_bias: bool = True,
                    pt_seq_len: float | None = None, latent_norm_regularization: float = 0.0,
                    num_classes: int = 0, **overrides) -> FlowConfig:
    """``ml-starflow`` ``Model(...)`` with ``rope=1`` (its learned-position path crashes): deep–shallow
    blocks (the last one is the deep block, optionally ``top_block_channels`` wide), text prefix in the
    deep block only when ``cond_top_only``. ``num_classes`` (not in ml-starflow, whose label route is
    broken) adds TarFlow's class embedding to the same blocks that would take the text."""
    lpb = list(layers_per_block) if not isinstance(layers_per_block, int) else [layers_per_block] * num_blocks
    if num_blocks and len(lpb) == 1:
        lpb = lpb * num_blocks
    if seq_order not in ("L2R", "R2L"):
        raise ValueError(f"seq_order={seq_order!r}: expected 'L2R' or 'R2L'")
    if any(n == 0 for n in lpb):
        raise ValueError(f"layers_per_block={lpb}: identity blocks (0 layers) are not supported")
    norm = {"layer_norm": "layernorm", "rms_norm": "rmsnorm", "none": "none"}.get(norm_type)
    if norm is None:
        raise ValueError(f"norm_type={norm_type!r}: expected 'layer_norm', 'rms_norm' or 'none'")
    k_total = len(lpb)
    blocks = []
    for k, n_layers in enumerate(lpb):
        width = top_block_channels if (k == k_total - 1 and top_block_channels) else channels
        heads = num_heads or width // head_dim
        phase = k if seq_order == "R2L" else k + 1
        blocks.append(BlockConfig(
            width=width, num_layers=n_layers, num_heads=heads, num_kv_heads=num_kv_heads or heads,
            head_dim=head_dim, permutation=("identity", "flip")[phase % 2],
            text_conditioned=bool(txt_dim) and (k == k_total - 1 or not cond_top_only),
            class_conditioned=k == k_total - 1 or not cond_top_only))
    cfg = FlowConfig(
        image_size=_square(img_size), in_channels=in_channels, patch_size=patch_size, blocks=tuple(blocks),
        variant="starflow", feature_order="ijc", text_dim=txt_dim if txt_dim else 0,
        text_len=txt_size, num_classes=num_classes, sos=sos, position="rope", pt_seq_len=pt_seq_len,
        scale_fn="softplus" if use_softplus else "exp", soft_clip=soft_clip, final_norm=use_final_norm,
        norm=norm, mlp="swiglu" if use_swiglu else "gelu", use_bias=use_bias, qk_norm=use_qk_norm,
        post_norm=use_post_norm, guide_deep_only=bool(cond_top_only or guide_top),
        latent_norm_reg=latent_norm_regularization)
    return dataclasses.replace(cfg, **overrides).validate()


def config_to_dict(config: FlowConfig) -> dict:
    """A JSON-ready dict of the config (blocks as a list of dicts)."""
    return dataclasses.asdict(config)


def config_from_dict(data: dict) -> FlowConfig:
    """Inverse of ``config_to_dict``; unknown fields raise a ValueError naming them."""
    names = {f.name for f in dataclasses.fields(FlowConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown FlowConfig fields: {unknown}")
    data = dict(data)
    data["image_size"] = tuple(data["image_size"])
    block_names = {f.name for f in dataclasses.fields(BlockConfig)}
    blocks = []
    for k, b in enumerate(data["blocks"]):
        bad = sorted(set(b) - block_names)
        if bad:
            raise ValueError(f"unknown BlockConfig fields in blocks[{k}]: {bad}")
        blocks.append(BlockConfig(**b))
    data["blocks"] = tuple(blocks)
    return FlowConfig(**data).validate()
