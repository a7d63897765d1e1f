"""Incremental steps with explicit caches: a document fed token by token, or segment by segment, gives
the outputs and the caches of one teacher-forced pass; that pass gives the cache-free packed
forward's outputs (a second code path: segment ids instead of a cache)."""


import jax
import jax.numpy as jnp
import numpy as np

from pretzel_fixtures import active_params, batch_of, interleaved_doc, tiny, vlm_params
from starflow2_jax import vlm
from starflow2_jax.pretzel import model as pmodel
from starflow2_jax.pretzel import step as pstep

ATOL = 1e-5
_step = jax.jit(pstep.step, static_argnums=0)
_deep_step = jax.jit(pstep.deep_step, static_argnums=0)
_text_step = jax.jit(vlm.text_step, static_argnums=0)


def _inputs(cfg, params, doc):
    """The document as step inputs (batch of 1): tokens, u at slots (hand-gathered from the model's
    shallow outputs), slot, positions; and the cache-free forward's Output."""
    n_images = len(doc["images"])
    batch = batch_of(cfg, [doc], length=len(doc["tokens"]), max_images=n_images)
    out = pmodel.forward(cfg, params, vlm_params(), batch)
    u = np.zeros(doc["tokens"].shape + (cfg.latent_dim,), np.float32)
    seen = {}
    for t in np.flatnonzero(doc["slot"]):
        k = int(doc["image_index"][t])
        u[t] = np.asarray(out.u[0, k, seen.get(k, 0)])
        seen[k] = seen.get(k, 0) + 1
    return (jnp.asarray(doc["tokens"][None]), jnp.asarray(u[None]), jnp.asarray(doc["slot"][None]),
            jnp.asarray(doc["positions"][None])), out


def _run(cfg, params, inputs, bounds, length):
    """Feeds inputs in the pieces [bounds[i], bounds[i+1]) → (y_vlm, y_deep, head, caches)."""
    caches = pmodel.create_caches(cfg, 1, length)
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        o = _step(cfg, params, vlm_params(), caches, *(x[:, a:b] for x in inputs))
        caches = o.caches
        pieces.append(o)
    cat = lambda name: jnp.concatenate([getattr(o, name) for o in pieces], axis=1)  # noqa: E731
    return cat("y_vlm"), cat("y_deep"), cat("head"), caches


def test_token_by_token_and_segments_equal_teacher_forcing():
    cfg = tiny()
    params = active_params()
    doc = interleaved_doc(cfg, seed=11)
    inputs, out = _inputs(cfg, params, doc)
    t = len(doc["tokens"])
    length = t + 3  # spare slots stay untouched
    full = _run(cfg, params, inputs, [0, t], length)
    # the prefill equals the cache-free packed forward (segment ids, no cache)
    np.testing.assert_allclose(full[0], out.y_vlm, atol=ATOL, rtol=0)
    np.testing.assert_allclose(full[1], out.y_deep, atol=ATOL, rtol=0)
    starts = [0] + [i for i in range(1, t) if doc["slot"][i] != doc["slot"][i - 1]] + [t]  # text / slot runs
    for bounds in (list(range(t + 1)), starts):
        got = _run(cfg, params, inputs, bounds, length)
        for a, b in zip(got[:3], full[:3]):
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
        for a, b in zip(jax.tree_util.tree_leaves(got[3]), jax.tree_util.tree_leaves(full[3])):
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert int(full[3].index) == t and float(jnp.max(jnp.abs(full[3].deep.k[:, :, t:]))) == 0.0


def test_vlm_and_deep_steps_alone():
    """vlm.text_step token by token equals the text model's own forward; pretzel.step.deep_step token by
    token equals the deep stream inside the coupled step."""
    cfg = tiny()
    params = active_params()
    doc = interleaved_doc(cfg, seed=12)
    inputs, out = _inputs(cfg, params, doc)
    tokens, positions = inputs[0], jnp.moveaxis(inputs[3], -1, 0)
    t = tokens.shape[1]
    _, ref_hidden = vlm.text_forward(cfg.vlm, vlm_params(), tokens, position_ids=positions, return_hidden=True)
    cache = vlm.create_cache(cfg.vlm, 1, t)
    deep_cache = pmodel.create_caches(cfg, 1, t).deep
    hidden, deep_out = [], []
    for i in range(t):
        h, cache = _text_step(cfg.vlm, vlm_params(), cache, input_ids=tokens[:, i:i + 1],
                              position_ids=positions[:, :, i:i + 1])
        hidden.append(h)
        slot_in = inputs[1][:, i:i + 1] + pmodel.Pretzel(cfg).apply(
            {"params": params}, out.y_vlm[:, i:i + 1], method=lambda m, y: m.vlm_to_flow(y))
        y_d, _, deep_cache = _deep_step(cfg, params["deep"], deep_cache, out.y_vlm[:, i:i + 1], slot_in,
                                        inputs[2][:, i:i + 1], inputs[3][:, i:i + 1])
        deep_out.append(y_d)
    # the slots read E[<|image_pad|>] + Adapter(u) in the coupled model: compare the text model on text
    # positions before the first image (where both read plain token embeddings)
    first = int(np.flatnonzero(doc["slot"])[0])
    np.testing.assert_allclose(jnp.concatenate(hidden, 1)[:, :first], out.y_vlm[:, :first], atol=ATOL, rtol=0)
    np.testing.assert_allclose(jnp.concatenate(hidden, 1), ref_hidden, atol=ATOL, rtol=0)
    np.testing.assert_allclose(jnp.concatenate(deep_out, 1), out.y_deep, atol=ATOL, rtol=0)
