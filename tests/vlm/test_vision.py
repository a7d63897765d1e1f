"""The Qwen2.5-VL vision tower against transformers' PyTorch tower (tiny random configs, float32):
merged features for odd grids and several images per call, real processor inputs, the host-side
window / segment / RoPE layout, the weight mapping in both key layouts, and input errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from starflow2_jax.vlm import vision
from starflow2_jax.vlm.config import QwenVisionConfig
from starflow2_jax.vlm.vision_params import vision_params_from_torch, vision_params_to_torch

TINY = dict(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
CONFIGS = {
    "d2_w56_full1": dict(depth=2, window_size=56, fullatt_block_indexes=(1,)),
    "d3_w112_full02": dict(depth=3, window_size=112, fullatt_block_indexes=(0, 2)),
    "d3_w56_full02": dict(depth=3, window_size=56, fullatt_block_indexes=(0, 2)),
}
PATCH = 3 * 2 * 14 * 14


def our_config(name: str) -> QwenVisionConfig:
    return QwenVisionConfig(**TINY, **CONFIGS[name])


@functools.lru_cache(maxsize=None)
def torch_tower(name: str) -> Qwen2_5_VisionTransformerPretrainedModel:
    """A random tower whose weights (norm scales included) are O(1), so features are far from zero."""
    kw = {**TINY, **CONFIGS[name]}
    hf = Qwen2_5_VLVisionConfig(**{**kw, "fullatt_block_indexes": list(kw["fullatt_block_indexes"])})
    torch.manual_seed(sorted(CONFIGS).index(name))
    model = Qwen2_5_VisionTransformerPretrainedModel(hf).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            is_norm = "norm" in key or "ln_q" in key
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if is_norm else 0.2 * torch.randn_like(p))
    return model


def torch_features(model, pixels: np.ndarray, grids) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), grid_thw=torch.tensor(np.asarray(grids)))
    return out.pooler_output.numpy()


def random_pixels(grids, seed=0) -> np.ndarray:
    rows = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((rows, PATCH)).astype(np.float32)


@pytest.mark.parametrize("name, grids", [
    ("d2_w56_full1", [(1, 4, 6)]),
    ("d2_w56_full1", [(1, 6, 2), (1, 8, 8)]),
    ("d3_w112_full02", [(1, 8, 8)]),
    ("d3_w112_full02", [(1, 4, 6), (1, 6, 2)]),
    ("d3_w56_full02", [(1, 4, 6), (2, 4, 4), (1, 10, 6)]),  # a 2-frame grid: windows and frames per frame
])
def test_features_match_transformers(name, grids):
    config = our_config(name)
    model = torch_tower(name)
    params = vision_params_from_torch(model.state_dict(), config)
    pixels = random_pixels(grids)
    ref = torch_features(model, pixels, grids)
    out = np.asarray(vision.vision_features(config, params, pixels, np.array(grids)))
    assert out.shape == (sum(vision.num_merged_tokens(config, np.array(grids))), 48) == ref.shape
    assert np.std(ref) > 0.5  # a meaningful comparison, not two near-zero arrays
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_processor_images_match_transformers():
    from skimage import data
    processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 12)
    batch = processor([data.astronaut(), data.coffee()], return_tensors="np")
    pixels, grids = batch["pixel_values"], batch["image_grid_thw"]
    assert pixels.shape[1] == PATCH and len(grids) == 2
    config, model = our_config("d3_w56_full02"), torch_tower("d3_w56_full02")  # 2×2-unit windows, partial
    params = vision_params_from_torch(model.state_dict(), config)
    out = np.asarray(vision.vision_features(config, params, pixels, grids))
    np.testing.assert_allclose(out, torch_features(model, pixels, grids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layout_matches_transformers(name):
    """Window order, attention segments and RoPE angles equal transformers' own helpers."""
    config = our_config(name)
    grids = np.array([[1, 4, 6], [2, 8, 8], [1, 6, 2], [1, 16, 10]])
    layout = vision.vision_layout(config, grids)
    grid_t = torch.tensor(grids)
    window_index, cu_window = get_vision_window_index(grid_t, 2, config.window_size, 14)
    cu_frames = get_vision_cu_seqlens(grid_t)
    unit = np.asarray(window_index)
    np.testing.assert_array_equal(layout.patch_order, (unit[:, None] * 4 + np.arange(4)).reshape(-1))
    np.testing.assert_array_equal(layout.merged_order, np.argsort(unit))
    positions = np.arange(layout.num_patches)
    segment_of = lambda cu: np.searchsorted(np.asarray(cu), positions, "right") - 1  # noqa: E731
    np.testing.assert_array_equal(layout.window_segments, segment_of(cu_window))
    np.testing.assert_array_equal(layout.frame_segments, segment_of(cu_frames))
    rotary = torch_tower(name).rotary_pos_emb
    pos = get_vision_position_ids(grid_t, 2)[torch.from_numpy(layout.patch_order.astype(np.int64))]
    cos, sin = rotary(torch.zeros(1), pos)
    angles = np.concatenate([layout.angles, layout.angles], axis=1)
    np.testing.assert_allclose(np.cos(angles), cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.sin(angles), sin.numpy(), atol=1e-6)


