"""Tiny random transformers Qwen2.5-VL models (the oracle) and our converted text params.

Every parameter is redrawn (seeded) at a scale where attention is far from uniform and RoPE
matters, so a wrong rotation, section split or head layout shows in the logits.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from starflow2_jax import vlm

IMAGE, VIDEO, START, END = 10, 11, 12, 13  # special token ids inside the tiny vocabulary
VOCAB = 1000
FIRST_WORD = 20  # ordinary text ids are drawn from [FIRST_WORD, VOCAB)

# name → text config overrides: GQA ratios 1, 2, 4; tied and untied heads; head_dim 16 and 32.
TEXT_CONFIGS = {
    "gqa2_untied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3],
                        num_hidden_layers=2, tie=False),
    "mha_tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, mrope_section=[2, 3, 3],
                     num_hidden_layers=2, tie=True),
    "gqa4_untied_hd32": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1,
                             mrope_section=[4, 6, 6], num_hidden_layers=3, tie=False),
}

VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])


def hf_config(name: str) -> Qwen2_5_VLConfig:
    spec = dict(TEXT_CONFIGS[name])
    tie = spec.pop("tie")
    section = spec.pop("mrope_section")
    text = dict(vocab_size=VOCAB, intermediate_size=2 * spec["hidden_size"], rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
                bos_token_id=1, eos_token_id=2, **spec)
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(VISION, out_hidden_size=spec["hidden_size"]),
                            image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
                            vision_end_token_id=END, tie_word_embeddings=tie)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraws every parameter: norms 1 + 0.1·N, biases 0.3·N, weights N / sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))


@functools.lru_cache(maxsize=None)
def build(name: str, seed: int | None = None):
    """(torch model in eval mode, our QwenVLConfig, our params {'text': ...}) for ``TEXT_CONFIGS[name]``,
    built once per process (callers must not modify them). The seed defaults to the config's index."""
    seed = sorted(TEXT_CONFIGS).index(name) if seed is None else seed
    torch.manual_seed(seed)
    hf = hf_config(name)
    model = Qwen2_5_VLForConditionalGeneration(hf).eval()
    randomize(model, seed)
    config = vlm.QwenVLConfig.from_hf_config(hf)
    params = {"text": vlm.text_params_from_torch(model.state_dict(), config.text)}
    return model, config, params


def words(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(FIRST_WORD, VOCAB, n).tolist()


def image_run(grid, merge: int = 2) -> list[int]:
    """<|vision_start|>, one <|image_pad|> per merged token of ``grid`` (t, h, w), <|vision_end|>."""
    t, h, w = grid
    return [START] + [IMAGE] * (t * (h // merge) * (w // merge)) + [END]


def pixels(grids, seed: int = 0) -> np.ndarray:
    """Random flattened patches (Σ t·h·w, 3·2·14·14) as the image processor lays them out."""
    rows = int(sum(t * h * w for t, h, w in grids))
    return np.random.default_rng(seed).standard_normal((rows, 3 * 2 * 14 * 14)).astype(np.float32)


def hf_image_features(model, pixel_values: np.ndarray, grids) -> np.ndarray:
    """transformers' merged vision features (num_merged_tokens, text hidden) for the images."""
    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(pixel_values.copy()),
                                             torch.as_tensor(np.asarray(grids)))
    return torch.cat(out.pooler_output).numpy()


def hf_logits(model, input_ids, **kwargs) -> np.ndarray:
    """transformers' logits (B, T, vocab); numpy kwargs become tensors (mm_token_type_ids always given)."""
    tensors = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in kwargs.items() if v is not None}
    ids = np.asarray(input_ids)
    tensors.setdefault("mm_token_type_ids", torch.from_numpy((ids == IMAGE).astype(np.int64)))
    model.model.rope_deltas = None  # transformers caches these between calls
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids.copy()), **tensors).logits.numpy()
