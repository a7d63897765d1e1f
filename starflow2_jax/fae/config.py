"""``FAEConfig``: the frozen DINOv2 encoder and the three learned parts of the feature auto-encoder.

    image (S×S×3, S = image_size) ──resize to encoder_image_size──▶ DINOv2 ──▶ F (B, N, C)   frozen
    F ──encoder: F + Attn(Norm(F)) (wide heads) → linear──▶ (mean, logvar) (B, N, 2·D)
    x = mean (or a sample) (B, N, D)                        the latent, N = (encoder_image_size / p)²
    x ──feature decoder (RoPE, RMSNorm, SwiGLU)──▶ F̂ (B, N, C)
    F̂ ──pixel decoder (ViT: LayerNorm, GELU MLP, learned positions, patch un-embedding)──▶ image (S×S×3)

The pixel decoder's output patch is ``image_size / grid`` pixels, so the output size need not be a
multiple of DINOv2's patch (the paper: 224 px into DINOv2-g/14 → 16×16 → 256 px out, 16-px patches).

**[choice]** (SPEC §3 is silent): the encoder's attention uses ``encoder_heads`` heads of width
C / encoder_heads (4 for the paper preset: 384-wide heads); the decoders' widths below; β = 1e-4;
σ (stage Ia) = 0.4 × the per-example feature RMS.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from starflow2_jax.fae.dinov2 import DTYPES, Dinov2Config
from starflow2_jax.nn.remat import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class FAEConfig:
    """Fields (widths are model widths; ``*_heads`` divide them):

    dinov2: the frozen encoder's ``Dinov2Config``; image_size: the pixel size in and out;
    encoder_image_size: the size images are resized to before DINOv2 (0: image_size);
    latent_dim: D; encoder_heads: heads of the one encoder attention layer;
    feature_decoder_{width,layers,heads,mlp_ratio}: the feature decoder (RoPE 2D, RMSNorm, SwiGLU);
    pixel_decoder_{width,layers,heads,mlp_ratio}: the ViT pixel decoder (LayerNorm, GELU);
    rope_theta: feature decoder RoPE base; dtype: compute dtype; remat: policy of every scanned stack.
    """

    dinov2: Dinov2Config
    image_size: int = 32
    encoder_image_size: int = 0
    latent_dim: int = 32
    encoder_heads: int = 4
    feature_decoder_width: int = 64
    feature_decoder_layers: int = 6
    feature_decoder_heads: int = 4
    feature_decoder_mlp_ratio: float = 8 / 3
    pixel_decoder_width: int = 64
    pixel_decoder_layers: int = 2
    pixel_decoder_heads: int = 4
    pixel_decoder_mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    dtype: str = "float32"
    remat: str = "none"

    # ---- derived ---------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        """The DINOv2 input size."""
        return self.encoder_image_size or self.image_size

    @property
    def grid(self) -> int:
        """Latent grid side (tokens per row)."""
        return self.input_size // self.dinov2.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def feature_dim(self) -> int:
        """C, the DINOv2 feature width the decoders reconstruct."""
        return self.dinov2.hidden_size

    @property
    def output_patch(self) -> int:
        """Pixels per latent token side at the output (image_size / grid)."""
        return self.image_size // self.grid

    def validate(self) -> "FAEConfig":
        """Returns self; raises ValueError naming the first inconsistent field."""
        self.dinov2.validate()
        for name in ("image_size", "latent_dim", "encoder_heads", "feature_decoder_width", "feature_decoder_layers",
                     "feature_decoder_heads", "pixel_decoder_width", "pixel_decoder_layers", "pixel_decoder_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FAEConfig.{name}={value!r}: expected a positive int")
        if self.encoder_image_size < 0:
            raise ValueError(f"FAEConfig.encoder_image_size={self.encoder_image_size}: expected 0 or a size")
        p = self.dinov2.patch_size
        if self.input_size % p:
            field = "encoder_image_size" if self.encoder_image_size else "image_size"
            raise ValueError(f"FAEConfig.{field}={self.input_size} (the DINOv2 input size) is not divisible by "
                             f"its patch size {p}")
        if self.image_size % self.grid:
            raise ValueError(f"FAEConfig.image_size={self.image_size} is not divisible by the latent grid "
                             f"{self.grid} (= {self.input_size} / patch {p})")
        if self.feature_dim % self.encoder_heads:
            raise ValueError(f"FAEConfig.encoder_heads={self.encoder_heads} does not divide the feature width "
                             f"{self.feature_dim}")
        for part in ("feature_decoder", "pixel_decoder"):
            width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if width % heads:
                raise ValueError(f"FAEConfig.{part}_heads={heads} does not divide {part}_width={width}")
        if (self.feature_decoder_width // self.feature_decoder_heads) % 4:
            raise ValueError(f"FAEConfig: the feature decoder's head width "
                             f"{self.feature_decoder_width // self.feature_decoder_heads} must be divisible by 4 "
                             f"(2D RoPE)")
        if self.dtype not in DTYPES:
            raise ValueError(f"FAEConfig.dtype={self.dtype!r}: expected one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"FAEConfig.remat={self.remat!r}: expected one of {tuple(REMAT_POLICIES)}")
        return self


def fae_config_to_dict(config: FAEConfig) -> dict[str, Any]:
    """A JSON-ready dict (the DINOv2 config nested under 'dinov2')."""
    out = dataclasses.asdict(config)
    out["dinov2"] = dataclasses.asdict(config.dinov2)
    return out


def fae_config_from_dict(data: dict[str, Any]) -> FAEConfig:
    """Inverse of ``fae_config_to_dict``; unknown keys raise ValueError naming them."""
    data = dict(data)
    dino = dict(data.pop("dinov2"))
    known = {f.name for f in dataclasses.fields(FAEConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"FAE config has unknown fields {unknown}; expected a subset of {sorted(known)}")
    dino = {k: tuple(v) if isinstance(v, list) else v for k, v in dino.items()}
    return FAEConfig(dinov2=Dinov2Config(**dino), **data).validate()
