"""The coupled model against independent oracles (SPEC §5.3's invariants 1, 2 and 4).

zero init: the frozen VLM's own forward (``vlm.forward`` on token ids) and a stage-1 model without
bridges; exact likelihood: ``jax.jacfwd`` through the whole coupled model; packing: each document
alone. Every zero-initialised projection is perturbed first (pretzel_fixtures.perturb), so the
deep head, the shallow heads and the bridges all act.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretzel_fixtures import (STAGE1, active_params, batch_of, image, interleaved_doc, jnp_batch, lm_logits,
                              per_example, tiny, vlm_params, words)
from starflow2_jax import vlm
from starflow2_jax.pretzel import layout, losses
from starflow2_jax.pretzel import model as pmodel


def test_zero_init_text_logits_equal_frozen_vlm():
    """Zero-initialised W_D and adapter on top of trained flows: the LM logits are the VLM's own."""
    cfg = tiny()
    stage1 = active_params(**STAGE1)
    params = dict(pmodel.init(cfg, jax.random.key(5)), **stage1)  # new parts fresh (zero), flows trained
    rng = np.random.default_rng(0)
    doc = layout.layout_document(cfg, [words(rng, 9), image(rng), words(rng, 5)])
    batch = batch_of(cfg, [doc], length=len(doc["tokens"]))
    out = pmodel.forward(cfg, params, vlm_params(), batch)
    got = lm_logits(cfg, params, vlm_params(), out.y_vlm, out.y_deep)
    # oracle: the frozen VLM on the same token ids (slots read <|image_pad|>), its own forward path
    ref = vlm.text_forward(cfg.vlm, vlm_params(), jnp.asarray(batch["tokens"]),
                           position_ids=jnp.asarray(np.moveaxis(batch["positions"], -1, 0)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)
    # once W_D is not zero, the flow stream reaches the logits
    moved = dict(params, flow_to_lm=jax.tree_util.tree_map(lambda w: w + 0.1, params["flow_to_lm"]))
    bad = lm_logits(cfg, moved, vlm_params(), out.y_vlm, out.y_deep)
    assert np.max(np.abs(np.asarray(bad) - np.asarray(ref))) > 1e-3


def test_zero_init_image_nll_equals_stage1():
    """Stage 3 initialised from stage 1 (bridges and adapter zero): the image likelihood is stage 1's,
    exactly, on caption→image and on interleaved documents."""
    cfg1, cfg3 = tiny(**STAGE1), tiny()
    stage1 = active_params(**STAGE1)
    params3 = dict(pmodel.init(cfg3, jax.random.key(7)), **stage1)
    rng = np.random.default_rng(1)
    caption_image = layout.layout_document(cfg3, [words(rng, 6), image(rng)])
    batch = batch_of(cfg3, [caption_image, interleaved_doc(cfg3, seed=2)])
    nll1 = pmodel.image_nll(cfg1, pmodel.forward(cfg1, stage1, vlm_params(), batch))
    nll3 = pmodel.image_nll(cfg3, pmodel.forward(cfg3, params3, vlm_params(), batch))
    valid = batch["image_valid"]
    np.testing.assert_array_equal(np.asarray(nll3)[valid], np.asarray(nll1)[valid])
    moved = dict(params3, vlm_to_flow=jax.tree_util.tree_map(lambda w: w + 0.05, params3["vlm_to_flow"]))
    nll_moved = pmodel.image_nll(cfg3, pmodel.forward(cfg3, moved, vlm_params(), batch))
    assert np.max(np.abs(np.asarray(nll_moved - nll1)[valid])) > 1e-3


def test_exact_likelihood_against_autodiff_jacobian():
    """−log p(images | text) = −log N(z) − log|det ∂z/∂x|, the Jacobian by jax.jacfwd through the shallow
    flows and the deep stream (both images of an interleaved document at once: the second one's context
    holds the first, so J is block-triangular and the total is the sum of the per-image NLLs)."""
    cfg = tiny()
    params = active_params()
    doc = interleaved_doc(cfg, seed=3)
    batch = jnp_batch(batch_of(cfg, [doc], length=len(doc["tokens"]), max_images=2))
    latents = pmodel.encode_images(cfg, {}, batch["images"])  # (1, 2, N, D)
    frozen = vlm_params()

    def z_of(x):
        out = pmodel.apply_model(cfg, params, frozen, batch, x.reshape(latents.shape))
        return out.z.reshape(-1)

    x = latents.reshape(-1)
    jac = jax.jit(jax.jacfwd(z_of))(x)
    z = z_of(x)
    _, logdet = jnp.linalg.slogdet(jac.astype(jnp.float64) if jax.config.jax_enable_x64 else jac)
    oracle = 0.5 * jnp.sum(z**2) + 0.5 * z.size * np.log(2 * np.pi) - logdet
    out = pmodel.forward(cfg, params, vlm_params(), batch_of(cfg, [doc], length=len(doc["tokens"]), max_images=2))
    got = jnp.sum(pmodel.image_nll(cfg, out))
    np.testing.assert_allclose(float(got), float(oracle), rtol=1e-5)
    # the Jacobian is block lower-triangular in raster order per image: image 0 does not see image 1
    n = cfg.num_slots * cfg.latent_dim
    assert float(jnp.max(jnp.abs(jac[:n, n:]))) == 0.0


def test_packing_equals_each_document_alone():
    """Two documents in one row (segment ids, offset image indices, padding) give each one's own losses."""
    cfg = tiny()
    params = active_params()
    rng = np.random.default_rng(4)
    doc_a = interleaved_doc(cfg, seed=5)
    doc_b = layout.layout_document(cfg, [words(rng, 4), image(rng), words(rng, 3)])
    packed = per_example(cfg, params, batch_of(cfg, [doc_a, doc_b]))
    la, lb = len(doc_a["tokens"]), len(doc_b["tokens"])
    alone_a = per_example(cfg, params, batch_of(cfg, [doc_a], length=la, max_images=2))
    alone_b = per_example(cfg, params, batch_of(cfg, [doc_b], length=lb, max_images=1))
    np.testing.assert_allclose(packed["nf"][0, :2], alone_a["nf"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed["nf"][0, 2:3], alone_b["nf"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed["ntp"][0, :la], alone_a["ntp"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed["ntp"][0, la:la + lb], alone_b["ntp"][0], atol=1e-5, rtol=0)
    assert np.all(np.asarray(packed["ntp"][0, la + lb:]) == 0) and not np.asarray(packed["nf_mask"])[0, 3]
    assert np.all(np.asarray(alone_a["nf"]) > 0) and np.sum(np.asarray(alone_a["ntp_mask"])) > 0


def test_loss_combines_terms():
    cfg = tiny(ntp_weight=0.5, caption_dropout=0.0)
    params = active_params()
    batch = jnp_batch(batch_of(cfg, [interleaved_doc(cfg, seed=6)]))
    total, metrics = jax.jit(functools.partial(losses.loss, cfg))(params, vlm_params(), batch)
    terms = per_example(cfg, params, batch)
    nf = np.sum(terms["nf"]) / np.sum(terms["nf_mask"])
    ntp = np.sum(terms["ntp"]) / np.sum(terms["ntp_mask"])
    np.testing.assert_allclose([metrics["loss_nf"], metrics["loss_ntp"], total], [nf, ntp, nf + 0.5 * ntp],
                               rtol=1e-6)
    # NTP is the LM's cross-entropy: check one position by hand
    out = terms["output"]
    logits = lm_logits(cfg, params, vlm_params(), out.y_vlm, out.y_deep)[0]
    t = int(np.flatnonzero(np.asarray(terms["ntp_mask"][0]))[0])
    expected = -jax.nn.log_softmax(logits[t])[int(batch["tokens"][0, t + 1])]
    np.testing.assert_allclose(terms["ntp"][0, t], expected, rtol=1e-5)
    grads = jax.jit(jax.grad(lambda p: losses.loss(cfg, p, vlm_params(), batch)[0]))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.max(jnp.abs(grads["flow_to_lm"]["kernel"]))) > 0  # W_D is trained through L_NTP


def test_caption_dropout_masks_text_for_the_image():
    """A dropped caption: the image's likelihood equals that of the same document without its text
    (its <|vision_start|> first), and the document's text carries no NTP loss."""
    cfg = tiny(caption_dropout=0.999)
    params = active_params()
    rng = np.random.default_rng(7)
    img = image(rng)
    with_text = layout.layout_document(cfg, [words(rng, 5), img])
    without = layout.layout_document(cfg, [img])
    # positions of the text-free document start at 0; shift them to where they sit after the caption
    without["positions"] = with_text["positions"][5:]
    terms = per_example(cfg, params, batch_of(cfg, [with_text]), rng=jax.random.key(0), train=True)
    ref = per_example(cfg, params, batch_of(cfg, [without]))
    np.testing.assert_allclose(terms["nf"][0, 0], ref["nf"][0, 0], rtol=1e-5)
    assert not np.any(np.asarray(terms["ntp_mask"]))
    kept = per_example(cfg, params, batch_of(cfg, [with_text]))
    assert abs(float(kept["nf"][0, 0]) - float(ref["nf"][0, 0])) > 1e-4


def test_bad_batches():
    cfg = tiny()
    params = active_params()
    batch = batch_of(cfg, [interleaved_doc(cfg)])
    with pytest.raises(ValueError, match=r"batch\['positions'\] has shape \(1, 64\)"):
        pmodel.forward(cfg, params, vlm_params(), dict(batch, positions=batch["positions"][..., 0]))
    with pytest.raises(ValueError, match="lacks"):
        pmodel.forward(cfg, params, vlm_params(), {k: v for k, v in batch.items() if k != "segment_ids"})
    with pytest.raises(ValueError, match=r"lacks \['text_loss'\]"):
        pmodel.check_batch(cfg, {k: v for k, v in batch.items() if k != "text_loss"}, loss=True)
    with pytest.raises(ValueError, match=r"batch\['image_target'\] has shape \(1, 3\)"):
        pmodel.check_batch(cfg, dict(batch, image_target=batch["image_target"][:, :3]), loss=True)
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 4, 8\)"):
        pmodel.forward(cfg, params, vlm_params(), batch, latents=jnp.zeros((1, 4, 4, 8)))
