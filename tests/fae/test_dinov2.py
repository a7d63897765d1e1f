"""DINOv2 in Flax against transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``.

Oracle: tiny random transformers models (dinov2_hf_tiny) written with ``save_pretrained`` and read
back with ``load_hf_dinov2``; the torch models run in float32 eval mode. Sizes: the native 16×16,
a larger non-square 24×32, a smaller 8×12 and 8×32 (as many patches as the native grid but not
square: plain DINOv2 must resize there too).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from safetensors.torch import load_file, save_file

from dinov2_hf_tiny import CONFIGS, build, hf_features, hf_hidden, images, model_class
from starflow2_jax import convert, fae, parallel

ATOL = 1e-4
SIZES = [(16, 16), (24, 32), (8, 12), (8, 32)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name → save_pretrained directory of ``build(name)``."""
    out = {}
    for name in CONFIGS:
        out[name] = tmp_path_factory.mktemp(name)
        build(name).save_pretrained(out[name])
    return out


@functools.lru_cache(maxsize=None)
def _loaded(directory):
    return convert.load_hf_dinov2(directory)


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---- position-embedding resize ------------------------------------------------------------------
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("n", [1, 4, 5, 16])
def test_resize_matrix_matches_torch_interpolate(n, antialias):
    """Separable weights == torch bicubic interpolate (float64, the (1, D, n, n) permuted layout
    transformers passes), growing, shrinking, mixed and to one pixel."""
    pos = np.random.default_rng(n).standard_normal((1, n, n, 3))
    x = torch.from_numpy(pos).permute(0, 3, 1, 2)
    for rows, cols in [(n, n), (3, 7), (2 * n + 1, max(n // 2, 1)), (1, 1), (6, 1)]:
        want = torch.nn.functional.interpolate(x, size=(rows, cols), mode="bicubic", align_corners=False,
                                               antialias=antialias).permute(0, 2, 3, 1).numpy()[0]
        got = np.einsum("hi,wj,ijd->hwd", fae.resize_matrix(n, rows, antialias),
                        fae.resize_matrix(n, cols, antialias), pos[0])
        assert _max_err(got, want) < 1e-10, (rows, cols)


# ---- features vs transformers -------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_features_match_transformers(name, size, checkpoints):
    config, params = _loaded(checkpoints[name])
    assert config == CONFIGS[name]
    x = images((2, *size, 3), seed=sum(size))
    got = fae.dinov2_features(config, params, x)
    want = hf_features(build(name), config, x)
    assert got.shape == want.shape == (2, size[0] * size[1] // 16, 32)
    err = _max_err(got, want)
    print(f"{name} {size}: max abs error {err:.2e}")
    assert err <= ATOL
    assert np.std(want) > 0.5  # not a degenerate comparison


def test_hidden_sequence_keeps_cls_and_registers(checkpoints):
    config, params = _loaded(checkpoints["registers"])
    x = images((2, 24, 32, 3), seed=3)
    got = fae.dinov2_hidden(config, params, x)
    want = hf_hidden(build("registers"), config, x)
    assert got.shape == want.shape == (2, 1 + 4 + 48, 32)
    assert _max_err(got, want) <= ATOL


def test_classification_checkpoint_with_prefix_and_head(tmp_path):
    """``Dinov2ForImageClassification`` checkpoints prefix the encoder ('dinov2.') and add a head."""
    model = build("plain", head=True)
    model.save_pretrained(tmp_path)
    assert any(k.startswith("dinov2.") for k in load_file(str(tmp_path / "model.safetensors")))
    config, params = convert.load_hf_dinov2(tmp_path)
    x = images((2, 24, 32, 3), seed=5)
    assert _max_err(fae.dinov2_features(config, params, x), hf_features(model, config, x)) <= ATOL


def test_config_round_trip():
    for name, config in CONFIGS.items():
        hf = build(name).config.to_dict()
        assert fae.Dinov2Config.from_hf(hf) == config
        assert fae.Dinov2Config.from_hf(json.loads(json.dumps(config.to_hf()))) == config
    assert CONFIGS["swiglu"].mlp_hidden == 88  # (int(128·2/3) + 7) // 8 · 8, as Dinov2SwiGLUFFN
    assert CONFIGS["plain"].mlp_hidden == 128


# ---- export -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_round_trip(name, checkpoints, tmp_path):
    """Export → transformers from_pretrained (no missing / unexpected keys) → the same tensors and
    features; and back through load_hf_dinov2 → the same params."""
    config, params = _loaded(checkpoints[name])
    out = convert.export_hf_dinov2(config, params, tmp_path / "out")
    reloaded, info = model_class(config).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = build(name).state_dict()
    for key, value in reloaded.state_dict().items():
        if key != "embeddings.mask_token":
            torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)
    x = images((2, 24, 32, 3), seed=7)
    assert _max_err(hf_features(reloaded.eval(), config, x), fae.dinov2_features(config, params, x)) <= ATOL
    config2, params2 = convert.load_hf_dinov2(out)
    assert config2 == config
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)))


