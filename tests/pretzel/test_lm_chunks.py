"""L_NTP in chunks of positions (``losses.chunked_token_nll``, ``PretzelConfig.lm_chunk``).

Oracle: the full computation it replaces, written out here — the (B, L, vocab) logits of the whole
row, log_softmax, the next token picked — for values and for gradients (in the trainable params and
in both streams' outputs), at chunk sizes that do not divide L (padding), of 1, of L and above L.
The memory claim is checked on the compiled program: its temporaries stay well below one (B, L,
vocab) float32 array, where the full computation's do not.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretzel_fixtures import active_params, batch_of, interleaved_doc, per_example, tiny, vlm_params
from starflow2_jax import vlm
from starflow2_jax.pretzel import losses
from starflow2_jax.pretzel import model as pmodel

LENGTH = 37  # prime: no chunk size below it divides it


def _reference_nll(config, params, vlm_params, y_vlm, y_deep, tokens, mask):
    """The whole row's logits at once (the computation chunking replaces)."""
    logits = pmodel.lm_logits(config, params, vlm_params, y_vlm, y_deep)  # (B, L, V)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    picked = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
    return jnp.where(mask, -picked, 0.0)


def _inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    b = 2
    y_vlm = jnp.asarray(rng.normal(size=(b, LENGTH, config.vlm.hidden_size)), jnp.float32)
    y_deep = jnp.asarray(rng.normal(size=(b, LENGTH, config.flow_width)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, config.vlm.vocab_size, (b, LENGTH)), jnp.int32)
    mask = jnp.asarray(rng.uniform(size=(b, LENGTH)) < 0.7)
    return y_vlm, y_deep, tokens, mask


def _weighted_sum(fn, config, weights):
    def total(params, y_vlm, y_deep, tokens, mask):
        return jnp.sum(weights * fn(config, params, vlm_params(), y_vlm, y_deep, tokens, mask))
    return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))


@pytest.mark.parametrize("chunk", [1, 8, 37, 512])
def test_chunked_nll_equals_the_full_logits_values_and_gradients(chunk):
    config = dataclasses.replace(tiny(), lm_chunk=chunk)
    params = active_params()  # W_D perturbed: the LM head reads y_vlm + W_D·y_D
    y_vlm, y_deep, tokens, mask = _inputs(config)
    got = jax.jit(losses.chunked_token_nll, static_argnums=0)(config, params, vlm_params(), y_vlm, y_deep, tokens,
                                                             mask)
    want = jax.jit(_reference_nll, static_argnums=0)(config, params, vlm_params(), y_vlm, y_deep, tokens, mask)
    assert got.shape == (2, LENGTH) and float(jnp.min(jnp.where(mask, got, 1.0))) > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    assert np.all(np.asarray(got)[~np.asarray(mask)] == 0)
    weights = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, (2, LENGTH)), jnp.float32)
    (v_got, g_got) = _weighted_sum(losses.chunked_token_nll, config, weights)(params, y_vlm, y_deep, tokens, mask)
    (v_want, g_want) = _weighted_sum(_reference_nll, config, weights)(params, y_vlm, y_deep, tokens, mask)
    np.testing.assert_allclose(float(v_got), float(v_want), rtol=1e-6)
    assert float(jnp.max(jnp.abs(g_want[0]["flow_to_lm"]["kernel"]))) > 0  # the gradient reaches W_D
    for got_leaf, want_leaf in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=0, atol=1e-5)


def test_per_example_ntp_is_the_full_logits_nll():
    """The loss path (``per_example``) with a chunk of 5 positions against the full logits of its own
    stream outputs."""
    config = dataclasses.replace(tiny(), lm_chunk=5)
    params = active_params()
    batch = batch_of(config, [interleaved_doc(config, 3)])
    terms = per_example(config, params, batch)
    out = terms["output"]
    want = _reference_nll(config, params, vlm_params(), out.y_vlm, out.y_deep, jnp.asarray(batch["tokens"]),
                          terms["ntp_mask"])
    assert int(jnp.sum(terms["ntp_mask"])) > 3
    np.testing.assert_allclose(np.asarray(terms["ntp"]), np.asarray(want), rtol=0, atol=1e-5)


def _temp_bytes(fn, *args) -> int:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    return int(analysis.temp_size_in_bytes)


def test_compiled_temporaries_stay_below_one_row_of_full_logits():
    """Loss and gradient in W_D at vocab 4096, L = 512: chunks of 64 keep the compiled temporaries
    under half of one (B, L, vocab) float32 logits array (8.4 MB); the full computation needs more
    than that array."""
    vlm_cfg = dataclasses.replace(tiny().vlm, vocab_size=4096)
    config = dataclasses.replace(tiny(), vlm=vlm_cfg, seq_len=512, lm_chunk=64)
    params = pmodel.init(config, jax.random.key(0))
    frozen = vlm.init_text(config.vlm, jax.random.key(1))
    b, length = 1, 512
    y_vlm = jnp.zeros((b, length, config.vlm.hidden_size), jnp.float32)
    y_deep = jnp.zeros((b, length, config.flow_width), jnp.float32)
    tokens = jnp.zeros((b, length), jnp.int32)
    mask = jnp.ones((b, length), bool)
    logits_bytes = b * length * config.vlm.vocab_size * 4

    def grad_of(nll):
        return jax.grad(lambda p: jnp.sum(nll(config, p, frozen, y_vlm, y_deep, tokens, mask)))

    chunked = _temp_bytes(grad_of(losses.chunked_token_nll), params)
    full = _temp_bytes(grad_of(_reference_nll), params)
    assert full > logits_bytes, (full, logits_bytes)
    assert chunked < logits_bytes / 2, (chunked, logits_bytes)  # measured: 3.4 MB (a few (B, 64, V) blocks)
