"""starflow2_jax.convert: Apple PyTorch TarFlow/STARFlow state dicts ↔ our Flax variables."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from starflow2_jax.convert import LAYOUTS, export_torch_flow, import_torch_flow, load_state_dict, save_state_dict
from starflow2_jax.flow import api
from starflow2_jax.flow.config import starflow_config, tarflow_config


def _keys_listing(path):
    """(name, shape) pairs of a `*.keys.txt` / appendix listing."""
    rows = []
    for line in path.read_text().splitlines() if hasattr(path, "read_text") else path.strip().splitlines():
        name, shape = line.split()[0], line[line.index("("):line.index(")") + 1]
        rows.append((name, tuple(int(x) for x in shape.strip("()").split(",") if x.strip())))
    return rows


def _assert_same_state_dict(got, want):
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert np.array_equal(got[k], want[k]), k


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_variables(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].shape == fb[k].shape and fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def _random_variables(config, seed=0):
    """api.init's tree (shapes only: tracing is much faster than running init) with every leaf random,
    since proj_out and the RMSNorm offsets are zero-initialised."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: api.init(config, key), jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32), shapes)


# ---- the reference fixtures -------------------------------------------------------------------
TARFLOW_CONFIG = dict(in_channels=3, img_size=32, patch_size=4, channels=128, num_blocks=4, layers_per_block=2,
                      nvp=True, num_classes=10)
STARFLOW_CONFIG = dict(in_channels=4, img_size=8, patch_size=1, channels=128, layers_per_block=[2, 2, 2, 4],
                       head_dim=64, txt_size=8, txt_dim=32, cond_top_only=True, sos=True, use_softplus=True,
                       use_final_norm=True, soft_clip=4.0, seq_order="L2R")


def test_tarflow_fixture_round_trip_and_config(tarflow_fixture, reference_dir):
    sd = load_state_dict(tarflow_fixture)
    assert [(k, v.shape) for k, v in sd.items()] == _keys_listing(reference_dir / "apple_tarflow_tiny.keys.txt")
    config, variables = import_torch_flow(sd, "apple-tarflow", in_channels=3)
    assert config == tarflow_config(**TARFLOW_CONFIG)
    _assert_same_state_dict(export_torch_flow(config, variables, "apple-tarflow"), sd)
    # patch_size alone determines in_channels as well
    assert import_torch_flow(sd, "apple-tarflow", patch_size=4)[0] == config


def test_starflow_fixture_round_trip_and_config(starflow_fixture, reference_dir):
    sd = load_state_dict(starflow_fixture)
    assert [(k, v.shape) for k, v in sd.items()] == _keys_listing(reference_dir / "apple_starflow_tiny.keys.txt")
    config, variables = import_torch_flow(sd, "apple-starflow", in_channels=4)
    assert config == starflow_config(**STARFLOW_CONFIG)
    assert [b.num_layers for b in config.blocks] == [2, 2, 2, 4]
    assert [b.text_conditioned for b in config.blocks] == [False, False, False, True]
    assert [b.permutation for b in config.blocks] == ["flip", "identity", "flip", "identity"]
    assert (config.text_len, config.text_dim) == (8, 32)
    _assert_same_state_dict(export_torch_flow(config, variables, "apple-starflow"), sd)
    # what the weights cannot tell comes from options
    r2l = import_torch_flow(sd, "apple-starflow", in_channels=4, seq_order="R2L", soft_clip=2.0)[0]
    assert [b.permutation for b in r2l.blocks] == ["identity", "flip", "identity", "flip"] and r2l.soft_clip == 2.0


def test_imported_fixtures_reproduce_the_reference_forward(tarflow_fixture, starflow_fixture):
    """End to end through our flow: the converted weights give the reference z and log-dets."""
    config, variables = import_torch_flow(tarflow_fixture, "apple-tarflow", in_channels=3)
    z, logdets = api.forward(config, variables, tarflow_fixture["x"].transpose(0, 2, 3, 1), tarflow_fixture["y"])
    np.testing.assert_allclose(z, tarflow_fixture["z"], atol=1e-5)
    np.testing.assert_allclose(np.sum(logdets, 1) / config.num_dims, tarflow_fixture["logdets"], atol=1e-6)
    config, variables = import_torch_flow(starflow_fixture, "apple-starflow", in_channels=4)
    z, _ = api.forward(config, variables, starflow_fixture["x"].transpose(0, 2, 3, 1), starflow_fixture["y_cond"])
    np.testing.assert_allclose(z, starflow_fixture["z"].transpose(0, 2, 3, 1).reshape(2, 64, 4), atol=1e-5)