def test_params_both_key_layouts_and_round_trip(tmp_path):
    from safetensors.numpy import load_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision_kw = {**TINY, **CONFIGS["d2_w56_full1"], "fullatt_block_indexes": [1], "out_hidden_size": 64}
    text = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                        "rope_theta": 1e6})
    full = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision_kw))
    config = QwenVisionConfig(**{**vision_kw, "fullatt_block_indexes": (1,)})
    memory = {k: v.numpy() for k, v in full.state_dict().items()}  # model.visual.* (transformers 5 in memory)
    full.save_pretrained(tmp_path)
    hub = load_file(str(tmp_path / "model.safetensors"))  # visual.* (checkpoint layout)
    assert any(k.startswith("model.visual.") for k in memory) and any(k.startswith("visual.") for k in hub)
    from_memory = vision_params_from_torch(memory, config)
    from_hub = vision_params_from_torch(hub, config, prefix="visual.")
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_memory, from_hub)
    back = vision_params_to_torch(from_hub, config)
    assert back.keys() == {k for k in hub if k.startswith("visual.")}
    for key, value in back.items():
        np.testing.assert_array_equal(value, hub[key], err_msg=key)
    # our init has the same tree, shapes, and logical axis names on every parameter
    boxed = jax.eval_shape(lambda: vision.init_vision_boxed(config, jax.random.key(0)))["params"]
    shapes = jax.tree_util.tree_map(lambda b: b.value.shape, boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert shapes == jax.tree_util.tree_map(np.shape, from_hub)
    assert boxed["patch_embed"]["kernel"].names == ("patch", "embed")
    assert boxed["layers"]["attn"]["query"]["kernel"].names == ("layers", "embed", "heads", "head_dim")
    assert boxed["layers"]["mlp"]["gate"]["kernel"].names == ("layers", "embed", "mlp")
    assert boxed["merger"]["mlp_out"]["kernel"].names == ("mlp", "embed")


@pytest.mark.slow
def test_init_params_bfloat16_and_remat_run():
    config = our_config("d2_w56_full1")
    params = vision.init_vision_params(config, jax.random.key(0))
    pixels, grids = random_pixels([(1, 4, 6)]), np.array([[1, 4, 6]])
    out = np.asarray(vision.vision_features(config, params, pixels, grids))
    assert out.shape == (6, 48) and np.isfinite(out).all()
    rematted = vision.vision_features(dataclasses.replace(config, remat="full"), params, pixels, grids)
    np.testing.assert_allclose(rematted, out, atol=1e-6)
    low = vision.vision_features(dataclasses.replace(config, dtype="bfloat16"), params, pixels, grids)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), out, atol=0.05 * np.abs(out).max())


def test_bad_inputs_give_clear_errors():
    config = our_config("d2_w56_full1")
    params = vision_params_from_torch(torch_tower("d2_w56_full1").state_dict(), config)
    grids = np.array([[1, 4, 6], [1, 6, 2]])
    with pytest.raises(ValueError, match=r"pixel_values has 35 rows but image_grid_thw \[\[1, 4, 6\], \[1, 6, 2\]\] "
                                         r"implies Σ t·h·w = 36"):
        vision.vision_features(config, params, random_pixels([(1, 5, 7)]), grids)
    with pytest.raises(ValueError, match=r"grid_thw\[1\] = \(1, 5, 4\): h and w must be multiples of "
                                         r"spatial_merge_size=2"):
        vision.vision_features(config, params, random_pixels([(1, 4, 6), (1, 5, 4)]), np.array([[1, 4, 6], [1, 5, 4]]))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_patches, .* = 1176\), got \(36, 588\)"):
        vision.vision_features(config, params, np.zeros((36, 588), np.float32), grids)
    with pytest.raises(ValueError, match=r"grid_thw must be integer \(t, h, w\) rows"):
        vision.vision_features(config, params, random_pixels([(1, 4, 6)]), np.array([1, 4, 6]))
    with pytest.raises(ValueError, match=r"window_size=20 is smaller than one merge unit"):
        vision.vision_layout(QwenVisionConfig(**{**TINY, **CONFIGS["d2_w56_full1"], "window_size": 20}), grids)
    deeper = QwenVisionConfig(**{**TINY, **CONFIGS["d3_w112_full02"]})
    with pytest.raises(ValueError, match=r"missing \['blocks.2.norm1.weight'"):
        vision_params_from_torch(torch_tower("d2_w56_full1").state_dict(), deeper)
    shallower = our_config("d2_w56_full1")
    with pytest.raises(ValueError, match=r"unexpected \['visual.blocks.2"):
        vision_params_from_torch({f"visual.{k}": v for k, v in torch_tower("d3_w56_full02").state_dict().items()},
                                 shallower)
    with pytest.raises(ValueError, match="no vision tower found"):
        vision_params_from_torch({"model.layers.0.mlp.up_proj.weight": np.zeros(3)}, config)


@pytest.mark.slow
def test_sharded_tower_equals_one_device():
    """Params sharded by the rules on a (2 data × 2 fsdp × 2 tensor) mesh, activation constraints on."""
    from starflow2_jax import parallel

    config = our_config("d3_w56_full02")
    rules = parallel.DEFAULT_RULES + (("patch", None),)  # the flattened patch width is never split
    params = vision_params_from_torch(torch_tower("d3_w56_full02").state_dict(), config)
    grids = np.array([[1, 4, 6], [1, 8, 8]])
    pixels = random_pixels([(1, 4, 6), (1, 8, 8)], seed=3)
    ref = np.asarray(vision.vision_features(config, params, pixels, grids))
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = parallel.variable_shardings(lambda key: vision.init_vision_boxed(config, key), mesh, rules)
    sharded = parallel.shard_variables(params, shardings["params"])
    assert sharded["layers"]["attn"]["query"]["kernel"].sharding.spec[2] == "tensor"  # heads split
    with parallel.activation_rules(mesh, rules):
        out = np.asarray(vision.vision_features(config, sharded, pixels, grids))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
