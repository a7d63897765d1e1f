"""Shared nn blocks against PyTorch (an independent implementation) and against their own second path
(the KV-cached incremental attention must equal the full causal pass)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from starflow2_jax.nn import MLP, Attention, KVCache, LayerNorm, RMSNorm, apply_rope, attention_mask
from starflow2_jax.nn.rope import starflow_rope_angles


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_layernorm_matches_torch():
    x = rand((2, 5, 16)) * 3 + 1
    module = LayerNorm(epsilon=1e-5)
    variables = jax.tree_util.tree_map(lambda a: a + jnp.asarray(rand(a.shape, 1)),
                                       module.init(jax.random.PRNGKey(0), x))
    p = jax.tree_util.tree_map(np.array, nn_unbox(variables))["params"]
    ref = F.layer_norm(torch.from_numpy(x), (16,), torch.from_numpy(p["scale"]), torch.from_numpy(p["bias"]), 1e-5)
    np.testing.assert_allclose(module.apply(variables, x), ref.numpy(), atol=1e-5)


def nn_unbox(tree):
    import flax.linen as nn
    return nn.meta.unbox(tree)


def test_rmsnorm_offset_convention():
    x = rand((3, 8))
    w = rand((8,), 2)
    out = RMSNorm(epsilon=1e-6, offset=True).apply({"params": {"scale": w}}, x)
    ref = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6) * (1 + w)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    out = RMSNorm(epsilon=1e-6, offset=False).apply({"params": {"scale": w}}, x)
    np.testing.assert_allclose(out, ref / (1 + w) * w, atol=1e-5)


@pytest.mark.parametrize("kind", ["gelu", "gated"])
def test_mlp_matches_torch(kind):
    x = rand((2, 3, 8))
    module = MLP(hidden=16, kind=kind)
    params = nn_unbox(module.init(jax.random.PRNGKey(0), x))["params"]
    t = {k: {n: torch.from_numpy(np.array(v)) for n, v in d.items()} for k, d in params.items()}
    tx = torch.from_numpy(x)
    if kind == "gelu":  # torch's default GELU is the exact erf form
        ref = F.gelu(tx @ t["wi"]["kernel"] + t["wi"]["bias"]) @ t["wo"]["kernel"] + t["wo"]["bias"]
    else:  # STARFlow's use_swiglu: down(gelu_tanh(gate(x)) * up(x))
        gate = F.gelu(tx @ t["gate"]["kernel"] + t["gate"]["bias"], approximate="tanh")
        ref = (gate * (tx @ t["up"]["kernel"] + t["up"]["bias"])) @ t["wo"]["kernel"] + t["wo"]["bias"]
    np.testing.assert_allclose(module.apply({"params": params}, x), ref.numpy(), atol=1e-5)


def test_starflow_rope_frequencies_and_layout():
    # documented 3D values for head_dim 64: 12 x-freqs 1 … 2.15e-4, 12 y-freqs, 8 t-freqs 1 … 3.16e-4
    angles = starflow_rope_angles((8, 8), 64, pt_seq_len=8, text_len=8, three_d=True)
    assert angles.shape == (8 + 64, 32)
    x_freqs = angles[8 + 1 * 8, :12]  # image token (r=1, c=0): p_x = 1
    np.testing.assert_allclose(x_freqs[[0, 1, 11]], [1.0, 0.464159, 2.154435e-4], rtol=1e-5)
    np.testing.assert_allclose(angles[8 + 1, 12:24][[0, 11]], [1.0, 2.154435e-4], rtol=1e-5)  # (r=0, c=1)
    t_freqs = angles[1, 24:]  # text token 1: p_t = 1/8 * 8 = 1
    np.testing.assert_allclose(t_freqs[[0, 1, 7]], [1.0, 0.316228, 3.162278e-4], rtol=1e-5)
    assert np.all(angles[:8, :24] == 0) and np.all(angles[8:, 24:] == 0)
    two_d = starflow_rope_angles((4, 4), 32, pt_seq_len=4)
    assert two_d.shape == (16, 16)
    np.testing.assert_allclose(two_d[4, :8], 10000.0 ** (-2 * np.arange(8) / 16), rtol=1e-5)


def test_interleaved_rope_matches_reference_formula():
    x = rand((1, 5, 2, 8))
    angles = rand((5, 4), 3)
    freqs = np.repeat(angles, 2, axis=-1)[None, :, None, :]  # '... n -> ... (n r)', r=2
    rotated = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)  # rotate_half
    ref = x * np.cos(freqs) + rotated * np.sin(freqs)
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.asarray(angles)), ref, atol=1e-5)
    half = np.concatenate([angles, angles], -1)[None, :, None, :]
    ref_half = x * np.cos(half) + np.concatenate([-x[..., 4:], x[..., :4]], -1) * np.sin(half)
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.asarray(angles), "half"), ref_half, atol=1e-5)


def attention_params(module, x):
    return nn_unbox(module.init(jax.random.PRNGKey(0), x))["params"]


@pytest.mark.parametrize("heads, kv_heads, qk_norm", [(4, 4, False), (4, 2, True), (4, 1, False)])
def test_attention_matches_torch_sdpa(heads, kv_heads, qk_norm):
    batch, length, dim, hd = 2, 7, 16, 8
    x = rand((batch, length, dim))
    module = Attention(num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, qk_norm=qk_norm)
    params = attention_params(module, x)
    params = jax.tree_util.tree_map(lambda a: a + 0.1 * jnp.asarray(rand(a.shape, 5)), params)
    angles = rand((length, hd // 2), 4)
    temperature = np.array([1.0, 0.5], np.float32)
    out, _ = module.apply({"params": params}, x, angles=angles, temperature=temperature)

    p = jax.tree_util.tree_map(np.array, params)
    proj = lambda name, n: np.einsum("btd,dhk->bthk", x, p[name]["kernel"]) + p[name]["bias"]
    q, k, v = proj("query", heads), proj("key", kv_heads), proj("value", kv_heads)
    if qk_norm:
        rms = lambda t, w: t / np.sqrt(np.mean(t ** 2, -1, keepdims=True) + 1e-6) * (1 + w)
        q, k = rms(q, p["query_norm"]["scale"]), rms(k, p["key_norm"]["scale"])
    q = np.asarray(apply_rope(jnp.asarray(q), jnp.asarray(angles)))  # RoPE itself is checked above
    k = np.asarray(apply_rope(jnp.asarray(k), jnp.asarray(angles)))
    tq, tk, tv = (torch.from_numpy(np.array(a.transpose(0, 2, 1, 3))) for a in (q, k, v))
    tk = tk.repeat_interleave(heads // kv_heads, dim=1)  # the reference's GQA expansion
    tv = tv.repeat_interleave(heads // kv_heads, dim=1)
    rows = []
    for b in range(batch):
        rows.append(F.scaled_dot_product_attention(tq[b:b + 1], tk[b:b + 1], tv[b:b + 1], is_causal=True,
                                                   scale=hd ** -0.5 / float(temperature[b])))
    o = torch.cat(rows).transpose(1, 2).reshape(batch, length, heads * hd).numpy()
    ref = o @ p["out"]["kernel"].reshape(heads * hd, dim) + p["out"]["bias"]
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_cached_incremental_attention_equals_full_pass(layout):
    """Oracle: the uncached causal pass. Either cache layout; the cache holds each key at its slot."""
    batch, length, dim, hd = 2, 9, 16, 8
    x = rand((batch, length, dim))
    angles = rand((length, hd // 2), 1)
    module = Attention(num_heads=4, num_kv_heads=2, head_dim=hd, qk_norm=True, cache_layout=layout)
    params = attention_params(module, x)
    full, _ = module.apply({"params": params}, x, angles=angles)
    cache = KVCache.create(batch, 12, 2, hd, layout=layout)
    assert cache.length == 12 and cache.k.shape == ((2, 12, 2, hd) if layout == "bshd" else (2, 2, 12, hd))
    outs = []
    for start, stop in [(0, 3), (3, 4), (4, 9)]:  # uneven chunks, like a prefill then steps
        y, (k, v) = module.apply({"params": params}, x[:, start:stop], angles=angles[start:stop],
                                 kv=(cache.k, cache.v), index=cache.index)
        cache = cache.replace(k=k, v=v, index=cache.index + (stop - start))
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
    assert int(cache.index) == 9 and int(cache.rewind(4).index) == 5
    # the keys sit at their slots on the layout's position axis (as one (B, S, Hkv, hd) write puts them)
    empty = KVCache.create(batch, 12, 2, hd)
    reference = Attention(num_heads=4, num_kv_heads=2, head_dim=hd, qk_norm=True)
    _, (k_ref, _) = reference.apply({"params": params}, x, angles=angles, kv=(empty.k, empty.v), index=0)
    keys = cache.k if layout == "bshd" else cache.k.transpose(0, 2, 1, 3)
    np.testing.assert_allclose(keys, k_ref, atol=1e-6)


def test_cache_layout_errors():
    with pytest.raises(ValueError, match="cache layout='bsdh'"):
        KVCache.create(1, 4, 1, 8, layout="bsdh")
    x = rand((1, 2, 16))
    module = Attention(num_heads=2, num_kv_heads=2, head_dim=8, cache_layout="hbsd")
    with pytest.raises(ValueError, match="cache_layout='hbsd'"):
        module.init(jax.random.PRNGKey(0), x)


def test_attention_masks():
    q = jnp.arange(4)
    np.testing.assert_array_equal(attention_mask(q, q, "causal"), np.tril(np.ones((4, 4), bool)))
    prefix = np.asarray(attention_mask(q, q, "prefix", prefix_len=2))
    assert prefix[0, 1] and not prefix[1, 2] and prefix[3].all()
    assert np.asarray(attention_mask(q, q, "bidirectional")).all()
    with pytest.raises(ValueError, match="mask kind 'diagonal'"):
        attention_mask(q, q, "diagonal")


def test_segment_ids_restrict_attention_to_own_segment():
    batch, length, dim, hd = 1, 6, 16, 8
    x = rand((batch, length, dim))
    module = Attention(num_heads=2, num_kv_heads=2, head_dim=hd, mask="bidirectional", use_bias=True, out_bias=False)
    params = attention_params(module, x)
    assert "bias" not in params["out"] and "bias" in params["query"]
    segments = jnp.array([[0, 0, 0, 1, 1, 1]])
    packed, _ = module.apply({"params": params}, x, segment_ids=segments)
    first, _ = module.apply({"params": params}, x[:, :3])
    second, _ = module.apply({"params": params}, x[:, 3:])
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=1e-5)