def test_buffers_are_optional_on_import(starflow_fixture, tarflow_fixture):
    for fixture, layout, opts in [(starflow_fixture, "apple-starflow", dict(in_channels=4, txt_size=8, img_size=8)),
                                  (tarflow_fixture, "apple-tarflow", dict(in_channels=3))]:
        sd = load_state_dict(fixture)
        params_only = {k: v for k, v in sd.items() if not k.endswith(("attn_mask", "freqs_cos", "freqs_sin"))
                       and k != "var"}
        config, variables = import_torch_flow(params_only, layout, **opts)
        assert config == import_torch_flow(sd, layout, **opts)[0]
        _assert_same_state_dict(export_torch_flow(config, variables, layout), sd)  # buffers regenerated


def test_tarflow_oracle_mappings(tarflow_fixture):
    """Hand-computed correspondences, independent of the exporter."""
    sd = load_state_dict(tarflow_fixture)
    _, variables = import_torch_flow(sd, "apple-tarflow", in_channels=3)
    b0 = variables["params"]["blocks_0"]
    qkv = sd["blocks.0.attn_blocks.1.attention.qkv.weight"]  # rows [q | k | v], 2 heads × 64
    np.testing.assert_array_equal(b0["layers"]["attn"]["query"]["kernel"][1], qkv[:128].T.reshape(128, 2, 64))
    np.testing.assert_array_equal(b0["layers"]["attn"]["key"]["kernel"][1], qkv[128:256].T.reshape(128, 2, 64))
    np.testing.assert_array_equal(b0["layers"]["attn"]["value"]["bias"][0],
                                  sd["blocks.0.attn_blocks.0.attention.qkv.bias"][256:].reshape(2, 64))
    # out kernel (H, hd, D)[h, j, o] = proj.weight[o, h·64 + j]
    w = sd["blocks.0.attn_blocks.0.attention.proj.weight"]
    assert b0["layers"]["attn"]["out"]["kernel"][0][1, 3, 5] == w[5, 64 + 3]
    np.testing.assert_array_equal(b0["proj_out"]["kernel"], sd["blocks.0.proj_out.weight"].T)
    np.testing.assert_array_equal(b0["class_embed"], sd["blocks.0.class_embed"][:, 0])
    np.testing.assert_array_equal(variables["params"]["blocks_3"]["layers"]["mlp"]["wo"]["kernel"][1],
                                  sd["blocks.3.attn_blocks.1.mlp.main.2.weight"].T)
    np.testing.assert_array_equal(b0["layers"]["attn_norm"]["scale"][1],
                                  sd["blocks.0.attn_blocks.1.attention.norm.weight"])
    np.testing.assert_array_equal(variables["prior"]["var"], sd["var"])


