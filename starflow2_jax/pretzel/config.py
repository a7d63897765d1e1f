"""STARFlow2 / Pretzel configuration: one frozen, hashable dataclass (usable as a static ``jit`` argument).

Field groups: the frozen VLM text decoder (``vlm``), the latent space images live in (``latent``:
``PatchesSpace`` or ``FAESpace``, N = grid tokens of D features), the shallow flows and the deep
stream (widths, depths, heads; STARFlow's block options), the bridges and their switches
(``adapter``, ``vlm_to_flow`` = W_vlm, ``flow_to_lm`` = W_D), the losses (λ, caption dropout,
latent noise), the packed-row shape (``seq_len`` L, ``max_images`` M) and execution (dtype, remat, the
LM loss's chunk ``lm_chunk``). Presets: ``tiny`` (tests),
``sevenb`` (the paper's sizes, SPEC §5). Every **[choice]** of SPEC §5.3 is a field here.
``config_to_dict`` / ``config_from_dict`` round-trip it through JSON (for checkpoints).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from starflow2_jax.fae.config import FAEConfig, fae_config_from_dict, fae_config_to_dict
from starflow2_jax.fae.dinov2 import Dinov2Config
from starflow2_jax.fae.latent_space import FAESpace, PatchesSpace
from starflow2_jax.flow.config import BlockConfig, FlowConfig
from starflow2_jax.nn.remat import REMAT_POLICIES
from starflow2_jax.vlm.config import QwenTextConfig

PRESETS = ("tiny", "7b")


@dataclasses.dataclass(frozen=True)
class PretzelConfig:
    """The coupled model; see the module docstring."""

    vlm: QwenTextConfig
    latent: PatchesSpace | FAESpace
    # flows (STARFlow's options: MHA, LayerNorm, exact-GELU MLP, final RMSNorm, soft clip, softplus σ)
    flow_width: int = 3072
    flow_head_dim: int = 64
    flow_mlp_ratio: float = 4.0
    shallow_blocks: int = 2
    shallow_layers: int = 4
    deep_layers: int = 24
    soft_clip: float = 4.0
    flow_rope_theta: float = 10000.0
    # rotated pairs per (temporal, height, width) row of the deep stream's multimodal RoPE; () →
    # Qwen's [16, 24, 24] proportions scaled to flow_head_dim / 2 (SPEC §5.3 [choice])
    deep_mrope_section: tuple[int, ...] = ()
    # bridges (each with its switch; their last layers are zero-initialised)
    adapter: bool = True  # the VLM reads E[<|image_pad|>] + Adapter(u) at slots (off: E[<|image_pad|>])
    adapter_hidden: int = 0  # 0 → the VLM width
    vlm_to_flow: bool = True  # W_vlm: slot input of the deep stream u + W_vlm·y_vlm
    flow_to_lm: bool = True  # W_D: LM head reads y_vlm + W_D·y_D
    # losses and guidance
    ntp_weight: float = 1.0  # λ in L_NF + λ·L_NTP (SPEC §5.1 [choice])
    caption_dropout: float = 0.1  # per document with a target image: its text masked out of attention
    latent_noise: float = 0.0  # σ_n of the training noise on the latents (0: none); the score step's σ
    # packed rows
    seq_len: int = 2048  # L
    max_images: int = 4  # M per row (0: text only)
    # execution
    dtype: str = "float32"
    remat: str = "none"
    # positions per chunk of the LM loss: the (B, chunk, vocab) logits are built one chunk at a time, forward
    # and backward, never (B, L, vocab) (at 7b: 152k × 4096 float32 = 2.5 GB per row)
    lm_chunk: int = 512

    # ---- derived ----------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.latent.grid)

    @property
    def num_slots(self) -> int:
        """N, the slots (latent tokens) of one image."""
        return self.grid[0] * self.grid[1]

    @property
    def latent_dim(self) -> int:
        return self.latent.latent_dim

    @property
    def flow_heads(self) -> int:
        return self.flow_width // self.flow_head_dim

    @property
    def adapter_width(self) -> int:
        return self.adapter_hidden or self.vlm.hidden_size

    @property
    def mrope_section(self) -> tuple[int, ...]:
        if self.deep_mrope_section:
            return tuple(self.deep_mrope_section)
        return scaled_sections(self.flow_head_dim // 2)

    def _flow_config(self, blocks: tuple[BlockConfig, ...]) -> FlowConfig:
        return FlowConfig(
            image_size=self.grid, in_channels=self.latent_dim, patch_size=1, blocks=blocks, variant="starflow",
            feature_order="ijc", sos=True, position="rope", rope_theta=self.flow_rope_theta, scale_fn="softplus",
            soft_clip=self.soft_clip, final_norm=True, norm="layernorm", mlp="gelu", mlp_ratio=self.flow_mlp_ratio,
            dtype=self.dtype, remat=self.remat)

    def shallow_config(self) -> FlowConfig:
        """The shallow stack as a flow on the (gh, gw) latent grid (patch 1, token = one latent): STARFlow
        blocks with a start token and 2D RoPE, alternating order so that the last one (next to the deep
        stream) is flipped."""
        k = self.shallow_blocks
        blocks = tuple(BlockConfig(width=self.flow_width, num_layers=self.shallow_layers, num_heads=self.flow_heads,
                                   num_kv_heads=self.flow_heads, head_dim=self.flow_head_dim,
                                   permutation=("flip", "identity")[(k - 1 - i) % 2])
                       for i in range(k))
        return self._flow_config(blocks)

    def deep_config(self) -> FlowConfig:
        """The deep stream's transformer options as a one-block flow config (its layers reuse
        ``flow.block.layer_stack``; the sequence is the whole interleaved row, in order)."""
        block = BlockConfig(width=self.flow_width, num_layers=self.deep_layers, num_heads=self.flow_heads,
                            num_kv_heads=self.flow_heads, head_dim=self.flow_head_dim)
        return self._flow_config((block,))

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> "PretzelConfig":
        """Returns self; raises ValueError naming the first bad field."""
        self.vlm.validate()
        if self.latent.kind not in ("patches", "fae"):
            raise ValueError(f"latent.kind={self.latent.kind!r}: expected 'patches' or 'fae'")
        for name in ("flow_width", "flow_head_dim", "shallow_blocks", "shallow_layers", "deep_layers", "seq_len",
                     "lm_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        if self.flow_width % self.flow_head_dim:
            raise ValueError(f"flow_width={self.flow_width} is not a multiple of flow_head_dim={self.flow_head_dim}")
        if (self.flow_head_dim // 2) % 2:
            raise ValueError(f"flow_head_dim={self.flow_head_dim}: the shallow flows' 2D RoPE needs a multiple of 4")
        if sum(self.mrope_section) != self.flow_head_dim // 2 or len(self.mrope_section) != 3:
            raise ValueError(f"deep_mrope_section={list(self.mrope_section)}: expected 3 entries summing to "
                             f"flow_head_dim / 2 = {self.flow_head_dim // 2}")
        if self.adapter_hidden < 0:
            raise ValueError(f"adapter_hidden={self.adapter_hidden}: expected >= 0 (0: the VLM width)")
        if self.ntp_weight < 0:
            raise ValueError(f"ntp_weight={self.ntp_weight}: expected >= 0")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout={self.caption_dropout}: expected a probability in [0, 1)")
        if self.latent_noise < 0:
            raise ValueError(f"latent_noise={self.latent_noise}: expected >= 0")
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 0:
            raise ValueError(f"max_images={self.max_images!r}: expected an int >= 0")
        if self.max_images * (self.num_slots + 2) > self.seq_len:
            raise ValueError(f"max_images={self.max_images} images of {self.num_slots} slots (+2 markers each) do "
                             f"not fit seq_len={self.seq_len}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {tuple(REMAT_POLICIES)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: expected 'float32', 'bfloat16' or 'float16'")
        ids = (self.vlm.vision_start_token_id, self.vlm.vision_end_token_id, self.vlm.image_token_id)
        if any(not 0 <= i < self.vlm.vocab_size for i in ids):
            raise ValueError(f"vlm special tokens (vision_start, vision_end, image_pad) = {ids} must lie in the "
                             f"vocabulary [0, {self.vlm.vocab_size})")
        self.shallow_config().validate()
        self.deep_config().validate()
        return self


def scaled_sections(pairs: int, reference: Sequence[int] = (16, 24, 24)) -> tuple[int, ...]:
    """``reference`` (Qwen's rotated pairs per t/h/w row) scaled to ``pairs`` in total, h = w kept equal."""
    total = sum(reference)
    spatial = round(pairs * reference[1] / total)
    return (pairs - 2 * spatial, spatial, spatial)


def tiny(**overrides) -> PretzelConfig:
    """A test-sized model: a 2-layer VLM of width 64 (vocab 256), 8×8×1 images as 4×4 patches
    (N = 4 slots of D = 16), flows of width 32 (2 heads of 16), shallow 2 × 1, deep 2 layers."""
    vlm = QwenTextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, mrope_section=(2, 3, 3), image_token_id=252, video_token_id=253,
                         vision_start_token_id=250, vision_end_token_id=251, bos_token_id=None,
                         eos_token_ids=(255,), pad_token_id=0, max_position_embeddings=4096)
    cfg = PretzelConfig(vlm=vlm, latent=PatchesSpace(8, 8, 1, 4), flow_width=32, flow_head_dim=16,
                        shallow_blocks=2, shallow_layers=1, deep_layers=2, seq_len=64, max_images=4)
    return dataclasses.replace(cfg, **overrides).validate()


