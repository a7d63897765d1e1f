"""Hugging Face checkpoint import/export (convert.hf_qwen) against transformers' PyTorch Qwen2.5-VL.

Oracle: tiny random ``Qwen2_5_VLForConditionalGeneration`` models (qwen_hf_tiny) written with
``save_pretrained``; everything goes through files. Imports are checked by logits (text-only and one
image through our vision tower) and exports by transformers loading them back.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText

from qwen_hf_tiny import IMAGE, build, hf_logits, image_run, pixels, words
from starflow2_jax import convert, parallel, vlm
from starflow2_jax.convert import hf_qwen

ATOL = 1e-4


def save(model, directory, **kwargs):
    model.save_pretrained(str(directory), **kwargs)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name → (torch model, directory): a single-file untied, a sharded (with index) untied, a tied one."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, config_name, kwargs in (("single", "gqa2_untied", {}),
                                      ("sharded", "gqa4_untied_hd32", dict(max_shard_size="200KB")),
                                      ("tied", "mha_tied", {})):
        model = build(config_name)[0]
        out[name] = (model, save(model, root / name, **kwargs))
    assert (out["sharded"][1] / hf_qwen.INDEX_FILE).is_file()
    assert len(list(out["sharded"][1].glob("*.safetensors"))) > 2
    return out


def image_prompt(seed=0):
    rng = np.random.default_rng(seed)
    grids = np.array([[1, 6, 4]])
    ids = np.array([words(rng, 3) + image_run(grids[0]) + words(rng, 4)])
    return ids, grids, pixels(grids, seed=seed)


def assert_matches_torch(model, config, params):
    ids = np.random.default_rng(1).integers(20, 1000, (2, 11))
    types = np.zeros_like(ids)
    np.testing.assert_allclose(vlm.forward(config, params, ids, mm_token_type_ids=types),
                               hf_logits(model, ids, mm_token_type_ids=types), atol=ATOL, rtol=0)
    ids, grids, pv = image_prompt()
    types = (ids == IMAGE).astype(np.int64)
    got = vlm.forward(config, params, ids, pixel_values=pv, image_grid_thw=grids, mm_token_type_ids=types)
    ref = hf_logits(model, ids, pixel_values=pv, image_grid_thw=grids, mm_token_type_ids=types)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
            and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))


@pytest.mark.parametrize("name", ["single", "sharded", "tied"])
def test_load_matches_torch(checkpoints, name):
    model, directory = checkpoints[name]
    config, params = convert.load_hf_qwen2_5_vl(directory)
    assert config == vlm.QwenVLConfig.from_hf_config(model.config)
    assert sorted(params) == ["text", "vision"]
    assert ("lm_head" in params["text"]) == (name != "tied")
    assert all(isinstance(x, jax.Array) and x.dtype == np.float32 for x in jax.tree_util.tree_leaves(params))
    assert_matches_torch(model, config, params)


def test_in_memory_layout_and_shards_without_index(checkpoints, tmp_path):
    model, directory = checkpoints["single"]
    _, expected = convert.load_hf_qwen2_5_vl(directory)
    memory = tmp_path / "memory"  # transformers 5's in-memory keys (model.language_model.…, model.visual.…)
    memory.mkdir()
    shutil.copy(directory / "config.json", memory)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    assert any(k.startswith("model.visual.") for k in state)
    keys = sorted(state)
    save_file({k: state[k] for k in keys[::2]}, str(memory / "part-a.safetensors"), metadata={"format": "pt"})
    save_file({k: state[k] for k in keys[1::2]}, str(memory / "part-b.safetensors"), metadata={"format": "pt"})
    assert leaves_equal(convert.load_hf_qwen2_5_vl(memory)[1], expected)


def test_bfloat16_checkpoint(checkpoints, tmp_path):
    model, _ = checkpoints["single"]
    directory = save(copy.deepcopy(model).to(torch.bfloat16), tmp_path / "bf16")  # the cached model stays f32
    config, params = convert.load_hf_qwen2_5_vl(directory, "bfloat16")
    assert config.text.dtype == config.vision.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {np.dtype(jax.numpy.bfloat16)}
    _, wide = convert.load_hf_qwen2_5_vl(directory, "float32")
    widened = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    assert leaves_equal(widened, wide)  # bf16 → f32 is exact
    ids = np.random.default_rng(2).integers(20, 1000, (1, 9))
    ref = hf_logits(model, ids)
    got = np.asarray(vlm.forward(config, params, ids))
    assert np.isfinite(got).all() and np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("name, shard_bytes", [("single", 10 ** 9), ("tied", 100_000), ("sharded", 300_000)])
def test_export_round_trip_through_transformers(checkpoints, tmp_path, name, shard_bytes):
    model, directory = checkpoints[name]
    config, params = convert.load_hf_qwen2_5_vl(directory)
    out = convert.export_hf_qwen2_5_vl(config, params, tmp_path / "export", max_shard_bytes=shard_bytes)
    assert (out / hf_qwen.INDEX_FILE).is_file() == (shard_bytes < 10 ** 9)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    loaded, info = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
    assert type(loaded).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original, exported = model.state_dict(), loaded.eval().state_dict()
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        assert torch.equal(value, exported[key]), key
    ids, grids, pv = image_prompt(seed=3)
    types = (ids == IMAGE).astype(np.int64)
    kwargs = dict(pixel_values=pv, image_grid_thw=grids, mm_token_type_ids=types)
    np.testing.assert_array_equal(hf_logits(loaded, ids, **kwargs), hf_logits(model, ids, **kwargs))
    # and our loader reads the export back bit for bit
    assert leaves_equal(convert.load_hf_qwen2_5_vl(out)[1], params)


def test_export_copies_tokenizer_files_and_keeps_bfloat16(checkpoints, tmp_path):
    _, directory = checkpoints["tied"]
    config, params = convert.load_hf_qwen2_5_vl(directory, "bfloat16")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "tok" / "unrelated.txt").write_text("x")
    out = convert.export_hf_qwen2_5_vl(config, params, tmp_path / "out", tokenizer_dir=tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert leaves_equal(convert.load_hf_qwen2_5_vl(out, "bfloat16")[1], params)


def test_export_is_atomic(checkpoints, tmp_path, monkeypatch):
    _, directory = checkpoints["single"]
    config, params = convert.load_hf_qwen2_5_vl(directory)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="full exists and is not an empty directory"):
        convert.export_hf_qwen2_5_vl(config, params, tmp_path / "full")
    calls, original = [], hf_qwen.to_torch

    def failing(key, params, config):  # fails in the middle of the second shard file
        calls.append(key)
        if len(calls) > 20:
            raise RuntimeError("disk full")
        return original(key, params, config)

    monkeypatch.setattr(hf_qwen, "to_torch", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        convert.export_hf_qwen2_5_vl(config, params, tmp_path / "out", max_shard_bytes=50_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # neither the target nor a temporary dir


@pytest.mark.slow
def test_load_onto_mesh_equals_one_device(checkpoints):
    """(2 data × 2 fsdp × 2 tensor): every parameter placed with its VLM_RULES sharding while loading;
    values and the forward (text + one image, batch sharded) equal the single-device load."""
    model, directory = checkpoints["single"]
    config, expected = convert.load_hf_qwen2_5_vl(directory)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, params = convert.load_hf_qwen2_5_vl(directory, mesh=mesh)
    assert params["text"]["embed_tokens"].sharding.spec == P("tensor", "fsdp")
    assert params["text"]["layers"]["attn"]["query"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert params["vision"]["patch_embed"]["kernel"].sharding.spec == P(None, "fsdp")
    assert params["vision"]["layers"]["mlp"]["gate"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert all(x.sharding.mesh == mesh for x in jax.tree_util.tree_leaves(params))
    assert leaves_equal(params, expected)

    rng = np.random.default_rng(4)
    grids = np.array([[1, 4, 4]])
    ids = np.array([words(rng, 3) + image_run(grids[0]) + words(rng, 2)] + [words(rng, 11)] * 3)
    types = (ids == IMAGE).astype(np.int64)
    pv = pixels(grids, seed=4)
    ref = np.asarray(vlm.forward(config, expected, ids, pixel_values=pv, image_grid_thw=grids, mm_token_type_ids=types))
    with parallel.activation_rules(mesh, parallel.VLM_RULES):
        got = vlm.forward(config, params, parallel.shard_batch(ids, mesh), pixel_values=pv, image_grid_thw=grids,
                          mm_token_type_ids=types)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=0)


# ---- bad inputs ---------------------------------------------------------------------------------
def test_missing_files_are_listed(checkpoints, tmp_path):
    _, directory = checkpoints["sharded"]
    broken = shutil.copytree(directory, tmp_path / "broken")
    shards = sorted(broken.glob("model-*.safetensors"))
    for path in (broken / "config.json", shards[0], shards[-1]):
        os.remove(path)
    with pytest.raises(FileNotFoundError) as err:
        convert.load_hf_qwen2_5_vl(broken)
    assert "missing 3 file(s)" in str(err.value)
    for name in ("config.json", shards[0].name, shards[-1].name):
        assert name in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing 2 file\(s\): \['config.json', 'model.safetensors"):
        convert.load_hf_qwen2_5_vl(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        convert.load_hf_qwen2_5_vl(tmp_path / "nowhere")


def test_missing_unexpected_and_misshapen_keys_are_listed_together(checkpoints, tmp_path):
    model, directory = checkpoints["single"]
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(directory / "config.json", broken)
    from safetensors.torch import load_file
    state = load_file(str(directory / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"], state["visual.blocks.0.attn.qkv.bias"]
    state["model.layers.2.input_layernorm.weight"] = torch.ones(64)  # a layer the config does not have
    state["model.norm.weight"] = torch.ones(65)
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        convert.load_hf_qwen2_5_vl(broken)
    message = str(err.value)
    for text in ("2 missing", "model.layers.1.mlp.up_proj.weight", "visual.blocks.0.attn.qkv.bias",
                 "1 unexpected", "model.layers.2.input_layernorm.weight", "1 with the wrong shape",
                 "model.norm.weight: (65,) != (64,)", "2 text layers"):
        assert text in message, (text, message)


def test_config_of_another_architecture_is_an_error(checkpoints, tmp_path):
    _, directory = checkpoints["single"]
    other = shutil.copytree(directory, tmp_path / "other")
    data = json.loads((other / "config.json").read_text())
    data.update(model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"])
    (other / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config.json: config model_type='qwen2_vl' \(architectures="
                                         r"\['Qwen2VLForConditionalGeneration'\]\)"):
        convert.load_hf_qwen2_5_vl(other)
    with pytest.raises(ValueError, match="dtype='float16'"):
        convert.load_hf_qwen2_5_vl(directory, "float16")


def test_export_needs_the_vision_tower(checkpoints, tmp_path):
    _, directory = checkpoints["single"]
    config, params = convert.load_hf_qwen2_5_vl(directory)
    with pytest.raises(ValueError, match=r"params lack \['vision'\]"):
        convert.export_hf_qwen2_5_vl(config, {"text": params["text"]}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