# ---- synthetic layouts: appendices D and E of TORCH_LAYOUTS.md ---------------------------------
APPENDIX_D = """
var                                                                (64, 4)            buffer
blocks.0.sos_embed                                                 (1, 1, 4)          param
blocks.0.attn_mask                                                 (72, 72)           buffer
blocks.0.proj_in.weight                                            (128, 4)           param
blocks.0.proj_in.bias                                              (128,)             param
blocks.0.proj_out.weight                                           (8, 128)           param
blocks.0.proj_out.bias                                             (8,)               param
blocks.0.attn_blocks.0.attention.norm.weight                       (128,)             param
blocks.0.attn_blocks.0.attention.qkv.weight                        (256, 128)         param
blocks.0.attn_blocks.0.attention.proj.weight                       (128, 128)         param
blocks.0.attn_blocks.0.attention.query_norm.weight                 (32,)              param
blocks.0.attn_blocks.0.attention.key_norm.weight                   (32,)              param
blocks.0.attn_blocks.0.attention.post_norm.weight                  (128,)             param
blocks.0.attn_blocks.0.mlp.norm.weight                             (128,)             param
blocks.0.attn_blocks.0.mlp.post_norm.weight                        (128,)             param
blocks.0.attn_blocks.0.mlp.gate_proj.weight                        (512, 128)         param
blocks.0.attn_blocks.0.mlp.up_proj.weight                          (512, 128)         param
blocks.0.attn_blocks.0.mlp.down_proj.weight                        (128, 512)         param
blocks.0.final_norm.weight                                         (128,)             param
blocks.1.sos_embed                                                 (1, 1, 4)          param
blocks.1.attn_mask                                                 (72, 72)           buffer
blocks.1.proj_in.weight                                            (192, 4)           param
blocks.1.proj_in.bias                                              (192,)             param
blocks.1.proj_out.weight                                           (8, 192)           param
blocks.1.proj_out.bias                                             (8,)               param
blocks.1.proj_txt.weight                                           (192, 32)          param
blocks.1.proj_txt.bias                                             (192,)             param
blocks.1.attn_blocks.0.attention.norm.weight                       (192,)             param
blocks.1.attn_blocks.0.attention.qkv.weight                        (256, 192)         param
blocks.1.attn_blocks.0.attention.proj.weight                       (192, 128)         param
blocks.1.attn_blocks.0.attention.query_norm.weight                 (32,)              param
blocks.1.attn_blocks.0.attention.key_norm.weight                   (32,)              param
blocks.1.attn_blocks.0.attention.post_norm.weight                  (192,)             param
blocks.1.attn_blocks.0.mlp.norm.weight                             (192,)             param
blocks.1.attn_blocks.0.mlp.post_norm.weight                        (192,)             param
blocks.1.attn_blocks.0.mlp.gate_proj.weight                        (768, 192)         param
blocks.1.attn_blocks.0.mlp.up_proj.weight                          (768, 192)         param
blocks.1.attn_blocks.0.mlp.down_proj.weight                        (192, 768)         param
blocks.1.final_norm.weight                                         (192,)             param
feat_rope.freqs_cos                                                (72, 32)           buffer
feat_rope.freqs_sin                                                (72, 32)           buffer
"""

APPENDIX_E = """
var                                                                (64, 4)            buffer
blocks.0.attn_mask                                                 (72, 72)           buffer
blocks.0.proj_in.weight                                            (128, 4)           param
blocks.0.proj_in.bias                                              (128,)             param
blocks.0.proj_out.weight                                           (8, 128)           param
blocks.0.proj_out.bias                                             (8,)               param
blocks.0.proj_txt.weight                                           (128, 32)          param
blocks.0.proj_txt.bias                                             (128,)             param
blocks.0.attn_blocks.0.attention.norm.weight                       (128,)             param
blocks.0.attn_blocks.0.attention.norm.bias                         (128,)             param
blocks.0.attn_blocks.0.attention.qkv.weight                        (384, 128)         param
blocks.0.attn_blocks.0.attention.qkv.bias                          (384,)             param
blocks.0.attn_blocks.0.attention.proj.weight                       (128, 128)         param
blocks.0.attn_blocks.0.attention.proj.bias                         (128,)             param
blocks.0.attn_blocks.0.mlp.norm.weight                             (128,)             param
blocks.0.attn_blocks.0.mlp.norm.bias                               (128,)             param
blocks.0.attn_blocks.0.mlp.main.0.weight                           (512, 128)         param
blocks.0.attn_blocks.0.mlp.main.0.bias                             (512,)             param
blocks.0.attn_blocks.0.mlp.main.2.weight                           (128, 512)         param
blocks.0.attn_blocks.0.mlp.main.2.bias                             (128,)             param
blocks.0.final_norm.weight                                         (128,)             param
blocks.1.attn_mask                                                 (72, 72)           buffer
blocks.1.proj_in.weight                                            (128, 4)           param
blocks.1.proj_in.bias                                              (128,)             param
blocks.1.proj_out.weight                                           (8, 128)           param
blocks.1.proj_out.bias                                             (8,)               param
blocks.1.proj_txt.weight                                           (128, 32)          param
blocks.1.proj_txt.bias                                             (128,)             param
blocks.1.attn_blocks.0.attention.norm.weight                       (128,)             param
blocks.1.attn_blocks.0.attention.norm.bias                         (128,)             param
blocks.1.attn_blocks.0.attention.qkv.weight                        (384, 128)         param
blocks.1.attn_blocks.0.attention.qkv.bias                          (384,)             param
blocks.1.attn_blocks.0.attention.proj.weight                       (128, 128)         param
blocks.1.attn_blocks.0.attention.proj.bias                         (128,)             param
blocks.1.attn_blocks.0.mlp.norm.weight                             (128,)             param
blocks.1.attn_blocks.0.mlp.norm.bias                               (128,)             param
blocks.1.attn_blocks.0.mlp.main.0.weight                           (512, 128)         param
blocks.1.attn_blocks.0.mlp.main.0.bias                             (512,)             param
blocks.1.attn_blocks.0.mlp.main.2.weight                           (128, 512)         param
blocks.1.attn_blocks.0.mlp.main.2.bias                             (128,)             param
blocks.1.final_norm.weight                                         (128,)             param
feat_rope.freqs_cos                                                (72, 64)           buffer
feat_rope.freqs_sin                                                (72, 64)           buffer
"""