def sevenb(**overrides) -> PretzelConfig:
    """The paper's sizes (SPEC §5): Qwen2.5-VL-7B-Instruct text decoder; the FAE latent of 256-px images
    (16×16 × 32, DINOv2-g/14); flows of width 3072 (48 heads of 64, GELU ×4), shallow 2 × 4 layers,
    deep 24 layers; rows of 4096 tokens with up to 8 images."""
    # the FAE of configs/fae.py's g14_256 size: DINOv2-g/14 at 224 px → 16×16 latents of 32
    dino = Dinov2Config(hidden_size=1536, num_layers=40, num_heads=24, mlp_ratio=4.0, patch_size=14, image_size=518,
                        use_swiglu_ffn=True, dtype="bfloat16")
    fae = FAEConfig(dinov2=dino, image_size=256, encoder_image_size=224, latent_dim=32, encoder_heads=4,
                    feature_decoder_width=1024, feature_decoder_layers=6, feature_decoder_heads=16,
                    pixel_decoder_width=1024, pixel_decoder_layers=24, pixel_decoder_heads=16,
                    dtype="bfloat16").validate()
    # the frozen VLM computes in bfloat16 and is rematerialised too: the adapter's gradient flows through it
    cfg = PretzelConfig(vlm=QwenTextConfig(dtype="bfloat16", remat="full"), latent=FAESpace(fae), seq_len=4096,
                        max_images=8, dtype="bfloat16", remat="full")
    return dataclasses.replace(cfg, **overrides).validate()


