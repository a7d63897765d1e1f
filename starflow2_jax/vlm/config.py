"""Qwen2.5-VL configuration: frozen, hashable dataclasses (usable as static ``jit`` arguments).

``QwenVLConfig.from_hf_dict`` reads a Hugging Face ``config.json`` in either layout transformers
writes: the hub's flat one (text fields at the top level, ``rope_scaling`` with ``type='mrope'``,
as in ``Qwen/Qwen2.5-VL-7B-Instruct``) and the nested one of transformers 5 (``text_config``
with ``rope_parameters``). Defaults are transformers 5.24's. ``to_hf_dict`` writes the nested
layout, which ``transformers.Qwen2_5_VLConfig(**d)`` and ``from_pretrained`` read back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from starflow2_jax.nn.remat import REMAT_POLICIES

MODEL_TYPE = "qwen2_5_vl"
ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")


@dataclasses.dataclass(frozen=True)
class QwenTextConfig:
    """The Qwen2.5-VL text decoder (``Qwen2_5_VLTextModel`` + LM head)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (16, 24, 24)  # rotated pairs per (temporal, height, width) row
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_ids: tuple[int, ...] = (151645,)
    pad_token_id: int | None = None
    max_position_embeddings: int = 128000
    dtype: str = "float32"  # compute dtype; parameters are float32
    remat: str = "none"  # one of REMAT_POLICIES

    @property
    def head_dim(self) -> int:
        """hidden_size // num_heads: transformers' attention derives it so (a config head_dim is ignored)."""
        return self.hidden_size // self.num_heads

    def validate(self) -> "QwenTextConfig":
        """Returns self; raises ValueError naming the first inconsistent field."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (hidden_size / num_heads) must be even for RoPE")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section={list(self.mrope_section)} sums to {sum(self.mrope_section)}; "
                             f"expected head_dim / 2 = {self.head_dim // 2}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {tuple(REMAT_POLICIES)}")
        return self


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """The Qwen2.5-VL vision tower (``Qwen2_5_VisionTransformerPretrainedModel``)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    in_channels: int = 3
    tokens_per_second: int = 4  # temporal position spacing of videos
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6  # hard-coded in transformers' vision blocks and merger
    dtype: str = "float32"
    remat: str = "none"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """Text decoder + vision tower of one Qwen2.5-VL checkpoint."""

    text: QwenTextConfig = QwenTextConfig()
    vision: QwenVisionConfig = QwenVisionConfig()

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], *, dtype: str = "float32", remat: str = "none") -> "QwenVLConfig":
        """Parses a Hugging Face Qwen2.5-VL ``config.json`` dict (flat hub or nested layout).

        Raises ValueError when ``model_type`` / ``architectures`` name another model, and
        NotImplementedError for features this implementation lacks (sliding-window attention,
        RoPE types other than the default/mrope one, activations other than SiLU).
        """
        check_architecture(data)
        top = dict(data)
        nested = top.get("text_config")
        text = dict(nested) if isinstance(nested, Mapping) else top
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or top.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise NotImplementedError(f"text RoPE type {rope_type!r}: only the default multimodal RoPE is implemented")
        if text.get("use_sliding_window", False):
            raise NotImplementedError("use_sliding_window=true: sliding-window attention is not implemented "
                                      "(transformers only supports it with flash attention)")
        for name, cfg in (("text", text), ("vision", top.get("vision_config") or {})):
            act = cfg.get("hidden_act", "silu")
            if act != "silu":
                raise NotImplementedError(f"{name} hidden_act={act!r}: only 'silu' is implemented")
        eos = text.get("eos_token_id", top.get("eos_token_id", 151645))
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        num_heads = int(text.get("num_attention_heads", 64))
        hidden = int(text.get("hidden_size", 8192))
        head_dim = text.get("head_dim")
        if head_dim is not None and num_heads and int(head_dim) != hidden // num_heads:
            raise NotImplementedError(f"head_dim={head_dim} differs from hidden_size / num_attention_heads = "
                                      f"{hidden // num_heads}; transformers' Qwen2.5-VL attention ignores head_dim")
        kv_heads = text.get("num_key_value_heads")
        tie = bool(top.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        text_config = QwenTextConfig(
            vocab_size=int(text.get("vocab_size", 152064)),
            hidden_size=hidden,
            intermediate_size=int(text.get("intermediate_size", 29568)),
            num_layers=int(text.get("num_hidden_layers", 80)),
            num_heads=num_heads,
            num_kv_heads=int(num_heads if kv_heads is None else kv_heads),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", top.get("rope_theta", 1e6)))),
            mrope_section=tuple(int(s) for s in rope.get("mrope_section", (16, 24, 24))),
            tie_word_embeddings=tie,
            image_token_id=int(top.get("image_token_id", 151655)),
            video_token_id=int(top.get("video_token_id", 151656)),
            vision_start_token_id=int(top.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(top.get("vision_end_token_id", 151653)),
            bos_token_id=_opt_int(text.get("bos_token_id", top.get("bos_token_id", 151643))),
            eos_token_ids=eos,
            pad_token_id=_opt_int(text.get("pad_token_id", top.get("pad_token_id"))),
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            dtype=dtype,
            remat=remat,
        ).validate()
        return cls(text=text_config, vision=vision_config_from_hf(top.get("vision_config") or {}, dtype=dtype,
                                                                    remat=remat))

    @classmethod
    def from_hf_config(cls, hf_config, *, dtype: str = "float32", remat: str = "none") -> "QwenVLConfig":
        """Like ``from_hf_dict`` for a ``transformers.Qwen2_5_VLConfig`` object."""
        data = hf_config.to_dict()
        if getattr(hf_config, "architectures", None):
            data["architectures"] = list(hf_config.architectures)
        return cls.from_hf_dict(data, dtype=dtype, remat=remat)

    def to_hf_dict(self) -> dict:
        """A transformers-5 ``config.json`` dict (nested layout) for ``Qwen2_5_VLForConditionalGeneration``."""
        t, v = self.text, self.vision
        text = dict(
            model_type="qwen2_5_vl_text", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, hidden_act="silu",
            rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
            rope_parameters=dict(rope_type="default", mrope_section=list(t.mrope_section), rope_theta=t.rope_theta),
            use_sliding_window=False, bos_token_id=t.bos_token_id,
            eos_token_id=(t.eos_token_ids[0] if len(t.eos_token_ids) == 1 else list(t.eos_token_ids) or None),
            pad_token_id=t.pad_token_id,
        )
        vision = dict(
            model_type="qwen2_5_vl_vision", depth=v.depth, hidden_size=v.hidden_size, hidden_act="silu",
            intermediate_size=v.intermediate_size, num_heads=v.num_heads, in_channels=v.in_channels,
            patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
            temporal_patch_size=v.temporal_patch_size, tokens_per_second=v.tokens_per_second,
            window_size=v.window_size, out_hidden_size=v.out_hidden_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            rope_parameters=dict(rope_type="axial", rope_theta=v.rope_theta),
        )
        return dict(
            architectures=[ARCHITECTURES[0]], model_type=MODEL_TYPE, text_config=text, vision_config=vision,
            image_token_id=t.image_token_id, video_token_id=t.video_token_id,
            vision_start_token_id=t.vision_start_token_id, vision_end_token_id=t.vision_end_token_id,
            tie_word_embeddings=t.tie_word_embeddings, dtype="float32",
        )


def check_architecture(data: Mapping[str, Any]) -> None:
    """Raises ValueError unless ``data`` (a config.json dict) describes a Qwen2.5-VL model."""
    model_type = data.get("model_type")
    archs = list(data.get("architectures") or [])
    if model_type != MODEL_TYPE:
        raise ValueError(f"config model_type={model_type!r} (architectures={archs}): expected {MODEL_TYPE!r}, "
                         f"a Qwen2.5-VL checkpoint ({ARCHITECTURES[0]})")
    if archs and not any(a in ARCHITECTURES for a in archs):
        raise ValueError(f"config architectures={archs}: expected one of {list(ARCHITECTURES)}")


def vision_config_from_hf(data: Mapping[str, Any], *, dtype: str = "float32", remat: str = "none") -> QwenVisionConfig:
    """A ``QwenVisionConfig`` from the ``vision_config`` dict of a Qwen2.5-VL config.json (hub checkpoints
    spell ``in_channels`` as ``in_chans``; missing fields take transformers' defaults)."""
    d = dict(data)
    rope = d.get("rope_parameters") or {}
    patch = d.get("patch_size", 14)
    temporal = d.get("temporal_patch_size", 2)
    for name, value in (("patch_size", patch), ("temporal_patch_size", temporal)):
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise NotImplementedError(f"vision {name}={list(value)}: only square patches are implemented")
    return QwenVisionConfig(
        depth=int(d.get("depth", d.get("num_hidden_layers", 32))),
        hidden_size=int(d.get("hidden_size", 3584)),
        intermediate_size=int(d.get("intermediate_size", 3420)),
        num_heads=int(d.get("num_heads", d.get("num_attention_heads", 16))),
        patch_size=int(patch[0] if isinstance(patch, (list, tuple)) else patch),
        temporal_patch_size=int(temporal[0] if isinstance(temporal, (list, tuple)) else temporal),
        spatial_merge_size=int(d.get("spatial_merge_size", 2)),
        window_size=int(d.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in d.get("fullatt_block_indexes", (7, 15, 23, 31))),
        out_hidden_size=int(d.get("out_hidden_size", 3584)),
        in_channels=int(d.get("in_channels", d.get("in_chans", 3))),
        tokens_per_second=int(d.get("tokens_per_second", 4)),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        dtype=dtype,
        remat=remat,
    )


def _opt_int(value) -> int | None:
    return None if value is None else int(value)