@pytest.mark.parametrize("name", ["registers", "swiglu"])
def test_export_of_fresh_params_matches_transformers(name, tmp_path):
    """Independent of the importer: our random init (perturbed) → export → transformers' features."""
    config = CONFIGS[name]
    params = fae.init_dinov2(config, jax.random.key(1))
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda p: (p + 0.3 * rng.standard_normal(p.shape)).astype(np.float32), params)
    out = convert.export_hf_dinov2(config, params, tmp_path / "out")
    model = model_class(config).from_pretrained(out).eval()
    x = images((2, 8, 12, 3), seed=8)
    assert _max_err(hf_features(model, config, x), fae.dinov2_features(config, params, x)) <= ATOL
    with pytest.raises(FileExistsError, match="not an empty directory"):
        convert.export_hf_dinov2(config, params, out)


# ---- bad inputs ---------------------------------------------------------------------------------
def test_image_errors_name_the_bad_value():
    config = CONFIGS["plain"]
    params = fae.init_dinov2(config, jax.random.key(0))
    with pytest.raises(ValueError, match=r"expected RGB images with 3 channels, got 1 \(grey\?\)"):
        fae.dinov2_features(config, params, np.zeros((1, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match=r"rank 3"):
        fae.dinov2_features(config, params, np.zeros((16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"image 18×16: height 18 is not a positive multiple of patch_size=4"):
        fae.dinov2_features(config, params, np.zeros((1, 18, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"width 30 is not a positive multiple of patch_size=4"):
        fae.dinov2_features(config, params, np.zeros((1, 16, 30, 3), np.float32))


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=30), "hidden_size=30 is not divisible by num_heads=4"),
    (dict(image_size=18), "image_size=18 is not a multiple of patch_size=4"),
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(remat="some"), "remat='some'"),
    (dict(image_mean=(0.5,)), "image_mean=(0.5,) has 1 entries; expected num_channels=3"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(CONFIGS["plain"], **fields).validate()


def test_from_hf_rejects_other_models_and_options():
    hf = CONFIGS["plain"].to_hf()
    with pytest.raises(ValueError, match=r"model_type='vit': expected one of \('dinov2', 'dinov2_with_registers'\)"):
        fae.Dinov2Config.from_hf(dict(hf, model_type="vit"))
    with pytest.raises(ValueError, match=r"hidden_act='gelu_new'"):
        fae.Dinov2Config.from_hf(dict(hf, hidden_act="gelu_new"))
    with pytest.raises(ValueError, match=r"image_size=\[16, 20\]: only square"):
        fae.Dinov2Config.from_hf(dict(hf, image_size=[16, 20]))


def test_wrong_model_type_in_checkpoint(checkpoints, tmp_path):
    broken = shutil.copytree(checkpoints["plain"], tmp_path / "broken")
    hf = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(hf, model_type="vit")))
    with pytest.raises(ValueError, match=r"config.json: model_type='vit': expected one of"):
        convert.load_hf_dinov2(broken)


@pytest.mark.parametrize("name, expect, parts", [
    ("registers", CONFIGS["plain"], ["variant: checkpoint 'dinov2_with_registers', expected 'dinov2'",
                                     "num_register_tokens: checkpoint 4, expected 0"]),
    ("plain", CONFIGS["registers"], ["variant: checkpoint 'dinov2', expected 'dinov2_with_registers'",
                                     "num_register_tokens: checkpoint 0, expected 4"]),
    ("plain", dict(hidden_size=64, patch_size=14), ["hidden_size: checkpoint 32, expected 64",
                                                    "patch_size: checkpoint 4, expected 14"]),
    ("swiglu", dict(use_swiglu_ffn=False), ["use_swiglu_ffn: checkpoint True, expected False"]),
])
def test_expect_mismatch_names_each_field(name, expect, parts, checkpoints):
    with pytest.raises(ValueError) as err:
        convert.load_hf_dinov2(checkpoints[name], expect=expect)
    assert "does not match the expected encoder" in str(err.value)
    for part in parts:
        assert part in str(err.value)


def test_expect_accepts_a_match_and_rejects_unknown_fields(checkpoints):
    config, _ = convert.load_hf_dinov2(checkpoints["registers"], expect=CONFIGS["registers"])
    assert config == CONFIGS["registers"]
    convert.load_hf_dinov2(checkpoints["plain"], expect=dict(variant="dinov2", hidden_size=32))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['dtype'\]"):
        convert.load_hf_dinov2(checkpoints["plain"], expect=dict(dtype="float32"))


def test_missing_unexpected_and_misshapen_keys_are_listed_together(checkpoints, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(checkpoints["registers"] / "config.json", broken)
    state = load_file(str(checkpoints["registers"] / "model.safetensors"))
    del state["encoder.layer.1.mlp.fc2.bias"], state["embeddings.register_tokens"]
    state["encoder.layer.2.norm1.weight"] = torch.ones(32)  # a layer the config does not have
    state["layernorm.weight"] = torch.ones(33)
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        convert.load_hf_dinov2(broken)
    message = str(err.value)
    for part in ("2 missing", "encoder.layer.1.mlp.fc2.bias", "embeddings.register_tokens",
                 "1 unexpected: ['encoder.layer.2.norm1.weight']",
                 "1 with the wrong shape: ['layernorm.weight: (33,) != (32,)']"):
        assert part in message


# ---- sharded ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sharded_features_equal_one_device(checkpoints):
    """(2 data × 2 fsdp × 2 tensor): params placed by FAE_RULES while loading, batch sharded; the
    features equal the single-device ones."""
    config, expected = _loaded(checkpoints["registers"])
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, params = convert.load_hf_dinov2(checkpoints["registers"], mesh=mesh)
    assert params["layers"]["mlp"]["wi"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert params["layers"]["attn"]["query"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert params["patch_embed"]["kernel"].sharding.spec == P(None, "fsdp")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)))
    x = images((4, 24, 32, 3), seed=9)
    want = np.asarray(fae.dinov2_features(config, expected, x))
    with parallel.activation_rules(mesh, parallel.FAE_RULES):
        got = fae.dinov2_features(config, params, parallel.shard_batch(x, mesh))
    assert got.sharding.mesh == mesh
    err = _max_err(got, want)
    print(f"sharded vs one device: max abs error {err:.2e}")
    assert err <= 1e-5

    fresh = parallel.init_sharded(functools.partial(fae.init_dinov2_boxed, config), jax.random.key(0), mesh,
                                  parallel.FAE_RULES)
    assert fresh["layers"]["mlp"]["wi"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