def config_to_dict(config: PretzelConfig) -> dict[str, Any]:
    """A JSON-ready dict: the VLM text config and the latent space (``kind`` + its fields) nested."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(PretzelConfig)}
    out["vlm"] = dataclasses.asdict(config.vlm)
    latent = config.latent
    if latent.kind == "fae":
        out["latent"] = dict(kind="fae", config=fae_config_to_dict(latent.config))
    else:
        out["latent"] = dict(kind="patches", height=latent.height, width=latent.width, channels=latent.channels,
                             patch=latent.patch)
    return out


def config_from_dict(data: dict[str, Any]) -> PretzelConfig:
    """Inverse of ``config_to_dict`` (lists back to tuples); unknown fields raise ValueError naming them."""
    data = dict(data)
    known = {f.name for f in dataclasses.fields(PretzelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"PretzelConfig has unknown fields {unknown}; expected a subset of {sorted(known)}")
    vlm = dict(data.pop("vlm"))
    vlm_known = {f.name for f in dataclasses.fields(QwenTextConfig)}
    if set(vlm) - vlm_known:
        raise ValueError(f"PretzelConfig.vlm has unknown fields {sorted(set(vlm) - vlm_known)}")
    vlm = {k: tuple(v) if isinstance(v, list) else v for k, v in vlm.items()}
    latent = dict(data.pop("latent"))
    kind = latent.pop("kind", None)
    if kind == "fae":
        space = FAESpace(fae_config_from_dict(latent["config"]))
    elif kind == "patches":
        space = PatchesSpace(**latent)
    else:
        raise ValueError(f"PretzelConfig.latent.kind={kind!r}: expected 'patches' or 'fae'")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return PretzelConfig(vlm=QwenTextConfig(**vlm), latent=space, **data).validate()


def preset(name: str, **overrides) -> PretzelConfig:
    """The preset called ``name`` ('tiny' | '7b') with field overrides."""
    if name == "tiny":
        return tiny(**overrides)
    if name == "7b":
        return sevenb(**overrides)
    raise ValueError(f"pretzel preset {name!r}: expected one of {PRESETS}")