_SYNTH = dict(in_channels=4, img_size=8, patch_size=1, channels=128, layers_per_block=[1, 1], txt_size=8, txt_dim=32)
SYNTHETIC = {
    "appendix_d": (APPENDIX_D, dict(_SYNTH, use_swiglu=True, norm_type="rms_norm", use_qk_norm=True,
                                    use_post_norm=True, use_bias=False, num_heads=4, num_kv_heads=2, head_dim=32,
                                    top_block_channels=192)),
    "appendix_e": (APPENDIX_E, dict(_SYNTH, cond_top_only=False, sos=False)),
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_starflow_layouts(name):
    listing, kwargs = SYNTHETIC[name]
    config = starflow_config(**kwargs)
    variables = _random_variables(config)
    sd = export_torch_flow(config, variables, "apple-starflow")
    assert [(k, v.shape) for k, v in sd.items()] == _keys_listing(listing)
    assert all(v.dtype == np.float32 for v in sd.values())
    np.testing.assert_array_equal(sd["blocks.0.attn_mask"], np.tril(np.ones((72, 72), np.float32)))
    assert not sd["feat_rope.freqs_cos"].any()
    config2, variables2 = import_torch_flow(sd, "apple-starflow", in_channels=4)
    assert config2 == config
    _assert_same_variables(variables2, variables)
    _assert_same_state_dict(export_torch_flow(config2, variables2, "apple-starflow"), sd)


def test_gqa_qkv_rows_are_head_major():
    config = starflow_config(**SYNTHETIC["appendix_d"][1])
    variables = _random_variables(config, seed=3)
    sd = export_torch_flow(config, variables, "apple-starflow")
    attn = variables["params"]["blocks_1"]["layers"]["attn"]
    qkv = sd["blocks.1.attn_blocks.0.attention.qkv.weight"]  # [q 4×32 | k 2×32 | v 2×32] rows, 192 cols
    np.testing.assert_array_equal(qkv[32 * 2 + 7], attn["query"]["kernel"][0][:, 2, 7])
    np.testing.assert_array_equal(qkv[128 + 32 + 5], attn["key"]["kernel"][0][:, 1, 5])
    np.testing.assert_array_equal(qkv[192 + 31], attn["value"]["kernel"][0][:, 0, 31])


# ---- files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_file_round_trip(tmp_path, tarflow_fixture, suffix):
    sd = load_state_dict(tarflow_fixture)
    path = save_state_dict(sd, tmp_path / f"model{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model{suffix}"]  # no temporary left behind
    _assert_same_state_dict(load_state_dict(path), sd)
    config, variables = import_torch_flow(path, "apple-tarflow", in_channels=3)
    _assert_same_state_dict(export_torch_flow(config, variables, "apple-tarflow"), sd)


def test_torch_checkpoint_variants(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = load_state_dict(tmp_path / "ckpt.pth")
    assert list(loaded) == ["a.weight", "b"] and loaded["b"].dtype == np.float32
    np.testing.assert_array_equal(loaded["a.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_safetensors_bfloat16_and_foreign_order(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    x = torch.randn(3, 4).to(torch.bfloat16)
    save_file({"z": x, "a": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    loaded = load_state_dict(tmp_path / "m.safetensors")
    assert sorted(loaded) == ["a", "z"]
    np.testing.assert_array_equal(loaded["z"], x.float().numpy())


def test_fixture_file_prefix(reference_dir):
    sd = load_state_dict(reference_dir / "apple_tarflow_tiny.npz")
    assert len(sd) == 125 and next(iter(sd)) == "var"
    assert list(load_state_dict({"sd/x": np.zeros(1), "y": np.ones(1)})) == ["x"]
    assert list(load_state_dict({"m.x": np.zeros(1), "y": np.ones(1)}, prefix="m.")) == ["x"]


def test_unsupported_file_type(tmp_path):
    with pytest.raises(ValueError, match=r"\.ckpt.*\.npz, \.safetensors, \.pt, \.pth"):
        load_state_dict(tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match=r"\.bin"):
        save_state_dict({"x": np.zeros(1)}, tmp_path / "m.bin")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def broken_savez(file, **arrays):  # writes half a file, then fails
        with open(file, "wb") as f:
            f.write(b"PK partial")
        raise OSError("disk full")
    (tmp_path / "m.npz").write_bytes(b"old")
    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({"x": np.zeros(1)}, tmp_path / "m.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"] and (tmp_path / "m.npz").read_bytes() == b"old"


# ---- errors ------------------------------------------------------------------------------------
def test_unknown_layout(tarflow_fixture):
    with pytest.raises(ValueError, match="apple-tarflow, apple-starflow"):
        import_torch_flow(tarflow_fixture, "tarflow")
    config, variables = import_torch_flow(tarflow_fixture, "apple-tarflow", in_channels=3)
    with pytest.raises(ValueError, match="valid layouts"):
        export_torch_flow(config, variables, "apple")
    assert LAYOUTS == ("apple-tarflow", "apple-starflow")


def test_mismatched_state_dict_lists_every_problem(tarflow_fixture):
    sd = load_state_dict(tarflow_fixture)
    del sd["blocks.1.attn_blocks.0.mlp.main.0.bias"]
    sd["blocks.0.bogus.weight"] = np.zeros(3, np.float32)
    sd["blocks.2.proj_out.bias"] = np.zeros(95, np.float32)
    sd["blocks.3.attn_mask"] = np.zeros((4, 4), np.float32)  # buffers are optional but checked when present
    with pytest.raises(ValueError) as info:
        import_torch_flow(sd, "apple-tarflow", in_channels=3)
    message = str(info.value)
    assert "missing: blocks.1.attn_blocks.0.mlp.main.0.bias" in message
    assert "unexpected: blocks.0.bogus.weight" in message
    assert "blocks.2.proj_out.bias: got shape (95,), expected (96,)" in message
    assert "blocks.3.attn_mask: got shape (4, 4), expected (64, 64)" in message


def test_token_dim_needs_channels_or_patch(tarflow_fixture, starflow_fixture):
    with pytest.raises(ValueError, match=r"d=48 .*ambiguous.*in_channels=3, patch_size=4.*in_channels= or patch_size="):
        import_torch_flow(tarflow_fixture, "apple-tarflow")
    with pytest.raises(ValueError, match=r"d=4 .*ambiguous"):
        import_torch_flow(starflow_fixture, "apple-starflow")
    with pytest.raises(ValueError, match="do not fit"):
        import_torch_flow(tarflow_fixture, "apple-tarflow", in_channels=5)


def test_squarefree_token_dim_implies_patch_one():
    config = tarflow_config(in_channels=3, img_size=8, patch_size=1, channels=64, num_blocks=2, layers_per_block=1)
    sd = export_torch_flow(config, _random_variables(config), "apple-tarflow")
    assert import_torch_flow(sd, "apple-tarflow")[0] == config


def test_export_rejects_variables_of_another_config(tarflow_fixture):
    config, variables = import_torch_flow(tarflow_fixture, "apple-tarflow", in_channels=3)
    other = tarflow_config(**dict(TARFLOW_CONFIG, num_classes=5))
    with pytest.raises(ValueError, match=r"class_embed: got shape \(10, 128\), expected \(5, 128\)"):
        export_torch_flow(other, variables, "apple-tarflow")
